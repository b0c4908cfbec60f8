"""Shared fixtures: tiny random AutoencoderKLs saved as diffusers folders, and small image sets made here."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach a hub
ROOT = Path(__file__).resolve().parent.parent


def tiny_vae(in_channels: int = 3, seed: int = 0):
    """A 2-level AutoencoderKL (downsampling factor 2) small enough for CPU tests."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=in_channels,
        out_channels=in_channels,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )


def save_tiny_vae(path: Path, in_channels: int = 3, seed: int = 0) -> Path:
    tiny_vae(in_channels, seed).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def vae_dir(tmp_path_factory) -> Path:
    return save_tiny_vae(tmp_path_factory.mktemp("vae") / "tiny-vae")


def smooth_image(seed: int, size: tuple[int, int]) -> np.ndarray:
    """A smooth random colour field (uint8 H, W, 3): compressible, and something a decoder can learn."""
    rng = np.random.default_rng(seed)
    w, h = size
    small = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC))


def make_images(folder: Path, n: int, size: tuple[int, int] = (40, 36), suffix: str = ".png") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"img{i:03d}{suffix}"
        Image.fromarray(smooth_image(i, size)).save(p)
        paths.append(p)
    return paths
