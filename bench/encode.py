"""`python bench/encode.py`: what `cli.py encode` costs on top of the encoder itself.

Builds the SD 1.x VAE architecture with random weights (the speed does not depend on the values), writes N
source images, then measures in one run, on the same model, batch size, device and dtype:
  (a) end to end: `vaedec.encode.encode(EncodeConfig(...))`: model load, fingerprint, decode + crop, forward,
      fp16 conversion, PNG + npy encoding, tar writing, fsync;
  (b) encoder forward only: `vaedec.latents.encode_moments` on the same crops preloaded as tensors.
The ratio (a)/(b) is the pipeline's overhead: 1.0 means the encoder is the only cost.
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import click
import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from bench.common import Row
from vaedec.config import EncodeConfig
from vaedec.encode import encode
from vaedec.images import crop_boxes, crop_resize, load_rgb, to_model_range
from vaedec.latents import encode_moments
from vaedec.vae import DTYPES, SD_VAE_CONFIG, freeze, load_vae

SD_VAE = SD_VAE_CONFIG
MODEL = f"SD 1.x VAE architecture (block_out_channels {SD_VAE['block_out_channels']}), random weights"


def make_sources(folder: Path, n: int, size: tuple[int, int]) -> list[Path]:
    """n smooth random JPEGs (photo-like to decode: 8x8 colour field upsampled, a little noise)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        a = np.asarray(Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)).astype(np.int16)
        a = np.clip(a + rng.integers(-8, 9, a.shape), 0, 255).astype(np.uint8)
        p = folder / f"img{i:05d}.jpg"
        Image.fromarray(a).save(p, quality=90)
        paths.append(p)
    return paths


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_timer(
    vae_dir: Path, sources: list[Path], cfg: EncodeConfig, device: torch.device
) -> Callable[[], float]:
    """A function timing encode_moments over all crops, preloaded on the device (warmed up once here)."""
    vae = freeze(load_vae(str(vae_dir)))
    dtype = DTYPES[cfg.dtype]
    vae.encoder.to(device=device, dtype=dtype)
    vae.quant_conv.to(device=device, dtype=dtype)
    crops = []
    for p in sources:  # the same center crops the pipeline encodes
        im = load_rgb(str(p))
        (box,) = crop_boxes(im.size, cfg.crop_side, cfg.resolution, 0, None)
        crops.append(np.asarray(crop_resize(im, box, cfg.resolution)))
    x = to_model_range(torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2)).to(device=device, dtype=dtype)
    batches = list(x.split(cfg.batch_size))
    encode_moments(vae, batches[0])  # warm-up: kernel selection, allocator
    sync(device)

    def run() -> float:
        t0 = time.perf_counter()
        for b in batches:
            m = encode_moments(vae, b)
        m.cpu()
        sync(device)
        return time.perf_counter() - t0

    return run


def pipeline_time(cfg: EncodeConfig, images: int) -> float:
    """Seconds for one complete `encode` into an empty OUT (model load included)."""
    t0 = time.perf_counter()
    result = encode(cfg)
    elapsed = time.perf_counter() - t0
    assert result.samples == images and result.skipped_inputs == 0 and not result.already_complete, result
    return elapsed


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    cpu = platform.processor() or platform.machine()
    return f"cpu ({cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


@dataclass(frozen=True)
class EncodeResult:
    """images/s of (a) the pipeline and (b) the encoder forward alone, with what they were measured on."""

    pipeline: float  # images/s, fastest round
    forward: float  # images/s, fastest round
    t_pipeline: float  # seconds, fastest round
    t_forward: float  # seconds, fastest round
    t_load: float  # seconds to load + freeze the VAE, part of t_pipeline
    device: str
    setup: str
    repeats: int
    load_average: float


