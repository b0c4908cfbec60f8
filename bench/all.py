"""`python bench/all.py` (`make bench`): every benchmark of bench/ in one run, printed as one markdown table.

Sections, each measured side by side against its own reference in this run (see each script's docstring):
  encode        bench/encode.py        `encode` end to end vs the encoder forward alone
  train step    bench/train_step.py    (a)-(d): this trainer's step vs the alternatives
  train loop    bench/train_loop.py    a step of `cli.py train` (subprocess) vs the bare decoder step, 128 px
  shard read    bench/shard_read.py    training's reader, images/s per DataLoader worker, 256 px
  resume        bench/shard_read.py    seconds to the first batch of a resumed stream, early and 10,000
                                       epochs in
  bytes on disk bench/shard_read.py    shard bytes per sample, 256 px photographs
  train memory  bench/train_memory.py  peak RSS of `cli.py train` on a small and a large data set
`--write docs/benchmarks.md` also writes the table with the date, the command and the machine (atomically).
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

# Before torch: tqdm (which torch imports) reads TQDM_* once, at import. encode's bars would bury the table.
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from bench import encode as encode_bench
from bench import shard_read, train_loop, train_memory, train_step
from bench.common import Row, machine, markdown_table
from vaedec.io import atomic_write_bytes

GPU_COMMAND = "python bench/all.py --device cuda --dtype bf16"


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run_all(quick: bool, device: torch.device, dtype: str) -> tuple[list[Row], list[str]]:
    """Measure every section; returns the rows and one line per section saying what it ran on."""
    cuda = device.type == "cuda"
    rows: list[Row] = []
    notes: list[str] = []

    log("encode: pipeline vs encoder forward")
    e = encode_bench.measure(
        images=4 if quick else None, repeats=1 if quick else 3, dtype=dtype, device=str(device)
    )
    rows += encode_bench.rows(e)
    notes.append(
        f"encode: {encode_bench.MODEL}; {e.setup}; fastest of {e.repeats} interleaved rounds; {e.device}"
    )

    log("train step: (a)-(d)")
    resolution, batch = (256, 4) if cuda else (64, 2)
    t = train_step.measure(
        resolution, batch, steps=1 if quick else 6, warmup=1, device=str(device), dtype=dtype
    )
    rows += train_step.rows(t)
    spread = ", ".join(f"({k}) {min(v):.1f}-{max(v):.1f}" for k, v in t.times.items())
    notes.append(
        f"train step: {train_step.MODEL}; {resolution} px, batch size {batch}, dtype {dtype}, "
        f"median of {t.steps} timed steps after {t.warmup} warm-up, variants interleaved; GAN term on; "
        f"min-max s/step {spread} (ratios inside these spreads are noise)"
    )

    if not cuda:  # the CPU's question: what the loop around the decoder costs (a GPU step is measured above)
        log("train loop: `cli.py train` step vs bare decoder step (128 px)")
        loop = train_loop.measure(rounds=1 if quick else 3, steps=4 if quick else 8)
        rows += train_loop.rows(loop)
        notes.append(
            f"train loop: {train_loop.MODEL}; {loop.resolution} px, batch size {loop.batch_size}, fp32; "
            f"{loop.rounds} rounds of a `cli.py train` subprocess ({loop.steps} steps, the first dropped) "
            f"then {loop.steps} bare steps in this process; medians; min-max s/step train "
            f"{min(loop.train):.2f}-{max(loop.train):.2f}, bare {min(loop.bare):.2f}-{max(loop.bare):.2f}"
        )

    log("shard read + bytes on disk (256 px)")
    s = shard_read.measure(crops_per_image=4 if quick else 16, rounds=1 if quick else 3)
    rows += shard_read.rows(s)
    members = ", ".join(f"{ext} {b:,.0f} B" for ext, b in sorted(s.member_bytes.items()))
    notes.append(
        f"shard read, bytes on disk: {shard_read.MODEL}; {s.setup}; CPU (the reader never uses the "
        f"GPU); members' mean size: {members}, the rest is tar headers and padding"
    )

    log("train memory: two data-set sizes")
    sizes, steps = ((100, 1000), 63) if quick else ((200, 4000), 250)
    m = train_memory.measure(sizes, steps, dtype=dtype)
    rows += train_memory.rows(m)
    notes.append(
        f"train memory: {train_memory.MODEL}; {m.setup}; `python cli.py train` subprocess, "
        "peak RSS from wait4 (ru_maxrss)"
    )
    return rows, notes


def document(
    table: str,
    notes: list[str],
    command: str,
    device: torch.device,
    dtype: str,
    quick: bool,
    started: datetime,
    wall_s: float,
    load: float,
) -> str:
    """docs/benchmarks.md: the table and everything needed to read it and to rerun it."""
    if device.type == "cuda":
        gpu = f"Measured on {torch.cuda.get_device_name(device)}, dtype {dtype}."
    else:
        gpu = (
            "GPU figures (256 px, bf16) are missing: no GPU was lent to the task that ran this. On a machine "
            f"with one, `{GPU_COMMAND}` prints them (encode and train step at 256 px on the GPU)."
        )
    lines = [
        "# Benchmarks",
        "",
        (
            "Written by `make bench` (bench/all.py); every figure below is pasted by that run from its own "
            "output."
        ),
        "",
        f"- date: {started:%Y-%m-%d %H:%M} UTC; the run took {wall_s / 60:.1f} min"
        + (" (`--quick`: fewer rounds and samples)" if quick else ""),
        f"- command: `{command}`",
        f"- machine: {machine(device)}; load average {load:.2f} at the start",
        (
            "- conditions: the load average above says whether other jobs shared the cores (near or above "
            "the core count: absolute figures are inflated by contention); the ratios compare rows measured "
            "side by side (interleaved) in this same run"
        ),
        f"- {gpu}",
        "",
        table,
        "",
        "What each section ran on (random weights everywhere: speed does not depend on the values):",
        "",
        *[f"- {n}" for n in notes],
        "",
        (
            "Reading the ratios: encode, end to end / forward (1.00 = the encoder is the only cost); train "
            "step, images/s / (a)'s (> 1 = faster than this trainer); shard read, 1 worker / the main "
            "process alone; bytes, on disk / raw uint8 pixels; train memory, large data set / small (1.00 = "
            "memory does not grow with the data: `train` streams, and holds at most data.shuffle_buffer "
            "samples per reader)."
        ),
        "",
    ]
    return "\n".join(lines)


@click.command(context_settings={"show_default": True})
@click.option("--quick", is_flag=True, help="Fewer rounds, images and steps (about a third of the time).")
@click.option(
    "--device", default=None, help="torch device for encode and train step [default: cuda if available]."
)
@click.option(
    "--dtype",
    type=click.Choice(["fp32", "bf16"]),
    default="fp32",
    help="Encoder dtype and training autocast dtype.",
)
@click.option(
    "--write",
    "write",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write the table, date, command and machine to this markdown file (atomically).",
)
def main(quick: bool, device: str | None, dtype: str, write: Path | None) -> None:
    """Every benchmark, one table: section | row | figure | unit | ratio vs its reference."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    started, t0, load = datetime.now(timezone.utc), time.perf_counter(), os.getloadavg()[0]
    rows, notes = run_all(quick, dev, dtype)
    wall_s = time.perf_counter() - t0
    table = markdown_table(rows)
    print(table)
    print()
    for n in notes:
        print(f"- {n}")
    print(f"\nmachine: {machine(dev)}; load average {load:.2f} at the start; {wall_s / 60:.1f} min")
    if write is not None:
        command = shlex.join(["python", "bench/all.py", *sys.argv[1:]])
        text = document(table, notes, command, dev, dtype, quick, started, wall_s, load)
        write.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(write, text.encode())
        log(f"wrote {write}")


if __name__ == "__main__":
    main()
