"""The one definition of the latent convention: what the shards store and how z is made from it.

Shards store the raw posterior moments of the frozen encoder, `mean ‖ logvar` along channels, before any
`scaling_factor`: (2C, H/8, W/8) float16. The decoder takes raw z (diffusers pipelines divide by
scaling_factor before `vae.decode`), so training never needs the scaling; `scale_latents` exists for users who
feed a UNet.
"""

from __future__ import annotations

from typing import Literal

import torch
from diffusers import AutoencoderKL

# diffusers' DiagonalGaussianDistribution clamps logvar to this range before use; we store it clamped.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


@torch.no_grad()
def encode_moments(vae: AutoencoderKL, x: torch.Tensor) -> torch.Tensor:
    """Pixels (B, C, H, W) in [-1, 1] -> moments (B, 2C', H/8, W/8) = mean ‖ clamped logvar, in fp32."""
    h = vae.encoder(x)
    if vae.quant_conv is not None:
        h = vae.quant_conv(h)
    mean, logvar = h.float().chunk(2, dim=1)
    return torch.cat([mean, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)], dim=1)


def split_moments(moments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 2C, h, w) -> mean (B, C, h, w), logvar (B, C, h, w), both fp32."""
    mean, logvar = moments.float().chunk(2, dim=1)
    return mean, logvar


def sample_latent(
    moments: torch.Tensor,
    mode: Literal["sample", "mode"] = "sample",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """z = mean + exp(0.5 * logvar) * eps with eps ~ N(0, I) drawn from `generator`; or z = mean."""
    mean, logvar = split_moments(moments)
    if mode == "mode":
        return mean
    # Noise is drawn on the generator's device (CPU by default) so a seeded run is identical on any device.
    eps = torch.randn(
        mean.shape, generator=generator, dtype=mean.dtype, device=generator.device if generator else "cpu"
    )
    return mean + torch.exp(0.5 * logvar) * eps.to(mean.device)


def batch_latent(
    batch: dict, mode: Literal["sample", "mode"] = "sample", generator: torch.Generator | None = None
) -> torch.Tensor:
    """The raw z of a batch (B, C, h, w), fp32: `sample_latent` of its moments, or the stored latent of a
    family with a deterministic encoder (nothing to sample: no noise is drawn, `mode` must be "mode")."""
    if "latent" in batch:
        if mode != "mode":
            raise ValueError("a deterministic latent cannot be sampled")  # refused with a message before this
        return batch["latent"].float()
    return sample_latent(batch["moments"], mode, generator)


def add_latent_noise(
    z: torch.Tensor, std_raw: float | torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """z + std_raw * eps, eps ~ N(0, I) from `generator` (CPU, as sample_latent): robustness to generated
    latents. std_raw: a float, or a (C, h, w) map where a family's normalisation differs by channel
    (families.raw_noise_std)."""
    if isinstance(std_raw, float | int) and std_raw <= 0:
        return z  # draws nothing, so runs without it keep their random stream
    eps = torch.randn(
        z.shape, generator=generator, dtype=z.dtype, device=generator.device if generator else "cpu"
    )
    if isinstance(std_raw, torch.Tensor):
        return z + std_raw.to(z.device, z.dtype) * eps.to(z.device)
    return z + std_raw * eps.to(z.device)


def scale_latents(z: torch.Tensor, scaling_factor: float, shift_factor: float | None = None) -> torch.Tensor:
    """Raw z -> the latents a diffusion UNet sees: (z - shift) * scale."""
    return (z - (shift_factor or 0.0)) * scaling_factor
