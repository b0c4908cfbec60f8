"""The stand-in *pretrained* VAEs: small VAEs trained (encoder and decoder) on photographs, offline.

No pretrained SD VAE can be downloaded on an offline machine, so the demo and the quality experiment use this one:
trained on `domains.photos(split="train")` the way SD's VAE was trained on photographs (L1 reconstruction plus a
tiny KL), in SD's block layout at a fraction of its size. It is *pretrained on a source domain*; fine-tuning its
decoder on `domains.rendered_text` is then the same story as fine-tuning SD's decoder on documents or anime.

    python -m vaedec.source_vae --out assets/source-vae      # or: make source-vae
    python -m vaedec.source_vae --family qwenimage --out assets/source-vae-qwenimage   # make source-vae-qwenimage

Two families: `kl`, diffusers' AutoencoderKL in SD's block layout (4 latent channels), and `qwenimage`, diffusers'
AutoencoderKLQwenImage in Qwen-Image / Wan 2.1's layout (causal 3-D convolutions, RMS norms, 16 latent channels,
images as one-frame videos (B, 3, 1, H, W)): the stand-in for fine-tuning Qwen-Image's decoder as its authors did.

Deterministic on CPU for a given seed, thread count and torch build. Saved atomically as a diffusers folder plus
`training.json` (settings, losses, latent statistics, wall time).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch
from diffusers import AutoencoderKL, AutoencoderKLQwenImage
from PIL import Image

from vaedec.images import load_rgb, to_model_range
from vaedec.latents import LOGVAR_MAX, LOGVAR_MIN, encode_moments, split_moments


@dataclass(frozen=True)
class SourceVAEConfig:
    family: str = "kl"  # "kl": AutoencoderKL, SD's layout; "qwenimage": AutoencoderKLQwenImage (Qwen-Image, Wan 2.1)
    block_out_channels: tuple[int, ...] = (32, 64, 96)  # 3 levels: downsampling factor 4; 1.6 M parameters
    layers_per_block: int = 1  # resnets per encoder block (decoder blocks get one more, as in SD)
    latent_channels: int = 4  # SD's
    resolution: int = 64  # px, square training crops
    batch_size: int = 8  # crops per step
    steps: int = 600  # optimizer steps: about 9 CPU minutes
    lr: float = 1e-3  # Adam peak learning rate; cosine decay to 0 after warmup
    warmup_steps: int = 50  # linear warmup
    mse_weight: float = 0.5  # loss = L1 + mse_weight * MSE + kl_weight * KL; MSE pushes PSNR, L1 keeps edges
    kl_weight: float = 1e-6  # per element, like SD's: KL summed over latents vs reconstruction summed over pixels
    seed: int = 0  # weights, crops, flips and posterior noise
    threads: int = 1  # torch.set_num_threads: results depend on it, so it is fixed and recorded. 1, not 2: on a
    # shared 2-core machine two OpenMP threads spin-wait and cost 4x the CPU time per step (measured)


# The qwenimage stand-in: Qwen-Image's 16 latent channels, widths 16/32/64 (1.9 M parameters, close to the kl
# one's 1.6 M: its 3x3x3 kernels hold 3x the weights of 3x3 ones), downsampling factor 4 as the kl one.
QWENIMAGE = {"family": "qwenimage", "block_out_channels": (16, 32, 64), "latent_channels": 16}
FAMILIES = ("kl", "qwenimage")


def build_vae(cfg: SourceVAEConfig) -> AutoencoderKL | AutoencoderKLQwenImage:
    """A randomly initialised VAE of `cfg.family` (seeded by the caller)."""
    if cfg.family == "kl":
        return AutoencoderKL(**source_vae_config(cfg))
    if cfg.family == "qwenimage":
        base = cfg.block_out_channels[0]
        return AutoencoderKLQwenImage(
            base_dim=base, z_dim=cfg.latent_channels, dim_mult=[c // base for c in cfg.block_out_channels],
            num_res_blocks=cfg.layers_per_block, temperal_downsample=[False] * (len(cfg.block_out_channels) - 1),
            latents_mean=[0.0] * cfg.latent_channels, latents_std=[1.0] * cfg.latent_channels,
        )
    raise ValueError(f"unknown source VAE family {cfg.family!r}; one of {', '.join(FAMILIES)}")


def posterior(vae: AutoencoderKL | AutoencoderKLQwenImage, x: torch.Tensor) -> torch.Tensor:
    """Pixels (B, 3, H, W) -> moments (B, 2C, H/f, W/f), mean ‖ logvar unclamped, with gradients."""
    if isinstance(vae, AutoencoderKLQwenImage):  # an image is a one-frame video: (B, 3, 1, H, W)
        return vae.encode(x.unsqueeze(2)).latent_dist.parameters.squeeze(2)
    return vae.quant_conv(vae.encoder(x))


def decode(vae: AutoencoderKL | AutoencoderKLQwenImage, z: torch.Tensor) -> torch.Tensor:
    """z (B, C, h, w) -> pixels (B, 3, H, W); the qwenimage decoder's output is clamped to [-1, 1] (diffusers')."""
    if isinstance(vae, AutoencoderKLQwenImage):
        return vae.decode(z.unsqueeze(2)).sample.squeeze(2)
    return vae.decode(z).sample


def source_vae_config(cfg: SourceVAEConfig) -> dict:
    """SD's AutoencoderKL block layout (mid-block attention included) at `cfg`'s widths and depth."""
    levels = len(cfg.block_out_channels)
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * levels,
        "up_block_types": ("UpDecoderBlock2D",) * levels,
        "block_out_channels": tuple(cfg.block_out_channels),
        "layers_per_block": cfg.layers_per_block,
        "latent_channels": cfg.latent_channels,
        "norm_num_groups": 8,
        "sample_size": cfg.resolution,
    }


def load_pyramid(folder: Path, resolution: int) -> list[torch.Tensor]:
    """Every image in `folder` at several scales, uint8 (3, H, W) each, shorter side from 1.5 x resolution to full.

    Random crops from random scales: a 64 px crop of a 512 px photo at full size is only texture, at 96 px it is
    the whole scene; SD's VAE saw both (256 px crops of images of every size).
    """
    levels = []
    for p in sorted(folder.iterdir()):
        im = load_rgb(str(p))
        short = min(im.size)
        sides = sorted({s for s in (int(1.5 * resolution), 2 * resolution, 3 * resolution, 4 * resolution, short)
                        if s <= short})
        for side in sides:
            scale = side / short
            size = (max(resolution, round(im.size[0] * scale)), max(resolution, round(im.size[1] * scale)))
            r = im if size == im.size else im.resize(size, Image.Resampling.LANCZOS)
            levels.append(torch.from_numpy(np.asarray(r).copy()).permute(2, 0, 1))
    return levels


def random_crops(levels: list[torch.Tensor], n: int, resolution: int, rng: random.Random) -> torch.Tensor:
    """n random crops (a random image scale, position, horizontal flip) -> float (n, 3, res, res) in [-1, 1]."""
    crops = []
    for _ in range(n):
        im = levels[rng.randrange(len(levels))]
        top, left = rng.randint(0, im.shape[1] - resolution), rng.randint(0, im.shape[2] - resolution)
        c = im[:, top : top + resolution, left : left + resolution]
        crops.append(c.flip(2) if rng.random() < 0.5 else c)
    return to_model_range(torch.stack(crops))


def kl_per_element(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) summed over latent elements, averaged over the batch (LDM's kl())."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=(1, 2, 3)).mean()


def vae_loss(x: torch.Tensor, x_rec: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor,
             cfg: SourceVAEConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """L1 + mse_weight * MSE (pixel means) + kl_weight * KL / pixels-per-image; returns (loss, logs).

    Dividing the summed KL by the pixel count is LDM's weighting (sum of |x - x_rec| over pixels + 1e-6 * KL sum)
    expressed in per-pixel means, so kl_weight=1e-6 means what it meant for SD's VAE.
    """
    l1 = (x - x_rec).abs().mean()
    mse = (x - x_rec).pow(2).mean()
    kl = kl_per_element(mean, logvar)
    loss = l1 + cfg.mse_weight * mse + cfg.kl_weight * kl / x[0].numel()
    return loss, {"l1": l1.item(), "mse": mse.item(), "kl": kl.item()}


def lr_at(step: int, cfg: SourceVAEConfig) -> float:
    """Linear warmup to cfg.lr, then cosine decay to 0 at cfg.steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


