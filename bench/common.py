"""What the benchmark scripts share: a row of the combined table, the machine line, photographs."""

from __future__ import annotations

import os
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Row:
    """One figure of bench/all.py's table; `ratio` = figure / the section's reference (None: no ratio)."""

    section: str
    name: str
    figure: float
    unit: str
    ratio: float | None = None
    reference: str = ""  # what the ratio divides by; "" on the reference row itself

    def cells(self) -> list[str]:
        digits = 0 if abs(self.figure) >= 1000 else 2
        if self.ratio is None:
            ratio = ""
        elif not self.reference:
            ratio = "1.00× (reference)"
        else:
            ratio = f"{self.ratio:.2f}× {self.reference}"
        return [self.section, self.name, f"{self.figure:,.{digits}f}", self.unit, ratio]


def markdown_table(rows: list[Row]) -> str:
    """Rows as a markdown table: section | row | figure | unit | ratio vs reference."""
    lines = ["| section | row | figure | unit | ratio vs reference |", "|---|---|---:|---|---|"]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in rows]
    return "\n".join(lines)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> str:
    """One line naming where the figures come from."""
    cpu = f"{cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    gpu = f"; GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else "; no GPU used"
    return f"{cpu}{gpu}; torch {torch.__version__}, python {platform.python_version()}"


# scikit-image's colour photographs (greyscale ones and drawings would make PNGs unrealistically small).
PHOTOS = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "motorcycle_left.png",
    "retina.jpg",
    "rocket.jpg",
)


def copy_photos(out: Path) -> list[Path]:
    """Copy the colour photographs scikit-image ships into `out` (offline: they are inside the package)."""
    import skimage

    data = Path(skimage.__file__).parent / "data"
    out.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy(data / name, out / name)) for name in PHOTOS]
