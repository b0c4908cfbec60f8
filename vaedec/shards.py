"""The shard format, in one place: schema, shard writer, manifest, and decoding and checking samples.

A shard folder holds
    shard-000000.tar ...   WebDataset tars; a tar appears under its final name only once complete (a
                           multi-process encode names them shard-r{rank:03d}-{i:06d}.tar; readers take names
                           from the manifest)
    manifest.json          what was encoded, how, with which encoder (`new_manifest`); replaced atomically
    skipped.jsonl          one JSON line per input or sample that was not encoded, with the reason

Each sample in a tar is three (four) members sharing a dot-free key:
    KEY.moments.npy   float16 (2C, H/8, W/8): mean ‖ logvar of the encoder posterior, raw (before
                      scaling_factor), logvar clamped to [-30, 20] as diffusers does (vaedec/latents.py)
    KEY.latent.npy    instead of moments.npy for VAEs with a deterministic encoder (DC-AE, TAESD): float16
                      (C, h, w)
    KEY.image.png     the exact uint8 RGB pixels (H, W, 3) that were encoded, lossless
    KEY.depth.png     RGB+depth VAEs only: the 16-bit depth map (H, W), cropped like the image
    KEY.json          {"source": path relative to SRC, "orig_size": [w, h], "crop_box": [l, t, r, b] in
                      original pixels, "crop_index": i, "flip": bool, "upscaled": bool}
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from vaedec import __version__
from vaedec.errors import ShardError, ShardUnreachable
from vaedec.images import GREY16_MODES
from vaedec.io import atomic_write_bytes, atomic_write_json, npy_bytes, png_bytes
from vaedec.redact import redact
from vaedec.transport import (
    NAME_FIELD,
    PIPE_EXAMPLES,
    is_remote,
    iter_samples,
    local_folder,
    read_remote_bytes,
    shard_name,
    shard_url,
)

log = logging.getLogger("vaedec")

FORMAT = "vaedec-latent-shards"
FORMAT_VERSION = 1  # AutoencoderKL shards, unchanged since the first release
# Shards of other VAE classes (vaedec/families.py): settings.vae also names the family, what is stored, the
# rank its encode/decode take and the diffusion model's normalisation. A new version so that a vaedec from
# before families refuses them instead of reading them as an AutoencoderKL's.
FORMAT_VERSION_FAMILIES = 2
READABLE_VERSIONS = (FORMAT_VERSION, FORMAT_VERSION_FAMILIES)
STORED_MEMBER = {"moments": "moments.npy", "latent": "latent.npy"}  # settings.vae.store -> a sample's member
MANIFEST = "manifest.json"
SKIPPED = "skipped.jsonl"
SHARD_NAME = "shard-{:06d}.tar"
RANK_SHARD_NAME = "shard-r{:03d}-{:06d}.tar"  # multi-process encode: (rank, that rank's shard index)


# ------------------------------------------------------------------------------------------------------------
# encoding one sample


def sample_members(
    key: str, stored: np.ndarray, pixels: np.ndarray, record: dict, depth: np.ndarray | None = None,
    store: str = "moments",
) -> dict[str, Any]:
    """One sample as WebDataset members (already-encoded bytes); `stored` is the moments or the latent
    (`store`)."""
    assert "." not in key, key  # WebDataset splits keys at the first dot
    members = {
        "__key__": key,
        STORED_MEMBER[store]: npy_bytes(stored.astype(np.float16)),
        "image.png": png_bytes(pixels),
        "json": json.dumps(record, sort_keys=True).encode(),
    }
    if depth is not None:
        members["depth.png"] = png_bytes(depth)
    return members


class ShardWriter:
    """Writes shard-%06d.tar files into a folder; each goes to a temp name and is renamed when complete.
    `name` replaces SHARD_NAME (a multi-process encode's `shard-r001-000000.tar`: every rank numbers its own
    shards)."""

    def __init__(self, folder: str | Path, index: int, name: str | None = None):
        self.folder = Path(folder)
        self.index = index
        self.name = name or SHARD_NAME.format(index)
        self.tmp = self.folder / f".{self.name}.partial"
        self._file = open(self.tmp, "wb")  # noqa: SIM115 - stays open across write() calls until commit/abort
        # Fixed mtime: the same inputs give byte-identical tars, so a resumed encode equals an uninterrupted
        # one.
        self._tar = wds.TarWriter(self._file, encoder=False, mtime=0.0)
        self.samples = 0

    @property
    def bytes(self) -> int:
        return self._file.tell()

    def write(self, members: dict[str, Any]) -> None:
        self._tar.write(members)
        self.samples += 1

    def commit(self) -> dict[str, Any]:
        """Close, fsync and rename to the final name; returns the shard's manifest entry."""
        self._tar.close()  # closes the tar stream; the file object stays open
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        size = self.tmp.stat().st_size
        os.replace(self.tmp, self.folder / self.name)
        return {"name": self.name, "samples": self.samples, "bytes": size}

    def abort(self) -> None:
        """Drop the partial tar."""
        try:
            # Close the tar stream too, or its buffer is written to the closed file when collected; after a
            # full disk that write fails again, which does not matter: the file is deleted.
            with contextlib.suppress(OSError, ValueError):
                self._tar.close()
            self._file.close()
        finally:
            self.tmp.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------------------
