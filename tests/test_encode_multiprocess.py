"""`accelerate launch ... cli.py encode` with two CPU processes (gloo): the ranks encode disjoint blocks of
the inputs into their own shards, one manifest covers them, and the samples are those of a one-process encode.
A rank killed mid-way resumes from its own progress file; another process count on an unfinished OUT is
refused.

Both encodes run at --batch-size 1: a rank's first batch starts at its block's first input, so with larger
batches an image can meet other batch company than in a one-process encode, which on some backends moves a
moment by one float16 rounding step (the README says so for resume too).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, cli, free_port, make_images, tar_samples
from PIL import Image

from vaedec.shards import read_manifest, read_samples, shard_paths

RES = 32  # pixels; the tiny VAE downsamples by 2
N_INPUTS = 14  # 12 images and 2 broken files: broken.png is input 0 (rank 0), zz_broken.png input 13 (rank 1)
# ~2 samples a shard
ARGS = ("--resolution", RES, "--num-workers", 0, "--batch-size", 1, "--shard-size-mb", 0.02)

# Rank 1 dies right after recording its first shard: the launcher then stops rank 0 wherever it is.
DYING_RANK = """
import os
import vaedec.encode as enc
from vaedec.cli import main

real = enc._save_rank


def save_then_die(out, state, skips):
    real(out, state, skips)
    if state["rank"] == 1 and state["shards"]:
        os._exit(17)


