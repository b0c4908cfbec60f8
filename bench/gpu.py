"""`python bench/gpu.py` (`make bench-gpu`): the GPU figures in one command, within 8 minutes on one GPU.

Sections, each row measured next to its reference in this run (random weights: speed does not depend on them):
  train step  bf16, 256 px, SD 1.x VAE architecture: vaedec's step (z from stored moments, L1 + LPIPS +
              PatchGAN with the adaptive λ, the GAN on, as configs/ldm_kl_f8.yaml once past disc_start_step)
              next to the bare decoder step (forward, L1, backward, Adam) — bench/train_step.py's (a) and (d)
              — and each one's model FLOP utilisation: the FLOPs of one step counted by
              torch.utils.flop_counter.FlopCounterMode (convolutions and matmuls, forward and backward) / the
              median step time / the device's dense peak
  fp16        the same step (a) under fp16 autocast with accelerate's GradScaler: images/s, the optimizer
              updates the scaler skipped while finding its scale, the final scale, and that every weight
              stayed finite
  encode      `encode` end to end next to the encoder forward alone (bench/encode.py), bf16
  max batch   the largest batch of step (a) in bf16 at 512 and 1024 px, with and without the decoder's
              gradient checkpointing: doubling until CUDA runs out of memory, then bisecting; capped in batch
              and in time
`--device cpu --quick` runs every section at toy sizes (a small VAE, 32-64 px) in seconds: the test suite
does, so this script cannot rot. Its figures mean nothing; the max-batch search runs on CUDA only (a CPU has
no out-of-memory error to catch, the kernel kills the process), except up to the toy cap of --quick.
"""

from __future__ import annotations

import gc
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

# Before torch: tqdm (which torch imports) reads TQDM_* once, at import. encode's bars would bury the table.
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import click
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from bench import encode as encode_bench
from bench.common import Row, machine, markdown_table
from bench.train_step import MODEL, StepBench, sync, time_steps
from vaedec.io import atomic_write_bytes
from vaedec.vae import SD_VAE_CONFIG, small_vae_config

COMMAND = "make bench-gpu"
# Dense (no sparsity) bf16/fp16 tensor-core peaks from NVIDIA's datasheets, TFLOP/s, by a substring of
# torch.cuda.get_device_name; the first match wins. Any other device: MFU "unknown".
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))


@dataclass(frozen=True)
class Sizes:
    """How big each section is: the GPU run, or the toy CPU run of --quick."""

    vae_config: dict = field(default_factory=lambda: dict(SD_VAE_CONFIG))  # SD 1.x VAE architecture
    lpips: bool = True  # LPIPS (random VGG16) in step (a), as configs/ldm_kl_f8.yaml
    disc_ndf: int = 64  # PatchGAN width (LDM's)
    resolution: int = 256  # train step, fp16 and encode, pixels
    batch_size: int = 8  # train step and fp16
    steps: int = 10  # timed steps per variant (median), after `warmup`
    warmup: int = 3
    fp16_steps: int = 40  # fp16 steps run; the scaler halves from 65536 on each overflowing one
    encode_images: int = 256
    encode_batch: int = 32
    encode_workers: int = 8
    encode_repeats: int = 2
    max_batch_resolutions: tuple[int, ...] = (512, 1024)
    max_batch_cap: int = 256  # the search stops here (the row says so)
    max_batch_budget_s: float = 240.0  # and here, for all four searches together


QUICK = Sizes(
    vae_config=small_vae_config((8, 16, 32, 32)),
    lpips=False,
    disc_ndf=8,
    resolution=32,
    batch_size=2,
    steps=2,
    warmup=1,
    fp16_steps=3,
    encode_images=4,
    encode_batch=2,
    encode_workers=0,
    encode_repeats=1,
    max_batch_resolutions=(32, 64),
    max_batch_cap=2,
    max_batch_budget_s=60.0,
)


