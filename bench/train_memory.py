"""`python bench/train_memory.py`: peak memory of `cli.py train` on a small and a large data set, same steps.

`train` streams its shards, so its memory must not grow with the number of samples. This encodes two shard
folders of small samples through `vaedec.encode.encode` with the tests' tiny random VAE (32 px, downsampling
factor 2), e.g. 200 and 4000 samples in many small shards, then runs `python cli.py train SHARDS --config
configs/demo.yaml KEY=VALUE...` on each as a subprocess, with the same steps, batch size and shuffle buffer,
and reports each run's peak resident set size (the kernel's ru_maxrss of that process, from wait4). The batch
size and steps are chosen so the large run reads its whole data set once (the small one loops over its data).
data.num_workers=0 keeps the reading inside the measured process: with workers, ru_maxrss would report only
the largest single process, not their sum.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from bench.common import Row
from vaedec.config import EncodeConfig
from vaedec.encode import encode
from vaedec.vae import small_vae_config

RESOLUTION = 32  # pixels; the tiny VAE downsamples by 2, so moments are (8, 16, 16)
SOURCES = 100  # source images; each gives samples / SOURCES random crops
MODEL = "tiny random VAE (8, 16) (factor 2), as the tests' `tiny_vae`; 32 px samples; configs/demo.yaml"
# configs/demo.yaml with the tests' fast settings: no LPIPS, GAN from step 0, no periodic grids/validation/
# checkpoints (one of each at the end), no held-out shards (validation batches would scale with val_shards).
OVERRIDES = [
    "data.num_workers=0",
    "data.val_shards=0",
    "loss.perceptual_weight=0",
    "loss.disc_start_step=0",
    "loss.disc_ndf=8",
    "run.log_every_steps=50",
    "run.image_every_steps=0",
    "run.val_every_steps=0",
    "run.checkpoint_every_steps=0",
    "run.grid_samples=2",
]


@dataclass(frozen=True)
class MemoryResult:
    peak_mib: dict[int, float]  # samples in the data set -> peak RSS of the train process, MiB
    seconds: dict[int, float]  # samples -> wall time of the train process
    shards: dict[int, int]  # samples -> shard count
    steps: int
    batch_size: int
    setup: str


def write_shards(root: Path, vae_dir: Path, samples: int) -> tuple[Path, int]:
    """`samples` small samples (random crops of SOURCES smooth noisy images) in many small shards."""
    src = root / f"images-{samples}"
    src.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(SOURCES):
        small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        a = np.asarray(Image.fromarray(small).resize((64, 48), Image.Resampling.BICUBIC)).astype(np.int16)
        a = np.clip(a + rng.integers(-12, 13, a.shape), 0, 255).astype(np.uint8)
        Image.fromarray(a).save(src / f"img{i:04d}.png")
    out = root / f"shards-{samples}"
    cfg = EncodeConfig(
        src=str(src),
        out=str(out),
        vae=str(vae_dir),
        resolution=RESOLUTION,
        resize=40,
        crops_per_image=-(-samples // SOURCES),
        num_workers=0,
        batch_size=64,
        shard_size_mb=0.25,
    )
    result = encode(cfg)
    assert result.samples == SOURCES * cfg.crops_per_image, result
    return out, result.shards


# Runs argv[1:] and prints the child's peak RSS. A process's ru_maxrss survives exec and starts from its
# parent's at fork, so `train` forked straight from this (big) benchmark process would report at least this
# process's peak; forked from this small launcher instead, it reports its own.
LAUNCHER = """
import os, subprocess, sys
proc = subprocess.Popen(sys.argv[1:])
_, status, usage = os.wait4(proc.pid, 0)
print(f"peak_rss_kib {usage.ru_maxrss}", flush=True)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_train(
    shards: Path, run: Path, steps: int, batch_size: int, shuffle_buffer: int, extra: list[str]
) -> tuple[float, float]:
    """(peak RSS MiB, seconds) of one `python cli.py train` subprocess; its output goes to run/../NAME.log."""
    cmd = [
        sys.executable, "-c", LAUNCHER,
        sys.executable, str(ROOT / "cli.py"), "train", str(shards),
        "--config", str(ROOT / "configs" / "demo.yaml"), "--output", str(run), *OVERRIDES,
        f"run.max_steps={steps}", f"data.batch_size_per_device={batch_size}",
        f"data.shuffle_buffer={shuffle_buffer}", *extra,
    ]  # fmt: skip
    # One thread: on a busy shared machine two spinning OpenMP threads made a step of this tiny model take
    # seconds; the figure here is memory, which the thread count barely moves.
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "HF_HUB_OFFLINE": "1",
        "TQDM_DISABLE": "1",
        "OMP_NUM_THREADS": "1",
    }
    log = run.parent / f"{run.name}.log"
    t0 = time.perf_counter()
    with open(log, "wb") as f:
        code = subprocess.run(
            cmd, check=False, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT
        ).returncode
    elapsed = time.perf_counter() - t0
    text = log.read_text()
    if code:
        raise RuntimeError(f"train exited {code}:\n{text[-3000:]}")
    peak_kib = int(text.rsplit("peak_rss_kib ", 1)[1].split()[0])  # Linux: ru_maxrss in KiB
    return peak_kib / 1024, elapsed


