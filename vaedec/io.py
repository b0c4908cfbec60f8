"""What vaedec writes to disk, in one place: atomic files and folders, in-memory PNG/npy, and the log.

Every writer builds its output under a temp name next to the target and renames it when complete, so a reader
(or a rerun after a kill) sees the old file or the new one, never half of one. Temp names are
`.NAME.<random hex>.tmp`; they are created with the usual permissions (mode 0666/0777 minus the umask), which a
rename keeps.
"""

from __future__ import annotations

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

LOG_FORMAT = logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S")


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Have `write(tmp_path)` write the whole file under a temp name, then fsync it and rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)
    try:
        write(str(tmp))
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
        log.addHandler(h)
    log.setLevel(logging.INFO)
    log.propagate = False