# manifest


def new_manifest(settings: dict[str, Any]) -> dict[str, Any]:
    """An empty manifest for a fresh OUT (version 1 for an AutoencoderKL, as before; 2 for other families)."""
    store = settings["vae"].get("store", "moments")
    described = {
        "moments": "float16 (2*latent_channels, H/f, W/f): mean ‖ logvar, raw, logvar clamped [-30, 20]",
        "latent": "float16 (latent_channels, H/f, W/f): the deterministic encoder's latent, raw",
    }
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION if "family" not in settings["vae"] else FORMAT_VERSION_FAMILIES,
        "vaedec_version": __version__,
        "complete": False,
        "settings": settings,
        "sample": {
            STORED_MEMBER[store]: described[store],
            "image.png": "uint8 RGB (H, W, 3): the exact pixels encoded",
            "depth.png": "uint16 (H, W), RGB+depth only",
            "json": "source, orig_size, crop_box, crop_index, flip, upscaled",
        },
        "shards": [],
        "next_input": 0,
        "totals": {"samples": 0, "inputs_skipped": 0, "samples_skipped": 0, "list_entries_skipped": 0},
    }


def write_manifest(folder: str | Path, manifest: dict[str, Any]) -> None:
    """Replace OUT/manifest.json atomically: readers see the old manifest or the new one."""
    atomic_write_json(Path(folder) / MANIFEST, manifest)


def write_skipped(folder: str | Path, records: list[dict[str, Any]]) -> None:
    """Replace OUT/skipped.jsonl atomically, one JSON line per record."""
    lines = "".join(json.dumps(r) + "\n" for r in records)
    atomic_write_bytes(Path(folder) / SKIPPED, lines.encode())


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """Load and sanity-check the manifest.json of SHARDS (a folder, file://, http(s):// or pipe: spec)."""
    if is_remote(folder):
        url = shard_url(str(folder), MANIFEST)
        try:
            data = read_remote_bytes(str(folder), MANIFEST)
        except ShardUnreachable as e:
            raise ShardError(
                f"{e}: SHARDS {folder} must hold the manifest.json of `vaedec encode` next to its "
                "shards (upload the whole OUT folder)"
            ) from None
        return _checked_manifest(data, url)
    scheme = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", str(folder))
    if scheme and scheme.group(1).lower() != "file":  # s3://, gs://...: say how, rather than "not a folder"
        raise ShardError(
            f"{folder}: {scheme.group(1)}:// is not read directly; give an http(s):// URL or a pipe: "
            f"command with {NAME_FIELD} where the file name goes, e.g. {PIPE_EXAMPLES}"
        )
    path = local_folder(folder) / MANIFEST
    if not local_folder(folder).is_dir():
        raise ShardError(f"{folder} is not a folder; give the OUT folder of `cli.py encode`")
    if not path.is_file():
        raise ShardError(
            f"{path} not found: {folder} is not a vaedec shard folder (run `cli.py encode` first)"
        )
    return _checked_manifest(path.read_bytes(), path)


