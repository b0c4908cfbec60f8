"""`python bench/train_step.py`: what one training step of `cli.py train` costs, against the alternatives.

Builds the SD 1.x VAE architecture with random weights (the speed does not depend on the values) and measures
in one run, on the same model, batch size, resolution and device, images per second of:
  (a) this trainer: z sampled from stored moments (float16, as in the shards), decoder forward, the loss with
      the fast λ (`generator_grads`: one LPIPS and one PatchGAN backward to x̂), one decoder backward, the
      decoder's Adam step, then the PatchGAN step on the detached reconstruction;
  (b) the classic way: the encoder runs online on the pixels (no_grad) and z is sampled from its moments,
      then the same decoder/loss/optimizer step as (a);
  (c) LDM's naive λ: `ldm_generator_loss` (autograd.grad of nll and g w.r.t. conv_out.weight on the graph,
      retain_graph, then the full backward), then the same PatchGAN step;
  (d) the limit: decoder forward, L1 loss, backward, Adam step (no LPIPS, no GAN);
  (e) (a) with a teacher (loss.teacher_weight=1): the original decoder, frozen, decodes the same z under no_grad
      and L1 + LPIPS towards its output join the loss (vaedec/decoders.py's new decoders, preview models).
(a)-(c) and (e) have the GAN term on (step >= disc_start_step). The variants are interleaved step by step, so a busy
machine slows them alike, and images/s is batch size / the median step time. Reading and decoding shards is
not timed (DataLoader workers overlap it with the step).
"""

from __future__ import annotations

import copy
import dataclasses
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from bench.common import Row
from vaedec.config import LossConfig
from vaedec.discriminator import build_discriminator
from vaedec.images import batch_to_model
from vaedec.latents import encode_moments, sample_latent
from vaedec.losses import discriminator_loss, generator_grads, ldm_generator_loss, load_lpips, surrogate_loss
from vaedec.vae import SD_VAE_CONFIG, TrainableDecoder, freeze

SD_VAE = SD_VAE_CONFIG

VARIANTS = {
    "a": "(a) this trainer: stored moments, fast λ",
    "b": "(b) encoder online (no_grad) + same step",
    "c": "(c) naive double-backward λ (LDM)",
    "d": "(d) bare decoder fwd+bwd, L1 (limit)",
    "e": "(e) (a) + teacher (frozen decoder fwd)",
}
ROW_NAMES = {  # the same variants, as rows of bench/all.py's table
    "a": "(a) vaedec: stored moments, single-backward λ",
    "b": "(b) encoder run online on pixels, same loss",
    "c": "(c) naive double-backward λ (LDM)",
    "d": "(d) bare decoder fwd + bwd, L1 (the limit)",
    "e": "(e) (a) + a teacher: the original decoder's forward, frozen",
}
MODEL = (
    f"SD 1.x VAE architecture {SD_VAE['block_out_channels']}, random weights; LPIPS random VGG16; PatchGAN"
)

NOTE = """\
vs (a): images/s relative to this trainer's step (> 1 = faster). (d) is the decoder alone, the floor for any
decoder loss: (d)/(a) is what LPIPS + the GAN add; (b) adds the encoder's forward; (c) adds a second LPIPS +
PatchGAN backward, which is small next to the decoder's backward at low resolution; (e) adds the teacher's
forward (no backward: it is frozen) and its LPIPS term. Differences inside the min-max spread are noise."""


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def smooth_pixels(batch: int, resolution: int, seed: int = 0) -> torch.Tensor:
    """uint8 (B, 3, R, R): smooth random colour fields, what the shards store."""
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(batch, 3, 8, 8, generator=g)
    big = torch.nn.functional.interpolate(
        small, size=(resolution, resolution), mode="bicubic", align_corners=False
    )
    return (big.clamp(0, 1) * 255).round().to(torch.uint8)


@dataclass(frozen=True)
class StepResult:
    """Seconds per step of each variant, with what they were measured on."""

    times: dict[str, list[float]]  # variant -> timed steps, seconds
    peak_mib: dict[str, float]  # variant -> CUDA peak allocated (0 on CPU)
    batch_size: int
    resolution: int
    dtype: str
    steps: int
    warmup: int
    device: torch.device
    cfg: LossConfig

    def images_per_s(self, key: str) -> float:
        return self.batch_size / statistics.median(self.times[key])  # median: robust to a busy machine


