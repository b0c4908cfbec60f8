"""Resume that costs the same at any step: the data stream starts from a recorded position (epoch, shard,
sample, block offset per DataLoader role) after reading again at most the shards of one shuffle block, and
continues exactly as the uninterrupted stream, also with several workers; and a preempted run (SIGTERM)
checkpoints first."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import FAST_TRAIN, ROOT, cli, same_sample, shard_list

import vaedec.stream
from vaedec.checkpoint import list_checkpoints
from vaedec.shards import read_manifest
from vaedec.stream import TrainStream, new_position

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture
def opened(monkeypatch) -> list[str]:
    """The tars the streams in this process open, in order."""
    seen: list[str] = []
    real = vaedec.stream.iter_samples

    def counting(path: str):
        seen.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(vaedec.stream, "iter_samples", counting)
    return seen


def test_resume_many_epochs_in_reads_about_one_shard(shards, opened) -> None:
    """16 samples in 6 shards of <= 3, batch 3, blocks of 3: batch 60 is 11 epochs in. Resuming there opens at
    most the two shards one block can span, while reaching it from the start opened every shard 11 times."""
    listed = shard_list(shards)
    sizes = [e["samples"] for e in read_manifest(shards)["shards"]]
    assert max(sizes) >= 3  # so that one block of 3 spans at most two shards

    def make(positions: dict | None = None) -> TrainStream:
        return TrainStream(listed, 3, seed=7, shuffle_buffer=3, positions=positions)

    it = iter(make())
    full = [next(it) for _ in range(70)]
    assert full[60]["position"]["sets"][0]["epoch"] >= 10
    opened_from_start = len(opened)
    for at in (13, 37, 60):  # mid-block and block-boundary positions, many epochs in
        opened.clear()
        resumed = iter(make({0: full[at - 1]["position"]}))
        first = next(resumed)
        assert len(opened) <= 2, (at, opened)
        rest = [first] + [next(resumed) for _ in range(69 - at)]
        assert all(same_sample(a, b) for a, b in zip(full[at:], rest, strict=True)), at
    assert opened_from_start >= 11 * len(listed)


def test_resumed_dataloader_continues_with_the_right_worker(shards) -> None:
    """Two DataLoader workers deliver batches in turn; after an odd number of batches the resumed loader's
    worker 0 plays the role whose batch is next (first_role), and the sequence goes on unchanged."""

    def loader(positions: dict | None = None, first_role: int = 0) -> list[dict]:
        stream = TrainStream(
            shard_list(shards), 2, seed=3, shuffle_buffer=3, positions=positions, first_role=first_role
        )
        it = iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2))
        return [next(it) for _ in range(12)]

    full = loader()
    assert [b["worker"] for b in full[:4]] == [0, 1, 0, 1]
    consumed = 7
    # the last of each role, as train keeps it
    positions = {b["worker"]: b["position"] for b in full[:consumed]}
    resumed = loader(positions, first_role=consumed % 2)
    assert all(same_sample(a, b) for a, b in zip(full[consumed:], resumed[: 12 - consumed], strict=True))


def test_resume_with_other_stream_settings_warns_and_restarts_the_order(tmp_path, shards) -> None:
    run = tmp_path / "run"
    args = ["train", shards, "--output", run, *FAST_TRAIN, "--no-export", "run.checkpoint_every_steps=2"]
    cli(*args, "run.max_steps=2")
    state = json.loads((list_checkpoints(run)[-1] / "state.json").read_text())
    assert (
        state["data"]["fingerprint"] and state["data"]["positions"]["rank0"]["0"]["sets"][0] != new_position()
    )
    epochs = [json.loads(line)["data/epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0.0, 0.0]  # 4 of 12 training samples: still the first pass
    cli(*args, "run.max_steps=3", "data.shuffle_buffer=5")
    log = (run / "log.txt").read_text()
    assert "fresh data order" in log and "data.shuffle_buffer" in log, log


def test_sigterm_checkpoints_the_step_and_exits_so_a_rerun_resumes(tmp_path, shards) -> None:
    """SIGTERM to the whole process group (as SLURM sends it, DataLoader worker included): the run finishes
    its step, writes a checkpoint there and exits with 128 + 15; the same command resumes from that step."""
    run = tmp_path / "run"
    cmd = [sys.executable, "cli.py", "train", str(shards), "--output", str(run), *FAST_TRAIN, "--no-export",
           "data.num_workers=1", "run.max_steps=500", "run.checkpoint_every_steps=0", "run.log_every_steps=1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    log = tmp_path / "out.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            deadline = time.monotonic() + 120
            while (
                not (run / "metrics.jsonl").is_file()
                or len((run / "metrics.jsonl").read_text().splitlines()) < 2
            ):
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, log.read_text()
    step = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    assert [c.name for c in list_checkpoints(run)] == [f"step-{step:08d}"], log.read_text()
    assert 2 <= step < 500 and "stopped by SIGTERM" in (run / "log.txt").read_text()
    assert "rerun the same command to resume" in log.read_text()
    resumed = cli(*cmd[2:-3], f"run.max_steps={step + 1}")
    assert f"at step {step}" in resumed.output, resumed.output


def _worker_that_ignores_stop_signals() -> None:
    from vaedec.signals import ignore_stop_signals

    ignore_stop_signals()
    time.sleep(60)


def test_a_worker_ignores_foreign_stop_signals_but_not_its_parents_terminate() -> None:
    """DataLoader workers: SIGTERM/SIGUSR1 from another process (a scheduler) leave them running; the parent's
    terminate() (DataLoader shutdown, multiprocessing's exit) still ends them, or the parent would wait for
    ever."""
    import multiprocessing

    worker = multiprocessing.get_context("fork").Process(
        target=_worker_that_ignores_stop_signals, daemon=True
    )
    worker.start()
    try:
        time.sleep(0.5)  # the handler thread is up
        for sig in ("TERM", "USR1"):
            subprocess.run(["kill", f"-{sig}", str(worker.pid)], check=True)  # sent by `kill`, not the parent
        time.sleep(0.5)
        assert worker.is_alive()
        worker.terminate()
        worker.join(timeout=10)
        assert worker.exitcode == 0, worker.exitcode
    finally:
        if worker.is_alive():
            worker.kill()