def _checked_manifest(data: bytes, path: str | Path) -> dict[str, Any]:
    """Parse manifest bytes read from `path` (named in the messages) and check its format and fields."""
    try:
        manifest = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardError(f"{path} is not valid JSON ({e}); re-encode with --overwrite") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ShardError(f"{path} is not a vaedec manifest (format {found!r})")
    if manifest.get("format_version") not in READABLE_VERSIONS:
        raise ShardError(
            f"{path} has format version {manifest.get('format_version')}; this vaedec reads "
            f"{', '.join(map(str, READABLE_VERSIONS))}"
        )
    missing = manifest_gaps(manifest)
    if missing:
        raise ShardError(f"{path} lacks {', '.join(missing)} (edited by hand?); re-encode with --overwrite")
    return manifest


# The fields readers rely on, as (path, type); encode always writes them all.
_MANIFEST_FIELDS = (
    (("complete",), bool),
    (("shards",), list),
    (("totals", "samples"), int),
    (("settings", "preprocessing", "resolution"), int),
    *(
        (("settings", "vae", k), t)
        for k, t in (
            ("source", str),
            ("encoder_sha256", str),
            ("in_channels", int),
            ("out_channels", int),
            ("latent_channels", int),
            ("downsample_factor", int),
        )
    ),
)
# Version 1 (AutoencoderKL) always has a scaling factor; version 2 says the family and its normalisation
# instead.
_VERSION_FIELDS = {
    FORMAT_VERSION: ((("settings", "vae", "scaling_factor"), float),),
    FORMAT_VERSION_FAMILIES: tuple(
        (("settings", "vae", k), t)
        for k, t in (("family", str), ("store", str), ("latent_rank", int), ("normalisation", dict))
    ),
}


def manifest_gaps(manifest: dict[str, Any]) -> list[str]:
    """Dotted names of required manifest fields that are absent or of the wrong type (empty = complete)."""
    gaps = []
    for keys, kind in _MANIFEST_FIELDS + _VERSION_FIELDS.get(manifest.get("format_version"), ()):
        value: Any = manifest
        for k in keys:
            value = value.get(k) if isinstance(value, dict) else None
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            gaps.append(".".join(keys))
    shards = manifest.get("shards")
    if isinstance(shards, list) and not all(
        isinstance(e, dict) and isinstance(e.get("name"), str) and isinstance(e.get("samples"), int)
        for e in shards
    ):
        gaps.append("shards[].name/samples")
    return gaps


def shard_paths(folder: str | Path, manifest: dict[str, Any]) -> list[str]:
    """The manifest's shards: absolute paths, each checked to exist; for remote SHARDS their URLs or pipe:
    commands (not checked: a missing one is a ShardUnreachable when it is read)."""
    if is_remote(folder):
        return [shard_url(str(folder), entry["name"]) for entry in manifest["shards"]]
    paths = []
    for entry in manifest["shards"]:
        p = local_folder(folder) / entry["name"]
        if not p.is_file():
            raise ShardError(
                f"{p} is listed in the manifest but missing: restore the file, or re-encode with --overwrite"
            )
        paths.append(str(p.resolve()))
    return paths


def read_skipped(folder: str | Path) -> list[dict[str, Any]]:
    """The lines of skipped.jsonl of a local shard folder (empty when absent). Only encode reads it, on its
    own OUT; remote SHARDS are never asked for theirs."""
    path = local_folder(folder) / SKIPPED
    if is_remote(folder) or not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------------------------
# reading


def decode_moments(data: bytes) -> np.ndarray:
    """moments.npy (or latent.npy) bytes -> float16 (2C or C, h, w); never unpickles."""
    return np.load(io.BytesIO(data), allow_pickle=False)


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes -> uint8 (H, W, 3) or uint16 (H, W) as stored."""
    with Image.open(io.BytesIO(data)) as im:
        if im.mode in GREY16_MODES:
            return np.asarray(im).astype(np.uint16)
        return np.asarray(im.convert("RGB") if im.mode != "RGB" else im).copy()


def stored_key(sample: dict[str, Any]) -> str:
    """ "latent" for a deterministic family's sample (latent.npy), else "moments": its batch key."""
    return "latent" if STORED_MEMBER["latent"] in sample else "moments"


