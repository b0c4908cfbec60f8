"""Reconstruction metrics (PSNR and SSIM from torchmetrics, LPIPS, colour shift, rFID from torchmetrics +
torch-fidelity's InceptionV3), paired confidence intervals, the PNG comparison grids, and a run's
`Evaluator`."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from scipy.stats import bootstrap
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from torchmetrics.image.fid import FrechetInceptionDistance

from vaedec.errors import ShardError, VaedecError
from vaedec.images import batch_to_model, to_uint8
from vaedec.io import atomic_write_bytes, png_bytes
from vaedec.latents import batch_latent
from vaedec.losses import perceptual_distance
from vaedec.shards import collate, read_samples

CHANNEL_NAMES = ("r", "g", "b")  # further channels (depth) are c3, c4, ...


class MetricsError(VaedecError):
    """A metric cannot be set up (e.g. a wrong Inception weights file); the message says how to fix it."""


def channel_names(c: int) -> list[str]:
    """Short names of C image channels for tables and CSV columns: r, g, b, c3, ...; grey is c0."""
    if c < 3:
        return [f"c{i}" for i in range(c)]
    return list(CHANNEL_NAMES) + [f"c{i}" for i in range(3, c)]


@torch.no_grad()
def per_image_metrics(
    x: torch.Tensor, x_rec: torch.Tensor, lpips_model: torch.nn.Module | None
) -> dict[str, torch.Tensor]:
    """Per-image PSNR (dB), SSIM and LPIPS (each (B,)) and colour shift (B, C) of images in [-1, 1] (B, C, H,
    W).

    PSNR and SSIM are over all channels at data range 1 after mapping to [0, 1]. The colour shift is
    mean(x̂) - mean(x) per channel in 8-bit levels: a decoder that tints everything shows it here even when
    its PSNR barely moves.
    """
    a, b = (x.float().clamp(-1, 1) + 1) / 2, (x_rec.float().clamp(-1, 1) + 1) / 2
    out = {
        "psnr": peak_signal_noise_ratio(b, a, data_range=1.0, dim=(1, 2, 3), reduction="none"),
        "ssim": structural_similarity_index_measure(b, a, data_range=1.0, reduction="none"),
        "colour_shift": (b - a).mean(dim=(2, 3)) * 255.0,  # (B, C)
    }
    if lpips_model is not None:
        out["lpips"] = perceptual_distance(lpips_model, x.float(), x_rec.float()).flatten()
    return out


@torch.no_grad()
def reconstruction_metrics(
    x: torch.Tensor, x_rec: torch.Tensor, lpips_model: torch.nn.Module | None
) -> dict[str, float]:
    """Batch means of PSNR (dB), SSIM and LPIPS for images in [-1, 1] (B, C, H, W), all channels."""
    per_image = per_image_metrics(x, x_rec, lpips_model)
    return {k: float(v.mean()) for k, v in per_image.items() if k != "colour_shift"}


def paired_ci(
    deltas: np.ndarray, seed: int = 0, level: float = 0.95, resamples: int = 2000
) -> tuple[float, float, float]:
    """Mean of per-image differences and its bootstrap confidence interval (BCa, scipy): (mean, low, high).

    The images are the unit: both models decoded the same latents, so the per-image difference removes the
    images' own difficulty from the comparison (a paired test). One image gives no interval (nan, nan).
    """
    d = np.asarray(deltas, dtype=np.float64)
    d = d[np.isfinite(d)]  # PSNR of a pixel-exact reconstruction is inf; it carries no difference to average
    if d.size == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(d.mean())
    if d.size < 2:
        return mean, float("nan"), float("nan")
    if np.ptp(d) == 0:  # every image moved by the same amount (e.g. a model against itself): no spread
        return mean, mean, mean
    res = bootstrap((d,), np.mean, confidence_level=level, n_resamples=resamples, method="BCa",
                    random_state=np.random.default_rng(seed))
    lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    # BCa degenerates on near-constant data; percentile does not
    if not (np.isfinite(lo) and np.isfinite(hi)):
        res = bootstrap((d,), np.mean, confidence_level=level, n_resamples=resamples, method="percentile",
                        random_state=np.random.default_rng(seed))
        lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return mean, lo, hi


def _read_inception_state(path: str) -> dict[str, torch.Tensor]:
    """The user's InceptionV3 weights, never unpickling code: safetensors, or
    torch.load(weights_only=True)."""
    if not Path(path).is_file():
        raise MetricsError(
            f"--fid-weights {path}: no such file. FID needs torch-fidelity's InceptionV3 weights, "
            "weights-inception-2015-12-05-6726825d.pth (README, 'eval')."
        )
    try:
        if path.endswith(".safetensors"):
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle, zip and safetensors errors all mean "not a weights file"
        raise MetricsError(
            f"--fid-weights {path} cannot be read as tensors ({type(e).__name__}: {e})"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MetricsError(f"--fid-weights {path} is not a state dict of tensors")
    return state


# InceptionV3 layers torchmetrics offers; 2048 (the pool) is the standard FID
FID_FEATURES = (64, 192, 768, 2048)


def load_fid(weights_path: str, device: torch.device | str = "cpu", features: int = 2048):
    """torchmetrics' FrechetInceptionDistance on torch-fidelity's InceptionV3 (`features`-d activations; 2048
    = the standard pool features) with the weights read from a local file. Real-image statistics survive
    `reset()`, so one object serves every model."""
    state = _read_inception_state(weights_path)
    # torch-fidelity reads its weights with torch.load(weights_only=False). We hand it a file that we wrote
    # ourselves from the tensors read above, so no pickled code from the user's file is ever run.
    with tempfile.TemporaryDirectory() as tmp:
        own = str(Path(tmp) / "inception.pt")
        torch.save(state, own)
        try:
            fid = FrechetInceptionDistance(feature=features, reset_real_features=False,
                                           feature_extractor_weights_path=own)
        except RuntimeError as e:  # load_state_dict: missing / unexpected keys or shapes
            raise MetricsError(f"--fid-weights {weights_path} are not torch-fidelity's InceptionV3 weights "
                               f"({str(e).splitlines()[0]})") from None
    return fid.to(device)


def fid_images(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (B, C, H, W) -> the uint8 RGB (B, 3, H, W) Inception sees: RGB only, grey
    repeated."""
    rgb = x[:, :3] if x.shape[1] >= 3 else x[:, :1].expand(-1, 3, -1, -1)
    return to_uint8(rgb)


