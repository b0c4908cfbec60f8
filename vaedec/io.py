"""What vaedec writes to disk, in one place: atomic files and folders, in-memory PNG/npy, and the log.

Every writer builds its output under a temp name next to the target and renames it when complete, so a reader
(or a rerun after a kill) sees the old file or the new one, never half of one. Temp names are
`.NAME.<random hex>.tmp`. Before the rename every file gets mode 0666 and every folder 0777, minus the umask,
whatever wrote it: safetensors' `save_file` (and so diffusers' `save_pretrained`) creates 0600 files, which a
ComfyUI or pipeline running as another user (a shared models folder, a container with another uid) cannot read.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import logging
import os
import shutil
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vaedec.redact import redact

LOG_FORMAT = logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S")


class _Redacted(logging.Filter):
    """Every line vaedec logs goes through `redact`: a signed URL's token never reaches stderr or log.txt."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = redact(message)
        if masked != message:
            record.msg, record.args = masked, None
        return True


def umask() -> int:
    """The process's umask, read without changing it where Linux shows it (os.umask can only set it)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def usual_modes(path: str | os.PathLike) -> None:
    """Give `path` (a file, or a folder and everything in it) the umask's modes: 0666 / 0777 minus the umask."""
    mask = umask()
    path = Path(path)
    if not path.is_dir():
        os.chmod(path, 0o666 & ~mask)
        return
    os.chmod(path, 0o777 & ~mask)
    for root, dirs, files in os.walk(path):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~mask)
        for f in files:
            os.chmod(os.path.join(root, f), 0o666 & ~mask)


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Have `write(tmp_path)` write the whole file under a temp name, then fsync it and rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)
    try:
        write(str(tmp))
        usual_modes(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # the data is on disk before the name points at it
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """`data` as the file `path`, atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """JSON, pretty-printed, atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


@contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp folder next to `path`; when the block ends without an error it replaces `path` (an existing
    folder there is deleted first), on an error it is deleted. A folder under the final name is always whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):  # left by a killed earlier try
        shutil.rmtree(stale, ignore_errors=True)
    tmp = _temp_name(path)
    tmp.mkdir()
    try:
        yield tmp
        usual_modes(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def npy_bytes(array: np.ndarray) -> bytes:
    """An .npy file in memory (no pickle)."""
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def png_bytes(array: np.ndarray) -> bytes:
    """Lossless PNG of uint8 (H, W, 3) or uint16 (H, W)."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)  # fast; PNG is lossless at any level
    return buf.getvalue()


def setup_logging(logfile: str | os.PathLike | None = None) -> None:
    """vaedec's log: timestamped messages to stderr and, when given, to `logfile` (a run's log.txt).

    A second call replaces the handlers of the first: an earlier train() in this process must not keep writing
    its log.txt. Messages do not propagate to the root logger, so third-party logging setups do not print them
    twice.
    """
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if logfile is not None:
        Path(logfile).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(logfile))
    log = logging.getLogger("vaedec")
    for old in list(log.handlers):
        log.removeHandler(old)
        old.close()
    for h in handlers:
        h.setFormatter(LOG_FORMAT)
        h.addFilter(_Redacted())
        log.addHandler(h)
    log.setLevel(logging.INFO)
    log.propagate = False
