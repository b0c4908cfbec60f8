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
  (e) (a) with a teacher (loss.teacher_weight=1): the original decoder, frozen, decodes the same z under
      no_grad and L1 + LPIPS towards its output join the loss (vaedec/decoders.py's new decoders, preview
      models).
(a)-(c) and (e) have the GAN term on (step >= disc_start_step). The variants are interleaved step by step, so
a busy machine slows them alike, and images/s is batch size / the median step time. Reading and decoding
shards is not timed (DataLoader workers overlap it with the step).
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


AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class StepBench:
    """One VAE (decoder trainable, encoder frozen), LPIPS, PatchGAN and their optimizers on a device, and the
    variants' step functions on one batch as the shards hold it (`fns`, keys of VARIANTS). bench/gpu.py
    reuses it with another batch size (`set_batch`), fp16 (a GradScaler, as accelerate's), gradient
    checkpointing, or a small VAE (`vae_config`), no LPIPS (`lpips=False`; its VGG16 in bf16/fp16 takes
    seconds a step on a CPU) and a narrow PatchGAN (`disc_ndf`) for its CPU smoke run."""

    def __init__(
        self,
        resolution: int,
        batch_size: int,
        device: str | torch.device,
        dtype: str = "fp32",
        vae_config: dict | None = None,
        gradient_checkpointing: bool = False,
        lpips: bool = True,
        disc_ndf: int = 64,
    ):
        from diffusers import AutoencoderKL

        self.resolution, self.dtype, self.device = resolution, dtype, torch.device(device)
        dev = self.device
        self.autocast = torch.autocast(dev.type, dtype=AUTOCAST_DTYPES[dtype] or torch.float32,
                                       enabled=dtype != "fp32")
        # fp16: accelerate's GradScaler (scale 65536, halved on inf/nan, doubled every 2000 finite steps)
        self.scaler = torch.amp.GradScaler(dev.type) if dtype == "fp16" else None
        torch.manual_seed(0)

        # --- models: one VAE; the decoder path trains, the encoder is frozen and used by (b) only
        self.vae_config = vae_config or SD_VAE
        vae = AutoencoderKL(**self.vae_config)
        if gradient_checkpointing:
            vae.enable_gradient_checkpointing()  # diffusers' own, as model.gradient_checkpointing
        self.vae = vae
        freeze(vae.encoder).to(dev)
        freeze(vae.quant_conv).to(dev)
        self.decoder = TrainableDecoder(vae).to(dev).train()
        # (e): the original decoder, no gradients, no optimizer
        self.teacher = freeze(copy.deepcopy(self.decoder))
        # LDM loss, GAN term on from step 0
        self.cfg = LossConfig(
            disc_start_step=0,
            lpips_random_backbone=True,
            perceptual_weight=1.0 if lpips else 0.0,
            disc_ndf=disc_ndf,
        )
        self.lpips_model = None
        if lpips:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the RANDOM-backbone warning: said in the output instead
                self.lpips_model = load_lpips(None, random_backbone=True).to(dev)
        self.cfg_teacher = dataclasses.replace(self.cfg, teacher_weight=1.0)
        self.disc = build_discriminator(self.cfg, 3).to(dev).train()
        self.logvar = torch.zeros((), device=dev)  # LDM's s, not trained (learn_logvar=False)
        self.opt_g = torch.optim.Adam(self.decoder.parameters(), lr=1e-6, betas=(0.5, 0.9))
        self.opt_d = torch.optim.Adam(self.disc.parameters(), lr=1e-6, betas=(0.5, 0.9))
        self.noise = torch.Generator().manual_seed(0)
        self.step_index = 10  # > disc_start_step: the GAN term and λ are on
        self.seen: dict[str, float] = {}  # λ · f_t of each variant's last step (the GAN term was on)
        self.skipped = 0  # fp16: optimizer steps the scaler skipped (inf/nan gradients)
        self.fns: dict[str, Callable[[], None]] = {
            "a": self.step_a,
            "b": self.step_b,
            "c": self.step_c,
            "d": self.step_d,
            "e": self.step_e,
        }
        self.set_batch(batch_size)

    def set_batch(self, batch_size: int) -> None:
        """A new batch as the shards hold it: uint8 pixels + float16 moments (computed once, as `cli.py
        encode`)."""
        self.batch_size = batch_size
        self.batch = {"pixels": smooth_pixels(batch_size, self.resolution)}
        with (
            torch.no_grad()
        ):  # 8 images an encoder forward: a large batch must not fail here rather than in training
            x = batch_to_model(self.batch, self.device)
            moments = [encode_moments(self.vae, chunk).half().cpu() for chunk in x.split(8)]
            self.batch["moments"] = torch.cat(moments)  # (B, 2C, R/f, R/f)

    def _update(self, loss: torch.Tensor, opt: torch.optim.Optimizer) -> None:
        """backward + optimizer step; with fp16 through the GradScaler, which skips inf/nan steps."""
        if self.scaler is None:
            loss.backward()
            opt.step()
        else:
            before = self.scaler.get_scale()
            self.scaler.scale(loss).backward()
            self.scaler.step(opt)
            self.scaler.update()
            self.skipped += int(self.scaler.get_scale() < before)
        opt.zero_grad(set_to_none=True)

    def _disc_step(self, x: torch.Tensor, x_rec: torch.Tensor) -> None:
        self.opt_d.zero_grad(
            set_to_none=True
        )  # (c) filled the PatchGAN's .grad too, as LDM's toggling clears it
        with self.autocast:
            d_loss, _ = discriminator_loss(self.disc, x, x_rec, self.cfg, self.step_index)
        self._update(d_loss, self.opt_d)

    def _fast_step(self, x: torch.Tensor, z: torch.Tensor, key: str, with_teacher: bool = False) -> None:
        scale = self.scaler.get_scale() if self.scaler is not None else 1.0
        with self.autocast:
            x_rec, h = self.decoder(z)
            x_t = None
            if with_teacher:
                with torch.no_grad():
                    x_t, _ = self.teacher(z)
            grads = generator_grads(
                x,
                x_rec,
                h,
                self.decoder.conv_out,
                self.lpips_model,
                self.disc,
                self.logvar,
                self.cfg_teacher if with_teacher else self.cfg,
                self.step_index,
                loss_scale=scale,
                x_teacher=x_t,
            )
        self._update(surrogate_loss(x_rec, grads, self.logvar), self.opt_g)
        self._disc_step(x, x_rec.detach())
        self.seen[key] = grads.logs["loss/d_weight"] * grads.logs["loss/disc_factor"]

    def _inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        x = batch_to_model(self.batch, self.device)
        return x, sample_latent(self.batch["moments"], "sample", self.noise).to(self.device)

    def step_a(self) -> None:
        """(a) this trainer: z from stored moments, fast λ, one decoder backward, then the PatchGAN step."""
        x, z = self._inputs()
        self._fast_step(x, z, "a")

    def step_b(self) -> None:
        """(b) the encoder online on the pixels, then (a)'s step."""
        x = batch_to_model(self.batch, self.device)
        with self.autocast:
            moments = encode_moments(self.vae, x)  # no_grad inside; (B, 2C, R/f, R/f) mean ‖ clamped logvar
        self._fast_step(x, sample_latent(moments, "sample", self.noise).to(self.device), "b")

    def step_c(self) -> None:
        """(c) LDM's naive λ: autograd.grad on conv_out.weight on the graph, then the full backward."""
        x, z = self._inputs()
        with self.autocast:
            x_rec, _ = self.decoder(z)
            loss, logs = ldm_generator_loss(
                x,
                x_rec,
                self.decoder.conv_out.weight,
                self.lpips_model,
                self.disc,
                self.logvar,
                self.cfg,
                self.step_index,
            )
        self._update(loss, self.opt_g)
        self._disc_step(x, x_rec.detach())
        self.seen["c"] = logs["loss/d_weight"] * logs["loss/disc_factor"]

    def step_e(self) -> None:
        """(e) (a) with a teacher: the frozen original decoder decodes the same z, L1 + LPIPS towards it."""
        x, z = self._inputs()
        self._fast_step(x, z, "e", with_teacher=True)

    def step_d(self) -> None:
        """(d) the limit: decoder forward, L1, backward, Adam step (no LPIPS, no GAN)."""
        x, z = self._inputs()
        with self.autocast:
            x_rec, _ = self.decoder(z)
        self._update((x_rec.float() - x).abs().mean(), self.opt_g)


def time_steps(
    fns: dict[str, Callable[[], None]], steps: int, warmup: int, dev: torch.device
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Seconds of each timed step and the CUDA peak MiB (0 on CPU) per variant, interleaved step by step: a
    busy machine slows every variant alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    peak: dict[str, float] = dict.fromkeys(fns, 0.0)
    for i in range(warmup + steps):
        for key, fn in fns.items():
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
    return times, peak


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
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    bench = StepBench(resolution, batch_size, dev, dtype)
    times, peak = time_steps(bench.fns, steps, warmup, dev)
    assert all(bench.seen[k] > 0 for k in "abce"), f"the GAN term was off: {bench.seen}"
    return StepResult(times, peak, batch_size, resolution, dtype, steps, warmup, dev, bench.cfg)


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
        f"({cfg.disc_num_layers} layers, ndf {cfg.disc_ndf}, {cfg.disc_norm} norm); GAN term on for (a)-(c), "
        "(e)"
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
