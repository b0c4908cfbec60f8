"""Which torch device a command runs on (`encode` and `eval`; `train` leaves it to accelerate)."""

from __future__ import annotations

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
