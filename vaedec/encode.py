"""`cli.py encode`: every input image through the frozen encoder once, into resumable WebDataset shards."""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from vaedec.config import EncodeConfig
from vaedec.images import (
    InputItem,
    Skip,
    SkipImage,
    check_unique_stems,
    crop_boxes,
    crop_resize,
    depth_to_model_range,
    discover_inputs,
    image_seed_rng,
    index_depth_maps,
    load_depth,
    load_rgb,
    make_key,
    resize_depth,
    to_model_range,
)
from vaedec.latents import encode_moments
from vaedec.shards import (
    MANIFEST,
    SKIPPED,
    ShardWriter,
    new_manifest,
    read_manifest,
    read_skipped,
    sample_members,
    write_manifest,
    write_skipped,
)
from vaedec.vae import DTYPES, encoder_fingerprint, freeze, load_vae, vae_summary

log = logging.getLogger("vaedec")


class EncodeError(ValueError):
    """The encode cannot start (bad settings, OUT belongs to another run); the message says how to fix it."""


@dataclass
class EncodeResult:
    out: Path
    samples: int  # samples in all shards
    inputs: int  # inputs considered
    skipped_inputs: int  # inputs not encoded at all
    skipped_list_entries: int  # file-list lines that named no file (or a duplicate)
    skipped_samples: int  # single samples dropped (non-finite moments)
    shards: int
    already_complete: bool = False
    skips: list[dict[str, Any]] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------------------
# per-input preprocessing (runs in DataLoader workers)


@dataclass
class PreparedSample:
    key: str
    pixels: np.ndarray  # uint8 (H, W, 3)
    depth: np.ndarray | None  # uint16 (H, W) for RGB+depth
    record: dict[str, Any]


class PreparedInputs(torch.utils.data.Dataset):
    """Input i -> its crops (and flips) as uint8 arrays, or the reason it cannot be encoded."""

    def __init__(self, items: list[InputItem], cfg: EncodeConfig, depth_index: dict[str, str] | None):
        self.items, self.cfg, self.depth_index = items, cfg, depth_index

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.items[i]
        try:
            return {"item": item, "samples": prepare_input(item, self.cfg, self.depth_index)}
        except SkipImage as e:
            return {"item": item, "skip": str(e)}


def prepare_input(item: InputItem, cfg: EncodeConfig, depth_index: dict[str, str] | None) -> list[PreparedSample]:
    """Decode, crop and optionally mirror one input; depth maps get the same boxes."""
    im = load_rgb(item.path)
    depth_im = load_depth(item, depth_index, im.size) if depth_index is not None else None
    w, h = im.size
    rng = image_seed_rng(cfg.seed, item.rel) if cfg.crops_per_image else None
    boxes = crop_boxes(im.size, cfg.crop_side, cfg.resolution, cfg.crops_per_image, rng)
    base = make_key(item.rel)
    samples = []
    for c, box in enumerate(boxes):
        crop = crop_resize(im, box, cfg.resolution)
        depth = resize_depth(depth_im, box, cfg.resolution) if depth_im is not None else None
        record = {
            "source": item.rel,
            "orig_size": [w, h],
            "crop_box": list(box),
            "crop_index": c,
            "flip": False,
            "upscaled": min(w, h) < cfg.crop_side,
        }
        key = base if not cfg.crops_per_image else f"{base}-c{c}"
        samples.append(PreparedSample(key, np.asarray(crop), depth, record))
        if cfg.flip:
            # The mirrored crop is encoded on its own: a mirrored latent is not the latent of the mirrored image.
            flipped = np.ascontiguousarray(np.asarray(crop)[:, ::-1])
            fdepth = None if depth is None else np.ascontiguousarray(depth[:, ::-1])
            samples.append(PreparedSample(f"{key}-flip", flipped, fdepth, {**record, "flip": True}))
    return samples


# ----------------------------------------------------------------------------------------------------------------
# the run


