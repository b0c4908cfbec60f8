"""New decoders for a frozen latent space, trained from the same shards: what a run trains when it is not the
VAE's own pretrained decoder, the original decoder next to it, and how export and eval see the result.

model.decoder_init=scratch, model.decoder_config
    The shards' VAE class with decoder_config over its config. Only the keys its family lists in
    `Family.decoder_keys` (the keys of diffusers 0.42.1's __init__ that shape the decoder alone) may change,
    so the encoder, and with it the latent space, stays bit-identical: AutoencoderKLFlux2
    decoder_block_out_channels, AutoencoderKLWan decoder_base_dim, AutoencoderDC decoder_*,
    AutoencoderKLHunyuanImage upsample_match_channel, AutoencoderTiny's decoder keys. Plain AutoencoderKL and
    AutoencoderKLQwenImage have none (their decoder shares block_out_channels / base_dim with the encoder): a
    message says so; scratch with {} (the same architecture, new weights) works for every class. The new
    decoder is initialised from run.seed in a forked RNG (export rebuilds the same values for parameters a
    run never trains), the encoder parts are copied from the source VAE. The export is the same class with
    the new config: `from_pretrained` loads it.

model.decoder_class=AutoencoderTiny (a preview model, TAESD-style)
    What it takes: `families.normalise(z)`, the latents a diffusion model sees, in the base VAE's own (C, h,
    w) layout: (z - shift) * scale (AutoencoderKL, DC-AE, Hunyuan), (z - mean[c]) / std[c] (Qwen-Image, Wan),
    and for FLUX.2 the bn-whitened latents unpatchified (what Flux2Pipeline has after `_unpatchify_latents`
    of the transformer's normalised output, without its bn de-normalisation). Its config says scaling_factor
    1.0 and shift_factor 0.0, so an SD/SDXL pipeline, which divides by vae.config.scaling_factor before
    decode, hands it the UNet's latents unchanged, as with TAESD; its config.json's `_vaedec_latent_space`
    names the latent space (base class, encoder fingerprint, normalisation), which diffusers keeps and
    ignores. The tiny encoder maps pixels in [-1, 1] to the same units and is trained here to regress the
    stored latent (the moments' mean, or a deterministic family's latent), normalised: the big encoder never
    runs, the latent space does not change. Both halves train in one forward (`PreviewDecoder`), with the
    decoder's Adam (Adam's state is per parameter; clipping is per half), EMA and checkpoints. Default size:
    TAESD's (64 channels, blocks (1,3,3,3) / (3,3,3,1) at f8), one level per factor of 2 of the base VAE's
    downsampling.

The original decoder (`original_decoder`): the source VAE's, frozen, never in an optimizer, the EMA or a
checkpoint; loss.teacher_weight's teacher, and the "original decoder" column of a run's grids.
"""

from __future__ import annotations

import inspect
import logging
import math
from typing import Any

import torch
from diffusers import AutoencoderTiny
from torch import nn

from vaedec.config import TrainConfig, config_to_dict
from vaedec.errors import TrainError
from vaedec.families import (
    FAMILIES,
    Family,
    FamilyDecoder,
    Normalisation,
    decoder_of,
    family_for,
    load_manifest_vae,
    manifest_family,
    manifest_normalisation,
    normalise,
    trainable_decoder,
)
from vaedec.losses import latent_regression_loss
from vaedec.vae import freeze

log = logging.getLogger("vaedec")

LATENT_SPACE_KEY = "_vaedec_latent_space"  # a preview model's config.json: the latent space it serves
TINY = FAMILIES["AutoencoderTiny"]
# AutoencoderTiny keys a preview model's latent space fixes: model.decoder_config may not set them.
PREVIEW_FIXED = ("in_channels", "out_channels", "latent_channels", "scaling_factor", "shift_factor")


# ------------------------------------------------------------------------------------------------------------
# the model a run trains


def init_config(cls: type, config: Any) -> dict[str, Any]:
    """The constructor arguments of `cls` in a model's config (no _class_name, no keys registered after
    init)."""
    params = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in dict(config).items() if k in params and k != "self"}


