"""`make demo`: the whole flow on a fresh machine with no network and no GPU, in a few minutes.

1. images: the photographs scikit-image ships (plus their mirrored/cropped variants from encode)
2. a small randomly initialised AutoencoderKL saved as a diffusers folder (no weights can be downloaded)
3. encode -> shards; 4. train with configs/demo.yaml; 5. export; then it prints where everything is.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import click
from PIL import Image

from vaedec.io import setup_logging

ROOT = Path(__file__).resolve().parent.parent


def demo_images(out: Path) -> int:
    """Copy scikit-image's bundled photographs (RGB and grey) into `out`; returns how many."""
    import skimage

    data = Path(skimage.__file__).parent / "data"
    out.mkdir(parents=True, exist_ok=True)
    n = 0
    for p in sorted(data.iterdir()):
        if p.suffix.lower() not in (".png", ".jpg"):
            continue
        with Image.open(p) as im:
            if min(im.size) < 128:
                continue
        shutil.copy(p, out / p.name)
        n += 1
    return n


def demo_vae(out: Path, seed: int = 0) -> Path:
    """A 2-level AutoencoderKL (SD's block layout, 8-16x narrower, factor 2 downsampling), random weights.

    Factor 2 rather than SD's 8: a random encoder scrambles the image, and a decoder that has to learn to invert
    it in a few CPU minutes needs latents that still hold most of the pixels (4 x 32 x 32 floats for 64 x 64 x 3).
    """
    import torch
    from diffusers import AutoencoderKL

    from vaedec.vae import small_vae_config

    torch.manual_seed(seed)
    vae = AutoencoderKL(**small_vae_config((32, 64), sample_size=64))
    vae.save_pretrained(out)
    return out


@click.command()
@click.option("--out", default="demo", show_default=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--max-steps", default=None, type=int, help="Override configs/demo.yaml's run.max_steps.")
def main(out: Path, max_steps: int | None) -> None:
    """Run the demo end to end into OUT (images/, vae/, shards/, run/)."""
    from vaedec.checkpoint import RUN_IMAGES, RUN_METRICS
    from vaedec.config import EncodeConfig, load_train_config
    from vaedec.encode import encode
    from vaedec.train import train

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    setup_logging()
    out.mkdir(parents=True, exist_ok=True)
    n = demo_images(out / "images")
    click.echo(f"[1/4] {n} photographs from scikit-image -> {out / 'images'}")
    if not (out / "vae" / "config.json").exists():
        demo_vae(out / "vae")
    click.echo(f"[2/4] random tiny AutoencoderKL -> {out / 'vae'}")
    result = encode(
        EncodeConfig(
            src=str(out / "images"),
            out=str(out / "shards"),
            vae=str(out / "vae"),
            resolution=64,
            resize=96,
            crops_per_image=6,
            flip=True,
            batch_size=32,
            num_workers=1,
            shard_size_mb=0.25,
        )
    )
    click.echo(f"[3/4] encoded {result.samples} samples into {result.shards} shards -> {result.out}")
    overrides = [f"data.shards={out / 'shards'}", f"run.output={out / 'run'}"]
    if max_steps:
        overrides.append(f"run.max_steps={max_steps}")
    cfg = load_train_config(ROOT / "configs" / "demo.yaml", overrides)
    info = train(cfg)
    grids = sorted((info.run_dir / RUN_IMAGES).glob("*.png"))
    click.echo(f"[4/4] trained {info.step} steps")
    click.echo(f"\n  grids    {grids[-1] if grids else '-'}  (original | original decoder | decoder | EMA)")
    click.echo(f"  metrics  {info.run_dir / RUN_METRICS}  (tensorboard --logdir {info.run_dir})")
    click.echo(f"  export   {info.export_dir}  (AutoencoderKL.from_pretrained)")
    click.echo(f"  inspect  vaedec inspect {out / 'shards'} --verify")


if __name__ == "__main__":
    main()
