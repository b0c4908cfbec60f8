"""The N-layer PatchGAN discriminator of taming-transformers / LDM (taming/modules/discriminator/model.py).

Layer indices inside `main` match taming's, so LDM checkpoints' `loss.discriminator.main.N.*` keys map one
to one.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from vaedec.config import LossConfig

Norm = Literal["batch", "group", "none", "spectral"]


def group_count(channels: int, max_groups: int = 32) -> int:
    """Largest divisor of `channels` that is at most `max_groups` (GroupNorm needs an exact split)."""
    return max(g for g in range(1, max_groups + 1) if channels % g == 0)


def norm_layer(norm: Norm, channels: int) -> nn.Module:
    """The normalisation after each strided conv: BatchNorm (taming), GroupNorm, or none."""
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "group":
        # GroupNorm has no batch statistics, so it also trains at batch size 1.
        return nn.GroupNorm(group_count(channels), channels)
    if norm in ("none", "spectral"):  # spectral: the convs are normalised instead (NLayerDiscriminator)
        # Identity keeps the layer indices (and so the state-dict keys) of the normalised variants.
        return nn.Identity()
    raise ValueError(f"disc_norm must be 'batch', 'group', 'none' or 'spectral', got {norm!r}")


def weights_init(module: nn.Module) -> None:
    """LDM/taming init: conv weights N(0, 0.02); norm weights N(1, 0.02) and biases 0."""
    # Conv biases keep PyTorch's default init, as taming's weights_init leaves them alone.
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class NLayerDiscriminator(nn.Module):
    """PatchGAN: a map of real/fake logits, one per overlapping patch (70x70 pixels at n_layers=3)."""

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3, norm: Norm = "batch") -> None:
        super().__init__()
        # BatchNorm's own shift makes a conv bias redundant (taming: use_bias = norm_layer != BatchNorm2d).
        use_bias = norm != "batch"
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, ndf, kernel_size=4, stride=2, padding=1),
            nn.LeakyReLU(0.2, True),
        ]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2**n, 8)
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, kernel_size=4, stride=2, padding=1, bias=use_bias),
                norm_layer(norm, ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        prev, mult = mult, min(2**n_layers, 8)
        layers += [
            nn.Conv2d(ndf * prev, ndf * mult, kernel_size=4, stride=1, padding=1, bias=use_bias),
            norm_layer(norm, ndf * mult),
            nn.LeakyReLU(0.2, True),
            nn.Conv2d(ndf * mult, 1, kernel_size=4, stride=1, padding=1),
        ]
        self.main = nn.Sequential(*layers)
        self.apply(weights_init)
        if norm == "spectral":
            # Miyato et al. 2018: each conv's weight divided by its largest singular value (one power
            # iteration per training forward), so D is 1-Lipschitz per layer; taming's init first, then the
            # parametrization.
            for i, layer in enumerate(self.main):
                if isinstance(layer, nn.Conv2d):
                    self.main[i] = nn.utils.parametrizations.spectral_norm(layer)
        # LeCAM's anchors (EMAs of D's mean real and fake logits) live here so checkpoints and resume carry
        # them; only when LeCAM is on, so the state dict keeps taming's keys otherwise.
        self.lecam: LeCAMAnchors | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images in [-1, 1] -> (B, 1, H', W') logits (256 -> 30 at n_layers=3)."""
        return self.main(x)


class LeCAMAnchors(nn.Module):
    """α_real, α_fake of LeCAM: EMAs of the mean discriminator logit on real and on reconstructed images."""

    def __init__(self, decay: float) -> None:
        super().__init__()
        self.decay = decay
        self.register_buffer("real", torch.zeros(()))
        self.register_buffer("fake", torch.zeros(()))
        # 0 = not yet set: the first value is taken
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> None:
        """α ← decay·α + (1 − decay)·mean(logits); the first call sets α to the means (no bias toward 0)."""
        d = self.decay if int(self.count) > 0 else 0.0
        self.real.mul_(d).add_((1 - d) * logits_real.detach().float().mean())
        self.fake.mul_(d).add_((1 - d) * logits_fake.detach().float().mean())
        self.count += 1


def build_discriminator(cfg: LossConfig, in_channels: int) -> NLayerDiscriminator:
    """The discriminator the loss config describes, for images with `in_channels` channels."""
    disc = NLayerDiscriminator(
        in_channels=in_channels, ndf=cfg.disc_ndf, n_layers=cfg.disc_num_layers, norm=cfg.disc_norm
    )
    if cfg.disc_lecam_weight > 0:
        disc.lecam = LeCAMAnchors(cfg.disc_lecam_decay)
    return disc
