"""`python bench/ab_commits.py REV`: a `cli.py train` step of commit REV against the working tree (or
`--new REV2`), at 128 px on the CPU, both measured at the same moments.

What it is for: a change to the training step or the data stream is compared with the commit before it,
side by side (issue 15 found a step ~10 % slower than at 0756a7e). On a shared or virtual machine the pace of
one run drifts by 5-15 % from minute to minute, more than the differences worth finding, so runs one after
the other (even interleaved) need many rounds to see 2 %. Here the two trees train *at the same time*, each
pinned to its own core with one torch thread, so whatever the machine does to one it does to the other; the
cores swap every round. Each run is `python cli.py train` of the tree under test (SD 1.x VAE architecture with
random weights, LPIPS with a random VGG16 + PatchGAN from step 0, batch 2, fp32, otherwise the tree's
defaults), on shards this checkout encodes once; the seconds per step come from each run's metrics.jsonl
(run.log_every_steps=1), the first step (the DataLoader workers' start) dropped. Needs 2 cores and git.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from bench.train_loop import OVERRIDES, prepare
from vaedec.vae import SD_VAE_CONFIG

WORKTREE = "WORKTREE"  # the working tree as it is, uncommitted changes included
BATCH = 2  # data.batch_size_per_device of every run (the issue-15 setting)


def checkout(rev: str, where: Path) -> Path:
    """A tree of `rev`: the working tree itself, or a detached `git worktree` of the commit under `where`."""
    if rev == WORKTREE:
        return ROOT
    path = where / rev.replace("/", "_")
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), rev],
        check=True,
        capture_output=True,
    )
    return path


def start_run(tree: Path, shards: Path, run: Path, steps: int, core: int) -> subprocess.Popen:
    """`cli.py train` of `tree`, one torch thread, pinned to `core` (its DataLoader workers too: the child
    pins itself before anything starts, not a preexec_fn in this threaded process)."""
    env = {
        **os.environ,
        "PYTHONPATH": str(tree),
        "HF_HUB_OFFLINE": "1",
        "TQDM_DISABLE": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    pinned = (
        f"import os, runpy, sys; os.sched_setaffinity(0, {{{core}}}); sys.argv = sys.argv[1:]; "
        "runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    cmd = [
        sys.executable,
        "-c",
        pinned,
        str(tree / "cli.py"),
        "train",
        str(shards),
        "--output",
        str(run),
        "--no-export",
        *OVERRIDES,
        f"data.batch_size_per_device={BATCH}",
        f"run.max_steps={steps}",
    ]
    return subprocess.Popen(cmd, env=env, cwd=tree, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def step_seconds(run: Path, steps: int) -> list[float]:
    """Seconds of each step after the first, from the run's metrics.jsonl (BATCH / images_per_s)."""
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    paces = [m["images_per_s"] for m in lines if "images_per_s" in m]
    assert len(paces) == steps, f"{run}: {len(paces)} logged steps of {steps}"
    return [BATCH / p for p in paces[1:]]


def measure(
    old: str, new: str, rounds: int, steps: int, resolution: int = 128, vae_config: dict | None = None
) -> list[tuple[float, float]]:
    """Per round, (median s/step of `old`, of `new`), the two trained at the same time on two cores."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        raise click.ClickException("needs 2 cores: the two trees train at the same time, one core each")
    result = []
    with tempfile.TemporaryDirectory(prefix="vaedec-ab-") as tmp:
        tmp = Path(tmp)
        trees: dict[str, Path] = {}
        try:
            for key, rev in (("old", old), ("new", new)):  # one by one: `finally` removes what was made
                trees[key] = checkout(rev, tmp / "trees")
            _, shards = prepare(tmp, resolution, vae_config or SD_VAE_CONFIG)
            for r in range(rounds):
                placed = dict(zip(("old", "new"), cores[:2] if r % 2 == 0 else cores[1::-1]))
                procs = {k: start_run(trees[k], shards, tmp / f"{k}-{r}", steps, placed[k]) for k in trees}
                for k, p in procs.items():
                    if p.wait():
                        err = p.stderr.read().decode()[-3000:]
                        raise click.ClickException(f"{k} ({trees[k]}) failed:\n{err}")
                medians = [statistics.median(step_seconds(tmp / f"{k}-{r}", steps)) for k in ("old", "new")]
                result.append((medians[0], medians[1]))
                print(
                    f"round {r + 1}: old {medians[0]:.3f} s/step (core {placed['old']}), new "
                    f"{medians[1]:.3f} s/step (core {placed['new']}), new/old {medians[1] / medians[0]:.3f}",
                    flush=True,
                )
        finally:
            for tree in trees.values():
                if tree != ROOT:
                    subprocess.run(
                        ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                        capture_output=True,
                        check=False,
                    )  # a leftover worktree: `git worktree prune`
    return result


@click.command(context_settings={"show_default": True})
@click.argument("old")
@click.option(
    "--new", default=WORKTREE, help="The commit to compare with OLD; WORKTREE: this checkout as is."
)
@click.option("--rounds", type=click.IntRange(1), default=2, help="Rounds; the cores swap every round.")
@click.option("--steps", type=click.IntRange(2), default=14, help="Steps per run (the first is dropped).")
def main(old: str, new: str, rounds: int, steps: int) -> None:
    """A `cli.py train` step of OLD against NEW, both training at once, one core and one thread each."""
    result = measure(old, new, rounds, steps)
    ratios = [n / o for o, n in result]
    print(
        f"{old} vs {new}: 128 px, batch 2, fp32, LPIPS (random VGG16) + GAN, 1 torch thread each, "
        f"{rounds} rounds of {steps} steps"
    )
    print(
        f"median s/step: old {statistics.median(o for o, _ in result):.3f}, new "
        f"{statistics.median(n for _, n in result):.3f}; new/old per round "
        f"{', '.join(f'{x:.3f}' for x in ratios)}; geometric mean {statistics.geometric_mean(ratios):.3f}"
    )


if __name__ == "__main__":
    main()
