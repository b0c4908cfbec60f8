"""`python bench/threads.py SHARDS`: what a CPU training step costs with 1 and with 2 torch (OpenMP) threads.

Runs `cli.py train SHARDS --config CONFIG` as a subprocess per trial, with OMP_NUM_THREADS set (torch takes
its thread count from it), thread counts interleaved round by round so a busy machine weighs on each alike.
Each trial is a short and a long run; the difference over the extra steps gives the seconds per step, wall
and CPU (user + system of the process and its DataLoader workers, from the kernel's accounting of waited-for
children), free of start-up, final checkpoint and export. CPU / wall above the thread count means other
processes' load was not the limit; CPU per step growing with threads is what extra threads cost on busy cores
(OpenMP threads spin while they wait for each other).
"""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parent.parent


def trial(shards: str, config: str, steps: int, threads: int, out: Path) -> tuple[float, float]:
    """(wall s, CPU s) of one `train` of `steps` steps in a fresh run folder."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "HF_HUB_OFFLINE": "1",
        "TQDM_DISABLE": "1",
        "PYTHONPATH": str(ROOT),
    }
    cmd = [
        sys.executable,
        str(ROOT / "cli.py"),
        "train",
        shards,
        "--config",
        config,
        "--output",
        str(out),
        "--no-export",
        f"run.max_steps={steps}",
        "run.checkpoint_every_steps=0",
        "run.image_every_steps=0",
        "run.val_every_steps=0",
        "run.log_every_steps=1000",
    ]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


@click.command(context_settings={"show_default": True})
@click.argument("shards")
@click.option("--config", default=str(ROOT / "configs" / "demo.yaml"), help="Training config of every trial.")
@click.option("--steps", type=click.IntRange(2), default=60, help="Steps of the long run of a trial.")
@click.option("--short", type=click.IntRange(1), default=10, help="Steps of the short run of a trial.")
@click.option(
    "--rounds", type=click.IntRange(1), default=2, help="Interleaved rounds (median per thread count)."
)
@click.option("--threads", default="1,2", help="Thread counts to compare, comma-separated.")
def main(shards: str, config: str, steps: int, short: int, rounds: int, threads: str) -> None:
    """Seconds per training step, wall and CPU, per torch thread count, measured side by side."""
    counts = [int(t) for t in threads.split(",")]
    per_step: dict[int, list[tuple[float, float]]] = {t: [] for t in counts}
    loads = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix="vaedec-threads-") as tmp:
        for r in range(rounds):
            for t in counts:
                (w0, c0), (w1, c1) = (
                    trial(shards, config, n, t, Path(tmp) / f"r{r}-t{t}-{n}") for n in (short, steps)
                )
                per_step[t].append(((w1 - w0) / (steps - short), (c1 - c0) / (steps - short)))
                loads.append(os.getloadavg()[0])
                print(
                    f"round {r + 1}, {t} thread(s): {per_step[t][-1][0]:.3f} s/step wall, "
                    f"{per_step[t][-1][1]:.3f} s/step CPU, load {loads[-1]:.1f}",
                    file=sys.stderr,
                    flush=True,
                )
    print(
        f"{Path(config).name}, steps {short} -> {steps}, {rounds} interleaved rounds, {os.cpu_count()} "
        "cores; "
        f"1-minute load average {min(loads):.1f}-{max(loads):.1f} during the runs"
    )
    print(
        f"{'threads':>7} {'wall s/step':>12} {'CPU s/step':>11} {'CPU/wall':>9}   (median of rounds; each "
        "round)"
    )
    for t in counts:
        wall = statistics.median(w for w, _ in per_step[t])
        cpu = statistics.median(c for _, c in per_step[t])
        each = ", ".join(f"{w:.2f}/{c:.2f}" for w, c in per_step[t])
        print(f"{t:>7} {wall:>12.3f} {cpu:>11.3f} {cpu / wall:>9.2f}   ({each})")


if __name__ == "__main__":
    main()
