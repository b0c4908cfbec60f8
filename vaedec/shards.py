"""The shard format, in one place: schema, shard writer, manifest, and the training reader pipeline.

A shard folder holds
    shard-000000.tar ...   WebDataset tars; a tar appears under its final name only once complete (a multi-process
                           encode names them shard-r{rank:03d}-{i:06d}.tar; readers take names from the manifest)
    manifest.json          what was encoded, how, with which encoder (`new_manifest`); replaced atomically
    skipped.jsonl          one JSON line per input or sample that was not encoded, with the reason

Each sample in a tar is three (four) members sharing a dot-free key:
    KEY.moments.npy   float16 (2C, H/8, W/8): mean ‖ logvar of the encoder posterior, raw (before scaling_factor),
                      logvar clamped to [-30, 20] as diffusers does (vaedec/latents.py)
    KEY.image.png     the exact uint8 RGB pixels (H, W, 3) that were encoded, lossless
    KEY.depth.png     RGB+depth VAEs only: the 16-bit depth map (H, W), cropped like the image
    KEY.json          {"source": path relative to SRC, "orig_size": [w, h], "crop_box": [l, t, r, b] in original
                      pixels, "crop_index": i, "flip": bool, "upscaled": bool}
"""

from __future__ import annotations

import base64
import contextlib
import copy
import http.client
import io
import json
import logging
import os
import random
import re
import shlex
import subprocess
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit
from urllib.request import url2pathname

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from vaedec import __version__
from vaedec.images import GREY16_MODES
from vaedec.io import atomic_write_bytes, atomic_write_json, npy_bytes, png_bytes
from vaedec.redact import redact

log = logging.getLogger("vaedec")

FORMAT = "vaedec-latent-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SKIPPED = "skipped.jsonl"
SHARD_NAME = "shard-{:06d}.tar"
RANK_SHARD_NAME = "shard-r{:03d}-{:06d}.tar"  # multi-process encode: (rank, that rank's shard index)


class ShardError(ValueError):
    """A shard folder is missing, foreign or inconsistent; the message says which file and why."""


class ShardUnreachable(ShardError):
    """A file of remote SHARDS could not be fetched (HTTP error, no connection, a pipe: command that failed): not
    damage in the data, so training stops on it even with data.on_bad_sample=skip, as for a missing local shard."""


# ----------------------------------------------------------------------------------------------------------------
# encoding one sample


def sample_members(
    key: str, moments: np.ndarray, pixels: np.ndarray, record: dict, depth: np.ndarray | None = None
) -> dict[str, Any]:
    """One sample as WebDataset members (already-encoded bytes)."""
    assert "." not in key, key  # WebDataset splits keys at the first dot
    members = {
        "__key__": key,
        "moments.npy": npy_bytes(moments.astype(np.float16)),
        "image.png": png_bytes(pixels),
        "json": json.dumps(record, sort_keys=True).encode(),
    }
    if depth is not None:
        members["depth.png"] = png_bytes(depth)
    return members


class ShardWriter:
    """Writes shard-%06d.tar files into a folder; each goes to a temp name and is renamed when complete. `name`
    replaces SHARD_NAME (a multi-process encode's `shard-r001-000000.tar`: every rank numbers its own shards)."""

    def __init__(self, folder: str | Path, index: int, name: str | None = None):
        self.folder = Path(folder)
        self.index = index
        self.name = name or SHARD_NAME.format(index)
        self.tmp = self.folder / f".{self.name}.partial"
        self._file = open(self.tmp, "wb")  # noqa: SIM115 - stays open across write() calls until commit/abort
        # Fixed mtime: the same inputs give byte-identical tars, so a resumed encode equals an uninterrupted one.
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
            # Close the tar stream too, or its buffer is written to the closed file when collected; after a full
            # disk that write fails again, which does not matter: the file is deleted.
            with contextlib.suppress(OSError, ValueError):
                self._tar.close()
            self._file.close()
        finally:
            self.tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------------------------
# manifest