def log(msg: str) -> None:
    print(f"[bench-gpu {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def peak_tflops(device_name: str | None) -> float | None:
    """The dense bf16 peak of a GPU named so by torch.cuda.get_device_name (PEAK_TFLOPS), or None (unknown,
    CPU)."""
    return next((peak for key, peak in PEAK_TFLOPS if key in device_name), None) if device_name else None


class _GlobalOnly:
    """Stands in for FlopCounterMode's per-module tracker, whose backward hooks make autograd.grad on a leaf
    (generator_grads takes ∇ at a leaf copy of x̂) raise; only the global total is wanted here."""

    parents = ("Global",)

    def __enter__(self) -> None:
        return None

    def __exit__(self, *args: object) -> None:
        return None


def step_flops(fn) -> int:
    """FLOPs of one call of a step function: convolutions and matmuls, forward and backward
    (FlopCounterMode)."""
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _GlobalOnly()
    with counter:
        fn()
    return counter.get_total_flops()


def mfu_row(section: str, label: str, flops: int, seconds: float, peak: float | None) -> Row:
    """Achieved TFLOP/s of a step, as a fraction of the device's peak when it is known."""
    achieved = flops / seconds / 1e12
    if peak is None:
        return Row(
            section,
            f"{label}: {flops / 1e9:,.4g} GFLOP per step (peak unknown for this device: no MFU)",
            achieved,
            "TFLOP/s",
        )
    return Row(
        section,
        f"{label}: {flops / 1e9:,.4g} GFLOP per step",
        achieved,
        "TFLOP/s",
        achieved / peak,
        f"of the {peak:,.0f} TFLOP/s peak (MFU)",
    )


def all_finite(*modules: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for m in modules for p in m.parameters())


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------------------
# sections


def train_step_rows(bench: StepBench, sizes: Sizes, peak: float | None) -> tuple[list[Row], str, float]:
    """bf16 (a) vs (d): images/s, ratio, MFU. Returns the rows, a note, and (a)'s images/s (fp16's
    reference)."""
    section = f"train step {bench.dtype} {sizes.resolution} px"
    fns = {"a": bench.step_a, "d": bench.step_d}
    times, peak_mib = time_steps(fns, sizes.steps, sizes.warmup, bench.device)
    assert bench.seen["a"] > 0, "the GAN term was off in (a)"
    median = {k: statistics.median(v) for k, v in times.items()}
    ips = {k: sizes.batch_size / median[k] for k in fns}
    flops = {k: step_flops(fn) for k, fn in fns.items()}  # one more step each, not timed
    rows = [
        Row(
            section,
            f"(a) vaedec step: L1 + {'LPIPS + ' if sizes.lpips else ''}PatchGAN, single-backward λ",
            ips["a"],
            "images/s",
            1.0,
        ),
        Row(
            section,
            "(d) bare decoder fwd + bwd, L1, Adam",
            ips["d"],
            "images/s",
            ips["d"] / ips["a"],
            "of (a)",
        ),
        mfu_row(section, "(a) model FLOP utilisation", flops["a"], median["a"], peak),
        mfu_row(section, "(d) model FLOP utilisation", flops["d"], median["d"], peak),
    ]
    spread = ", ".join(f"({k}) {min(v):.3f}-{max(v):.3f}" for k, v in times.items())
    memory = (
        f"; CUDA peak allocated (a) {peak_mib['a']:,.0f} MiB, (d) {peak_mib['d']:,.0f} MiB"
        if bench.device.type == "cuda"
        else ""
    )
    model = MODEL if sizes.lpips else "a small random VAE, no LPIPS, PatchGAN (--quick)"
    note = (
        f"{section}: {model}; batch {sizes.batch_size}, median of {sizes.steps} timed steps after "
        f"{sizes.warmup} warm-up, (a) and (d) interleaved; min-max s/step {spread}{memory}; FLOPs of one "
        "step "
        "by torch.utils.flop_counter.FlopCounterMode (LPIPS and PatchGAN included in (a); Adam's elementwise "
        "updates not counted)"
    )
    return rows, note, ips["a"]


def fp16_rows(
    sizes: Sizes, device: torch.device, bf16_ips: float, peak: float | None
) -> tuple[list[Row], str]:
    """Step (a) under fp16 autocast + GradScaler: how long the scaler takes to settle, speed, finiteness."""
    section = f"fp16 {sizes.resolution} px"
    bench = StepBench(
        sizes.resolution,
        sizes.batch_size,
        device,
        "fp16",
        sizes.vae_config,
        lpips=sizes.lpips,
        disc_ndf=sizes.disc_ndf,
    )
    times, scales = [], []
    for _ in range(sizes.fp16_steps):
        sync(device)
        t0 = time.perf_counter()
        bench.step_a()
        sync(device)
        times.append(time.perf_counter() - t0)
        scales.append(bench.scaler.get_scale())
    settled = max(1, sizes.fp16_steps - sizes.steps)
    median = statistics.median(times[settled:])  # the last steps: warm, scale found
    ips = sizes.batch_size / median
    finite = all_finite(bench.decoder, bench.disc) and all(0 < s < float("inf") for s in scales)
    flops = step_flops(bench.step_a)
    rows = [
        Row(
            section,
            "(a) vaedec step, fp16 autocast + GradScaler",
            ips,
            "images/s",
            ips / bf16_ips,
            "of bf16 (a)",
        ),
        Row(
            section,
            f"updates the scaler skipped in {sizes.fp16_steps} steps (G and D; from scale 65,536)",
            bench.skipped,
            "updates",
        ),
        Row(
            section,
            "final loss scale; weights and scale all finite: " + ("yes" if finite else "NO"),
            scales[-1],
            "scale",
        ),
        mfu_row(section, "(a) model FLOP utilisation", flops, median, peak),
    ]
    note = (
        f"{section}: step (a) as above in fp16 autocast, torch.amp.GradScaler with accelerate's defaults "
        "(scale "
        f"65,536, halved on inf/nan, doubled after 2,000 finite steps), {sizes.fp16_steps} steps, median of "
        f"the last {len(times) - settled}; scale by step: {', '.join(f'{s:g}' for s in scales[:24])}"
        + (" ..." if len(scales) > 24 else "")
    )
    return rows, note


def encode_rows(sizes: Sizes, device: torch.device, quick: bool) -> tuple[list[Row], str]:
    dtype = "bf16" if device.type == "cuda" else "fp32"
    e = encode_bench.measure(
        resolution=sizes.resolution,
        images=sizes.encode_images,
        batch_size=sizes.encode_batch,
        num_workers=sizes.encode_workers,
        dtype=dtype,
        device=str(device),
        repeats=sizes.encode_repeats,
        vae_config=sizes.vae_config if quick else None,
    )
    model = "small random VAE (--quick)" if quick else encode_bench.MODEL
    return encode_bench.rows(
        e
    ), f"encode: {model}; {e.setup}; fastest of {e.repeats} interleaved rounds; {e.device}"


def fits(bench: StepBench, batch: int, errors: list[str]) -> bool:
    """Whether two steps (a) of this batch run (the second holds Adam's moments too) without CUDA running out.
    Another error (a kernel refusing a tensor of more than 2^31 elements, say) also ends the search; its
    first line goes into `errors` and the note."""
    try:
        bench.set_batch(batch)
        for _ in range(2):
            bench.step_a()
        sync(bench.device)
        return True
    except torch.OutOfMemoryError:
        return False
    except RuntimeError as e:
        errors.append(f"{bench.resolution} px, batch {batch}: {str(e).strip().splitlines()[0][:200]}")
        return False
    finally:
        bench.opt_g.zero_grad(set_to_none=True)
        bench.opt_d.zero_grad(set_to_none=True)
        free_memory(bench.device)


def largest_batch(fits: Callable[[int], bool], cap: int, deadline: float) -> tuple[int, str]:
    """(the largest batch for which `fits`, why the search stopped: "out of memory" above it, "cap", or "time"
    at time.monotonic() `deadline`)."""
    fit, too_big, batch = 0, None, 1
    while batch <= cap:  # doubling
        if time.monotonic() > deadline:
            return fit, "time"
        if not fits(batch):
            too_big = batch
            break
        fit, batch = batch, batch * 2
    if too_big is None:
        return fit, "cap"
    while too_big - fit > 1:  # bisecting between a batch that fits and one that does not
        if time.monotonic() > deadline:
            return fit, "time"
        mid = (fit + too_big) // 2
        fit, too_big = (mid, too_big) if fits(mid) else (fit, mid)
    return fit, "out of memory"


def max_batch_rows(sizes: Sizes, device: torch.device) -> tuple[list[Row], str]:
    """The largest bf16 batch at each resolution, without and with the decoder's gradient checkpointing."""
    deadline = time.monotonic() + sizes.max_batch_budget_s
    bench = StepBench(
        sizes.max_batch_resolutions[0],
        1,
        device,
        "bf16",
        sizes.vae_config,
        lpips=sizes.lpips,
        disc_ndf=sizes.disc_ndf,
    )
    rows, errors = [], []
    for resolution in sizes.max_batch_resolutions:
        bench.resolution = resolution
        found = {}
        for gc_on in (False, True):
            if gc_on:
                bench.vae.enable_gradient_checkpointing()  # diffusers' own, as model.gradient_checkpointing
            else:
                bench.vae.disable_gradient_checkpointing()
            found[gc_on] = largest_batch(lambda b: fits(bench, b, errors), sizes.max_batch_cap, deadline)
            log(f"  max batch {resolution} px, checkpointing {gc_on}: {found[gc_on]}")
        for gc_on, (batch, why) in found.items():
            stop = {
                "out of memory": "",
                "cap": f", ≥: the cap {sizes.max_batch_cap} fits",
                "time": ", ≥: the search ran out of time",
            }[why]
            name = f"{resolution} px, step (a) bf16{', gradient checkpointing' if gc_on else ''}{stop}"
            ratio = batch / found[False][0] if gc_on and found[False][0] else None
            rows.append(
                Row(
                    "max batch",
                    name,
                    batch,
                    "samples",
                    ratio if gc_on else 1.0,
                    "of no checkpointing" if gc_on else "",
                )
            )
    bench.vae.disable_gradient_checkpointing()
    note = (
        "max batch: step (a) in bf16 as above (LPIPS + PatchGAN included), two steps per try (Adam's "
        "moments "
        f"allocated), batch doubled from 1 until CUDA ran out of memory, then bisected; capped at "
        f"{sizes.max_batch_cap} and {sizes.max_batch_budget_s:.0f} s for all searches"
        + (
            "; errors other than out of memory, each counted as not fitting: " + "; ".join(errors)
            if errors
            else ""
        )
    )
    return rows, note


# ------------------------------------------------------------------------------------------------------------


def run_all(device: torch.device, quick: bool) -> tuple[list[Row], list[str]]:
    """Every section; the rows and one note per section saying what it ran on."""
    sizes = QUICK if quick else Sizes()
    peak = peak_tflops(torch.cuda.get_device_name(device) if device.type == "cuda" else None)
    rows: list[Row] = []
    notes: list[str] = []

    log(f"train step: bf16 {sizes.resolution} px, (a) vs (d)")
    bench = StepBench(
        sizes.resolution,
        sizes.batch_size,
        device,
        "bf16",
        sizes.vae_config,
        lpips=sizes.lpips,
        disc_ndf=sizes.disc_ndf,
    )
    r, note, bf16_ips = train_step_rows(bench, sizes, peak)
    rows, notes = rows + r, notes + [note]
    del bench
    free_memory(device)

    log("fp16: step (a) with a GradScaler")
    r, note = fp16_rows(sizes, device, bf16_ips, peak)
    rows, notes = rows + r, notes + [note]
    free_memory(device)

    log("encode: pipeline vs encoder forward")
    r, note = encode_rows(sizes, device, quick)
    rows, notes = rows + r, notes + [note]
    free_memory(device)

    if device.type == "cuda" or quick:
        log(
            f"max batch: {', '.join(f'{res} px' for res in sizes.max_batch_resolutions)}, with and without "
            "checkpointing"
        )
        r, note = max_batch_rows(sizes, device)
        rows, notes = rows + r, notes + [note]
    else:
        notes.append("max batch: not searched on a CPU (no out-of-memory error to catch); run on a GPU")
    return rows, notes


def document(
    table: str,
    notes: list[str],
    command: str,
    device: torch.device,
    quick: bool,
    started: datetime,
    wall_s: float,
) -> str:
    """docs/benchmarks-gpu.md: the table and what is needed to read and rerun it."""
    if device.type == "cuda":
        where = f"Measured on {torch.cuda.get_device_name(device)}."
    else:
        where = "**Not GPU figures**: a CPU run (`--device cpu`), which only checks that the script works."
    return "\n".join(
        [
            "# GPU benchmarks",
            "",
            (
                "Written by `make bench-gpu` (bench/gpu.py); every figure below is pasted by that run from "
                "its own output."
            ),
            "",
            f"- date: {started:%Y-%m-%d %H:%M} UTC; the run took {wall_s / 60:.1f} min"
            + (" (`--quick`: toy sizes, the figures mean nothing)" if quick else ""),
            f"- command: `{command}`",
            f"- machine: {machine(device)}",
            f"- {where}",
            "",
            table,
            "",
            "What each section ran on (random weights everywhere: speed does not depend on the values):",
            "",
            *[f"- {n}" for n in notes],
            "",
            (
                "Reading it: (d)/(a) is what LPIPS, the PatchGAN and λ add to the bare decoder; MFU = "
                "counted FLOPs / "
                "step time / the device's dense peak; fp16's skipped updates are the scaler halving its "
                "scale until the "
                "backward fits in fp16 (LDM's nll is summed over pixels, so gradients grow with the image "
                "area); max "
                "batch with checkpointing / without is what `model.gradient_checkpointing` buys."
            ),
            "",
        ]
    )


@click.command(context_settings={"show_default": True})
@click.option("--device", default=None, help="torch device [default: cuda if available, else cpu].")
@click.option(
    "--quick", is_flag=True, help="Toy sizes (a small VAE, 32-64 px): seconds on a CPU; figures mean nothing."
)
@click.option(
    "--write",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write the table, date, command and machine to this markdown file (atomically).",
)
def main(device: str | None, quick: bool, write: Path | None) -> None:
    """The GPU figures: bf16 train step vs bare decoder (MFU), fp16 with its grad scaler, encode, max
    batch."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter(
            "torch sees no CUDA GPU here; use --device cpu --quick", param_hint="--device"
        )
    if dev.type == "cpu" and not quick:
        log("a CPU run at GPU sizes takes hours; add --quick for the toy run")
    if dev.type == "cpu" and quick:
        # Toy ops: a second OpenMP thread costs more than it gains, many times more on busy cores (README,
        # "CPU threads").
        torch.set_num_threads(1)
    started, t0 = datetime.now(timezone.utc), time.perf_counter()
    rows, notes = run_all(dev, quick)
    wall_s = time.perf_counter() - t0
    table = markdown_table(rows)
    print(table)
    print()
    for n in notes:
        print(f"- {n}")
    print(f"\nmachine: {machine(dev)}; {wall_s / 60:.1f} min")
    if write is not None:
        command = shlex.join(["python", "bench/gpu.py", *sys.argv[1:]])
        atomic_write_bytes(write, document(table, notes, command, dev, quick, started, wall_s).encode())
        log(f"wrote {write}")


if __name__ == "__main__":
    main()