def sample_to_tensors(sample: dict[str, Any], source: int | None = None) -> dict[str, Any]:
    """Decode the keys training needs: moments (2C, h, w) fp16 (or, for a deterministic family, latent
    (C, h, w)), pixels uint8 (C_out, H, W), key; and `source`, the index of the shard set it came from when
    sets are mixed."""
    stored = stored_key(sample)
    out = {
        "key": sample["__key__"],
        stored: torch.from_numpy(decode_moments(sample[STORED_MEMBER[stored]])),
        "pixels": torch.from_numpy(decode_png(sample["image.png"])).permute(2, 0, 1),  # uint8 (3, H, W)
    }
    if "depth.png" in sample:  # RGB+depth: raw 16-bit values, int32 since torch has no uint16 arithmetic
        out["depth"] = torch.from_numpy(decode_png(sample["depth.png"]).astype(np.int32))[None]  # (1, H, W)
    if source is not None:
        out["source"] = source
    return out


class BadSample(ValueError):
    """A sample training cannot use; the message says why."""


def checked_sample(
    sample: dict[str, Any], source: int | None = None, expect: dict[str, tuple[int, ...]] | None = None
) -> dict[str, Any]:
    """`sample_to_tensors`, or a BadSample: members missing or undecodable, non-finite moments, or a shape
    other than `expect` ({"moments": (2C, h, w), "pixels": (3, H, W)}; None = shapes not checked)."""
    missing = {STORED_MEMBER[stored_key(sample)], "image.png"} - set(sample)
    if missing:
        raise BadSample(f"missing {', '.join(sorted(missing))}")
    try:
        out = sample_to_tensors(sample, source)
    except Exception as e:  # noqa: BLE001 - numpy and Pillow raise many types for damaged bytes
        raise BadSample(f"cannot decode ({type(e).__name__}: {e})") from None
    for name, shape in (expect or {}).items():
        if name not in out:
            raise BadSample(f"no {STORED_MEMBER.get(name, name)}")
        if tuple(out[name].shape) != tuple(shape):
            raise BadSample(f"{name} shape {tuple(out[name].shape)}, expected {tuple(shape)}")
    stored = stored_key(sample)
    if not torch.isfinite(out[stored]).all():
        raise BadSample(f"non-finite {stored}")
    return out


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack a list of decoded samples into a batch."""
    stored = "latent" if "latent" in samples[0] else "moments"
    batch = {
        "key": [s["key"] for s in samples],
        stored: torch.stack([s[stored] for s in samples]),
        "pixels": torch.stack([s["pixels"] for s in samples]),
    }
    if "depth" in samples[0]:
        batch["depth"] = torch.stack([s["depth"] for s in samples])
    if "source" in samples[0]:
        batch["source"] = torch.tensor([s["source"] for s in samples])  # (B,) shard-set index
    return batch


def read_samples(
    paths: list[str], limit: int | None = None, skip_bad: bool = False
) -> Iterator[dict[str, Any]]:
    """Decoded samples from shards in order (validation, grids, verify). A bad sample or damaged tar is a
    ShardError naming shard and key, or with `skip_bad` a warning in the log and left out."""
    n = 0
    for path in paths:
        try:
            for sample in iter_samples(path):
                if limit is not None and n >= limit:
                    return
                try:
                    out = checked_sample(sample)
                except BadSample as e:
                    if not skip_bad:
                        raise ShardError(f"{path}: sample {sample.get('__key__')}: {e}") from None
                    log.warning(
                        "bad sample skipped: shard %s, key %s: %s", shard_name(path), sample.get("__key__"), e
                    )
                    continue
                yield out
                n += 1
        except ShardError as e:
            damaged = (
                str(path) in str(e) and "cannot be read" in str(e) and not isinstance(e, ShardUnreachable)
            )
            if not skip_bad or not damaged:
                raise
            log.warning("bad sample skipped: shard %s: %s", shard_name(path), e)


def summarize(folder: str | Path) -> str:
    """A human summary of the manifest of SHARDS (a folder, file://, http(s):// or pipe: spec)."""
    m = read_manifest(folder)
    s, vae, pre = m["settings"], m["settings"]["vae"], m["settings"]["preprocessing"]
    t = m["totals"]
    c = vae["latent_channels"]
    r = pre["resolution"] // vae["downsample_factor"]
    store = vae.get("store", "moments")
    stored = f"moments ({2 * c}, {r}, {r})" if store == "moments" else f"latent ({c}, {r}, {r})"
    norm = vae.get("normalisation", {"kind": "scale_shift"})
    scale = (
        f"scaling_factor {vae['scaling_factor']}, shift_factor {vae['shift_factor']}"
        if norm["kind"] == "scale_shift"
        else norm["kind"].replace("_", " ") + " (normalisation in the manifest)"
    )
    lines = [
        f"shards         {redact(str(folder))}"
        if is_remote(folder)
        else f"shard folder   {local_folder(folder).resolve()}",
        (
            "status         "
            f"{'complete' if m['complete'] else 'INCOMPLETE (rerun the encode command to resume)'}"
        ),
        f"vae            {vae['source']}"
        + (f" (subfolder {vae['subfolder']})" if vae.get("subfolder") else "")
        + f", {vae.get('family', 'AutoencoderKL')}",
        f"encoder sha256 {vae['encoder_sha256']}",
        (f"channels       in {vae['in_channels']}, out {vae['out_channels']}, latent {c}; {scale}"),
        (
            f"samples        {t['samples']} in {len(m['shards'])} shards; {stored} float16, "
            f"pixels {pre['resolution']}x{pre['resolution']}"
            + (" + 16-bit depth" if pre.get("depth") else "")
        ),
        f"preprocessing  shorter side -> {pre['resize_shorter_side_to']}, "
        + (f"{pre['crops_per_image']} random crops" if pre["crops_per_image"] else "center crop")
        + (", + mirrored copies" if pre["flip"] else "")
        + f", encoder dtype {pre['dtype']}, seed {pre['seed']}",
        f"inputs         {s['source']['inputs']} from {s['source']['src']}",
        (
            f"skipped        {t['inputs_skipped']} inputs, {t['samples_skipped']} samples, "
            f"{t.get('list_entries_skipped', 0)} missing/duplicate paths (see {SKIPPED})"
        ),
    ]
    return "\n".join(lines)


def verify(folder: str | Path) -> list[str]:
    """Read every sample of every shard of SHARDS (any spec); return a list of problems (empty = all good)."""
    m = read_manifest(folder)
    vae, pre = m["settings"]["vae"], m["settings"]["preprocessing"]
    c, f, res = vae["latent_channels"], vae["downsample_factor"], pre["resolution"]
    store = vae.get("store", "moments")
    member, channels = STORED_MEMBER[store], 2 * c if store == "moments" else c
    problems: list[str] = []
    keys: set[str] = set()
    for entry, path in zip(m["shards"], shard_paths(folder, m)):
        n = 0
        try:
            for sample in iter_samples(path):
                n += 1
                key = sample["__key__"]
                if key in keys:
                    problems.append(f"{entry['name']}: duplicate key {key}")
                keys.add(key)
                missing = {member, "image.png", "json"} - set(sample)
                if missing:
                    problems.append(f"{entry['name']}:{key}: missing {sorted(missing)}")
                    continue
                mom = decode_moments(sample[member])
                if mom.dtype != np.float16 or mom.shape != (channels, res // f, res // f):
                    problems.append(f"{entry['name']}:{key}: {store} {mom.dtype} {mom.shape}")
                elif not np.isfinite(mom).all():
                    problems.append(f"{entry['name']}:{key}: non-finite {store}")
                img = decode_png(sample["image.png"])
                if img.shape != (res, res, 3) or img.dtype != np.uint8:
                    problems.append(f"{entry['name']}:{key}: image {img.dtype} {img.shape}")
                if pre.get("depth"):
                    depth = decode_png(sample["depth.png"]) if "depth.png" in sample else None
                    if depth is None or depth.dtype != np.uint16 or depth.shape != (res, res):
                        problems.append(
                            f"{entry['name']}:{key}: depth.png missing or not uint16 ({res}, {res})"
                        )
                json.loads(sample["json"])
        except Exception as e:  # noqa: BLE001 - any damage in a tar must be reported, not crash the check
            problems.append(f"{entry['name']}: unreadable after {n} samples ({type(e).__name__}: {e})")
        if n != entry["samples"]:
            problems.append(f"{entry['name']}: {n} samples, manifest says {entry['samples']}")
    total = sum(e["samples"] for e in m["shards"])
    if total != m["totals"]["samples"]:
        problems.append(f"manifest totals say {m['totals']['samples']} samples, shards hold {total}")
    return problems