def colourise_depth(d: torch.Tensor) -> torch.Tensor:
    """One channel in [-1, 1] (B, 1, H, W) -> uint8 (B, 3, H, W) with a blue-green-yellow ramp (near =
    bright)."""
    t = ((d.float().clamp(-1, 1) + 1) / 2)[:, 0]  # (B, H, W) in [0, 1]
    r = (1.5 * t - 0.5).clamp(0, 1)
    g = (1.2 * t).clamp(0, 1) * (1 - 0.3 * r)
    bl = (1 - 1.5 * t).clamp(0, 1) * 0.7 + 0.3 * (1 - t)
    return (torch.stack([r, g, bl], dim=1) * 255).round().to(torch.uint8)


def to_display(x: torch.Tensor) -> torch.Tensor:
    """Model-range images (B, C, H, W) -> uint8 RGB tiles (B, 3, H, W*k): RGB, then each extra channel
    colourised."""
    x = x.float().cpu()
    c = x.shape[1]
    if c == 1:
        return to_uint8(x.repeat(1, 3, 1, 1))
    tiles = [to_uint8(x[:, :3])] if c >= 3 else [to_uint8(x[:, :1].repeat(1, 3, 1, 1))]
    tiles += [colourise_depth(x[:, i : i + 1]) for i in range(3 if c >= 3 else 1, c)]
    return torch.cat(tiles, dim=3)


def save_grid(
    columns: list[torch.Tensor],
    path: str | Path,
    pad: int = 2,
    labels: list[str] | None = None,
    min_tile: int = 0,
) -> None:
    """Rows = samples, columns = versions (e.g. original | original decoder | decoder | EMA); PNG, atomic.

    `labels`: one name per column, written above it. `min_tile`: tiles smaller than this many pixels high are
    scaled up by a whole factor, nearest neighbour (every decoded pixel stays a visible square, nothing is
    smoothed away), so 64 px tiles can be read; 0 = as decoded.
    """
    tiles = [to_display(c) for c in columns]  # each (B, 3, H, W')
    scale = -(-min_tile // tiles[0].shape[2]) if min_tile > tiles[0].shape[2] else 1  # ceil
    if scale > 1:
        tiles = [t.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3) for t in tiles]
    b, _, h, w = tiles[0].shape
    top = _label_height(h) + pad if labels else 0
    grid = np.full((top + b * (h + pad) + pad, len(tiles) * (w + pad) + pad, 3), 255, np.uint8)
    for j, col in enumerate(tiles):
        for i in range(b):
            y0, x0 = top + pad + i * (h + pad), pad + j * (w + pad)
            grid[y0 : y0 + h, x0 : x0 + w] = col[i].permute(1, 2, 0).numpy()
    if labels:
        grid = _draw_labels(grid, labels, w, pad, top)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, png_bytes(grid))