@contextmanager
def deterministic(cfg: SourceVAEConfig) -> Iterator[None]:
    """Seed torch, fix the thread count and force deterministic kernels; restore the process's settings after.

    Same config + same torch build = same weights. Restoring matters: these are process-wide switches, and a test
    or a caller that trains a source VAE should not find its other work single-threaded afterwards.
    """
    threads, strict = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(strict)


def train_source_vae(
    images: Path, cfg: SourceVAEConfig, progress: bool = True
) -> tuple[AutoencoderKL | AutoencoderKLQwenImage, list[float]]:
    """Train encoder + decoder from scratch on random crops of the images in `images`; returns (vae, losses)."""
    with deterministic(cfg):
        return _train(images, cfg, progress)


def _train(
    images: Path, cfg: SourceVAEConfig, progress: bool
) -> tuple[AutoencoderKL | AutoencoderKLQwenImage, list[float]]:
    from tqdm import tqdm

    vae = build_vae(cfg).train()
    opt = torch.optim.Adam(vae.parameters(), lr=cfg.lr)
    levels = load_pyramid(images, cfg.resolution)
    rng = random.Random(cfg.seed)
    noise = torch.Generator().manual_seed(cfg.seed)
    losses = []
    bar = tqdm(range(cfg.steps), desc="source VAE", unit="step", disable=not progress)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        x = random_crops(levels, cfg.batch_size, cfg.resolution, rng)  # (B, 3, res, res)
        moments = posterior(vae, x)  # (B, 2C, res/4, res/4) mean ‖ logvar, unclamped
        mean, logvar = moments.chunk(2, dim=1)
        logvar = logvar.clamp(-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution range
        z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=noise)
        x_rec = decode(vae, z)
        loss, logs = vae_loss(x, x_rec, mean, logvar, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(l1=f"{logs['l1']:.4f}", kl=f"{logs['kl']:.0f}")
    return vae.eval(), losses


def moments_of(vae: AutoencoderKL | AutoencoderKLQwenImage, x: torch.Tensor) -> torch.Tensor:
    """Pixels (B, 3, H, W) -> moments (B, 2C, h, w) with logvar clamped, no gradients (as encode stores them)."""
    if isinstance(vae, AutoencoderKL):
        return encode_moments(vae, x)
    with torch.no_grad():
        mean, logvar = posterior(vae, x).float().chunk(2, dim=1)
    return torch.cat([mean, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)], dim=1)