def new_manifest(settings: dict[str, Any]) -> dict[str, Any]:
    """An empty manifest for a fresh OUT."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "vaedec_version": __version__,
        "complete": False,
        "settings": settings,
        "sample": {
            "moments.npy": "float16 (2*latent_channels, H/f, W/f): mean ‖ logvar, raw, logvar clamped [-30, 20]",
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
            raise ShardError(f"{e}: SHARDS {folder} must hold the manifest.json of `vaedec encode` next to its "
                             "shards (upload the whole OUT folder)") from None
        return _checked_manifest(data, url)
    scheme = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", str(folder))
    if scheme and scheme.group(1).lower() != "file":  # s3://, gs://...: say how, rather than "not a folder"
        raise ShardError(f"{folder}: {scheme.group(1)}:// is not read directly; give an http(s):// URL or a pipe: "
                         f"command with {NAME_FIELD} where the file name goes, e.g. {PIPE_EXAMPLES}")
    path = local_folder(folder) / MANIFEST
    if not local_folder(folder).is_dir():
        raise ShardError(f"{folder} is not a folder; give the OUT folder of `cli.py encode`")
    if not path.is_file():
        raise ShardError(f"{path} not found: {folder} is not a vaedec shard folder (run `cli.py encode` first)")
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
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ShardError(
            f"{path} has format version {manifest.get('format_version')}; this vaedec reads {FORMAT_VERSION}"
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
    *((("settings", "vae", k), t) for k, t in (("source", str), ("encoder_sha256", str), ("in_channels", int),
                                              ("out_channels", int), ("latent_channels", int),
                                              ("downsample_factor", int), ("scaling_factor", float))),
)


def manifest_gaps(manifest: dict[str, Any]) -> list[str]:
    """Dotted names of required manifest fields that are absent or of the wrong type (empty = complete)."""
    gaps = []
    for keys, kind in _MANIFEST_FIELDS:
        value: Any = manifest
        for k in keys:
            value = value.get(k) if isinstance(value, dict) else None
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            gaps.append(".".join(keys))
    shards = manifest.get("shards")
    if isinstance(shards, list) and not all(
        isinstance(e, dict) and isinstance(e.get("name"), str) and isinstance(e.get("samples"), int) for e in shards
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
    """The lines of skipped.jsonl of a local shard folder (empty when absent). Only encode reads it, on its own
    OUT; remote SHARDS are never asked for theirs."""
    path = local_folder(folder) / SKIPPED
    if is_remote(folder) or not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------------------------------------------
# where shards live: SHARDS is a local folder, file:///abs/folder/, http(s)://host/folder/ (the manifest at
# <base>/manifest.json, shards at <base>/<name>) or pipe:CMD with {name} where the file name goes (CMD is run
# through /bin/sh exactly as written, as WebDataset's pipe: is, once per file, and its stdout read). Only JSON
# and tar bytes are read; nothing is unpickled.

PIPE = "pipe:"
NAME_FIELD = "{name}"
PIPE_EXAMPLES = "'pipe:aws s3 cp s3://bucket/shards/{name} -' or 'pipe:gsutil cat gs://bucket/shards/{name}'"
REMOTE_TIMEOUT_S = 60.0  # an http(s) connect or read that waits longer than this fails (and is named)
# A manifest's file names go into URLs and shell commands: plain file names only, nothing the shell interprets.
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def is_remote(spec: str | Path) -> bool:
    """True for http(s):// URLs and pipe: commands (read as streams); False for folders and file:// URLs."""
    s = str(spec)
    return s.startswith(PIPE) or s.lower().startswith(("http://", "https://"))


def local_folder(spec: str | Path) -> Path:
    """A local SHARDS as a Path: file:///abs/folder/ becomes /abs/folder, a plain path stays as given."""
    s = str(spec)
    return Path(url2pathname(urlsplit(s).path)) if s.startswith("file://") else Path(spec)