def _label_height(tile: int) -> int:
    """Pixels of the label band above a grid of tiles `tile` px high: a readable size that grows with the
    tiles."""
    return max(14, min(28, tile // 8))


def _label_font(size: int) -> Any:
    """Pillow's built-in font at `size` px (FreeType, Pillow >= 10.1), else its fixed ~11 px bitmap font."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def _draw_labels(grid: np.ndarray, labels: list[str], w: int, pad: int, top: int) -> np.ndarray:
    """Each label centred above its column, in a font shrunk (then the text shortened) until it fits the
    tile."""
    from PIL import Image, ImageDraw

    im = Image.fromarray(grid)
    draw = ImageDraw.Draw(im)
    for j, text in enumerate(labels):
        size = top - pad - 2
        font = _label_font(size)
        while draw.textlength(text, font=font) > w and size > 9:
            size -= 1
            font = _label_font(size)
        while draw.textlength(text, font=font) > w and len(text) > 2:
            text = text[:-2] + "…"
        x = pad + j * (w + pad) + (w - draw.textlength(text, font=font)) / 2
        draw.text((x, pad + (top - pad) / 2), text, fill=(0, 0, 0), font=font, anchor="lm")
    return np.asarray(im)


# ------------------------------------------------------------------------------------------------------------
# a run's grids and validation


@torch.no_grad()
def decode_mean(model: torch.nn.Module, batch: dict[str, Any], device: torch.device) -> torch.Tensor:
    """Decode z = mean (deterministic) for grids and validation: fp32 (B, C_out, H, W) on the CPU."""
    z = batch_latent(batch, "mode").to(device)  # the moments' mean, or a deterministic family's latent
    was_training = model.training
    model.eval()
    x_rec, _ = model(z)
    model.train(was_training)
    return x_rec.float().cpu()


def grid_batch(shards: list[str], n: int, skip_bad: bool = False) -> dict[str, Any]:
    """n samples spread evenly over the first shards, so a grid is not n crops of one image (skip_bad: see
    read_samples)."""
    pool = list(read_samples(shards, max(8 * n, 64), skip_bad))
    if not pool:
        raise ShardError(
            f"no readable sample for the image grids in {', '.join(shards)} (bad samples left out, "
            "see the log); check them with `vaedec inspect SHARDS --verify`"
        )
    picks = sorted({round(i * (len(pool) - 1) / max(n - 1, 1)) for i in range(min(n, len(pool)))})
    return collate([pool[i] for i in picks])


def val_batches(
    shards: list[str], max_samples: int, batch_size: int, skip_bad: bool = False
) -> list[dict[str, Any]]:
    """The first `max_samples` samples of the validation shards, in batches (skip_bad: see read_samples)."""
    samples = list(read_samples(shards, max_samples, skip_bad))
    return [collate(samples[i : i + batch_size]) for i in range(0, len(samples), batch_size)]


class Evaluator:
    """A run's fixed grid batch and validation batches, and the original decoder's outputs on them, computed
    once at construction (before any update or resume). Remembers the step each was last done at, so the final
    evaluation does only what is left."""

    def __init__(
        self,
        original: torch.nn.Module,
        grid: dict[str, Any] | None,
        val: list[dict[str, Any]],
        lpips_model: torch.nn.Module | None,
        device: torch.device,
        name: str = "",
    ):
        self.grid, self.val, self.lpips_model, self.device = grid, val, lpips_model, device
        self.prefix = f"val/{name}/" if name else "val/"  # a mixed-in shard set validates under its own name
        self.original_grid = decode_mean(original, grid, device) if grid else None  # (B, C_out, H, W)
        self.original_metrics = self.metrics(original) if val else {}
        self.done = {"grid": -1, "val": -1}

    def pending(self, step: int, grid: bool = True, val: bool = True) -> tuple[bool, bool]:
        """Which of (grid, validation) is asked for and not yet done at `step`."""
        grid = grid and self.grid is not None and self.done["grid"] != step
        return grid, val and bool(self.val) and self.done["val"] != step

    def mark_done(self, step: int) -> None:
        """Count both as done at `step` (a finished run, rerun: they are already there)."""
        self.done.update(grid=step, val=step)

    def write_grid(self, path: str | Path, step: int, models: list[torch.nn.Module]) -> None:
        """original | original decoder | each of `models`, one row a grid sample."""
        columns = [batch_to_model(self.grid, torch.device("cpu")), self.original_grid]
        columns += [decode_mean(m, self.grid, self.device) for m in models]
        save_grid(columns, path)
        self.done["grid"] = step

    def validate(self, step: int, models: dict[str, torch.nn.Module]) -> dict[str, float]:
        """val/[name/]{psnr,ssim,lpips}{suffix} of each model by suffix, next to ..._orig of the original
        decoder."""
        self.done["val"] = step
        out = {f"{self.prefix}{k}_orig": v for k, v in self.original_metrics.items()}
        for suffix, model in models.items():
            out.update({f"{self.prefix}{k}{suffix}": v for k, v in self.metrics(model).items()})
        return out

    def metrics(self, model: torch.nn.Module) -> dict[str, float]:
        """PSNR, SSIM (and LPIPS) of `model` over the validation batches."""
        rec = torch.cat([decode_mean(model, b, self.device) for b in self.val])
        x = torch.cat([batch_to_model(b, torch.device("cpu")) for b in self.val])
        return reconstruction_metrics(x.to(self.device), rec.to(self.device), self.lpips_model)