@torch.no_grad()
def latent_stats(vae: AutoencoderKL | AutoencoderKLQwenImage, images: Path, cfg: SourceVAEConfig,
                 n: int = 512) -> dict[str, Any]:
    """Posterior statistics on n seeded training crops: std and mean of the means, mean posterior std.

    scaling_factor = 1 / std(mean), as SD's 0.18215 was derived, so scaled latents have unit variance for a UNet.
    Per channel too (latents_mean / latents_std): the normalisation Qwen-Image and Wan pipelines apply.
    """
    levels = load_pyramid(images, cfg.resolution)
    x = random_crops(levels, n, cfg.resolution, random.Random(cfg.seed + 1))
    mean, logvar = split_moments(torch.cat([moments_of(vae, b) for b in x.split(64)]))
    std_of_mean = float(mean.std())
    per_channel = {
        "latents_mean": [round(float(v), 4) for v in mean.mean(dim=(0, 2, 3))],
        "latents_std": [round(float(v), 4) for v in mean.std(dim=(0, 2, 3))],
    } if cfg.family == "qwenimage" else {}
    return {**per_channel,
        "latent_mean_mean": float(mean.mean()),
        "latent_mean_std": std_of_mean,
        "posterior_std_mean": float(torch.exp(0.5 * logvar).mean()),
        "scaling_factor": round(1.0 / std_of_mean, 5),
        "crops": n,
    }


def tiles(path: Path, resize: int, tile: int) -> torch.Tensor:
    """One image: shorter side resized to `resize`, its center resize² square cut into tile² pieces, [-1, 1]."""
    im = load_rgb(str(path))
    s = resize / min(im.size)
    w, h = round(im.size[0] * s), round(im.size[1] * s)
    im = im.resize((w, h), Image.Resampling.LANCZOS)
    left, top = (w - resize) // 2, (h - resize) // 2
    x = torch.from_numpy(np.asarray(im.crop((left, top, left + resize, top + resize))).copy()).permute(2, 0, 1)
    pieces = x.unfold(1, tile, tile).unfold(2, tile, tile)  # (3, n, n, tile, tile)
    return to_model_range(pieces.permute(1, 2, 0, 3, 4).reshape(-1, 3, tile, tile))


@torch.no_grad()
def reconstruction_psnr(vae: AutoencoderKL | AutoencoderKLQwenImage, folder: Path, resize: int = 128,
                        tile: int = 64) -> float:
    """Mean PSNR (dB, per tile) of decode(z = mean) over tile x tile pieces of every image in `folder`."""
    from vaedec.metrics import reconstruction_metrics

    x = torch.cat([tiles(p, resize, tile) for p in sorted(folder.iterdir())])
    rec = torch.cat([decode(vae, split_moments(moments_of(vae, b))[0]) for b in x.split(64)])
    return reconstruction_metrics(x, rec, None)["psnr"]