def settings_of(cfg: EncodeConfig, vae_info: dict[str, Any], items: list[InputItem]) -> dict[str, Any]:
    """Everything that changes the shards' content: a rerun resumes only when these are equal."""
    inputs_sha = hashlib.sha256("\n".join(i.rel for i in items).encode()).hexdigest()
    return {
        "vae": vae_info,
        "preprocessing": {
            "resolution": cfg.resolution,
            "resize_shorter_side_to": cfg.crop_side,
            "crops_per_image": cfg.crops_per_image,
            "flip": cfg.flip,
            "seed": cfg.seed,
            "dtype": cfg.dtype,
            "resample": "lanczos (depth: bilinear)",
            "conversion_rule": "vaedec.images: EXIF transpose; alpha over white; 16-bit grey /257; CMYK via Pillow",
            "depth": cfg.depth_dir is not None,
            "depth_dir": str(Path(cfg.depth_dir).resolve()) if cfg.depth_dir else None,
        },
        "source": {"src": str(Path(cfg.src).resolve()), "inputs": len(items), "inputs_sha256": inputs_sha},
        "shard_size_mb": cfg.shard_size_mb,
    }


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix[:-1]}: {a!r} -> {b!r}"]


def _clear_out(out: Path) -> None:
    for p in list(out.glob("shard-*.tar")) + list(out.glob(".shard-*.partial")):
        p.unlink()
    for name in (MANIFEST, SKIPPED):
        (out / name).unlink(missing_ok=True)


