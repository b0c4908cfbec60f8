"""The benchmarks count what they measure: a first epoch through training's reader is exactly the samples
written, with 0 and with 1 DataLoader worker; the train-loop bench times every step of a real run. No timing
is asserted (benchmarks are not tests)."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import time

import pytest
from conftest import ROOT


def load_bench(name: str):
    """bench/NAME.py as a module (bench/ is a namespace package at the repository root, not installed)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module(f"bench.{name}")


def test_shard_read_bench_reads_every_sample_written_once() -> None:
    shard_read = load_bench("shard_read")
    # 8 photographs x 1 crop x 2 (mirrors) = 16 samples at 32 px; batch size 3 does not divide 16, so an epoch
    # ends inside a batch and the check covers the epoch boundary.
    r = shard_read.measure(resolution=32, crops_per_image=1, batch_size=3, epochs=2, rounds=1)
    assert r.samples == 2 * len(shard_read.PHOTOS)
    assert set(r.rates) == {0, 1} and all(v > 0 for v in r.rates.values())
    assert set(r.member_bytes) == {"moments.npy", "image.png", "json"}
    assert r.bytes_per_sample > sum(r.member_bytes.values())  # tar headers come on top of the members
    assert set(r.resume) == {"fresh", "recorded", "far", "replay"} and all(v > 0 for v in r.resume.values())


@pytest.mark.slow
def test_train_loop_bench_reads_every_step_of_a_real_run() -> None:
    """On the tests' tiny VAE at 32 px: one `cli.py train` run of 3 steps gives 2 timed steps (the first is
    dropped) from its metrics.jsonl, and 3 bare steps come next; the rows compare them."""
    from vaedec.vae import small_vae_config

    train_loop = load_bench("train_loop")
    r = train_loop.measure(
        rounds=1, steps=3, resolution=32, vae_config=small_vae_config((8, 16), sample_size=32)
    )
    assert len(r.train) == 2 and len(r.bare) == 3 and all(t > 0 for t in r.train + r.bare)
    bare, step = train_loop.rows(r)
    assert bare.ratio == 1.0 and step.ratio == pytest.approx(r.images_per_s("train") / r.images_per_s("bare"))


def test_gpu_bench_runs_in_its_cpu_quick_mode(tmp_path) -> None:
    """`make bench-gpu` cannot rot: its toy CPU run goes through every section and writes its document."""
    doc = tmp_path / "benchmarks-gpu.md"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu.py"), "--device", "cpu", "--quick", "--write", str(doc)],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    text = doc.read_text()
    assert "**Not GPU figures**" in text and "`--quick`: toy sizes" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| section")]
    sections = [row.split(" | ")[0][2:] for row in rows]
    assert sections == ["train step bf16 32 px"] * 4 + ["fp16 32 px"] * 4 + ["encode"] * 2 + ["max batch"] * 4
    assert "weights and scale all finite: yes" in text
    assert (
        sum("model FLOP utilisation" in row and "peak unknown" in row for row in rows) == 3
    )  # a CPU: no peak
    assert all("the cap 2 fits" in row for row in rows[-4:])  # the toy cap, never a CPU out-of-memory
    assert text.split("| section |")[1].split("\n\n")[0] in r.stdout  # printed as written


def test_gpu_bench_search_and_peak_table() -> None:
    gpu = load_bench("gpu")
    far = time.monotonic() + 60
    assert gpu.largest_batch(lambda b: b <= 37, 256, far) == (37, "out of memory")
    assert gpu.largest_batch(lambda b: b <= 37, 16, far) == (16, "cap")
    assert gpu.largest_batch(lambda b: False, 16, far) == (0, "out of memory")
    assert gpu.largest_batch(lambda b: True, 16, time.monotonic() - 1) == (0, "time")
    assert gpu.peak_tflops("NVIDIA H200") == 989 and gpu.peak_tflops("NVIDIA H100 PCIe") == 756
    assert (
        gpu.peak_tflops("NVIDIA A100-SXM4-80GB") == 312 and gpu.peak_tflops("NVIDIA GeForce RTX 4090") is None
    )
    assert gpu.peak_tflops(None) is None


@pytest.mark.slow
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="the two trees train at once, one core each")
def test_commit_ab_trains_both_trees_at_once_and_removes_its_worktree() -> None:
    """bench/ab_commits.py on the tests' tiny VAE at 32 px: HEAD (a git worktree it makes) against this
    checkout, one round of 3 steps; each side's median comes from its own run's metrics, and the worktree is
    gone afterwards."""
    from vaedec.vae import small_vae_config

    ab = load_bench("ab_commits")

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=False)

    if git("rev-parse", "HEAD").returncode:
        pytest.skip("not a git checkout")
    before = git("worktree", "list").stdout
    tiny = small_vae_config((8, 16), sample_size=32)
    ((old, new),) = ab.measure("HEAD", ab.WORKTREE, rounds=1, steps=3, resolution=32, vae_config=tiny)
    assert old > 0 and new > 0
    assert git("worktree", "list").stdout == before
