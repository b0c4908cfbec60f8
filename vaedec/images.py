"""Finding images, decoding them by one documented rule, cropping, depth maps, and the pixel <-> [-1, 1]
convention.

Conversion rule (applied after EXIF orientation), so every input becomes 8-bit RGB:
- RGB as is; L and 1 (grey, bilevel) replicated to three channels.
- 16-bit grey (I;16 and I modes): v8 = round(v16 / 257), i.e. 0..65535 mapped linearly onto 0..255.
- Anything with alpha (RGBA, LA, PA, palette with transparency): composited over white.
- Palette without transparency: expanded to its RGB colours.
- CMYK, YCbCr, LAB, HSV: Pillow's conversion to RGB (ICC profiles are not applied).
- Float images (mode F) and files Pillow cannot fully decode are skipped with the reason.

RGB+depth (ldm3d-4c): a 16-bit grey PNG per image, paired by file stem, cropped with the image's boxes, and
fed to the model as depth / 65535 * 2 - 1 (diffusers' LDM3D image processor), the one place that scaling is
written.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from vaedec.errors import VaedecError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
# antialiased when shrinking; the same filter diffusers' image processor uses
RESAMPLE = Image.Resampling.LANCZOS
# Pillow's modes of 16-bit grey images (and depth maps)
GREY16_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class InputError(VaedecError):
    """SRC or --depth-dir itself is unusable (missing, empty, ambiguous): the whole command stops with this
    message."""


class SkipImage(Exception):
    """One input cannot be encoded; the message is the reason written to skipped.jsonl."""


@dataclass(frozen=True)
class InputItem:
    index: int  # position in the deterministic input order
    rel: str  # path relative to SRC's folder, '/'-separated: the source recorded in every sample
    path: str  # absolute path to read


@dataclass(frozen=True)
class Skip:
    index: int  # input position; -1 for entries that never became inputs
    rel: str
    reason: str
    key: str | None = None  # set when one sample (not the whole input) was dropped


def make_key(rel: str) -> str:
    """Stable, unique, dot-free sample key: readable path stem + a hash of the full relative path."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", rel.rsplit(".", 1)[0]).strip("_")[-60:]
    digest = hashlib.sha1(rel.encode("utf-8")).hexdigest()[:10]
    return f"{stem}-{digest}" if stem else digest


def discover_inputs(src: str | Path) -> tuple[list[InputItem], list[Skip]]:
    """A folder (recursive, image suffixes) or a text file list -> inputs in a deterministic order, and
    skips."""
    src = Path(src)
    if not src.exists():
        raise InputError(
            f"SRC {src} does not exist; give a folder of images or a text file with one path a line"
        )
    if src.is_dir():
        named = [p for p in src.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES]
        files = sorted(p.relative_to(src).as_posix() for p in named if p.is_file())
        # A link whose target is gone is an input the user meant to give: reported, not silently passed over.
        broken = sorted(p.relative_to(src).as_posix() for p in named if p.is_symlink() and not p.exists())
        skips = [Skip(-1, rel, f"broken symbolic link (to {os.readlink(src / rel)})") for rel in broken]
        if not files:
            raise InputError(
                f"no images found under {src} (looked recursively for {', '.join(IMAGE_SUFFIXES)})"
                + (f"; {len(broken)} broken links" if broken else "")
            )
        items = [InputItem(i, rel, str(src / rel)) for i, rel in enumerate(files)]
        return items, skips
    return _read_file_list(src)