def measure(
    sizes: tuple[int, int] = (200, 4000),
    steps: int = 250,
    batch_size: int = 16,
    shuffle_buffer: int = 1000,
    dtype: str = "fp32",
) -> MemoryResult:
    """Encode both data sets, then train on each (small first) with the same settings."""
    from diffusers import AutoencoderKL

    extra = ["run.mixed_precision=bf16"] if dtype == "bf16" else []
    with tempfile.TemporaryDirectory(prefix="vaedec-bench-") as tmp:
        root = Path(tmp)
        torch.manual_seed(0)
        vae_dir = root / "tiny-vae"
        AutoencoderKL(**small_vae_config((8, 16), sample_size=RESOLUTION)).save_pretrained(vae_dir)
        folders = {n: write_shards(root, vae_dir, n) for n in sizes}
        peak, seconds = {}, {}
        for n, (folder, _) in folders.items():
            peak[n], seconds[n] = run_train(
                folder, root / f"run-{n}", steps, batch_size, shuffle_buffer, extra
            )
    setup = (
        f"{steps} steps, batch size {batch_size}, shuffle buffer {shuffle_buffer}, data.num_workers=0, "
        "1 torch thread, "
        f"dtype {dtype}; " + ", ".join(f"{n} samples in {s} shards" for n, (_, s) in folders.items())
    )
    return MemoryResult(peak, seconds, {n: s for n, (_, s) in folders.items()}, steps, batch_size, setup)


def rows(r: MemoryResult) -> list[Row]:
    """The train-memory section of bench/all.py's table; the reference is the smaller data set."""
    small, large = sorted(r.peak_mib)
    return [
        Row("train memory", f"peak RSS of `train`, {small} samples", r.peak_mib[small], "MiB", 1.0),
        Row(
            "train memory",
            f"peak RSS of `train`, {large} samples",
            r.peak_mib[large],
            "MiB",
            r.peak_mib[large] / r.peak_mib[small],
            f"of {small} samples",
        ),
    ]


@click.command(context_settings={"show_default": True})
@click.option("--small", type=click.IntRange(1), default=200, help="Samples in the small data set.")
@click.option("--large", type=click.IntRange(1), default=4000, help="Samples in the large data set.")
@click.option("--steps", type=click.IntRange(1), default=250, help="Optimizer steps of each run.")
@click.option("--batch-size", type=click.IntRange(1), default=16, help="data.batch_size_per_device.")
@click.option(
    "--shuffle-buffer", type=click.IntRange(0), default=1000, help="data.shuffle_buffer (train's default)."
)
@click.option(
    "--dtype", type=click.Choice(["fp32", "bf16"]), default="fp32", help="bf16 = run.mixed_precision=bf16."
)
def main(small: int, large: int, steps: int, batch_size: int, shuffle_buffer: int, dtype: str) -> None:
    """Peak RSS of `cli.py train` on two data-set sizes, same steps: streaming means it must not grow."""
    r = measure((small, large), steps, batch_size, shuffle_buffer, dtype)
    print("vaedec train-memory benchmark (bench/train_memory.py)")
    print(f"model    {MODEL}")
    print(f"setup    {r.setup}")
    for n in (small, large):
        print(f"{n:>6} samples  peak RSS {r.peak_mib[n]:8.1f} MiB  ({r.seconds[n]:.1f} s)")
    print(
        f"ratio          {r.peak_mib[large] / r.peak_mib[small]:8.3f}x  (1.00 = does not grow with the data)"
    )


if __name__ == "__main__":
    main()