def _seeded(cls: type, config: dict[str, Any], seed: int, what: str) -> nn.Module:
    """cls(**config) initialised from `seed` without touching the global RNG (the PatchGAN's init stays)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            return cls(**config).float()
        except (TypeError, ValueError, KeyError, IndexError, AssertionError, RuntimeError) as e:
            raise TrainError(f"model.decoder_config: {what} cannot be built with it ({e})") from None


def scratch_vae(family: Family, source: nn.Module, overrides: dict[str, Any], seed: int) -> nn.Module:
    """`source`'s class with `overrides` over its config: a new random decoder (from `seed`), the source's
    encoder parts (and FLUX.2's bn) copied bit for bit."""
    check_decoder_keys(family, overrides)
    vae = _seeded(
        family.model_class,
        init_config(family.model_class, source.config) | overrides,
        seed,
        family.class_name,
    )
    for name, part in family.encoder_parts(source).items():
        getattr(vae, name).load_state_dict(
            part.state_dict()
        )  # strict: the same architecture, by construction
    check_pixels(family, vae, source)
    return vae


def check_decoder_keys(family: Family, overrides: dict[str, Any]) -> None:
    """Only the keys that shape the family's decoder alone; a message naming them (or saying there are
    none)."""
    bad = sorted(set(overrides) - set(family.decoder_keys))
    if not bad:
        return
    if not family.decoder_keys:
        raise TrainError(
            f"model.decoder_config {bad}: {family.class_name} has no config key that shapes its decoder "
            "alone "
            "(its decoder takes block_out_channels / layers_per_block from the encoder's), so a different "
            "decoder "
            "would change the encoder and the latent space. model.decoder_init=scratch with "
            "model.decoder_config={} "
            "trains the same architecture from scratch; for a smaller, faster decoder train a preview model "
            "(model.decoder_class=AutoencoderTiny)"
        )
    raise TrainError(
        f"model.decoder_config {bad}: {family.class_name}'s decoder-only keys are "
        f"{', '.join(family.decoder_keys)}; others would change the encoder or the latent space"
    )


@torch.no_grad()
def check_pixels(family: Family, vae: nn.Module, source: nn.Module) -> None:
    """The new decoder turns a latent into as many pixels as the source's (its upsampling is the encoder's
    downsampling): a 2x2 latent through both classes' own decode."""
    c = family.channels(source)[2]
    z = torch.zeros(1, c, 2, 2)
    want = family.decode(source, z).shape
    try:
        got = family.decode(vae.eval(), z).shape
    except RuntimeError as e:  # diffusers builds some inconsistent configs, whose forward then fails
        raise TrainError(
            f"model.decoder_config: the new {family.class_name} cannot decode a latent "
            f"({str(e).splitlines()[0]}); keep the number of decoder levels of the source"
        ) from None
    if got != want:
        raise TrainError(
            f"model.decoder_config: the new decoder turns a (1, {c}, 2, 2) latent into {tuple(got)} "
            f"pixels, the source's into {tuple(want)}; keep the number of decoder levels (and "
            "upsampling) of the source"
        )


def preview_config(vae_info: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """AutoencoderTiny's config for a latent space: TAESD's layout with one level per factor 2 of
    downsampling, the latent and pixel channels of the base VAE, scaling 1.0 / shift 0.0, then `overrides`."""
    fixed = sorted(set(overrides) & set(PREVIEW_FIXED))
    unknown = sorted(set(overrides) - set(inspect.signature(AutoencoderTiny.__init__).parameters))
    if fixed or unknown:
        raise TrainError(
            f"model.decoder_config {fixed or unknown}: "
            + (
                f"a preview model's {', '.join(PREVIEW_FIXED)} follow from the latent space"
                if fixed
                else "not AutoencoderTiny config keys"
            )
        )
    f = int(vae_info["downsample_factor"])
    levels = int(math.log2(f)) + 1
    return {
        "in_channels": int(vae_info["in_channels"]),
        "out_channels": int(vae_info["out_channels"]),
        "latent_channels": int(vae_info["latent_channels"]),
        "encoder_block_out_channels": (64,) * levels,
        "decoder_block_out_channels": (64,) * levels,
        "num_encoder_blocks": (1,) + (3,) * (levels - 1),
        "num_decoder_blocks": (3,) * (levels - 1) + (1,),
        "scaling_factor": 1.0,
        "shift_factor": 0.0,
    } | overrides


def latent_space_record(vae_info: dict[str, Any]) -> dict[str, Any]:
    """What a preview model's config records about the latent space it serves (from the shard manifest)."""
    return {
        "family": manifest_family(vae_info).class_name,
        "source": vae_info["source"],
        "subfolder": vae_info.get("subfolder"),
        "encoder_sha256": vae_info["encoder_sha256"],
        "normalisation": manifest_normalisation(vae_info).as_dict(),
        "latent_channels": int(vae_info["latent_channels"]),
        "downsample_factor": int(vae_info["downsample_factor"]),
        "input": (
            "the latents a diffusion model sees: the normalisation applied, in the base VAE's "
            "(C, h, w) layout"
        ),
    }


@torch.no_grad()
def preview_vae(vae_info: dict[str, Any], overrides: dict[str, Any], seed: int) -> AutoencoderTiny:
    """A new AutoencoderTiny for the manifest's latent space (random, from `seed`), its config naming that
    space."""
    norm = manifest_normalisation(vae_info)
    if norm.kind == "scale_shift" and norm.scaling_factor is None:
        raise TrainError(
            "a preview model decodes the diffusion model's units, and the shards' VAE has no "
            "scaling_factor; re-encode with --scaling-factor"
        )
    vae = _seeded(AutoencoderTiny, preview_config(vae_info, overrides), seed, "AutoencoderTiny")
    vae.register_to_config(**{LATENT_SPACE_KEY: latent_space_record(vae_info)})
    f, c = int(vae_info["downsample_factor"]), int(vae_info["latent_channels"])
    latent = vae.encoder(torch.zeros(1, int(vae_info["in_channels"]), 2 * f, 2 * f)).shape
    pixels = vae.decoder(torch.zeros(1, c, 2, 2)).shape
    if tuple(latent) != (1, c, 2, 2) or tuple(pixels[2:]) != (2 * f, 2 * f):
        raise TrainError(
            f"model.decoder_config: this AutoencoderTiny maps {2 * f} px to a {tuple(latent)} latent "
            f"and a 2x2 latent to {tuple(pixels[2:])} px; the latent space is f{f} with {c} "
            "channels: give as many encoder and decoder levels as log2(f) + 1"
        )
    return vae


def is_preview(model: dict[str, Any]) -> bool:
    """Whether a run's `model` config section (as a dict) trains a preview model."""
    return model.get("decoder_class", "vae") == "AutoencoderTiny"


def run_family(model: dict[str, Any], vae_info: dict[str, Any]) -> Family:
    """The class a run's export has: AutoencoderTiny for a preview model, else the shards' family."""
    return TINY if is_preview(model) else manifest_family(vae_info)


def run_model(
    model: dict[str, Any], seed: int, vae_info: dict[str, Any], latents: str
) -> tuple[Family, nn.Module]:
    """(family, model) a run trains, before any training: the manifest's VAE (or model.vae; pretrained), its
    class with a new decoder (scratch), or a preview AutoencoderTiny. `model`: the config's model section as a
    dict (a checkpoint's, or `config_to_dict`); `latents` names the shards in messages."""
    if is_preview(model):
        return TINY, preview_vae(vae_info, model.get("decoder_config") or {}, seed)
    family, vae = load_manifest_vae(vae_info, model["vae"], model["subfolder"], latents)
    if model.get("decoder_init", "pretrained") == "scratch":
        vae = scratch_vae(family, vae, model.get("decoder_config") or {}, seed)
    return family, vae


def trained_names(family: Family, vae: nn.Module, model: dict[str, Any]) -> list[str]:
    """The parameter names a run's checkpoints hold: every one of a preview model, else the family's."""
    if is_preview(model):
        return [n for n, _ in vae.named_parameters()]
    return family.trainable_names(vae, model["train_post_quant_conv"], tuple(model.get("trainable") or ()))


class PreviewDecoder(FamilyDecoder):
    """A preview AutoencoderTiny as a run trains it, under AutoencoderTiny's own parameter names (decoder.*,
    encoder.*). forward(raw z) normalises z and decodes it (FamilyDecoder's interface: (x_rec, last layer
    input), TAESD's last layer for λ); forward(raw z, x, raw target) also returns the tiny encoder's
    regression loss on the pixels x (B, C, H, W) in [-1, 1] against normalise(target), in the same forward,
    so that one backward (and DDP's one all-reduce) covers both halves."""

    def __init__(self, vae: AutoencoderTiny, norm: Normalisation):
        super().__init__(vae, TINY)
        self.encoder = vae.encoder
        self.norm = norm

    def normalised(self, z: torch.Tensor) -> torch.Tensor:
        """Raw z (B, C, h, w) -> the diffusion model's units (FLUX.2's patchify needs a contiguous z)."""
        return normalise(z.contiguous() if self.norm.kind == "patched_batch_norm" else z, self.norm)

    def forward(self, z: torch.Tensor, x: torch.Tensor | None = None, target: torch.Tensor | None = None):
        x_rec, h = super().forward(self.normalised(z))
        if x is None:
            return x_rec, h
        return x_rec, h, latent_regression_loss(self.encoder(x), self.normalised(target))

    def encoder_parameters(self) -> list[nn.Parameter]:
        """The tiny encoder's parameters (clipped on their own)."""
        return list(self.encoder.parameters())


# ------------------------------------------------------------------------------------------------------------
# train


def check_settings(cfg: TrainConfig, manifest: dict[str, Any]) -> None:
    """What the shards' family cannot take for a new decoder, refused before the run folder is touched (the
    shapes are checked when the model is built)."""
    if cfg.model.decoder_class == "AutoencoderTiny":
        preview_config(manifest["settings"]["vae"], cfg.model.decoder_config)  # its keys
    elif cfg.model.decoder_init == "scratch":
        check_decoder_keys(manifest_family(manifest["settings"]["vae"]), cfg.model.decoder_config)


def original_decoder(cfg: TrainConfig, manifest: dict[str, Any]) -> nn.Module:
    """The manifest's (or model.vae's) own decoder, frozen: no gradients, in no optimizer, EMA or
    checkpoint."""
    family, vae = load_manifest_vae(
        manifest["settings"]["vae"], cfg.model.vae, cfg.model.subfolder, cfg.data.shards
    )
    return freeze(family.trainable_decoder(vae))


def run_decoders(
    cfg: TrainConfig, manifest: dict[str, Any], device: torch.device
) -> tuple[nn.Module, nn.Module | None, nn.Module | None]:
    """(the decoder the run trains, the original decoder frozen on `device`, the teacher): the original is
    loaded for a new decoder (the grids' reference) or a teacher (loss.teacher_weight: the original, else
    None), else None (the trained decoder before its first step is the original)."""
    new = cfg.model.decoder_init == "scratch"
    if not new:
        decoder = trainable_decoder(cfg, manifest)
    else:
        vae_info = manifest["settings"]["vae"]
        family, vae = run_model(config_to_dict(cfg.model), cfg.run.seed, vae_info, cfg.data.shards)
        norm = manifest_normalisation(vae_info)
        build = (lambda v: PreviewDecoder(v, norm)) if cfg.model.decoder_class == "AutoencoderTiny" else None
        decoder = decoder_of(cfg, family, vae, build)
        log.info(
            "new decoder (model.decoder_init=scratch): %s, %s decoder parameters, config overrides %s",
            family.class_name,
            f"{decoder_parameters(vae):,}",
            cfg.model.decoder_config or "none",
        )
    teach = cfg.loss.teacher_weight > 0
    original = original_decoder(cfg, manifest).to(device) if new or teach else None
    return decoder, original, original if teach else None


# ------------------------------------------------------------------------------------------------------------
# eval and export: any model, preview or not


def latent_space(vae: nn.Module) -> dict[str, Any] | None:
    """A preview model's record of the latent space it serves (config `_vaedec_latent_space`), else None."""
    config = getattr(vae, "config", None)
    return config.get(LATENT_SPACE_KEY) if config is not None else None


def latent_space_fingerprint(vae: nn.Module) -> str:
    """Which latent space a model decodes: a preview model's recorded base encoder, else its own encoder's."""
    record = latent_space(vae)
    return record["encoder_sha256"] if record else family_for(vae).fingerprint(vae)


@torch.no_grad()
def decode(vae: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """Raw z (B, C, h, w) of the latent space -> pixels, as a pipeline decodes: a preview model gets
    normalise(z) (what the diffusion model sees), any other model z through its class's own decode."""
    record = latent_space(vae)
    if record:
        n = Normalisation.from_dict(record["normalisation"])
        return vae.decode(normalise(z.contiguous(), n)).sample
    return family_for(vae).decode(vae, z)


def decoder_parameters(vae: nn.Module) -> int:
    """Parameters of the half that decodes (post_quant_conv + decoder, or the family's decoder modules)."""
    family = family_for(vae)
    return sum(
        p.numel()
        for name in family.decoder_modules
        if getattr(vae, name, None) is not None
        for p in getattr(vae, name).parameters()
    )
