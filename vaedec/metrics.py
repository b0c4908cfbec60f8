"""Reconstruction metrics (PSNR, SSIM from torchmetrics, LPIPS) and the PNG comparison grids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from vaedec.images import to_uint8
from vaedec.io import atomic_write_bytes, png_bytes
from vaedec.losses import perceptual_distance


@torch.no_grad()
def reconstruction_metrics(x: torch.Tensor, x_rec: torch.Tensor, lpips_model: torch.nn.Module | None) -> dict[str, float]:
    """Batch means of PSNR (dB), SSIM and LPIPS for images in [-1, 1] (B, C, H, W), all channels."""
    a, b = (x.float().clamp(-1, 1) + 1) / 2, (x_rec.float().clamp(-1, 1) + 1) / 2
    out = {
        "psnr": float(peak_signal_noise_ratio(b, a, data_range=1.0, dim=(1, 2, 3), reduction="elementwise_mean")),
        "ssim": float(structural_similarity_index_measure(b, a, data_range=1.0)),
    }
    if lpips_model is not None:
        out["lpips"] = float(perceptual_distance(lpips_model, x.float(), x_rec.float()).mean())
    return out


def colourise_depth(d: torch.Tensor) -> torch.Tensor:
    """One channel in [-1, 1] (B, 1, H, W) -> uint8 (B, 3, H, W) with a blue-green-yellow ramp (near = bright)."""
    t = ((d.float().clamp(-1, 1) + 1) / 2)[:, 0]  # (B, H, W) in [0, 1]
    r = (1.5 * t - 0.5).clamp(0, 1)
    g = (1.2 * t).clamp(0, 1) * (1 - 0.3 * r)
    bl = (1 - 1.5 * t).clamp(0, 1) * 0.7 + 0.3 * (1 - t)
    return (torch.stack([r, g, bl], dim=1) * 255).round().to(torch.uint8)


def to_display(x: torch.Tensor) -> torch.Tensor:
    """Model-range images (B, C, H, W) -> uint8 RGB tiles (B, 3, H, W*k): RGB, then each extra channel colourised."""
    x = x.float().cpu()
    c = x.shape[1]
    if c == 1:
        return to_uint8(x.repeat(1, 3, 1, 1))
    tiles = [to_uint8(x[:, :3])] if c >= 3 else [to_uint8(x[:, :1].repeat(1, 3, 1, 1))]
    tiles += [colourise_depth(x[:, i : i + 1]) for i in range(3 if c >= 3 else 1, c)]
    return torch.cat(tiles, dim=3)


def save_grid(columns: list[torch.Tensor], path: str | Path, pad: int = 2) -> None:
    """Rows = samples, columns = versions (e.g. original | original decoder | decoder | EMA); PNG, atomic."""
    tiles = [to_display(c) for c in columns]  # each (B, 3, H, W')
    b, _, h, w = tiles[0].shape
    grid = np.full((b * (h + pad) + pad, len(tiles) * (w + pad) + pad, 3), 255, np.uint8)
    for j, col in enumerate(tiles):
        for i in range(b):
            y0, x0 = pad + i * (h + pad), pad + j * (w + pad)
            grid[y0 : y0 + h, x0 : x0 + w] = col[i].permute(1, 2, 0).numpy()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, png_bytes(grid))


def load_grid(path: str | Path) -> np.ndarray:
    """A saved grid as uint8 (H, W, 3) (tests, notebooks)."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))