def measure(
    resolution: int = 64,
    batch_size: int = 2,
    steps: int = 4,
    warmup: int = 1,
    device: str | None = None,
    dtype: str = "fp32",
) -> StepResult:
    """Time the four variants, interleaved step by step."""
    if resolution % 8:
        raise click.BadParameter(
            "must be a multiple of 8 (the VAE downsamples by 8)", param_hint="--resolution"
        )
    from diffusers import AutoencoderKL

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dtype == "bf16")
    torch.manual_seed(0)

    # --- models: one SD VAE; the decoder path trains, the encoder is frozen and used by (b) only
    vae = AutoencoderKL(**SD_VAE)
    freeze(vae.encoder).to(dev)
    freeze(vae.quant_conv).to(dev)
    decoder = TrainableDecoder(vae).to(dev).train()
    teacher = freeze(copy.deepcopy(decoder))  # (e): the original decoder, no gradients, in no optimizer
    cfg = LossConfig(disc_start_step=0, lpips_random_backbone=True)  # LDM loss, GAN term on from step 0
    cfg_teacher = dataclasses.replace(cfg, teacher_weight=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the RANDOM-backbone warning: said in the output below instead
        lpips_model = load_lpips(None, random_backbone=True).to(dev)
    disc = build_discriminator(cfg, 3).to(dev).train()
    logvar = torch.zeros((), device=dev)  # LDM's s, not trained (learn_logvar=False)
    opt_g = torch.optim.Adam(decoder.parameters(), lr=1e-6, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(disc.parameters(), lr=1e-6, betas=(0.5, 0.9))

    # --- one batch as the shards hold it: uint8 pixels + float16 moments (computed once, as `cli.py encode`)
    batch = {"pixels": smooth_pixels(batch_size, resolution)}
    with torch.no_grad():
        batch["moments"] = encode_moments(vae, batch_to_model(batch, dev)).half().cpu()  # (B, 8, R/8, R/8)
    noise = torch.Generator().manual_seed(0)
    step_index = 10  # > disc_start_step: the GAN term and λ are on
    seen: dict[str, float] = {}

    def disc_step(x: torch.Tensor, x_rec: torch.Tensor) -> None:
        opt_d.zero_grad(set_to_none=True)
        with autocast:
            d_loss, _ = discriminator_loss(disc, x, x_rec, cfg, step_index)
        d_loss.backward()
        opt_d.step()
        opt_d.zero_grad(set_to_none=True)

    def fast_step(x: torch.Tensor, z: torch.Tensor, key: str, with_teacher: bool = False) -> None:
        with autocast:
            x_rec, h = decoder(z)
            x_t = None
            if with_teacher:
                with torch.no_grad():
                    x_t, _ = teacher(z)
            grads = generator_grads(x, x_rec, h, decoder.conv_out, lpips_model, disc, logvar,
                                    cfg_teacher if with_teacher else cfg, step_index, x_teacher=x_t)
        surrogate_loss(x_rec, grads, logvar).backward()
        opt_g.step()
        opt_g.zero_grad(set_to_none=True)
        disc_step(x, x_rec.detach())
        seen[key] = grads.logs["loss/d_weight"] * grads.logs["loss/disc_factor"]

    def step_a() -> None:
        x = batch_to_model(batch, dev)
        z = sample_latent(batch["moments"], "sample", noise).to(dev)
        fast_step(x, z, "a")

    def step_b() -> None:
        x = batch_to_model(batch, dev)
        with autocast:
            moments = encode_moments(vae, x)  # no_grad inside; (B, 8, R/8, R/8) mean ‖ clamped logvar
        z = sample_latent(moments, "sample", noise).to(dev)
        fast_step(x, z, "b")

    def step_c() -> None:
        x = batch_to_model(batch, dev)
        z = sample_latent(batch["moments"], "sample", noise).to(dev)
        with autocast:
            x_rec, _ = decoder(z)
            loss, logs = ldm_generator_loss(
                x, x_rec, decoder.conv_out.weight, lpips_model, disc, logvar, cfg, step_index
            )
        loss.backward()  # also fills the PatchGAN's .grad; disc_step clears it first, as LDM's toggling does
        opt_g.step()
        opt_g.zero_grad(set_to_none=True)
        disc_step(x, x_rec.detach())
        seen["c"] = logs["loss/d_weight"] * logs["loss/disc_factor"]

    def step_d() -> None:
        x = batch_to_model(batch, dev)
        z = sample_latent(batch["moments"], "sample", noise).to(dev)
        with autocast:
            x_rec, _ = decoder(z)
        (x_rec.float() - x).abs().mean().backward()
        opt_g.step()
        opt_g.zero_grad(set_to_none=True)

    def step_e() -> None:
        x = batch_to_model(batch, dev)
        z = sample_latent(batch["moments"], "sample", noise).to(dev)
        fast_step(x, z, "e", with_teacher=True)

    fns: dict[str, Callable[[], None]] = {"a": step_a, "b": step_b, "c": step_c, "d": step_d, "e": step_e}
    times: dict[str, list[float]] = {k: [] for k in fns}
    peak: dict[str, float] = dict.fromkeys(fns, 0.0)
    for i in range(warmup + steps):
        for key, fn in fns.items():  # interleaved: a busy machine slows every variant alike
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            sync(dev)
            t0 = time.perf_counter()
            fn()
            sync(dev)
            if i >= warmup:
                times[key].append(time.perf_counter() - t0)
            if dev.type == "cuda":
                peak[key] = max(peak[key], torch.cuda.max_memory_allocated(dev) / 2**20)
    assert all(seen[k] > 0 for k in "abce"), f"the GAN term was off: {seen}"

    return StepResult(times, peak, batch_size, resolution, dtype, steps, warmup, dev, cfg)


def rows(r: StepResult) -> list[Row]:
    """The train-step section of bench/all.py's table; the reference is (a), this trainer's step."""
    a = r.images_per_s("a")
    return [
        Row(
            "train step",
            ROW_NAMES[key],
            r.images_per_s(key),
            "images/s",
            r.images_per_s(key) / a,
            "of (a)" if key != "a" else "",
        )
        for key in VARIANTS
    ]


@click.command()
@click.option(
    "--resolution", type=click.IntRange(32), default=64, show_default=True, help="Image side, pixels."
)
@click.option("--batch-size", type=click.IntRange(1), default=2, show_default=True, help="Images per step.")
@click.option(
    "--steps", type=click.IntRange(1), default=4, show_default=True, help="Timed steps per variant."
)
@click.option(
    "--warmup", type=click.IntRange(0), default=1, show_default=True, help="Untimed steps per variant."
)
@click.option("--device", default=None, help="torch device [default: cuda if available, else cpu].")
@click.option(
    "--dtype",
    "--mixed-precision",
    "dtype",
    type=click.Choice(["fp32", "bf16"]),
    default="fp32",
    show_default=True,
    help="bf16 = autocast around the forward passes, as run.mixed_precision=bf16; weights stay fp32.",
)
def main(resolution: int, batch_size: int, steps: int, warmup: int, device: str | None, dtype: str) -> None:
    """Images/s of one decoder training step, four ways, side by side."""
    r = measure(resolution, batch_size, steps, warmup, device, dtype)
    dev, cfg, times, peak = r.device, r.cfg, r.times, r.peak_mib
    # --- report
    threads = f"{torch.get_num_threads()} threads" if dev.type == "cpu" else torch.cuda.get_device_name(dev)
    print("vaedec train-step benchmark (bench/train_step.py)")
    print(f"torch {torch.__version__}, python {platform.python_version()}, device {dev} ({threads})")
    print(
        f"resolution {r.resolution}, batch size {r.batch_size}, dtype {r.dtype}, "
        f"{r.steps} timed steps per variant after {r.warmup} warm-up, variants interleaved"
    )
    print(
        f"VAE: SD architecture {SD_VAE['block_out_channels']}, layers_per_block {SD_VAE['layers_per_block']},"
        f" latent {SD_VAE['latent_channels']}, groups {SD_VAE['norm_num_groups']}, RANDOM weights"
    )
    print(
        "LPIPS: VGG16 with a RANDOM backbone (speed does not depend on the weights); PatchGAN: LDM "
        f"({cfg.disc_num_layers} layers, ndf {cfg.disc_ndf}, {cfg.disc_norm} norm); GAN term on for (a)-(c), (e)"
    )
    print()
    ips = {k: r.images_per_s(k) for k in times}
    header = f"{'variant':<44} {'images/s':>9} {'median s/step':>14} {'min-max s':>12} {'vs (a)':>7}"
    header += f" {'peak MiB':>9}" if dev.type == "cuda" else ""
    print(header)
    print("-" * len(header))
    for key, label in VARIANTS.items():
        median = statistics.median(times[key])
        spread = f"{min(times[key]):.2f}-{max(times[key]):.2f}"
        row = f"{label:<44} {ips[key]:>9.2f} {median:>14.3f} {spread:>12} {ips[key] / ips['a']:>6.2f}x"
        row += f" {peak[key]:>9.0f}" if dev.type == "cuda" else ""
        print(row)
    print()
    print(NOTE)


if __name__ == "__main__":
    main()