def shard_url(spec: str, name: str) -> str:
    """Where the file `name` of remote SHARDS is: <base>/<name> for a URL (query kept; or {name} filled in),
    CMD with {name} filled in for pipe:CMD."""
    if spec.startswith(PIPE) and (NAME_FIELD not in spec or not spec[len(PIPE):].strip()):
        raise ShardError(f"{spec!r}: a pipe: SHARDS must say where the file name goes with {NAME_FIELD}, e.g. "
                         f"{PIPE_EXAMPLES}; it is run once for manifest.json and once per shard")
    if not _PLAIN_NAME.fullmatch(name):
        raise ShardError(f"{spec}: the manifest names a file {name!r}; shard names are plain file names "
                         "(shard-000000.tar): re-encode, or fix the manifest")
    if spec.startswith(PIPE):
        return spec.replace(NAME_FIELD, name)
    if NAME_FIELD in spec:
        return spec.replace(NAME_FIELD, quote(name))
    parts = urlsplit(spec)
    return urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/" + quote(name)))


def shard_name(path: str) -> str:
    """The file name of a shard for logs and reports: shard-000003.tar for a path, URL or pipe: command."""
    path = str(path)
    if path.startswith(PIPE):
        names = re.findall(r"[A-Za-z0-9_][\w.-]*?\.tar(?![\w-])", path)  # shard_url put a plain name there
        return names[-1] if names else path
    if is_remote(path):
        return unquote(urlsplit(path).path.rsplit("/", 1)[-1]) or path
    return local_folder(path).name


def shards_spec(path: str) -> str:
    """The SHARDS a shard path, URL or pipe: command belongs to, as the user would write it (for hints)."""
    path, name = str(path), shard_name(path)
    if path.startswith(PIPE):
        return path.replace(name, NAME_FIELD)
    if is_remote(path):
        parts = urlsplit(path)
        return urlunsplit(parts._replace(path=parts.path.rsplit("/", 1)[0] + "/"))
    return str(local_folder(path).parent)


def spec_name(spec: str) -> str:
    """A SHARDS' short name (the key of its logs): its folder's name; for a URL its last path component, for
    pipe: the last path component before {name}."""
    s = str(spec)
    if s.startswith(PIPE):
        before = s[len(PIPE):].split(NAME_FIELD)[0]
        word = before.split()[-1] if before.strip() and not before[-1].isspace() else ""
        return word.rstrip("/").rsplit("/", 1)[-1] or "shards"
    if is_remote(s):
        parts = urlsplit(s.split(NAME_FIELD)[0])
        return unquote(parts.path.rstrip("/").rsplit("/", 1)[-1]) or parts.hostname or "shards"
    return local_folder(s).resolve().name


def _request(url: str) -> urllib.request.Request:
    """A GET of `url`; user:password@ in it is sent as HTTP basic authentication (urllib would take it for part
    of the host name)."""
    parts = urlsplit(url)
    if parts.username is None:
        return urllib.request.Request(url)
    userinfo = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
    bare = urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))
    return urllib.request.Request(bare, headers={"Authorization": "Basic " + base64.b64encode(userinfo).decode()})


