"""Which torch device a command runs on (`encode` and `eval`; `train` leaves it to accelerate), and how a CPU
process keeps its memory between training steps."""

from __future__ import annotations

import ctypes

import torch

from vaedec.errors import VaedecError


class DeviceError(VaedecError):
    """--device names no device this machine has; the message says what to give instead."""


def pick_device(name: str | None) -> torch.device:
    """--device as a torch.device, checked before any work: None = cuda when present, else cpu."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"--device {name}: not a torch device; use cpu, cuda, cuda:1, mps, ...") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"--device {name}: torch sees no CUDA GPU on this machine; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"--device {name}: MPS is not available on this machine; use --device cpu")
    return device


# mallopt(3) parameters of glibc's malloc.h.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_BYTES = 32 << 20  # what glibc's dynamic mmap threshold grows to (DEFAULT_MMAP_THRESHOLD_MAX)


def keep_freed_heap() -> bool:
    """Have glibc keep the heap memory a training step frees, for the next step; True when it was set.

    A step on the CPU frees its activations when it returns (about 400 MB for SD's decoder at 128 px, batch 2);
    glibc then gives the free top of its heap back to the system (M_TRIM_THRESHOLD) and the next step faults
    every page in again, zero-filled: some 100k minor page faults, a tenth of the step's time. Trimming is
    switched off; since any mallopt ends glibc's dynamic thresholds, the mmap threshold is fixed at the value the
    dynamic one reaches. Results are the same bits; the process keeps its peak heap until it exits. Without
    glibc (no mallopt) nothing changes."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, -1))
