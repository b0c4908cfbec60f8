"""`python bench/train_loop.py`: a step of `cli.py train` against the bare decoder step, at 128 px on the CPU.

bench/train_step.py times the loss's pieces inside one process; this times what a run takes per step. Each
round runs `python cli.py train SHARDS ...` as a subprocess on the SD 1.x VAE architecture (random weights),
LPIPS (random VGG16) + PatchGAN from step 0, batch 2, fp32, otherwise the default config (DataLoader workers,
EMA, the non-finite checks, the data position, the stop agreement, the heap kept between steps), with
run.log_every_steps=1 so that metrics.jsonl holds every step's images/s; the run's first step (the workers'
start) is dropped. Then, in this process, the bare decoder step on the same model, batch and resolution:
forward, L1, backward, Adam. (train) / (bare) is what everything around the decoder costs; it moves when the
loop gets slower (issue 15 found a step ~10 % slower than at 0756a7e: glibc faulted the activations a step had
freed back in at every step). Train runs and bare steps alternate round by round, so a busy machine slows both
alike; the figures are medians.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import click
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from bench.common import Row, copy_photos
from vaedec.config import EncodeConfig
from vaedec.device import keep_freed_heap
from vaedec.encode import encode
from vaedec.images import batch_to_model
from vaedec.latents import sample_latent
from vaedec.shards import collate, read_manifest, read_samples, shard_paths
from vaedec.vae import SD_VAE_CONFIG, TrainableDecoder, load_vae

MODEL = (
    f"SD 1.x VAE architecture {SD_VAE_CONFIG['block_out_channels']}, random weights; LPIPS random VGG16; "
    "PatchGAN"
)
# The issue-15 setting: LPIPS + GAN from the first step, batch 2, fp32; nothing else changed from the defaults
# but what makes the run short and its per-step pace readable.
OVERRIDES = [
    "loss.disc_start_step=0",
    "loss.lpips_random_backbone=true",
    "run.log_every_steps=1",
]


@dataclass(frozen=True)
class LoopResult:
    """Seconds per step of the two variants, with what they ran on."""

    train: list[float]  # `cli.py train` steps (after each run's first), seconds
    bare: list[float]  # bare decoder steps, seconds
    batch_size: int
    resolution: int
    rounds: int
    steps: int

    def images_per_s(self, which: str) -> float:
        times = self.train if which == "train" else self.bare
        return self.batch_size / statistics.median(times)


def prepare(root: Path, resolution: int, vae_config: dict) -> tuple[Path, Path]:
    """(VAE folder, shard folder): `vae_config` with seeded random weights, and scikit-image's 8 colour
    photographs center-cropped to `resolution` and encoded with it."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae_dir = root / "vae"
    AutoencoderKL(**vae_config).save_pretrained(vae_dir)
    copy_photos(root / "photos")
    cfg = EncodeConfig(
        src=str(root / "photos"),
        out=str(root / "shards"),
        vae=str(vae_dir),
        resolution=resolution,
        batch_size=8,
        num_workers=0,
    )
    assert encode(cfg).samples > 0
    return vae_dir, root / "shards"


def train_steps(shards: Path, run: Path, steps: int, batch_size: int) -> list[float]:
    """Seconds of each step after the first of a `cli.py train` subprocess, from its metrics.jsonl."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    cmd = [sys.executable, str(ROOT / "cli.py"), "train", str(shards), "--output", str(run), "--no-export",
           *OVERRIDES, f"data.batch_size_per_device={batch_size}", f"run.max_steps={steps}"]
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    paces = [m["images_per_s"] for m in lines if "images_per_s" in m]
    assert len(paces) == steps, f"{len(paces)} logged steps of {steps}"
    return [batch_size / p for p in paces[1:]]


def bare_steps(vae_dir: Path, shards: Path, steps: int, batch_size: int) -> list[float]:
    """Seconds of `steps` bare decoder steps (after one untimed): z from the shards' moments, forward, L1 to
    the pixels, backward, Adam; on the decoder `train` trains (post_quant_conv + decoder)."""
    keep_freed_heap()  # as train does on the CPU: the floor is the decoder's arithmetic, not page faults
    torch.manual_seed(0)
    decoder = TrainableDecoder(load_vae(str(vae_dir))).train()
    opt = torch.optim.Adam(decoder.parameters(), lr=1e-6, betas=(0.5, 0.9))
    batch = collate(list(read_samples(shard_paths(shards, read_manifest(shards)), batch_size)))
    x, noise = batch_to_model(batch, torch.device("cpu")), torch.Generator().manual_seed(0)
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        x_rec, _ = decoder(sample_latent(batch["moments"], "sample", noise))
        (x_rec - x).abs().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t0)
    return times


def measure(rounds: int = 3, steps: int = 8, batch_size: int = 2, resolution: int = 128,
            vae_config: dict | None = None) -> LoopResult:
    """`rounds` times: one `cli.py train` run of `steps` steps, then `steps` bare decoder steps."""
    train, bare = [], []
    with tempfile.TemporaryDirectory(prefix="vaedec-bench-") as tmp:
        vae_dir, shards = prepare(Path(tmp), resolution, vae_config or SD_VAE_CONFIG)
        for r in range(rounds):
            train += train_steps(shards, Path(tmp) / f"run-{r}", steps, batch_size)
            bare += bare_steps(vae_dir, shards, steps, batch_size)
    return LoopResult(train, bare, batch_size, resolution, rounds, steps)


def rows(r: LoopResult) -> list[Row]:
    """The train-loop section of bench/all.py's table; the reference is the bare decoder step."""
    bare = r.images_per_s("bare")
    return [
        Row("train loop", f"bare decoder fwd + bwd + Adam, L1 ({r.resolution} px)", bare, "images/s", 1.0),
        Row("train loop", f"`cli.py train` step: LPIPS + GAN + EMA, data, logs ({r.resolution} px)",
            r.images_per_s("train"), "images/s", r.images_per_s("train") / bare, "of the bare step"),
    ]


@click.command(context_settings={"show_default": True})
@click.option(
    "--rounds", type=click.IntRange(1), default=3, help="Alternating rounds of a train run and bare steps."
)
@click.option(
    "--steps",
    type=click.IntRange(2),
    default=8,
    help="Steps per train run (the first is dropped) and bare steps per round.",
)
def main(rounds: int, steps: int) -> None:
    """Seconds per step of `cli.py train` and of the bare decoder step, 128 px, CPU, side by side."""
    r = measure(rounds, steps)
    threads = torch.get_num_threads()
    print(f"{MODEL}; {r.resolution} px, batch size {r.batch_size}, fp32, {threads} torch threads")
    for which, times in (("cli.py train step", r.train), ("bare decoder step", r.bare)):
        print(
            f"{which:<20} median {statistics.median(times):.3f} s/step  (min-max "
            f"{min(times):.2f}-{max(times):.2f}, {len(times)} steps)"
        )
    print(f"ratio                {statistics.median(r.train) / statistics.median(r.bare):.3f}x the bare step")


if __name__ == "__main__":
    main()