def measure(
    resolution: int | None = None,
    images: int | None = None,
    batch_size: int | None = None,
    source_size: int | None = None,
    num_workers: int = 2,
    dtype: str = "fp32",
    device: str | None = None,
    repeats: int = 3,
    vae_config: dict | None = None,
) -> EncodeResult:
    """Run (a) and (b) interleaved `repeats` times on the SD 1.x VAE architecture (or `vae_config`:
    bench/gpu.py's CPU smoke run); None = the device's default."""
    from diffusers import AutoencoderKL

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cpu = dev.type == "cpu"
    resolution = resolution or (128 if cpu else 256)
    images = images or (8 if cpu else 512)
    batch_size = batch_size or (4 if cpu else 32)
    long_side = source_size or 2 * resolution
    with tempfile.TemporaryDirectory(prefix="vaedec-bench-") as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        vae_dir = tmp / "sd-vae"
        AutoencoderKL(**(vae_config or SD_VAE)).save_pretrained(vae_dir)
        sources = make_sources(tmp / "images", images, (long_side, long_side * 3 // 4))
        cfg = EncodeConfig(
            src=str(tmp / "images"),
            out=str(tmp / "shards"),
            vae=str(vae_dir),
            resolution=resolution,
            batch_size=batch_size,
            num_workers=num_workers,
            dtype=dtype,
            device=str(dev),
        )

        load_before = os.getloadavg()[0]
        # Interleaved rounds, fastest of each: on a shared machine the load changes between measurements.
        forward = forward_timer(vae_dir, sources, cfg, dev)
        t_forward, t_pipeline = [], []
        for _ in range(repeats):
            t_forward.append(forward())
            t_pipeline.append(pipeline_time(replace(cfg, overwrite=True), images))
        t_forward, t_pipeline = min(t_forward), min(t_pipeline)

        t0 = time.perf_counter()
        # what the pipeline pays before its first batch, besides the fingerprint
        freeze(load_vae(str(vae_dir)))
        t_load = time.perf_counter() - t0

    setup = (
        f"{images} images {long_side}x{long_side * 3 // 4} JPEG -> {resolution}x{resolution}, "
        f"batch size {batch_size}, dtype {dtype}, {num_workers} decode workers"
    )
    return EncodeResult(
        images / t_pipeline,
        images / t_forward,
        t_pipeline,
        t_forward,
        t_load,
        device_name(dev),
        setup,
        repeats,
        load_before,
    )


def rows(r: EncodeResult) -> list[Row]:
    """The encode section of bench/all.py's table; the reference is the encoder forward alone."""
    return [
        Row("encode", "encoder forward only (tensors preloaded)", r.forward, "images/s", 1.0),
        Row(
            "encode",
            "`encode` end to end (decode, forward, PNG + npy, tar, fsync)",
            r.pipeline,
            "images/s",
            r.pipeline / r.forward,
            "of forward",
        ),
    ]


@click.command(context_settings={"show_default": True})
@click.option(
    "--resolution",
    type=click.IntRange(8),
    default=None,
    help="Encoded side, pixels [default: 128 on CPU, 256 on CUDA].",
)
@click.option(
    "--images",
    type=click.IntRange(1),
    default=None,
    help="Number of source images [default: 8 on CPU, 512 on CUDA].",
)
@click.option(
    "--batch-size",
    type=click.IntRange(1),
    default=None,
    help="Images per encoder forward [default: 4 on CPU, 32 on CUDA].",
)
@click.option(
    "--source-size",
    type=click.IntRange(8),
    default=None,
    help="Longer side of the source JPEGs [default: 2x resolution].",
)
@click.option("--num-workers", type=click.IntRange(0), default=2, help="Decoding processes of the pipeline.")
@click.option("--dtype", type=click.Choice(list(DTYPES)), default="fp32", help="Encoder compute dtype.")
@click.option("--device", default=None, help="torch device [default: cuda if available, else cpu].")
@click.option(
    "--repeats",
    type=click.IntRange(1),
    default=3,
    help="Interleaved (b), (a) rounds; the fastest of each counts.",
)
def main(
    resolution: int | None,
    images: int | None,
    batch_size: int | None,
    source_size: int | None,
    num_workers: int,
    dtype: str,
    device: str | None,
    repeats: int,
) -> None:
    """Encode pipeline vs encoder forward, images/s, on the SD 1.x VAE architecture with random weights.

    The CPU defaults finish in 1-2 minutes on 2 cores; the CUDA defaults are a realistic workload.
    """
    r = measure(resolution, images, batch_size, source_size, num_workers, dtype, device, repeats)
    print(f"device          {r.device}")
    print(f"torch           {torch.__version__}")
    print(f"model           {MODEL}")
    print(f"setup           {r.setup}")
    print(
        f"timing          fastest of {r.repeats} interleaved rounds; "
        f"load average {r.load_average:.2f} at the start"
    )
    print(
        f"(a) pipeline    {r.pipeline:8.2f} img/s  ({r.t_pipeline:.2f} s end to end, "
        f"incl. ~{r.t_load:.2f} s model load)"
    )
    print(f"(b) forward     {r.forward:8.2f} img/s  ({r.t_forward:.2f} s, encoder only, tensors preloaded)")
    print(
        f"ratio (b)/(a)   {r.forward / r.pipeline:8.2f}x  (pipeline time / forward time; 1.00 = no overhead)"
    )


if __name__ == "__main__":
    main()
