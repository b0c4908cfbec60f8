# The two commands a fresh machine needs: `make demo` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv test test-fast demo experiment preview source-vae source-vae-qwenimage bench bench-ab bench-gpu lint clean

# Re-install only when the project's dependencies change.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

demo: $(STAMP)
	$(PY) -m vaedec.demo --out demo

# Retrain the shipped stand-in pretrained VAE (assets/source-vae; about 10 CPU minutes). Its model card is kept.
source-vae: $(STAMP)
	$(PY) -m vaedec.source_vae --out assets/source-vae

# The same for a Qwen-Image / Wan 2.1-shaped VAE (AutoencoderKLQwenImage; about 20 CPU minutes).
source-vae-qwenimage: $(STAMP)
	$(PY) -m vaedec.source_vae --family qwenimage --out assets/source-vae-qwenimage

# Fine-tune the source VAE's decoder on rendered text with each shipped recipe; writes docs/quality.md.
experiment: $(STAMP)
	$(PY) -m vaedec.experiment --out experiment --docs docs

# A TAESD-style preview model for the source VAE's latents (about 5 CPU minutes); its section of docs/quality.md.
preview: $(STAMP)
	$(PY) -m vaedec.preview_experiment --out preview --docs docs

# One table of every benchmark, also written to docs/benchmarks.md. `make bench BENCH_FLAGS=--quick` is faster.
bench: $(STAMP)
	$(PY) bench/all.py --write docs/benchmarks.md $(BENCH_FLAGS)
	$(PY) bench/memory.py

# A `cli.py train` step of commit REV against this checkout, both training at once on one core each (minutes):
# `make bench-ab REV=0756a7e`. For a change to the training step or the data stream.
bench-ab: $(STAMP)
	$(PY) bench/ab_commits.py $(REV) $(AB_FLAGS)

# The GPU figures in one run on one CUDA GPU (bf16 256 px step vs bare decoder with MFU, fp16 with its grad scaler,
# encode, largest batch at 512/1024 px with and without checkpointing); writes docs/benchmarks-gpu.md.
# `python bench/gpu.py --device cpu --quick` is its toy CPU run (the test suite runs it).
bench-gpu: $(STAMP)
	$(PY) bench/gpu.py --write docs/benchmarks-gpu.md $(BENCH_FLAGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf demo runs experiment preview eval .pytest_cache
