"""`eval`'s report, apart from the scoring: the file names in --out and the markdown tables of a result, pure
functions of eval.json's dict, so that the export's model card can print them without importing the evaluation
(and, through it, the checkpoint module that writes the card)."""

from __future__ import annotations

from typing import Any

import numpy as np

EVAL_JSON, EVAL_REPORT = "eval.json", "report.md"  # in --out; export --eval reads eval.json into a model card


def _fmt(v: float | None, digits: int, signed: bool = False) -> str:
    if v is None or not np.isfinite(v):
        return "–"
    return f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"


def format_report(result: dict[str, Any]) -> str:
    """The markdown tables: one per data set, the baseline first, deltas with their intervals."""
    level = round(100 * result["config"]["confidence"])
    lines = []
    for s in result["sets"]:
        base = next(iter(s["models"].values()))
        enc = (
            f", encoded here from images ({s['skipped_inputs']} inputs skipped)" if s["encoded_here"] else ""
        )
        z = "z = mean" if s["latent"] == "mode" else "z = mean + std·eps (seeded per sample)"
        lines += [f"### {s['name']} — {s['samples']} samples, {z}{enc}", ""]
        cols = [
            "model",
            "PSNR dB",
            "SSIM",
            "LPIPS",
            "rFID",
            "colour shift (8-bit levels)",
            "decoder params",
            "decode img/s",
        ]
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for i, (label, m) in enumerate(s["models"].items()):
            d = s["deltas"].get(label, {})

            def cell(name: str, digits: int, _m=m, _d=d) -> str:
                text = _fmt(_m[name], digits)
                if name in _d:
                    x = _d[name]
                    mark = {"better": " ✓", "worse": " ✗"}.get(x["verdict"], "")
                    text += (
                        f" ({_fmt(x['mean'], digits, True)} [{_fmt(x['low'], digits, True)}, "
                        f"{_fmt(x['high'], digits, True)}]{mark})"
                    )
                return text

            shift = " ".join(f"{c} {_fmt(v, 1, True)}" for c, v in m["colour_shift"].items())
            name = f"{label} (baseline)" if i == 0 else label
            lines.append(
                f"| {name} | {cell('psnr', 2)} | {cell('ssim', 4)} | {cell('lpips', 4)} | "
                f"{_fmt(m['fid'], 2)} | {shift} | {_size_cells(m, base)} |"
            )
        lines.append("")
    lines.append(
        f"(Δ [{level}% CI]) against the baseline, per image on the same latents; ✓ / ✗: the paired "
        "bootstrap interval excludes 0 on the better / worse side. "
        + result["notes"]["lpips"]
        + " "
        + result["notes"]["fid"]
        + " "
        + result["notes"].get("speed", "")
    )
    return "\n".join(lines) + "\n"


def _size_cells(m: dict[str, Any], base: dict[str, Any]) -> str:
    """'decoder params | decode img/s' cells, each with its ratio to the baseline's (how much smaller,
    faster)."""
    cells = []
    for key, digits in (("decoder_parameters", 0), ("decode_images_per_s", 1)):
        v, b = m.get(key), base.get(key)
        text = "–" if v is None else f"{v:,.{digits}f}"
        if v is not None and b and m is not base:
            text += f" (×{v / b:.2f})"
        cells.append(text)
    return " | ".join(cells)