def save_atomic(vae: AutoencoderKL | AutoencoderKLQwenImage, out: Path, record: dict) -> None:
    """save_pretrained + training.json into a temp folder next to `out`, then swap it in."""
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    vae.save_pretrained(tmp, safe_serialization=True)
    # mkdtemp makes the folder 0700; a shipped asset should get the usual permissions (umask 022: 0755/0644).
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    for f in tmp.iterdir():
        f.chmod(0o666 & ~umask)
    (tmp / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    old = out.with_name(f".{out.name}-old")
    if out.exists():  # keep files others put there (e.g. README.md, the model card)
        for extra in out.iterdir():
            if not (tmp / extra.name).exists():
                shutil.copy2(extra, tmp / extra.name)
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _git_commit() -> str:
    """HEAD's short hash, with "+dirty" when vaedec/ has uncommitted changes; "unknown" outside a checkout."""
    try:
        cwd = Path(__file__).parent
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=cwd,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "."], capture_output=True, text=True, cwd=cwd,
                               check=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@click.command()
@click.option("--out", default="assets/source-vae", show_default=True, type=click.Path(file_okay=False, path_type=Path),
              help="Diffusers folder to write (replaced atomically; a README.md already there is kept).")
@click.option("--steps", default=SourceVAEConfig.steps, show_default=True, type=click.IntRange(1),
              help="Optimizer steps of batch 8 (about 1 CPU-second each on one core).")
@click.option("--seed", default=SourceVAEConfig.seed, show_default=True, type=int,
              help="Seeds the weights, crops, flips and posterior noise.")
@click.option("--family", type=click.Choice(FAMILIES), default="kl", show_default=True,
              help="kl: AutoencoderKL (SD's layout, 4 latent channels); qwenimage: AutoencoderKLQwenImage "
                   "(Qwen-Image / Wan 2.1's causal 3-D layout, 16 latent channels).")
@click.option("--threads", default=SourceVAEConfig.threads, show_default=True, type=click.IntRange(1),
              help="CPU threads; the weights depend on it, so it is recorded.")
def main(out: Path, steps: int, seed: int, family: str, threads: int) -> None:
    """Train the stand-in pretrained VAE on scikit-image's photographs (train split) and save it to OUT.

    Encoder and decoder, L1 + MSE + 1e-6 KL, 64 px crops, downsampling factor 4, 4 latent channels (qwenimage: 16).
    Then measures reconstruction PSNR on the held-out photographs and on rendered text, and sets scaling_factor =
    1 / std of the latent means on training crops (qwenimage: latents_mean / latents_std per channel, as its
    pipelines use). Everything it measured goes into OUT/training.json.
    """
    from vaedec.domains import photos, rendered_text

    preset = QWENIMAGE if family == "qwenimage" else {}
    cfg = SourceVAEConfig(**preset, steps=steps, seed=seed, threads=threads)
    commit = _git_commit()  # now, not after training: the code that trained is the code checked out at the start
    with tempfile.TemporaryDirectory() as d, deterministic(cfg):  # evaluation too runs on cfg.threads
        data = Path(d)
        photos(data / "train", "train")
        photos(data / "heldout", "heldout")
        rendered_text(data / "text", 48, seed=1)
        t0, cpu0 = time.time(), time.process_time()
        vae, losses = train_source_vae(data / "train", cfg)
        wall, cpu = time.time() - t0, time.process_time() - cpu0
        stats = latent_stats(vae, data / "train", cfg)
        if cfg.family == "qwenimage":  # its pipelines whiten per channel: (z - latents_mean) / latents_std
            vae.register_to_config(latents_mean=stats["latents_mean"], latents_std=stats["latents_std"])
        else:
            vae.register_to_config(scaling_factor=stats["scaling_factor"])
        psnr = {
            "heldout_photos": reconstruction_psnr(vae, data / "heldout"),
            "train_photos": reconstruction_psnr(vae, data / "train"),
            "rendered_text_seed1_n48": reconstruction_psnr(vae, data / "text"),
        }
    params = sum(p.numel() for p in vae.parameters())
    record = {
        "config": asdict(cfg),
        "vaedec_commit": commit,
        "torch": torch.__version__,
        "parameters": params,
        "train_wall_s": round(wall, 1),
        "train_cpu_s": round(cpu, 1),
        "loss_first_50": float(np.mean(losses[:50])),
        "loss_last_50": float(np.mean(losses[-50:])),
        "psnr_db": {k: round(v, 2) for k, v in psnr.items()},
        "latents": stats,
    }
    save_atomic(vae, out, record)
    click.echo(json.dumps(record, indent=2))
    click.echo(f"saved -> {out}")


if __name__ == "__main__":
    main()