class _HTTPStream:
    """The body of an http(s) response as a file; a broken connection is remembered for `failure`."""

    def __init__(self, url: str):
        self.url, self._failure, self._read = url, None, 0
        try:
            self._response = urllib.request.urlopen(_request(url), timeout=REMOTE_TIMEOUT_S)  # http(s) only
        except urllib.error.HTTPError as e:
            raise ShardUnreachable(f"{url}: HTTP {e.code} {e.reason}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as e:
            raise ShardUnreachable(f"{url} cannot be reached ({getattr(e, 'reason', e)})") from None

    def read(self, n: int = -1) -> bytes:
        try:
            data = self._response.read(n if n is not None and n >= 0 else None)
        except (OSError, http.client.HTTPException) as e:
            self._failure = f"{self.url}: the connection broke after {self._read} bytes ({type(e).__name__}: {e})"
            raise OSError(self._failure) from None
        self._read += len(data)
        return data

    def failure(self, finished: bool = False) -> str | None:
        """Why the transfer failed, or None (it did not, so any damage is in the bytes themselves)."""
        return self._failure

    def close(self) -> None:
        self._response.close()

    def __repr__(self) -> str:
        return self.url


class _PipeStream:
    """The stdout of a pipe: command as a file; its stderr goes to a temp file so that a failure can quote it."""

    def __init__(self, url: str):
        self.url, self.cmd, self._eof = url, url[len(PIPE):], False
        # stderr to a file, not a pipe: a chatty command cannot block on it. Closed in close().
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115
        try:  # through the shell, as WebDataset's pipe: does: the command runs exactly as the user wrote it
            self._proc = subprocess.Popen(self.cmd, shell=True, stdout=subprocess.PIPE, stderr=self._stderr)
        except OSError as e:
            self._stderr.close()
            raise ShardUnreachable(f"`{self.url}` cannot be started ({e})") from None

    def read(self, n: int = -1) -> bytes:
        data = self._proc.stdout.read(n)
        if n is None or n < 0 or len(data) < n:  # a buffered pipe returns short only at its end
            self._eof = True
        return data

    def failure(self, finished: bool = False) -> str | None:
        """The command's exit status and the tail of its stderr when it failed, or None. `finished`: the tar was
        read to its end (the rest, padding, is drained first); otherwise a command still sending data has not
        failed and the damage is in its bytes."""
        if finished:
            while self.read(1 << 16):
                pass
        if not self._eof:
            return None
        try:
            status = self._proc.wait(timeout=REMOTE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return f"`{self.url}` closed its output but did not exit within {REMOTE_TIMEOUT_S:g} s"
        if status == 0:
            return None
        self._stderr.seek(0)
        lines = [ln.strip() for ln in self._stderr.read().decode(errors="replace").splitlines() if ln.strip()]
        said = "; ".join(lines[-3:])[-400:]
        return f"`{self.url}` exited with status {status}" + (f": {said}" if said else " (it printed nothing)")

    def close(self) -> None:
        self._proc.stdout.close()  # a command still writing gets SIGPIPE
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        self._stderr.close()

    def __repr__(self) -> str:
        return self.url


def open_remote(url: str) -> _HTTPStream | _PipeStream:
    """A read stream of one remote file (a URL, or a pipe: command with the name filled in)."""
    return _PipeStream(url) if url.startswith(PIPE) else _HTTPStream(url)


def read_remote_bytes(spec: str, name: str) -> bytes:
    """The whole file `name` of remote SHARDS (the manifest); a ShardUnreachable names the URL or command and
    says why (HTTP status, connection, exit status and stderr)."""
    stream = open_remote(shard_url(spec, name))
    try:
        try:
            data = stream.read()
        except OSError:
            data = b""
        failure = stream.failure(finished=True)
    finally:
        stream.close()
    if failure:
        raise ShardUnreachable(failure)
    return data


# ----------------------------------------------------------------------------------------------------------------
# reading


def decode_moments(data: bytes) -> np.ndarray:
    """moments.npy bytes -> float16 (2C, h, w); never unpickles."""
    return np.load(io.BytesIO(data), allow_pickle=False)


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes -> uint8 (H, W, 3) or uint16 (H, W) as stored."""
    with Image.open(io.BytesIO(data)) as im:
        if im.mode in GREY16_MODES:
            return np.asarray(im).astype(np.uint16)
        return np.asarray(im.convert("RGB") if im.mode != "RGB" else im).copy()


def iter_samples(path: str) -> Iterator[dict[str, Any]]:
    """Raw samples of one tar (members as bytes), in file order, from a path, URL or pipe: command; a damaged
    tar is a ShardError naming it, a remote one that cannot be fetched a ShardUnreachable."""
    if is_remote(path):
        yield from _remote_samples(path)
        return
    try:
        yield from wds.DataPipeline(wds.SimpleShardList([path]), wds.tarfile_to_samples())
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ShardError(_damaged(path, e)) from None


def _damaged(path: str, e: BaseException) -> str:
    spec = shards_spec(path)
    return (f"{path} cannot be read ({type(e).__name__}: {e}): the shard is damaged. "
            f"`vaedec inspect {shlex.quote(spec) if is_remote(spec) else spec} --verify` lists every problem; "
            "re-encode with --overwrite to rebuild" + (" and upload again." if is_remote(spec) else "."))


def _remote_samples(url: str) -> Iterator[dict[str, Any]]:
    """iter_samples for a URL or pipe: command: WebDataset's tar expansion over our own stream, so that a failed
    transfer is told apart from damaged bytes (WebDataset's gopen would shell out to curl for http)."""
    stream = open_remote(url)
    try:
        try:
            files = wds.tariterators.tar_file_expander([{"url": url, "stream": stream}])
            yield from wds.tariterators.group_by_keys(files)
        except (tarfile.TarError, OSError, EOFError) as e:
            failure = stream.failure()
            raise (ShardUnreachable(failure) if failure else ShardError(_damaged(url, e))) from None
        failure = stream.failure(finished=True)
        if failure:
            raise ShardUnreachable(failure)
    finally:
        stream.close()


def unwrap_worker_errors(batches: Iterator[Any], timeout_s: float = 0) -> Iterator[Any]:
    """Re-raise a ShardError from a DataLoader worker with its own one-line message (torch re-raises it in the
    main process with the worker's whole traceback as the message), and a DataLoader timeout (`timeout_s`) as a
    ShardError that says what to look at."""
    try:
        yield from batches
    except ShardError as e:
        text, marker = str(e), "ShardError: "
        raise ShardError(text[text.rfind(marker) + len(marker) :].strip() if marker in text else text) from None
    except RuntimeError as e:
        if not timeout_s or "timed out" not in str(e):
            raise
        raise ShardError(
            f"no batch from the data loader in {timeout_s:g} s (data.read_timeout_s): a shard read is stuck (a "
            "pipe: command that does not end, a hung network mount or bucket). The newest checkpoint is intact: "
            "fix the cause and rerun the same command to resume, or raise data.read_timeout_s"
        ) from None


def sample_to_tensors(sample: dict[str, Any], source: int | None = None) -> dict[str, Any]:
    """Decode the keys training needs: moments (2C, h, w) fp16, pixels uint8 (C_out, H, W), key; and `source`,
    the index of the shard set it came from when sets are mixed."""
    out = {
        "key": sample["__key__"],
        "moments": torch.from_numpy(decode_moments(sample["moments.npy"])),
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
    """`sample_to_tensors`, or a BadSample: members missing or undecodable, non-finite moments, or a shape other
    than `expect` ({"moments": (2C, h, w), "pixels": (3, H, W)}; None = shapes not checked)."""
    missing = {"moments.npy", "image.png"} - set(sample)
    if missing:
        raise BadSample(f"missing {', '.join(sorted(missing))}")
    try:
        out = sample_to_tensors(sample, source)
    except Exception as e:  # noqa: BLE001 - numpy and Pillow raise many types for damaged bytes
        raise BadSample(f"cannot decode ({type(e).__name__}: {e})") from None
    for name, shape in (expect or {}).items():
        if tuple(out[name].shape) != tuple(shape):
            raise BadSample(f"{name} shape {tuple(out[name].shape)}, expected {tuple(shape)}")
    if not torch.isfinite(out["moments"]).all():
        raise BadSample("non-finite moments")
    return out


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack a list of decoded samples into a batch."""
    batch = {
        "key": [s["key"] for s in samples],
        "moments": torch.stack([s["moments"] for s in samples]),
        "pixels": torch.stack([s["pixels"] for s in samples]),
    }
    if "depth" in samples[0]:
        batch["depth"] = torch.stack([s["depth"] for s in samples])
    if "source" in samples[0]:
        batch["source"] = torch.tensor([s["source"] for s in samples])  # (B,) shard-set index
    return batch


def _assign_shards(shards: list[str], rank: int, world: int, worker: int, workers: int) -> tuple[list[str], int, int]:
    """Shards for one (rank, worker) and, when there are too few shards, a sample-level split (stride, offset)."""
    slots, slot = world * workers, rank * workers + worker
    if len(shards) >= slots:
        return shards[slot::slots], 1, 0
    # Fewer shards than readers: every reader reads all shards and keeps every `slots`-th sample, so no reader
    # is ever empty (an empty reader would hang the DataLoader) and ranks never see the same sample.
    return shards, slots, slot


def new_position() -> dict[str, int]:
    """A set reader's position at the start of its stream (TrainStream: "Position")."""
    return {"epoch": 0, "shard": 0, "sample": 0, "count": 0, "taken": 0}


class TrainStream(torch.utils.data.IterableDataset):
    """An endless, seeded, rank- and worker-split stream of batches from shards, optionally mixing shard sets,
    that starts at any recorded position by reading again at most the shards of one shuffle block.

    Roles. Each DataLoader worker plays a role r in [0, W): role r reads its own share of every set's shards
    (`_assign_shards`) and gives batches r, r+W, r+2W, ... of this rank (DataLoader's in-order fetch). Worker w
    plays role (w + first_role) % W, so that a resumed DataLoader, whose worker 0 always delivers first, goes on
    with the role whose batch is next.

    Order, a pure function of (seed, rank, role, set): each epoch permutes the reader's shards with seed+epoch and
    reads them in turn (every `stride`-th sample when there are fewer shards than readers); the samples are cut
    into blocks of `shuffle_buffer` and each block is permuted with a seed made of its start position. A block
    shuffle (as MosaicML streaming does) rather than webdataset's sliding buffer: a sliding buffer holds samples
    from arbitrarily far back, so recovering it means replaying the stream. With `mix` = [(shards, p), ...]
    each sample slot draws set i with probability p_i (else `shards`), by a choice seeded with the slot's number.

    Position. A set reader is at {"epoch", "shard" (index into that epoch's shard order), "sample" (raw samples
    of that shard before the current block), "count" (raw samples of the epoch before the block), "taken"
    (samples of the block already handed on)}; a role is at {"sets": [one per set], "mix": slots drawn}. Each
    batch carries its role's position after it (`position`); a checkpoint keeps the last one of every role and
    `positions` ({role: position}) starts the roles there: a reader opens the block's first shard, skips
    `sample` samples without decoding them, refills the block and drops `taken`.

    Bad samples (checked_sample) and the rest of a damaged tar are left out with on_bad_sample="skip": each batch
    carries `worker` (its role) and `bad_samples` (reports {shard, key, reason}). The position counts dropped
    samples too, so a resumed stream skips them as the killed one did.
    """

    def __init__(
        self,
        shards: list[str],
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 1000,
        mix: list[tuple[list[str], float]] = (),
        on_bad_sample: str = "error",
        expect: dict[str, tuple[int, ...]] | None = None,
        positions: dict[int, dict[str, Any]] | None = None,
        first_role: int = 0,
    ):
        super().__init__()
        if not shards or any(not m for m, _ in mix):
            raise ShardError("no training shards")
        self.sets = [list(shards)] + [list(m) for m, _ in mix]
        self.weights = [1 - sum(p for _, p in mix)] + [p for _, p in mix]  # the first is data.shards
        self.batch_size, self.seed = batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.shuffle_buffer = shuffle_buffer
        # "skip": bad samples and the rest of a damaged tar are left out of the stream and reported with the
        # batch (bad_samples); "error": a ShardError. expect: shapes checked per sample.
        self.on_bad_sample, self.expect = on_bad_sample, expect
        self.positions, self.first_role = dict(positions or {}), first_role
        self._reports: list[dict[str, Any]] = []  # this reader's bad samples not yet attached to a batch

    def _raw(self, index: int, role: int, workers: int, pos: dict[str, int]) -> Iterator[tuple[dict, dict]]:
        """(raw sample, the reader's position just after it) of set `index`, from `pos` on, for ever."""
        mine, stride, offset = _assign_shards(self.sets[index], self.rank, self.world_size, role, workers)
        tag = f"-set{index}" if index else ""
        epoch, first, skip, count = pos["epoch"], pos["shard"], pos["sample"], pos["count"]
        while True:
            order = list(mine)
            random.Random(f"{self.seed}-{epoch}{tag}").shuffle(order)
            whole, kept = first == 0 and skip == 0, 0
            for j in range(first, len(order)):
                tar = self._tar_samples(order[j])
                k, ahead = -1, next(tar, None)
                while ahead is not None:
                    # One sample read ahead: after a tar's last sample the position is the next tar's start,
                    # so that a resume never opens a tar only to find it finished.
                    sample, ahead, k = ahead, next(tar, None), k + 1
                    if k < skip:  # read again to reach the position, not decoded
                        continue
                    count += 1
                    if (count - 1) % stride == offset:
                        kept += 1
                        at = (j, k + 1) if ahead is not None else (j + 1, 0)
                        yield sample, {"epoch": epoch, "shard": at[0], "sample": at[1], "count": count}
                skip = 0
            if whole and kept == 0:  # every tar damaged at its start: an endless loop over nothing otherwise
                raise ShardError(f"none of {len(mine)} shards gave a readable sample: "
                                 + "; ".join(r["reason"] for r in self._reports[-3:]))
            epoch, first, skip, count = epoch + 1, 0, 0, 0

    def _tar_samples(self, path: str) -> Iterator[dict[str, Any]]:
        """iter_samples; with on_bad_sample=skip a damaged tar ends where it breaks and is reported."""
        last = None
        try:
            for sample in iter_samples(path):
                last = sample.get("__key__")
                yield sample
        except ShardUnreachable:
            raise  # not damage: a shard that cannot be fetched stops the run, as a missing local one does
        except ShardError as e:
            if self.on_bad_sample != "skip":
                raise
            where = f"after {last}" if last else "before its first sample"
            self._reports.append({"shard": shard_name(path), "key": last,
                                  "reason": f"damaged tar, rest skipped {where}: {e}"})

    def _set_stream(self, index: int, role: int, workers: int, pos: dict[str, int]) -> Iterator[dict[str, Any]]:
        """Set `index`'s block-shuffled samples for one role, from `pos` on; `pos` is kept at the position after
        the last sample handed on."""
        size, tag = max(self.shuffle_buffer, 1), f"-set{index}" if index else ""
        raw = self._raw(index, role, workers, pos)
        while True:
            start = "-".join(str(pos[k]) for k in ("epoch", "shard", "sample", "count"))
            reported = len(self._reports)
            block = [next(raw) for _ in range(size)]  # [(raw sample, position after it)]
            if pos["taken"]:  # a resumed block: what its refill met was reported when the killed run filled it
                del self._reports[reported:]
            order = list(range(size))
            if size > 1:
                random.Random(f"{self.seed}-{self.rank}-{role}{tag}-block-{start}").shuffle(order)
            for t in range(pos["taken"], size):
                if t + 1 < size:
                    pos["taken"] = t + 1
                else:  # the block is done: the next one starts after its last raw sample
                    pos.update(block[-1][1], taken=0)
                yield block[order[t]][0]

    def _samples(self, role: int, workers: int, position: dict[str, Any]) -> Iterator[tuple[int, dict[str, Any]]]:
        """(set index, raw sample), the set drawn per sample slot with the mix probabilities; advances `position`."""
        streams = [self._set_stream(i, role, workers, position["sets"][i]) for i in range(len(self.sets))]
        indices = range(len(streams))
        while True:
            i = 0
            if len(streams) > 1:
                slot = position["mix"]
                i = random.Random(f"{self.seed}-{self.rank}-{role}-mix-{slot}").choices(indices, self.weights)[0]
                position["mix"] = slot + 1
            yield i, next(streams[i])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        role = (worker + self.first_role) % workers
        start = self.positions.get(role) or {"sets": [new_position() for _ in self.sets], "mix": 0}
        position = copy.deepcopy(start)
        samples = self._samples(role, workers, position)
        mixing = len(self.sets) > 1
        while True:
            good, bad = [], 0
            while len(good) < self.batch_size:
                i, raw = next(samples)
                try:
                    good.append(checked_sample(raw, i if mixing else None, self.expect))
                except BadSample as e:
                    shard = shard_name(raw.get("__url__", "?"))
                    if self.on_bad_sample != "skip":
                        raise ShardError(f"{raw.get('__url__', shard)}: sample {raw.get('__key__')}: {e}. "
                                         "Set data.on_bad_sample=skip to train without it") from None
                    self._reports.append({"shard": shard, "key": raw.get("__key__"), "reason": str(e)})
                    bad += 1
                    if bad > 100 * self.batch_size + 1000:
                        raise ShardError(f"{bad} bad samples in a row (the last {raw.get('__key__')} in {shard}: "
                                         f"{e}); check the shards with `vaedec inspect SHARDS --verify`")
            batch = collate(good)
            # Reported with the batch: the main process logs and counts them and keeps the position (DataLoader
            # workers cannot).
            batch.update(worker=role, bad_samples=list(self._reports),
                         position=copy.deepcopy(position))
            self._reports.clear()
            yield batch


def read_samples(paths: list[str], limit: int | None = None, skip_bad: bool = False) -> Iterator[dict[str, Any]]:
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
                    log.warning("bad sample skipped: shard %s, key %s: %s", shard_name(path), sample.get("__key__"), e)
                    continue
                yield out
                n += 1
        except ShardError as e:
            damaged = str(path) in str(e) and "cannot be read" in str(e) and not isinstance(e, ShardUnreachable)
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
    lines = [
        f"shards         {redact(str(folder))}" if is_remote(folder) else f"shard folder   {local_folder(folder).resolve()}",
        f"status         {'complete' if m['complete'] else 'INCOMPLETE (rerun the encode command to resume)'}",
        f"vae            {vae['source']}" + (f" (subfolder {vae['subfolder']})" if vae.get("subfolder") else ""),
        f"encoder sha256 {vae['encoder_sha256']}",
        (
            f"channels       in {vae['in_channels']}, out {vae['out_channels']}, latent {c}; "
            f"scaling_factor {vae['scaling_factor']}, shift_factor {vae['shift_factor']}"
        ),
        (
            f"samples        {t['samples']} in {len(m['shards'])} shards; moments ({2 * c}, {r}, {r}) float16, "
            f"pixels {pre['resolution']}x{pre['resolution']}" + (" + 16-bit depth" if pre.get("depth") else "")
        ),
        f"preprocessing  shorter side -> {pre['resize_shorter_side_to']}, "
        + (f"{pre['crops_per_image']} random crops" if pre["crops_per_image"] else "center crop")
        + (", + mirrored copies" if pre["flip"] else "") + f", encoder dtype {pre['dtype']}, seed {pre['seed']}",
        f"inputs         {s['source']['inputs']} from {s['source']['src']}",
        (f"skipped        {t['inputs_skipped']} inputs, {t['samples_skipped']} samples, "
        f"{t.get('list_entries_skipped', 0)} missing/duplicate paths (see {SKIPPED})"),
    ]
    return "\n".join(lines)


def verify(folder: str | Path) -> list[str]:
    """Read every sample of every shard of SHARDS (any spec); return a list of problems (empty = all good)."""
    m = read_manifest(folder)
    vae, pre = m["settings"]["vae"], m["settings"]["preprocessing"]
    c, f, res = vae["latent_channels"], vae["downsample_factor"], pre["resolution"]
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
                missing = {"moments.npy", "image.png", "json"} - set(sample)
                if missing:
                    problems.append(f"{entry['name']}:{key}: missing {sorted(missing)}")
                    continue
                mom = decode_moments(sample["moments.npy"])
                if mom.dtype != np.float16 or mom.shape != (2 * c, res // f, res // f):
                    problems.append(f"{entry['name']}:{key}: moments {mom.dtype} {mom.shape}")
                elif not np.isfinite(mom).all():
                    problems.append(f"{entry['name']}:{key}: non-finite moments")
                img = decode_png(sample["image.png"])
                if img.shape != (res, res, 3) or img.dtype != np.uint8:
                    problems.append(f"{entry['name']}:{key}: image {img.dtype} {img.shape}")
                if pre.get("depth"):
                    depth = decode_png(sample["depth.png"]) if "depth.png" in sample else None
                    if depth is None or depth.dtype != np.uint16 or depth.shape != (res, res):
                        problems.append(f"{entry['name']}:{key}: depth.png missing or not uint16 ({res}, {res})")
                json.loads(sample["json"])
        except Exception as e:  # noqa: BLE001 - any damage in a tar must be reported, not crash the check
            problems.append(f"{entry['name']}: unreadable after {n} samples ({type(e).__name__}: {e})")
        if n != entry["samples"]:
            problems.append(f"{entry['name']}: {n} samples, manifest says {entry['samples']}")
    total = sum(e["samples"] for e in m["shards"])
    if total != m["totals"]["samples"]:
        problems.append(f"manifest totals say {m['totals']['samples']} samples, shards hold {total}")
    return problems
