"""`python bench/memory.py`: peak memory of one decoder training step, with and without gradient checkpointing
(and with only part of the decoder trained), on the SD 1.x VAE architecture with random weights.

Each variant runs in a fresh process (on CPU the peak resident set only grows, so variants cannot share one):
decoder forward from raw z, L1 loss, backward, Adam step. Printed: the peak minus the resident memory before
the step (what the step's activations, gradients and Adam moments add), and the step time. With --device cuda
it reports torch.cuda.max_memory_allocated instead, and --find-max-batch searches the largest batch that fits.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

VARIANTS = {
    "plain": [],
    "checkpointing": ["gc"],
    "partial (up_blocks.3 + conv_out)": ["partial"],
    "partial + checkpointing": ["gc", "partial"],
}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(resolution: int, batch: int, device: str, flags: list[str], steps: int) -> dict:
    """One variant in this process: (peak extra MiB, median step s)."""
    from diffusers import AutoencoderKL

    from vaedec.vae import SD_VAE_CONFIG, TrainableDecoder, freeze_all_but

    torch.manual_seed(0)
    vae = AutoencoderKL(**SD_VAE_CONFIG)
    if "gc" in flags:
        vae.enable_gradient_checkpointing()
    decoder = TrainableDecoder(vae).to(device)
    del vae
    if "partial" in flags:
        freeze_all_but(decoder, ("decoder.up_blocks.3.*", "decoder.conv_out.*"))
    opt = torch.optim.Adam([p for p in decoder.parameters() if p.requires_grad], lr=1e-6)
    z = torch.randn(batch, 4, resolution // 8, resolution // 8, device=device)
    x = torch.rand(batch, 3, resolution, resolution, device=device) * 2 - 1
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _status_kib("VmRSS") * 1024
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        x_rec, _ = decoder(z)
        (x_rec - x).abs().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else _status_kib("VmHWM") * 1024
    return {"extra_mib": (peak - before) / 2**20, "step_s": sorted(times)[len(times) // 2]}


def run_variant(resolution: int, batch: int, device: str, flags: list[str], steps: int) -> dict | None:
    cmd = [sys.executable, __file__, "--child", ",".join(flags) or "none", "--resolution", str(resolution),
           "--batch-size", str(batch), "--device", device, "--steps", str(steps)]
    out = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if out.returncode != 0:  # out of memory (CUDA OOM, or the kernel's OOM killer on CPU) or a real error
        lines = out.stderr.strip().splitlines() or [f"exit code {out.returncode}"]
        print(f"  ({' '.join(flags) or 'plain'}, batch {batch}: {lines[-1][:160]})", file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


@click.command()
@click.option("--resolution", type=int, default=256, show_default=True, help="Output side, pixels.")
@click.option("--batch-size", type=int, default=1, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--steps", type=int, default=2, show_default=True, help="Timed steps per variant (median).")
@click.option(
    "--find-max-batch", is_flag=True, help="CUDA: double the batch until a variant runs out of memory."
)
@click.option("--child", "child_flags", default=None, hidden=True)
def cli(
    resolution: int, batch_size: int, device: str, steps: int, find_max_batch: bool, child_flags: str | None
) -> None:
    """Peak memory and step time of one decoder training step, per variant (each in a fresh process)."""
    if child_flags is not None:
        flags = [] if child_flags == "none" else child_flags.split(",")
        print(json.dumps(child(resolution, batch_size, device, flags, steps)))
        return
    print(f"SD 1.x VAE decoder (random weights), {resolution} px, batch {batch_size}, fp32, {device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {steps} steps")
    print(
        f"{'variant':36s} {'peak extra MiB':>15s} {'step s':>8s}" + ("  max batch" if find_max_batch else "")
    )
    for name, flags in VARIANTS.items():
        r = run_variant(resolution, batch_size, device, flags, steps)
        line = f"{name:36s} " + (
            f"{r['extra_mib']:15.0f} {r['step_s']:8.2f}" if r else f"{'failed (stderr)':>24s}"
        )
        if find_max_batch:
            b, best = batch_size, None
            while (res := run_variant(resolution, b, device, flags, 1)) is not None:
                best, b = (b, res), b * 2
            line += f"  {best[0] if best else 0}"
        print(line, flush=True)


if __name__ == "__main__":
    cli()