def pick_device(name: str | None) -> torch.device:
    """--device as a torch.device, checked before any work: None = cuda when present, else cpu."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise EncodeError(f"--device {name}: not a torch device; use cpu, cuda, cuda:1, mps, ...") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EncodeError(f"--device {name}: torch sees no CUDA GPU on this machine; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise EncodeError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise EncodeError(f"--device {name}: MPS is not available on this machine; use --device cpu")
    return device


def encode(cfg: EncodeConfig) -> EncodeResult:
    """Encode SRC into OUT; resumes a killed run with the same settings; see the module docstring."""
    # 1. inputs and settings -------------------------------------------------------------------------------
    items, list_skips, depth_index = _inputs(cfg)
    device, dtype = pick_device(cfg.device), DTYPES[cfg.dtype]
    vae, vae_info = _encoder_vae(cfg, depth_index is not None)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)  # only now: a refused encode leaves no empty OUT behind
    settings = settings_of(cfg, vae_info, items)

    # 2. resume or refuse ----------------------------------------------------------------------------------
    manifest = _resume_or_refuse(out, settings, cfg.overwrite)
    skips = [Skip(-1, s.rel, s.reason) for s in list_skips]
    skips += [
        Skip(r["input_index"], r["source"], r["reason"], r.get("key"))
        for r in read_skipped(out)
        if 0 <= r["input_index"] < manifest["next_input"]
    ]
    if manifest["complete"]:
        log.info("%s is already complete (%d samples); nothing to do", out, manifest["totals"]["samples"])
        return _result(out, manifest, skips, already_complete=True)

    # 3. encode ---------------------------------------------------------------------------------------------
    freeze(vae)
    vae.decoder = vae.post_quant_conv = None  # never used here; free their memory
    vae.encoder.to(device=device, dtype=dtype)
    if vae.quant_conv is not None:
        vae.quant_conv.to(device=device, dtype=dtype)
    start = manifest["next_input"]
    todo = items[start:]
    loader = torch.utils.data.DataLoader(
        PreparedInputs(todo, cfg, depth_index),
        batch_size=None,
        num_workers=cfg.num_workers if len(todo) > 1 else 0,
        collate_fn=lambda x: x,
        prefetch_factor=4 if cfg.num_workers and len(todo) > 1 else None,
    )
    sink = _ShardSink(out, manifest, skips, cfg.shard_size_mb * 2**20, lambda b: _encode_batch(vae, b, device, dtype))
    t0 = time.perf_counter()
    bar = tqdm(total=len(items), initial=start, unit="img", desc="encode", dynamic_ncols=True)
    try:
        for prepared in loader:
            item: InputItem = prepared["item"]
            if "skip" in prepared:
                skips.append(Skip(item.index, item.rel, prepared["skip"]))
            else:
                sink.add(item.index, prepared["samples"], cfg.batch_size)
            bar.update(1)
        sink.finish(len(items))
    finally:
        bar.close()
        sink.abort()
    elapsed = time.perf_counter() - t0
    log.info("encoded %d inputs in %.1f s (%.1f img/s)", len(todo), elapsed, len(todo) / max(elapsed, 1e-9))
    return _result(out, manifest, skips)


def _inputs(cfg: EncodeConfig) -> tuple[list[InputItem], list[Skip], dict[str, str] | None]:
    """(inputs, file-list entries that are no input, depth index or None), checking what needs no VAE."""
    if cfg.resolution < 8:
        raise EncodeError(f"--resolution {cfg.resolution} must be at least 8")  # the VAE's own factor: _encoder_vae
    if cfg.resize is not None and cfg.resize < cfg.resolution:
        raise EncodeError(f"--resize {cfg.resize} must be >= --resolution {cfg.resolution}")
    items, list_skips = discover_inputs(cfg.src)
    depth_index = index_depth_maps(cfg.depth_dir) if cfg.depth_dir else None
    if depth_index is not None:
        check_unique_stems(items)
    if Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        raise EncodeError(f"OUT {cfg.out} exists and is not a folder")
    return items, list_skips, depth_index


def _encoder_vae(cfg: EncodeConfig, depth: bool) -> tuple[Any, dict[str, Any]]:
    """The VAE and its manifest record (source, fingerprint, channels, factors), refused when it cannot encode
    these inputs at this resolution."""
    vae = load_vae(cfg.vae, cfg.subfolder, cfg.scaling_factor)
    info = vae_summary(vae)
    expected_in = 4 if depth else 3
    if info["in_channels"] != expected_in:
        hint = "give --depth-dir for an RGB+depth VAE" if info["in_channels"] == 4 else "drop --depth-dir"
        raise EncodeError(f"the VAE takes {info['in_channels']} input channels, this encode gives {expected_in}: {hint}")
    if cfg.resolution % info["downsample_factor"]:
        raise EncodeError(
            f"--resolution {cfg.resolution} must be a multiple of the VAE's downsampling factor {info['downsample_factor']}"
        )
    # A local path is recorded absolute so `train` finds the VAE from any working directory; a hub id as given.
    source = str(Path(cfg.vae).resolve()) if Path(cfg.vae).exists() else cfg.vae
    return vae, {"source": source, "subfolder": cfg.subfolder, "encoder_sha256": encoder_fingerprint(vae), **info}


def _resume_or_refuse(out: Path, settings: dict[str, Any], overwrite: bool) -> dict[str, Any]:
    """OUT's manifest to continue (a new one for a fresh or overwritten OUT), refusing OUT of other settings."""
    manifest = None
    if overwrite:
        _clear_out(out)
    elif (out / MANIFEST).exists():
        manifest = read_manifest(out)
        changed = _diff(manifest["settings"], settings)
        if changed:
            raise EncodeError(
                f"{out} holds shards made with other settings:\n  " + "\n  ".join(changed)
                + "\nRerun with the original settings to resume, choose another OUT, or pass --overwrite to replace them."
            )
    elif any(out.glob("shard-*.tar")):
        raise EncodeError(f"{out} holds shard files but no manifest.json; pass --overwrite to replace them")
    for stale in out.glob(".shard-*.partial"):
        stale.unlink()  # the unfinished tar of a killed run; its inputs are encoded again below
    if manifest is None:
        manifest = new_manifest(settings)
        # Recorded before the first shard exists: a kill between that shard's rename and its manifest update
        # must leave a folder this command resumes, not "shard files but no manifest.json".
        write_manifest(out, manifest)
    return manifest