def _read_file_list(list_path: Path) -> tuple[list[InputItem], list[Skip]]:
    root = list_path.parent
    try:
        lines = list_path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise InputError(f"{list_path} is not a UTF-8 text file list (one image path a line)") from None
    items: list[InputItem] = []
    skips: list[Skip] = []
    seen: set[str] = set()
    for lineno, line in enumerate(lines, 1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        p = Path(entry) if Path(entry).is_absolute() else root / entry
        rel = Path(entry).as_posix()
        if rel in seen:
            skips.append(Skip(-1, rel, f"{list_path.name} line {lineno}: duplicate entry, encoded once"))
            continue
        seen.add(rel)
        if not p.is_file():
            skips.append(Skip(-1, rel, f"{list_path.name} line {lineno}: file does not exist ({p})"))
            continue
        items.append(InputItem(len(items), rel, str(p)))
    if not items:
        raise InputError(f"{list_path} lists no existing image files ({len(skips)} entries missing)")
    return items, skips


def load_rgb(path: str) -> Image.Image:
    """Decode one file to 8-bit RGB by the module's conversion rule, EXIF orientation applied."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            im.load()  # decode fully here: a truncated file fails now, not half-way into a crop
            return to_rgb(im)
    except SkipImage:
        raise
    except Image.DecompressionBombError as e:
        raise SkipImage(f"too large to decode safely ({e})") from None
    except (OSError, ValueError, SyntaxError, Image.UnidentifiedImageError) as e:
        reason = "empty file" if Path(path).stat().st_size == 0 else f"cannot decode: {e}"
        raise SkipImage(reason) from None


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB (see the module docstring for the rule)."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in GREY16_MODES:
        a = np.asarray(im).astype(np.float64)
        return Image.fromarray(np.clip(np.round(a / 257.0), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        raise SkipImage(
            "floating-point image (mode F): no unambiguous 8-bit mapping; convert it to 8/16-bit first"
        )
    if mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
        if im.mode == "RGB":
            return im
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def crop_boxes(
    size: tuple[int, int], side: int, resolution: int, crops: int, rng: np.random.Generator | None
) -> list[tuple[float, float, float, float]]:
    """Boxes in original pixels equal to: resize the shorter side to `side`, then crop resolution².

    crops == 0 gives the center crop; crops == N gives N random crops (positions from `rng`).
    """
    w, h = size
    scale = side / min(w, h)
    rw, rh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    if crops == 0:
        offsets = [((rw - resolution) // 2, (rh - resolution) // 2)]
    else:
        assert rng is not None
        offsets = [
            (int(rng.integers(0, rw - resolution + 1)), int(rng.integers(0, rh - resolution + 1)))
            for _ in range(crops)
        ]
    # Map resized-image pixels back to original ones; Pillow resamples a float box directly, so an
    # extreme aspect ratio never materialises the huge resized image.
    sx, sy = w / rw, h / rh
    return [
        (round(l * sx, 4), round(t * sy, 4), round((l + resolution) * sx, 4), round((t + resolution) * sy, 4))
        for l, t in offsets
    ]


def crop_resize(im: Image.Image, box: tuple[float, float, float, float], resolution: int) -> Image.Image:
    """The pixels of `box` resampled to resolution x resolution."""
    return im.resize((resolution, resolution), RESAMPLE, box=box)


def image_seed_rng(seed: int, rel: str) -> np.random.Generator:
    """A per-image generator: crops do not depend on order, worker or resume."""
    return np.random.default_rng([seed, int(hashlib.sha1(rel.encode()).hexdigest()[:15], 16)])


def to_model_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float in [-1, 1]."""
    return pixels.float() / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Float in [-1, 1] (B, C, H, W) -> uint8, rounded and clamped."""
    return ((x.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)


# ------------------------------------------------------------------------------------------------------------
# depth maps (RGB+depth VAEs)


def index_depth_maps(depth_dir: str) -> dict[str, str]:
    """{file stem: path} of the 16-bit depth PNGs under depth_dir; a stem found twice is an error."""
    root = Path(depth_dir)
    if not root.is_dir():
        raise InputError(f"--depth-dir {depth_dir} is not a folder")
    index: dict[str, str] = {}
    for p in sorted(q for q in root.rglob("*") if q.suffix.lower() == ".png" and q.is_file()):
        if p.stem in index:
            raise InputError(f"two depth maps share the stem {p.stem!r}: {index[p.stem]} and {p}; rename one")
        index[p.stem] = str(p)
    if not index:
        raise InputError(f"no .png depth maps under --depth-dir {depth_dir}")
    return index


def check_unique_stems(items: list[InputItem]) -> None:
    """Refuse inputs that share a file stem: depth maps are matched by stem, so they would share one
    silently."""
    seen: dict[str, str] = {}
    clashes = []
    for item in items:
        stem = Path(item.rel).stem
        if stem in seen:
            clashes.append(f"{seen[stem]} and {item.rel}")
        seen.setdefault(stem, item.rel)
    if clashes:
        raise InputError(
            "with --depth-dir, images are paired with depth maps by file stem, and these images share "
            "a stem: " + "; ".join(clashes[:5])
            + (f" (+{len(clashes) - 5} more)" if len(clashes) > 5 else "")
            + ". Rename them so every stem is unique."
        )


def load_depth(item: InputItem, depth_index: dict[str, str], size: tuple[int, int]) -> Image.Image:
    """The 16-bit depth map paired with `item` by file stem, as a float image the same size as the RGB.

    The depth map must match the image as displayed, i.e. after the image's EXIF orientation is applied.
    """
    stem = Path(item.rel).stem
    path = depth_index.get(stem)
    if path is None:
        raise SkipImage(f"no depth map named {stem}.png in --depth-dir")
    try:
        with Image.open(path) as d:
            d.load()
            mode, dsize = d.mode, d.size
            if mode not in GREY16_MODES:
                raise SkipImage(f"depth map {path} is {mode}, not a 16-bit grey PNG")
            arr = np.asarray(d).astype(np.float32)
    except (OSError, ValueError) as e:
        raise SkipImage(f"cannot decode depth map {path}: {e}") from None
    if dsize != size:
        raise SkipImage(f"depth map {path} is {dsize[0]}x{dsize[1]} but the image is {size[0]}x{size[1]}")
    return Image.fromarray(arr, "F")


def resize_depth(depth: Image.Image, box: tuple[float, float, float, float], resolution: int) -> np.ndarray:
    """The pixels of `box` of a float depth map resampled to resolution², as uint16 (H, W)."""
    # Bilinear, not Lanczos: depth is a measurement, and Lanczos would ring past the measured range at edges.
    out = np.asarray(depth.resize((resolution, resolution), Image.Resampling.BILINEAR, box=box))
    return np.clip(np.round(out), 0, 65535).astype(np.uint16)


def depth_to_model_range(depth: torch.Tensor) -> torch.Tensor:
    """Raw 16-bit depth (B, 1, H, W), any integer or float dtype -> float in [-1, 1] (diffusers' LDM3D
    scaling)."""
    return depth.float() / 65535.0 * 2.0 - 1.0


def batch_to_model(batch: dict[str, Any], device: torch.device) -> torch.Tensor:
    """Stored pixels (uint8 RGB, optional 16-bit depth) -> the decoder's target (B, C_out, H, W) in [-1,
    1]."""
    x = to_model_range(batch["pixels"].to(device))
    if "depth" in batch:
        x = torch.cat([x, depth_to_model_range(batch["depth"].to(device))], dim=1)
    return x