enc._save_rank = save_then_die
main()
"""


def launch_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "true",
            "OMP_NUM_THREADS": "1"}


def launch(script: Path | str, src: Path, out: Path, vae: Path, log: Path) -> int:
    """`accelerate launch` two gloo processes of `script encode SRC OUT`; its exit code, output in `log`.
    (`accelerate launch --cpu --num_processes 2` starts ONE process without MPI: two need the torchrun
    launcher, --multi_gpu, with ACCELERATE_USE_CPU=true.)"""
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()),
        str(script), "encode", str(src), str(out), "--vae", str(vae), *map(str, ARGS),
    ]
    with open(log, "w") as f:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=launch_env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            proc.wait(timeout=300)
        finally:
            if proc.returncode is None:  # hung: stop the launcher and its ranks (one process group)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return proc.returncode


def samples(out: Path) -> dict[str, tuple[np.ndarray, np.ndarray, dict]]:
    """key -> (moments float16, pixels uint8, record) of every shard file in OUT, read with tarfile; a key
    stored twice fails."""
    found = {}
    for _, key, files in tar_samples(out):
        assert key not in found, f"{key} stored twice"
        with Image.open(io.BytesIO(files["image.png"])) as im:
            pixels = np.asarray(im).copy()
        moments = np.load(io.BytesIO(files["moments.npy"]), allow_pickle=False)
        found[key] = (moments, pixels, json.loads(files["json"]))
    return found


def skipped(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def encoded(tmp_path_factory, vae_dir) -> dict[str, Path]:
    """The same inputs encoded by one process (in this one) and by two launched processes."""
    root = tmp_path_factory.mktemp("mp-encode")
    src = root / "imgs"
    make_images(src, 12)
    rng = np.random.default_rng(0)
    (src / "broken.png").write_bytes(rng.bytes(300))
    (src / "zz_broken.png").write_bytes(rng.bytes(300))
    # In a process of its own with the ranks' environment: one torch thread each, as CPU convolutions can
    # round differently with another thread count.
    one = subprocess.run(
        [
            sys.executable,
            "cli.py",
            "encode",
            str(src),
            str(root / "one"),
            "--vae",
            str(vae_dir),
            *map(str, ARGS),
        ],
        check=False,
        cwd=ROOT,
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 3, one.stdout + one.stderr  # 3: the broken files were skipped
    log = root / "two.log"
    rc = launch("cli.py", src, root / "two", vae_dir, log)
    assert rc == 0, log.read_text()  # 0 under a launcher even with skips (any other code reads as a crash)
    return {"src": src, "one": root / "one", "two": root / "two", "log": log}


# ------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_processes_store_what_one_process_stores(encoded, vae_dir):
    one, two = encoded["one"], encoded["two"]
    a, b = samples(one), samples(two)
    assert sorted(a) == sorted(b) and len(b) == N_INPUTS - 2  # every readable input exactly once
    for key, (moments, pixels, record) in a.items():
        assert np.array_equal(moments, b[key][0]) and moments.dtype == b[key][0].dtype == np.float16, key
        assert np.array_equal(pixels, b[key][1]), key
        assert record == b[key][2], key

    # one manifest, written by the main process; the shards of both ranks, rank 0's first, inputs in order
    m1, m2 = (json.loads((d / "manifest.json").read_text()) for d in (one, two))
    assert m2["complete"] is True and m2["processes"] == 2 and m2["next_input"] == N_INPUTS
    assert m2["settings"] == m1["settings"]
    names = [e["name"] for e in m2["shards"]]
    assert sorted(names) == sorted(p.name for p in two.glob("shard-*.tar")) == names
    assert names[0].startswith("shard-r000-") and names[-1].startswith("shard-r001-")
    assert [e["inputs"][0] for e in m2["shards"]] == [0] + [e["inputs"][1] for e in m2["shards"][:-1]]
    assert [e["inputs"] for e in m2["shards"]].count([0, 0]) == 0 and m2["shards"][-1]["inputs"][
        1
    ] <= N_INPUTS
    assert N_INPUTS // 2 in [e["inputs"][0] for e in m2["shards"]]  # rank 1's block starts a shard
    per_shard = Counter(shard for shard, _, _ in tar_samples(two))
    assert {e["name"]: e["samples"] for e in m2["shards"]} == per_shard
    assert {k: v for k, v in m2["totals"].items() if k != "shards"} == {
        k: v for k, v in m1["totals"].items() if k != "shards"}
    assert m2["totals"]["inputs_skipped"] == 2 and m2["totals"]["shards"] == len(names)
    assert skipped(two) == skipped(one) and [r["source"] for r in skipped(two)] == [
        "broken.png",
        "zz_broken.png",
    ]
    assert not list(two.glob(".rank-*")) and not list(two.glob(".*.partial")) and not list(two.glob(".*.tmp"))

    # one summary, from the main process; the other tools read the folder as any other
    log = encoded["log"].read_text()
    assert log.count(f"{N_INPUTS - 2} samples in {len(names)} shards") == 1, log
    assert "skipped 2 inputs" in log
    verified = cli("inspect", two, "--verify")
    assert "status         complete" in verified.output and "every sample read back" in verified.output
    read = list(read_samples(shard_paths(two, read_manifest(two))))
    assert sorted(s["key"] for s in read) == sorted(a)
    again = cli("encode", encoded["src"], two, "--vae", vae_dir, *ARGS, code=3)
    assert "\nalready complete: 12 samples" in again.output  # one process on a complete OUT: nothing to do


@pytest.mark.slow
def test_killed_rank_resumes_and_another_process_count_is_refused(encoded, vae_dir, tmp_path):
    out = tmp_path / "killed"
    dying = tmp_path / "dying_rank.py"
    dying.write_text(DYING_RANK)
    rc = launch(dying, encoded["src"], out, vae_dir, tmp_path / "killed.log")
    assert rc != 0, (tmp_path / "killed.log").read_text()
    rank1 = json.loads((out / ".rank-001-of-002.json").read_text())
    assert len(rank1["shards"]) == 1 and not rank1["complete"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] is False and manifest["processes"] == 2

    # one process on this unfinished OUT: refused, saying how to finish it; nothing touched
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    refused = cli("encode", encoded["src"], out, "--vae", vae_dir, *ARGS, code=1)
    assert "unfinished encode by 2 processes" in refused.output and "--num_processes 2" in refused.output
    assert "--overwrite" in refused.output
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before

    # the same command again: each rank resumes from its file; the result is the uninterrupted one, byte for
    # byte
    log = tmp_path / "resumed.log"
    assert launch("cli.py", encoded["src"], out, vae_dir, log) == 0, log.read_text()
    reference = encoded["two"]
    names = sorted(p.name for p in out.glob("shard-*.tar"))
    assert names == sorted(p.name for p in reference.glob("shard-*.tar"))
    for name in names:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), f"{name} differs"
    m, ref = (json.loads((d / "manifest.json").read_text()) for d in (out, reference))
    assert m["shards"] == ref["shards"] and m["totals"] == ref["totals"] and m["complete"]
    assert skipped(out) == skipped(reference)
    assert len(samples(out)) == N_INPUTS - 2
    assert not list(out.glob(".rank-*")) and not list(out.glob(".*.partial")) and not list(out.glob(".*.tmp"))


def test_unfinished_one_process_out_is_refused_for_two(tmp_path, vae_dir, monkeypatch):
    import vaedec.encode as enc

    src, out = tmp_path / "imgs", tmp_path / "out"
    make_images(src, 6)
    real, calls = enc._write_state, []

    def dying_write_state(*a, **k):  # the second commit never finishes
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(*a, **k)

    monkeypatch.setattr(enc, "_write_state", dying_write_state)
    cli("encode", src, out, "--vae", vae_dir, *ARGS, code=1)  # click: "Aborted!"
    manifest = read_manifest(out)
    assert manifest["shards"] and not manifest["complete"] and "processes" not in manifest
    with pytest.raises(enc.EncodeError, match="unfinished encode by one process, this run has 2") as e:
        enc._resume_or_refuse(out, manifest["settings"], False, processes=2)
    assert "--overwrite" in str(e.value)


@pytest.mark.parametrize("n", [0, 1, 5, 14, 101])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_shares_are_contiguous_disjoint_and_cover_the_inputs(n, world):
    from vaedec.encode import share_of

    shares = [share_of(n, r, world) for r in range(world)]
    assert shares[0][0] == 0 and shares[-1][1] == n
    assert all(a[1] == b[0] for a, b in itertools.pairwise(shares))  # rank r ends where rank r+1 starts
    assert max(hi - lo for lo, hi in shares) - min(hi - lo for lo, hi in shares) <= 1


def test_a_launch_that_accelerate_cannot_connect_or_with_device_is_refused(tmp_path, vae_dir, monkeypatch,
                                                                           fresh_accelerate_state):
    src = tmp_path / "imgs"
    make_images(src, 1)
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets in each process it starts
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    lone = cli("encode", src, tmp_path / "a", "--vae", vae_dir, *ARGS, code=1)  # each would be rank 0 of 1
    assert "ACCELERATE_USE_CPU=true" in lone.output and not (tmp_path / "a").exists()
    device = cli("encode", src, tmp_path / "b", "--vae", vae_dir, "--device", "cpu", *ARGS, code=1)
    assert "each process uses its own device" in device.output and not (tmp_path / "b").exists()