class _ShardSink:
    """Encodes prepared samples in batches and writes them into shards. A shard is committed (then the manifest
    updated) only at the end of an input, once it holds `limit` bytes: an input's samples never span two shards,
    so a resumed encode restarts at an input boundary."""

    def __init__(self, out: Path, manifest: dict, skips: list[Skip], limit: float, encode_batch: Any):
        self.out, self.manifest, self.skips, self.limit, self.encode_batch = out, manifest, skips, limit, encode_batch
        self.writer: ShardWriter | None = None
        self.pending: list[tuple[int, PreparedSample, bool]] = []  # (input index, sample, last sample of its input)

    def add(self, index: int, samples: list[PreparedSample], batch_size: int) -> None:
        """Queue one input's samples; encode once a batch is full."""
        self.pending.extend((index, s, j == len(samples) - 1) for j, s in enumerate(samples))
        if len(self.pending) >= batch_size:
            self.flush()

    def flush(self) -> None:
        """Encode the queued samples; a non-finite one is skipped, not stored."""
        batch, self.pending = self.pending, []
        for (index, sample, last), m in zip(batch, self.encode_batch(batch)):
            if not np.isfinite(m).all():
                self.skips.append(Skip(index, sample.record["source"], "non-finite moments from the encoder", sample.key))
            else:
                if self.writer is None:
                    self.writer = ShardWriter(self.out, len(self.manifest["shards"]))
                self.writer.write(sample_members(sample.key, m, sample.pixels, sample.record, sample.depth))
            if last and self.writer is not None and self.writer.bytes >= self.limit:
                _commit(self.out, self.manifest, self.writer, index + 1, self.skips)
                self.writer = None

    def finish(self, n_inputs: int) -> None:
        """Encode what is queued, commit the last shard and mark the manifest complete."""
        if self.pending:
            self.flush()
        writer, self.writer = self.writer, None
        if writer is not None and writer.samples:
            _commit(self.out, self.manifest, writer, n_inputs, self.skips)
        elif writer is not None:
            writer.abort()
        self.manifest["complete"] = True
        self.manifest["next_input"] = n_inputs
        _write_state(self.out, self.manifest, self.skips)

    def abort(self) -> None:
        """Drop an unfinished shard (after an error; a no-op after finish)."""
        if self.writer is not None:
            self.writer.abort()


def _encode_batch(vae: Any, batch: list, device: torch.device, dtype: torch.dtype) -> list[np.ndarray]:
    """uint8 crops -> float16-ready moments, one (2C, h, w) array per sample (fp32)."""
    pixels = torch.from_numpy(np.stack([s.pixels for _, s, _ in batch])).permute(0, 3, 1, 2)  # (B, 3, H, W)
    x = to_model_range(pixels)
    if batch[0][1].depth is not None:
        depth = torch.from_numpy(np.stack([s.depth.astype(np.int32) for _, s, _ in batch]))[:, None]  # (B, 1, H, W)
        x = torch.cat([x, depth_to_model_range(depth)], dim=1)
    moments = encode_moments(vae, x.to(device=device, dtype=dtype))
    # fp16 storage: values beyond its range become inf and are caught as non-finite, not silently clipped.
    return list(moments.to(torch.float16).float().cpu().numpy())


def _commit(out: Path, manifest: dict, writer: ShardWriter, next_input: int, skips: list[Skip]) -> None:
    """Shard first, then skipped.jsonl, then the manifest: the manifest only names complete files."""
    entry = writer.commit()
    entry["inputs"] = [manifest["next_input"], next_input]
    manifest["shards"].append(entry)
    manifest["next_input"] = next_input
    _write_state(out, manifest, skips)


def _write_state(out: Path, manifest: dict, skips: list[Skip]) -> None:
    done = [s for s in skips if s.index < manifest["next_input"]]
    manifest["totals"] = {
        "samples": sum(s["samples"] for s in manifest["shards"]),
        "shards": len(manifest["shards"]),
        "inputs_skipped": sum(1 for s in done if s.key is None and s.index >= 0),
        "samples_skipped": sum(1 for s in done if s.key is not None),
        "list_entries_skipped": sum(1 for s in done if s.index < 0),  # missing/duplicate list lines, broken links
    }
    write_skipped(out, [{"input_index": s.index, "source": s.rel, "reason": s.reason, "key": s.key} for s in done])
    write_manifest(out, manifest)


def _result(out: Path, manifest: dict, skips: list[Skip], already_complete: bool = False) -> EncodeResult:
    t = manifest["totals"]
    return EncodeResult(
        out=out,
        samples=t["samples"],
        inputs=manifest["settings"]["source"]["inputs"],
        skipped_inputs=t["inputs_skipped"],
        skipped_samples=t["samples_skipped"],
        skipped_list_entries=t["list_entries_skipped"],
        shards=len(manifest["shards"]),
        already_complete=already_complete,
        skips=[{"source": s.rel, "reason": s.reason, "key": s.key} for s in skips],
    )
