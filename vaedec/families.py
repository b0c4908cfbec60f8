"""One adapter per diffusers VAE class ("family"): how vaedec loads it, what `encode` stores, the trainable
decoder, the normalisation a diffusion model applies, the encoder fingerprint, and the export. Adding a family
is one `Family` subclass in `FAMILIES` (with its `tiny_config` for the tests), not edits across the pipeline.

Read from diffusers 0.42.1 (models/autoencoders/*.py and the pipelines that use each class):

| class                     | stores        | rank | trains                   | diffusion units             |
|---------------------------|---------------|------|--------------------------|-----------------------------|
| AutoencoderKL             | mean ‖ logvar | 4    | post_quant_conv, decoder | (z - shift) * scale         |
| AutoencoderKLFlux2        | mean ‖ logvar | 4    | post_quant_conv, decoder | 2x2 patches, bn whitening   |
| AutoencoderKLQwenImage    | mean ‖ logvar | 5    | post_quant_conv, decoder | (z - mean[c]) / std[c]      |
| AutoencoderKLWan 2.1, 2.2 | mean ‖ logvar | 5    | post_quant_conv, decoder | (z - mean[c]) / std[c]      |
| AutoencoderDC             | one latent    | 4    | decoder (BatchNorm eval) | z * scale                   |
| AutoencoderKLHunyuanImage | mean ‖ logvar | 4    | decoder                  | z * scale                   |
| AutoencoderTiny           | one latent    | 4    | decoder                  | (z - shift) * scale         |

Shards always hold one image per sample: (2C or C, h, w). The 5-D classes take (B, C, T=1, h, w); their
adapters add and drop the T axis, so encode, the losses and the metrics only ever see 4-D tensors.

Refused with a reason (`UNSUPPORTED`): AutoencoderRAE (its frozen encoder is a transformers model, and vaedec
does not depend on transformers; its latents come out already normalised, its pixels are in [0, 1] and its
decoder's output size is fixed by the config, not by the crop); AutoencoderKLQwenImage21 (Qwen-Image 2.1's
VAE, another architecture, not adapted yet).

Phase 2, the wiring (after issue 15's refactor; done on branch families-port, on the refactor's layout):
the call sites that ask the family (`family_of`, `family_for`, `manifest_family`), not AutoencoderKL:
  vae.py         the run's decoder (`trainable_decoder(cfg, manifest)`) and the VAE a manifest names
                 (`load_manifest_vae`: another class only with the same store and rank, the fingerprint
                 checked) move here: vae.py imports convert, which may not import a module above it (the
                 refactor's import-graph test). AutoencoderKL's loader, fingerprint, summary and
                 TrainableDecoder stay in vae.py (FLUX.2 uses that decoder too); the others use FamilyDecoder,
                 of the same interface: forward(z) -> (x_rec, h), conv_out, out_channels, last_weight_grad
  latents.py     Family.encode (moments or one latent); a deterministic family's stored latent is z itself
  encode.py      load, in_channels, downsample_factor, manifest fields, fingerprint (`_encoder_vae`); the
                 encoder parts to the device, the decoder dropped (`_encoder_on`); `_encode_batch`
  shards         manifest: family, store, latent_rank, normalisation (format version 2, other families only);
                 the sample member (moments.npy or latent.npy); shapes of train's `expect`, inspect --verify
  train.py       the trainable decoder (gradient checkpointing, channels_last), the discriminator's channels,
                 λ's last-layer gradient (losses.generator_grads' weight_grad), latent noise
                 (`raw_noise_std`), unreached kernel slices (gradient zeroed, no weight decay),
                 model.latent_sample
  checkpoint.py  finetuned_vae (`Family.trainable_names`), export_run (`Family.export`; single file only where
                 a layout exists), the prefixes of decoder.safetensors
  evaluate.py    load_model, decode (`Family.decode`), eval_latents (--sample refused for one latent), the
                 encoder check (`Family.fingerprint`)
  metrics.py     the Evaluator's z (`latents.batch_latent`)
  convert.py     AutoencoderKL only (LDM layout): a folder of another class is refused
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import diffusers
import torch
from torch import nn

from vaedec import vae as kl  # AutoencoderKL's own path, looked up at call time (tests spy on it)
from vaedec.config import TrainConfig
from vaedec.errors import TrainError
from vaedec.latents import LOGVAR_MAX, LOGVAR_MIN, encode_moments
from vaedec.vae import (
    EncoderMismatchError,
    VAELoadError,
    freeze,
    freeze_all_but,
    is_single_file,
    select_trainable,
)

log = logging.getLogger(__name__)

Store = Literal["moments", "latent"]


class FamilyError(VAELoadError):
    """A VAE class vaedec cannot handle, or a setting its family does not allow; the message says what."""


# ------------------------------------------------------------------------------------------------------------
# normalisation: what a diffusion model applies to raw latents, as plain data


@dataclass(frozen=True)
class Normalisation:
    """Raw z -> the latents a diffusion model sees (pipelines invert it before `vae.decode`).

    scale_shift:        (z - shift_factor) * scaling_factor (AutoencoderKL, DC-AE, Hunyuan, TAESD)
    channel_mean_std:   (z - mean[c]) / std[c] (Qwen-Image, Wan: config latents_mean / latents_std)
    patched_batch_norm: z patchified 2x2 (C -> 4C, channel c*4 + dy*2 + dx), then (z - mean[k]) / std[k]
                        with `bn`'s running statistics, std = sqrt(running_var + eps) (FLUX.2)
    """

    kind: Literal["scale_shift", "channel_mean_std", "patched_batch_norm"]
    scaling_factor: float | None = None  # scale_shift; None = the config has none (Hunyuan's default)
    shift_factor: float | None = None  # scale_shift; None = 0
    mean: tuple[
        float, ...
    ] = ()  # channel_mean_std: per latent channel; patched_batch_norm: per patched channel
    std: tuple[float, ...] = ()  # as mean
    patch_size: int = 1  # patched_batch_norm: side of the square patch folded into channels

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, only the fields this kind uses (the manifest's `settings.vae.normalisation`)."""
        if self.kind == "scale_shift":
            return {
                "kind": self.kind,
                "scaling_factor": self.scaling_factor,
                "shift_factor": self.shift_factor,
            }
        d = {"kind": self.kind, "mean": list(self.mean), "std": list(self.std)}
        return d | ({"patch_size": self.patch_size} if self.kind == "patched_batch_norm" else {})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Normalisation:
        return cls(
            d["kind"],
            d.get("scaling_factor"),
            d.get("shift_factor"),
            tuple(d.get("mean", ())),
            tuple(d.get("std", ())),
            int(d.get("patch_size", 1)),
        )


def _need_scale(n: Normalisation) -> float:
    if n.scaling_factor is None:
        raise FamilyError(
            "this VAE's config has no scaling_factor, so its diffusion units are unknown: give "
            "--scaling-factor at encode (the value the diffusion model was trained with)"
        )
    return n.scaling_factor


def patchify(z: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, h, w) -> (B, C p², h/p, w/p), channel c p² + dy p + dx (Flux2Pipeline._patchify_latents)."""
    b, c, h, w = z.shape
    return z.view(b, c, h // p, p, w // p, p).permute(0, 1, 3, 5, 2, 4).reshape(b, c * p * p, h // p, w // p)


def unpatchify(z: torch.Tensor, p: int) -> torch.Tensor:
    """Inverse of `patchify` (Flux2Pipeline._unpatchify_latents)."""
    b, cp, h, w = z.shape
    return (
        z.reshape(b, cp // (p * p), p, p, h, w)
        .permute(0, 1, 4, 2, 5, 3)
        .reshape(b, cp // (p * p), h * p, w * p)
    )


def _per_channel(values: tuple[float, ...], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)


def normalise(z: torch.Tensor, n: Normalisation) -> torch.Tensor:
    """Raw z (B, C, h, w) -> diffusion units, as the family's pipelines compute it."""
    if n.kind == "scale_shift":
        return (z - (n.shift_factor or 0.0)) * _need_scale(n)
    if n.kind == "channel_mean_std":
        return (z - _per_channel(n.mean, z)) / _per_channel(n.std, z)
    zp = patchify(z, n.patch_size)
    return unpatchify((zp - _per_channel(n.mean, zp)) / _per_channel(n.std, zp), n.patch_size)


def denormalise(zd: torch.Tensor, n: Normalisation) -> torch.Tensor:
    """Diffusion units (B, C, h, w) -> raw z, what the pipeline hands `vae.decode`."""
    if n.kind == "scale_shift":
        return zd / _need_scale(n) + (n.shift_factor or 0.0)
    if n.kind == "channel_mean_std":
        return zd * _per_channel(n.std, zd) + _per_channel(n.mean, zd)
    zp = patchify(zd, n.patch_size)
    return unpatchify(zp * _per_channel(n.std, zp) + _per_channel(n.mean, zp), n.patch_size)


def raw_noise_std(n: Normalisation, std: float, shape: tuple[int, int, int]) -> float | torch.Tensor:
    """Noise of std `std` in diffusion units, in raw latent units: a float for scale_shift (std /
    scaling_factor, model.latent_noise_std's meaning for AutoencoderKL), else a (C, h, w) tensor for a latent
    of `shape`."""
    if n.kind == "scale_shift":
        return std / _need_scale(n)
    c, h, w = shape
    if n.kind == "channel_mean_std":
        return std * torch.tensor(n.std, dtype=torch.float32).view(c, 1, 1).expand(c, h, w).clone()
    p = n.patch_size  # patched channel c p² + dy p + dx whitens raw z[c, p i + dy, p j + dx]
    return std * torch.tensor(n.std, dtype=torch.float32).view(c, p, p).repeat(1, h // p, w // p)


# ------------------------------------------------------------------------------------------------------------
# the trainable decoder of the families without AutoencoderKL's module layout


class FamilyDecoder(nn.Module):
    """The decoder half of a VAE, its modules under the VAE's own names (so checkpoints and exports use them),
    with vae.TrainableDecoder's interface: forward(z (B, C, h, w)) -> (x_rec (B, C_out, H, W), the input h of
    the last layer), `conv_out` (that layer), `out_channels`, and `last_weight_grad(h, g)`: ∇ of
    conv_out.weight given ∇_x̂ = g (the adaptive GAN weight λ), without a second pass through the decoder.

    x_rec is the decoder's raw output: the clamp some classes apply in `decode` is not applied, so the loss
    sees (and pushes back) values outside [-1, 1]. Modules in `eval_module_names` stay in eval mode under
    .train(). `unreached`: {parameter name: index} of weight slices an image never reaches (their gradient is
    exactly zero; train zeroes it explicitly and gives them no weight decay, so they come out bit-identical).
    """

    def __init__(self, vae: nn.Module, family: Family):
        super().__init__()
        for name in family.decoder_modules:
            module = getattr(vae, name, None)
            if module is not None:
                self.add_module(name, module)
        self.family = family
        self.vae_config = dict(vae.config)  # what the family's forward needs of it (Wan 2.2: patch_size)
        self.eval_module_names = tuple(n for n, m in self.named_modules() if isinstance(m, family.eval_types))
        self.unreached = family.unreached_slices(self)
        for name in family.never_reached(self):  # no gradient ever: frozen, the export keeps the original
            self.get_parameter(name).requires_grad_(False)
        self._h: torch.Tensor | None = None
        self.conv_out.register_forward_pre_hook(self._keep_last_input)

    def _keep_last_input(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        self._h = args[0]

    @property
    def conv_out(self) -> nn.Module:
        """The last layer with weights (LDM's `last_layer` for λ)."""
        return self.family.last_layer(self)

    @property
    def out_channels(self) -> int:
        return self.family.pixel_channels(self)

    def train(self, mode: bool = True) -> FamilyDecoder:
        super().train(mode)
        for name in self.eval_module_names:  # BatchNorm statistics stay the original's
            self.get_submodule(name).eval()
        return self

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw z (B, C, h, w) -> (x_rec (B, C_out, H, W) unclamped, last layer input)."""
        x_rec = self.family.decode_train(self, z)
        h, self._h = self._h, None
        return x_rec, h

    def last_weight_grad(self, h: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
        """dL/d conv_out.weight from its input h and dL/dx_rec, in fp32 at least (fp64 stays fp64)."""
        last = self.conv_out
        dtype = torch.promote_types(torch.promote_types(h.dtype, grad_out.dtype), torch.float32)
        params = {n: p.detach().to(dtype).requires_grad_(n == "weight") for n, p in last.named_parameters()}
        with torch.enable_grad(), torch.autocast(h.device.type, enabled=False):
            out = self.family.after_last(
                self, torch.func.functional_call(last, params, (h.detach().to(dtype),))
            )
            (grad,) = torch.autograd.grad(out, params["weight"], grad_out.detach().to(dtype))
        return grad


# ------------------------------------------------------------------------------------------------------------
# the families


class Family:
    """How vaedec handles one diffusers VAE class. The base is the shape shared by most classes: `encoder`
    (+ `quant_conv`) -> moments, `post_quant_conv` + `decoder` trained, a 4-D scale_shift latent."""

    class_name = ""
    used_by = ""  # models that ship this class (messages, README)
    store: Store = (
        "moments"  # mean ‖ logvar (2C, h, w) of a Gaussian posterior, or one deterministic latent (C, h, w)
    )
    latent_rank = (
        4  # rank of what the class's encode returns / decode takes: 4 (B, C, h, w), 5 (B, C, T=1, h, w)
    )
    encoder_modules: tuple[str, ...] = (
        "encoder",
        "quant_conv",
    )  # the frozen half: fingerprint, encode device
    decoder_modules: tuple[str, ...] = ("post_quant_conv", "decoder")  # the half that trains
    eval_types: tuple[type, ...] = ()  # module types kept in eval mode in the trainable decoder
    single_file = (
        ""  # single-file load: "" none, "ldm" (vaedec's convert.py), "diffusers" (from_single_file + config)
    )
    not_trained = ""  # README: parts of the model this decoder-only fine-tune leaves as they were
    # Config keys that shape the decoder half alone (diffusers 0.42.1's __init__): what model.decoder_config
    # may change while the encoder, and so the latent space, stays bit-identical (vaedec/decoders.py).
    decoder_keys: tuple[str, ...] = ()

    # -- loading ---------------------------------------------------------------------------------------------
    @property
    def model_class(self) -> type:
        return getattr(diffusers, self.class_name)

    def load(
        self,
        source: str,
        subfolder: str | None = None,
        scaling_factor: float | None = None,
        config: str | None = None,
    ) -> nn.Module:
        """The VAE in fp32 from a diffusers folder / hub id, or a single file where a layout exists."""
        if is_single_file(source):
            vae = self.load_single_file(source, config)
        else:
            vae = _from_pretrained(self.model_class, source, pipeline_subfolder(source, subfolder))
        if scaling_factor is not None:
            self.set_scaling_factor(vae, scaling_factor)
        return vae

    def load_single_file(self, path: str, config: str | None) -> nn.Module:
        if self.single_file != "diffusers":
            raise FamilyError(
                f"{path}: diffusers has no single-file layout for {self.class_name}; give its "
                "diffusers folder (config.json + diffusion_pytorch_model.safetensors) or hub id"
            )
        if config is None:
            raise FamilyError(
                f"{path}: a single {self.class_name} file does not say its architecture; also give "
                "the diffusers folder or hub id whose config.json describes it (offline, a hub id "
                "must be in the Hugging Face cache)"
            )
        try:
            vae = self.model_class.from_single_file(path, config=config, torch_dtype=torch.float32)
        except Exception as e:  # noqa: BLE001 - diffusers raises many types while converting keys
            raise FamilyError(
                f"could not load {path} as a {self.class_name} with the config of {config}: {e}"
            )
        return vae.float()

    def set_scaling_factor(self, vae: nn.Module, scaling_factor: float) -> None:
        """--scaling-factor: replace the config's; only where the normalisation is a scaling factor."""
        if self.normalisation(vae).kind != "scale_shift":
            raise FamilyError(
                f"--scaling-factor: {self.class_name} has no scaling_factor; its pipelines normalise "
                f"latents with {self.normalisation(vae).kind.replace('_', ' ')} from the VAE itself"
            )
        vae.register_to_config(scaling_factor=scaling_factor)

    def set_shift_factor(self, vae: nn.Module, shift_factor: float) -> None:
        """--shift-factor: replace the config's (a single file does not store it: FLUX.1's 0.1159)."""
        if self.normalisation(vae).kind != "scale_shift":
            raise FamilyError(
                f"--shift-factor: {self.class_name} has no shift_factor; its pipelines normalise "
                f"latents with {self.normalisation(vae).kind.replace('_', ' ')} from the VAE itself"
            )
        vae.register_to_config(shift_factor=shift_factor)

    # -- facts -----------------------------------------------------------------------------------------------
    def downsample_factor(self, vae: nn.Module) -> int:
        return 2 ** (len(vae.config.block_out_channels) - 1)

    def channels(self, vae: nn.Module) -> tuple[int, int, int]:
        """(in, out, latent) channels: pixels in, pixels out, latent channels C."""
        c = vae.config
        return int(c.in_channels), int(c.out_channels), int(c.latent_channels)

    def normalisation(self, vae: nn.Module) -> Normalisation:
        c = vae.config
        shift = c.get("shift_factor")
        return Normalisation(
            "scale_shift",
            None if c.get("scaling_factor") is None else float(c.scaling_factor),
            None if shift is None else float(shift),
        )

    def summary(self, vae: nn.Module) -> dict[str, Any]:
        """The facts a shard manifest records about the VAE (`settings.vae`, with source and fingerprint)."""
        cin, cout, latent = self.channels(vae)
        norm = self.normalisation(vae)
        return {
            "family": self.class_name,
            "store": self.store,
            "latent_rank": self.latent_rank,
            "in_channels": cin,
            "out_channels": cout,
            "latent_channels": latent,
            "downsample_factor": self.downsample_factor(vae),
            "scaling_factor": norm.scaling_factor,
            "shift_factor": norm.shift_factor,
            "normalisation": norm.as_dict(),
        }

    def stored_channels(self, vae: nn.Module) -> int:
        """Channels of one stored sample: 2C for moments, C for a latent."""
        return self.channels(vae)[2] * (2 if self.store == "moments" else 1)

    # -- the frozen half -------------------------------------------------------------------------------------
    def encoder_parts(self, vae: nn.Module) -> dict[str, nn.Module]:
        """The modules (present in this VAE) that define its latent space, in fingerprint order."""
        return {n: getattr(vae, n) for n in self.encoder_modules if getattr(vae, n, None) is not None}

    def fingerprint(self, vae: nn.Module) -> str:
        """sha256 over the encoder parts' state (names, shapes, fp32 values): which latent space this is. Not
        the class name: Qwen-Image's VAE has Wan 2.1's encoder, and latents of one may train the other's
        decoder."""
        h = hashlib.sha256()
        for prefix, module in self.encoder_parts(vae).items():
            for name, t in sorted(module.state_dict().items()):
                t = t.detach().to("cpu", torch.float32).contiguous()
                h.update(f"{prefix}.{name}:{tuple(t.shape)}".encode())
                h.update(t.numpy().tobytes())
        return h.hexdigest()

    @torch.no_grad()
    def encode(self, vae: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Pixels (B, C_in, H, W) in [-1, 1] -> what a shard stores per sample, fp32: moments (B, 2C, h, w) =
        mean ‖ logvar clamped as diffusers' DiagonalGaussianDistribution does, or the latent (B, C, h, w)."""
        h = vae.encoder(x)
        if getattr(vae, "quant_conv", None) is not None:
            h = vae.quant_conv(h)
        return _moments(h) if self.store == "moments" else h.float()

    def drop_decoder(self, vae: nn.Module) -> None:
        """Encode only: free the decoder half's memory."""
        for name in self.decoder_modules:
            if getattr(vae, name, None) is not None:
                setattr(vae, name, None)

    # -- the trainable half ----------------------------------------------------------------------------------
    def trainable_decoder(self, vae: nn.Module) -> nn.Module:
        return FamilyDecoder(vae, self)

    def decode_train(self, dec: FamilyDecoder, z: torch.Tensor) -> torch.Tensor:
        """The training forward: raw z (B, C, h, w) -> unclamped pixels (B, C_out, H, W)."""
        if getattr(dec, "post_quant_conv", None) is not None:
            z = dec.post_quant_conv(z)
        return dec.decoder(z)

    def last_layer(self, dec: nn.Module) -> nn.Module:
        return dec.decoder.conv_out

    def after_last(self, dec: nn.Module, out: torch.Tensor) -> torch.Tensor:
        """What the decoder does after its last layer, to x_rec (identity for most)."""
        return out

    def pixel_channels(self, dec: nn.Module) -> int:
        return int(self.last_layer(dec).out_channels)

    def unreached_slices(self, dec: nn.Module) -> dict[str, tuple[slice, ...]]:
        return {}

    def never_reached(self, module: nn.Module) -> list[str]:
        """Parameters (of a VAE or its decoder) an image never reaches: frozen, exported unchanged."""
        return []

    def trainable_names(
        self, vae: nn.Module, train_post_quant_conv: bool, patterns: tuple[str, ...]
    ) -> list[str]:
        """The parameter names (VAE names) a run with these settings trains: what its checkpoints hold."""
        never = set(self.never_reached(vae))
        names = [
            n
            for m in self.decoder_modules
            if getattr(vae, m, None) is not None  # the decoder's order
            for n, _ in getattr(vae, m).named_parameters(prefix=m)
            if n not in never
        ]
        chosen, _ = select_trainable(names, patterns)
        return [n for n in chosen if train_post_quant_conv or not n.startswith("post_quant_conv.")]

    def gradient_checkpointing(self, vae: nn.Module) -> None:
        """model.gradient_checkpointing: diffusers' own, where the class has it."""
        if not getattr(self.model_class, "_supports_gradient_checkpointing", False):
            raise FamilyError(
                f"model.gradient_checkpointing: diffusers' {self.class_name} does not support "
                "gradient checkpointing; lower data.batch_size_per_device or the resolution instead"
            )
        vae.enable_gradient_checkpointing()

    @property
    def supports_channels_last(self) -> bool:
        return self.latent_rank == 4

    @torch.no_grad()
    def decode(self, vae: nn.Module, z: torch.Tensor) -> torch.Tensor:
        """The class's own decode, as a pipeline calls it (clamped where the class clamps): raw z
        (B, C, h, w) -> pixels (B, C_out, H, W)."""
        return vae.decode(z).sample

    # -- export ----------------------------------------------------------------------------------------------
    @property
    def decoder_prefixes(self) -> tuple[str, ...]:
        return tuple(f"{n}." for n in self.decoder_modules)

    def export(self, vae: nn.Module, folder: Path) -> None:
        """The family's own diffusers folder (config.json with its class, buffers such as FLUX.2's `bn`)."""
        vae.save_pretrained(folder, safe_serialization=True)

    def export_single_file(self, vae: nn.Module, path: Path) -> None:
        raise FamilyError(
            f"{self.class_name} has no single-file layout vaedec can write (diffusers only reads "
            "AutoencoderKL's LDM layout back); export the diffusers folder (--format diffusers)"
        )

    # -- tests -----------------------------------------------------------------------------------------------
    def tiny_config(self) -> dict[str, Any]:
        """A random-weight model of this class small enough for CPU tests (downsampling factor 2 or 4)."""
        raise NotImplementedError


def _moments(h: torch.Tensor) -> torch.Tensor:
    mean, logvar = h.float().chunk(2, dim=1)
    return torch.cat([mean, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)], dim=1)


def _from_pretrained(cls: type, source: str, subfolder: str | None) -> nn.Module:
    try:
        kwargs = {"subfolder": subfolder} if subfolder else {}
        return cls.from_pretrained(source, torch_dtype=torch.float32, **kwargs)
    except Exception as e:  # noqa: BLE001 - diffusers raises many types (OSError, ValueError, HF errors) here
        where = f"{source}" + (f" (subfolder {subfolder})" if subfolder else "")
        raise FamilyError(
            f"could not load a {cls.__name__} from {where}: {e}\nGive a diffusers VAE folder (config.json + "
            "diffusion_pytorch_model.safetensors), or a pipeline folder or hub id with --subfolder vae. "
            "Offline, a hub id only works if it is already in the Hugging Face cache."
        ) from None


class AutoencoderKLFamily(Family):
    """SD 1.x/2.x, SDXL, SD3, FLUX.1, RGB+depth: vaedec's original path, kept bit for bit (vae.py, latents.py,
    convert.py)."""

    class_name = "AutoencoderKL"
    used_by = "SD 1.x/2.x, SDXL, SD3, FLUX.1"
    single_file = "ldm"

    def load(
        self,
        source: str,
        subfolder: str | None = None,
        scaling_factor: float | None = None,
        config: str | None = None,
    ) -> nn.Module:
        return kl.load_vae(source, subfolder, scaling_factor)

    def summary(self, vae: nn.Module) -> dict[str, Any]:
        return kl.vae_summary(vae)  # the version-1 manifest fields, unchanged

    def fingerprint(self, vae: nn.Module) -> str:
        return kl.encoder_fingerprint(vae)

    @torch.no_grad()
    def encode(self, vae: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return encode_moments(vae, x)

    def trainable_decoder(self, vae: nn.Module) -> nn.Module:
        return kl.TrainableDecoder(vae)

    def export_single_file(self, vae: nn.Module, path: Path) -> None:
        from vaedec.convert import write_single_file

        write_single_file(vae, path)

    def tiny_config(self) -> dict[str, Any]:
        from vaedec.vae import small_vae_config

        return small_vae_config((8, 16), sample_size=32)


class Flux2Family(Family):
    """FLUX.2: AutoencoderKL's encoder and decoder (the decoder may have its own widths), 32 latent channels,
    and `bn`, a BatchNorm2d (affine=False) whose running statistics over 2x2-patchified latents are the
    pipeline's normalisation. `bn` never runs in encode or decode; it belongs to the frozen half (fingerprint)
    and the export copies it from the source."""

    class_name = "AutoencoderKLFlux2"
    used_by = "FLUX.2 [dev], FLUX.2 [klein]"
    encoder_modules = ("encoder", "quant_conv", "bn")
    decoder_keys = ("decoder_block_out_channels",)  # BFL's small decoder: 96/192/384/384

    def normalisation(self, vae: nn.Module) -> Normalisation:
        bn = vae.bn
        p = math.isqrt(bn.num_features // int(vae.config.latent_channels))
        std = torch.sqrt(bn.running_var.float() + vae.config.batch_norm_eps)  # as Flux2Pipeline computes it
        return Normalisation(
            "patched_batch_norm",
            mean=tuple(bn.running_mean.float().tolist()),
            std=tuple(std.tolist()),
            patch_size=p,
        )

    def set_scaling_factor(self, vae: nn.Module, scaling_factor: float) -> None:
        raise FamilyError(
            "--scaling-factor: AutoencoderKLFlux2 has no scaling_factor; FLUX.2 pipelines whiten "
            "latents with the running statistics of the VAE's `bn`"
        )

    @torch.no_grad()
    def encode(self, vae: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return encode_moments(vae, x)

    def trainable_decoder(self, vae: nn.Module) -> nn.Module:
        return kl.TrainableDecoder(vae)  # post_quant_conv + diffusers' Decoder, as AutoencoderKL's

    def tiny_config(self) -> dict[str, Any]:
        return {
            "block_out_channels": (8, 16),
            "decoder_block_out_channels": (8, 8),
            "down_block_types": ("DownEncoderBlock2D",) * 2,
            "up_block_types": ("UpDecoderBlock2D",) * 2,
            "layers_per_block": 1,
            "latent_channels": 8,
            "norm_num_groups": 4,
            "sample_size": 32,
        }


class _Causal3DFamily(Family):
    """Wan-style video VAEs used on images: causal 3-D convolutions over (B, C, T, H, W) with T = 1 here.

    A causal kernel of temporal size k sees the frame and k-1 zero-padded frames before it, so with one frame
    only its last temporal slice is ever reached; the others get an exact zero gradient. The decoder's
    `time_conv`s (temporal upsampling) never run for a first frame and are frozen. Neither is trained: the
    fine-tune changes the image (first-frame) behaviour only, not the video one. `decode` clamps to [-1, 1];
    training uses the unclamped output."""

    latent_rank = 5
    single_file = ""
    not_trained = "video: temporal kernel slices and time_conv (an image is one frame)"

    def downsample_factor(self, vae: nn.Module) -> int:
        return (vae.config.get("patch_size") or 1) * 2 ** (len(vae.config.dim_mult) - 1)

    def channels(self, vae: nn.Module) -> tuple[int, int, int]:
        c, p2 = vae.config, (vae.config.get("patch_size") or 1) ** 2
        cin = c.get("in_channels", c.get("input_channels", 3))
        cout = c.get("out_channels", c.get("input_channels", 3))
        return int(cin) // p2, int(cout) // p2, int(c.z_dim)

    def normalisation(self, vae: nn.Module) -> Normalisation:
        c = vae.config
        return Normalisation(
            "channel_mean_std", mean=tuple(map(float, c.latents_mean)), std=tuple(map(float, c.latents_std))
        )

    def _encoder_input(self, vae: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(2)  # (B, C, 1, H, W)

    @torch.no_grad()
    def encode(self, vae: nn.Module, x: torch.Tensor) -> torch.Tensor:
        # The class's _encode for one frame: the first chunk through the cached causal encoder, quant_conv.
        x5 = self._encoder_input(vae, x)
        cache = [None] * sum(isinstance(m, nn.Conv3d) for m in vae.encoder.modules())
        h = vae.quant_conv(vae.encoder(x5, feat_cache=cache, feat_idx=[0]))  # (B, 2C, 1, h, w)
        return _moments(h.squeeze(2))

    def _decoder_call(self, dec: nn.Module, x5: torch.Tensor) -> torch.Tensor:
        return dec.decoder(x5)

    def decode_train(self, dec: FamilyDecoder, z: torch.Tensor) -> torch.Tensor:
        # Without the frame cache: for one frame every causal conv pads with zeros either way and the temporal
        # upsamplers do not run, so this is the class's _decode without its clamp (the tests compare them).
        x5 = dec.post_quant_conv(z.unsqueeze(2))  # (B, C, 1, h, w)
        return self.after_last(dec, self._decoder_call(dec, x5))  # (B, C_out, H, W)

    def after_last(self, dec: nn.Module, out: torch.Tensor) -> torch.Tensor:
        return out.squeeze(2)

    def unreached_slices(self, dec: nn.Module) -> dict[str, tuple[slice, ...]]:
        out = {}
        for name, m in dec.named_modules():
            if isinstance(m, nn.Conv3d) and m.kernel_size[0] > 1 and ".time_conv" not in f".{name}":
                out[f"{name}.weight"] = (slice(None), slice(None), slice(0, m.kernel_size[0] - 1))
        return out

    def never_reached(self, module: nn.Module) -> list[str]:
        return [n for n, _ in module.named_parameters() if n.startswith("decoder.") and ".time_conv." in n]

    def pixel_channels(self, dec: nn.Module) -> int:
        p = dec.vae_config.get("patch_size") or 1
        return int(dec.decoder.conv_out.out_channels) // (p * p)

    @torch.no_grad()
    def decode(self, vae: nn.Module, z: torch.Tensor) -> torch.Tensor:
        return vae.decode(z.unsqueeze(2)).sample.squeeze(2)


class QwenImageFamily(_Causal3DFamily):
    class_name = "AutoencoderKLQwenImage"
    used_by = "Qwen-Image, Qwen-Image-Edit, Qwen-Image-Layered"

    def tiny_config(self) -> dict[str, Any]:
        return {
            "base_dim": 8,
            "z_dim": 4,
            "dim_mult": [1, 2],
            "num_res_blocks": 1,
            "temperal_downsample": [True],
            "latents_mean": [0.1, -0.2, 0.3, 0.0],
            "latents_std": [1.5, 2.0, 0.5, 1.0],
        }


class WanFamily(_Causal3DFamily):
    """Wan 2.1 (16 ch, f8) and Wan 2.2 (48 ch, f16: pixels 2x2-patchified into channels before the encoder,
    the decoder's output unpatchified; residual up blocks whose first frame is cut by `first_chunk`)."""

    class_name = "AutoencoderKLWan"
    used_by = "Wan 2.1, Wan 2.2 and models built on them"
    single_file = "diffusers"
    decoder_keys = ("decoder_base_dim",)

    def _encoder_input(self, vae: nn.Module, x: torch.Tensor) -> torch.Tensor:
        from diffusers.models.autoencoders.autoencoder_kl_wan import patchify as wan_patchify

        p = vae.config.get("patch_size")
        return wan_patchify(x.unsqueeze(2), p) if p else x.unsqueeze(2)

    def _decoder_call(self, dec: nn.Module, x5: torch.Tensor) -> torch.Tensor:
        return dec.decoder(x5, first_chunk=True)  # as _decode's first frame: DupUp3D keeps its last frame

    def after_last(self, dec: nn.Module, out: torch.Tensor) -> torch.Tensor:
        from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify as wan_unpatchify

        p = dec.vae_config.get("patch_size") or 1  # Wan 2.2: conv_out gives 2x2 patches in channels
        return (wan_unpatchify(out, p) if p > 1 else out).squeeze(2)

    def tiny_config(self) -> dict[str, Any]:
        return {
            "base_dim": 8,
            "z_dim": 4,
            "dim_mult": [1, 2],
            "num_res_blocks": 1,
            "temperal_downsample": [True],
            "latents_mean": [0.1, -0.2, 0.3, 0.0],
            "latents_std": [1.5, 2.0, 0.5, 1.0],
            "scale_factor_spatial": 2,
        }

    def tiny_config_22(self) -> dict[str, Any]:
        """Wan 2.2's layout: residual blocks, 2x2 patches, decoder wider than the encoder."""
        return {
            "base_dim": 8,
            "decoder_base_dim": 12,
            "z_dim": 4,
            "dim_mult": [1, 2, 2],
            "num_res_blocks": 1,
            "temperal_downsample": [False, True],
            "is_residual": True,
            "patch_size": 2,
            "in_channels": 12,
            "out_channels": 12,
            "latents_mean": [0.1, -0.2, 0.3, 0.0],
            "latents_std": [1.5, 2.0, 0.5, 1.0],
            "scale_factor_spatial": 8,
        }


class DCFamily(Family):
    """DC-AE (Sana): a deterministic latent (no logvar), f32 with 32 channels in Sana's; some decoders use
    BatchNorm (decoder_norm_types), kept in eval mode so its statistics stay the original's."""

    class_name = "AutoencoderDC"
    used_by = "Sana, Sana-Sprint (DC-AE 1.0 / 1.1)"
    store = "latent"
    encoder_modules = ("encoder",)
    decoder_modules = ("decoder",)
    eval_types = (nn.modules.batchnorm._BatchNorm,)
    single_file = "diffusers"
    decoder_keys = ("decoder_block_types", "decoder_block_out_channels", "decoder_layers_per_block",
                    "decoder_qkv_multiscales", "decoder_norm_types", "decoder_act_fns", "decoder_in_shortcut",
                    "decoder_conv_act_fn", "upsample_block_type")  # DC-AE-Lite: a lighter decoder

    def downsample_factor(self, vae: nn.Module) -> int:
        return int(vae.spatial_compression_ratio)

    def channels(self, vae: nn.Module) -> tuple[int, int, int]:
        c = vae.config
        return int(c.in_channels), int(c.in_channels), int(c.latent_channels)

    def last_layer(self, dec: nn.Module) -> nn.Module:
        last = (
            dec.decoder.conv_out
        )  # a Conv2d, or a DCUpBlock2d (conv + pixel shuffle) when layers_per_block[0] == 0
        return last if isinstance(last, nn.Conv2d) else last.conv

    def after_last(self, dec: nn.Module, out: torch.Tensor) -> torch.Tensor:
        last = dec.decoder.conv_out  # a DCUpBlock2d conv_out has no shortcut: pixel shuffle after its conv
        return (
            out
            if isinstance(last, nn.Conv2d) or last.interpolate
            else nn.functional.pixel_shuffle(out, last.factor)
        )

    def pixel_channels(self, dec: nn.Module) -> int:
        last = dec.decoder.conv_out
        if isinstance(last, nn.Conv2d) or last.interpolate:
            return int(self.last_layer(dec).out_channels)
        return int(last.conv.out_channels) // last.factor**2

    def tiny_config(self) -> dict[str, Any]:
        return {
            "latent_channels": 4,
            "attention_head_dim": 4,
            "encoder_block_types": ("ResBlock", "EfficientViTBlock"),
            "decoder_block_types": ("ResBlock", "EfficientViTBlock"),
            "encoder_block_out_channels": (8, 16),
            "decoder_block_out_channels": (8, 16),
            "encoder_layers_per_block": (1, 1),
            "decoder_layers_per_block": (1, 1),
            "encoder_qkv_multiscales": ((), (5,)),
            "decoder_qkv_multiscales": ((), (5,)),
            "decoder_norm_types": ("batch_norm", "rms_norm"),
            "scaling_factor": 0.41407,
        }


class HunyuanImageFamily(Family):
    """HunyuanImage 2.1: Gaussian moments straight from the encoder (no quant_conv, no post_quant_conv), 64
    channels at f32 in the released model; its config's scaling_factor may be None (then give
    --scaling-factor)."""

    class_name = "AutoencoderKLHunyuanImage"
    used_by = "HunyuanImage 2.1"
    encoder_modules = ("encoder",)
    decoder_modules = ("decoder",)
    decoder_keys = ("upsample_match_channel",)

    def downsample_factor(self, vae: nn.Module) -> int:
        from diffusers.models.autoencoders.autoencoder_kl_hunyuanimage import HunyuanImageDownsample

        return 2 ** sum(isinstance(m, HunyuanImageDownsample) for m in vae.encoder.modules())

    def tiny_config(self) -> dict[str, Any]:
        return {
            "in_channels": 3,
            "out_channels": 3,
            "latent_channels": 8,
            "block_out_channels": (32, 32),
            "layers_per_block": 1,
            "spatial_compression_ratio": 2,
            "sample_size": 32,
            "scaling_factor": 0.75,
        }


class TinyFamily(Family):
    """TAESD / TAESDXL / TAESD3 / TAEF1: a deterministic latent in the parent model's latent space (for SD the
    scaled one: config scaling_factor 1.0); pipelines use config scaling_factor / shift_factor like
    AutoencoderKL's. latent_magnitude / latent_shift only map latents to uint8 in `forward`, never used here.
    The decoder soft-clamps its input (tanh(z / 3) * 3) and maps [0, 1] to [-1, 1] after its last conv."""

    class_name = "AutoencoderTiny"
    used_by = "TAESD, TAESDXL, TAESD3, TAEF1 (fast previews)"
    store = "latent"
    encoder_modules = ("encoder",)
    decoder_modules = ("decoder",)
    decoder_keys = (
        "decoder_block_out_channels",
        "num_decoder_blocks",
        "upsampling_scaling_factor",
        "upsample_fn",
    )

    def downsample_factor(self, vae: nn.Module) -> int:
        return 2 ** (len(vae.config.encoder_block_out_channels) - 1)

    def last_layer(self, dec: nn.Module) -> nn.Module:
        return dec.decoder.layers[-1]

    def after_last(self, dec: nn.Module, out: torch.Tensor) -> torch.Tensor:
        return out.mul(2).sub(1)  # DecoderTiny.forward: [0, 1] -> [-1, 1]

    def gradient_checkpointing(self, vae: nn.Module) -> None:
        vae.enable_gradient_checkpointing()
        # EncoderTiny's checkpointed branch skips its [-1, 1] -> [0, 1] input mapping; no encoder trains.
        vae.encoder.gradient_checkpointing = False

    def tiny_config(self) -> dict[str, Any]:
        return {
            "encoder_block_out_channels": (8, 8),
            "decoder_block_out_channels": (8, 8),
            "num_encoder_blocks": (1, 1),
            "num_decoder_blocks": (1, 1),
            "latent_channels": 4,
        }


FAMILIES: dict[str, Family] = {
    f.class_name: f
    for f in (
        AutoencoderKLFamily(),
        Flux2Family(),
        QwenImageFamily(),
        WanFamily(),
        DCFamily(),
        HunyuanImageFamily(),
        TinyFamily(),
    )
}

# Classes people ask for that vaedec refuses with a specific reason rather than the generic list.
UNSUPPORTED = {
    "AutoencoderRAE": (
        "its frozen encoder is a transformers model (DINOv2 / SigLIP2 / MAE) and vaedec does not depend on "
        "transformers; its latents are stored already normalised, its pixels are in [0, 1] and its decoder's "
        "output size is fixed by the config, not by the crop"
    ),
    "AutoencoderKLQwenImage21": (
        "Qwen-Image 2.1's VAE: another architecture than Qwen-Image's, not adapted yet"
    ),
}


# ------------------------------------------------------------------------------------------------------------
# which family


def supported() -> str:
    return ", ".join(FAMILIES)


def family_of(class_name: str, source: str = "the VAE") -> Family:
    """The adapter of a diffusers class name; FamilyError naming it and the supported ones otherwise."""
    if class_name in FAMILIES:
        return FAMILIES[class_name]
    why = f" ({UNSUPPORTED[class_name]})" if class_name in UNSUPPORTED else ""
    raise FamilyError(f"{source} is a {class_name}{why}: vaedec fine-tunes the decoders of {supported()}")


def family_for(vae: nn.Module) -> Family:
    """The adapter of a loaded VAE (its class)."""
    return family_of(type(vae).__name__)


def manifest_family(vae_info: dict[str, Any]) -> Family:
    """The family of a shard manifest's `settings.vae`; manifests from before families are AutoencoderKL."""
    return family_of(vae_info.get("family", "AutoencoderKL"), "the VAE of these shards")


def manifest_normalisation(vae_info: dict[str, Any]) -> Normalisation:
    """The manifest's normalisation; before families: AutoencoderKL's scaling_factor / shift_factor."""
    if "normalisation" in vae_info:
        return Normalisation.from_dict(vae_info["normalisation"])
    return Normalisation("scale_shift", vae_info["scaling_factor"], vae_info.get("shift_factor"))


def pipeline_subfolder(source: str, subfolder: str | None) -> str | None:
    """`subfolder`, or "vae" for a local pipeline folder (no config.json at its root, a vae/ folder in it)."""
    local = Path(source)
    if (
        subfolder is None
        and local.is_dir()
        and not (local / "config.json").exists()
        and (local / "vae").is_dir()
    ):
        return "vae"
    return subfolder


def load_manifest_vae(
    vae_info: dict[str, Any],
    vae: str | None = None,
    subfolder: str | None = None,
    latents: str = "these latents",
) -> tuple[Family, nn.Module]:
    """(family, VAE) a shard manifest's `settings.vae` names, or `vae` (with `subfolder`) in its place:
    another class is allowed when it stores the same kind of latent at the same rank (Qwen-Image's decoder on
    Wan 2.1's latents); refused unless its encoder fingerprint is the manifest's. `latents` names them in
    messages."""
    expected = manifest_family(vae_info)
    norm = manifest_normalisation(vae_info)
    scaling = norm.scaling_factor if norm.kind == "scale_shift" else None
    if vae:
        family, model = load(vae, subfolder, scaling)
    else:
        family, model = load(
            vae_info["source"], vae_info.get("subfolder"), scaling, config=vae_info.get("config")
        )
    if (
        norm.kind == "scale_shift" and norm.shift_factor is not None
    ):  # encode --shift-factor (BFL's ae.safetensors)
        family.set_shift_factor(model, norm.shift_factor)
    source = vae or vae_info["source"]
    if (family.store, family.latent_rank) != (expected.store, expected.latent_rank):
        raise FamilyError(
            f"{source} is a {family.class_name}, whose latents are not those of {latents} (made with "
            f"a {expected.class_name}: {expected.store}, {expected.latent_rank}-D); use a VAE of "
            "that class, or re-encode the images with this one"
        )
    if family.fingerprint(model) != vae_info["encoder_sha256"]:
        raise EncoderMismatchError(
            f"the encoder of {source} is not the one that made {latents} (sha256 differs from the "
            "manifest's): these latents would be decoded by a decoder trained for another latent space. "
            "Use the manifest's VAE, or re-encode the images with this one."
        )
    return family, model


def vae_class_name(source: str, subfolder: str | None = None) -> str:
    """The diffusers class a VAE folder or hub id holds (its config.json's `_class_name`). A single file, a
    config without `_class_name`, or a source whose config cannot be read: AutoencoderKL, whose loader then
    says what is wrong as before."""
    if is_single_file(source):
        return "AutoencoderKL"
    local = Path(source)
    if local.is_dir():
        path = local / (pipeline_subfolder(source, subfolder) or "") / "config.json"
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError):
            return "AutoencoderKL"
    else:
        try:
            config = diffusers.AutoencoderKL.load_config(
                source, **({"subfolder": subfolder} if subfolder else {})
            )
        except Exception:  # noqa: BLE001 - offline, unknown id...: AutoencoderKL's loader reports it
            return "AutoencoderKL"
    name = config.get("_class_name", "AutoencoderKL") if isinstance(config, dict) else "AutoencoderKL"
    return name if isinstance(name, str) else "AutoencoderKL"


def load(
    source: str,
    subfolder: str | None = None,
    scaling_factor: float | None = None,
    class_name: str | None = None,
    config: str | None = None,
) -> tuple[Family, nn.Module]:
    """(family, VAE in fp32) for a diffusers folder, pipeline folder, hub id or single file; the class is read
    from its config unless `class_name` says it. A single file of another class than AutoencoderKL needs
    `config`, a diffusers folder or hub id whose config.json gives its class and architecture."""
    if class_name is None and config is not None and is_single_file(source):
        class_name = vae_class_name(config)  # a single file's architecture, and so its class, is the config's
    name = class_name or vae_class_name(source, subfolder)
    family = family_of(name, source)
    return family, family.load(source, subfolder, scaling_factor, config)


def build_tiny(class_name: str, seed: int = 0, **overrides: Any) -> nn.Module:
    """A tiny random model of a family (its `tiny_config` with `overrides`), seeded: the tests' VAEs."""
    family = family_of(class_name)
    torch.manual_seed(seed)
    return family.model_class(**(family.tiny_config() | overrides))


# ------------------------------------------------------------------------------------------------------------
# a run's decoder


def check_run_settings(cfg: TrainConfig, manifest: dict[str, Any]) -> TrainConfig:
    """`cfg` with the family's defaults filled in (model.latent_sample None: sample a Gaussian posterior, take
    a deterministic latent as it is); settings the shards' family cannot take are refused before the run
    folder is touched."""
    family = manifest_family(manifest["settings"]["vae"])
    if cfg.model.latent_sample is None:
        mode = "mode" if family.store == "latent" else "sample"
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, latent_sample=mode))
    if family.store == "latent" and cfg.model.latent_sample == "sample":
        raise TrainError(
            f"model.latent_sample=sample: the shards hold one deterministic {family.class_name} "
            "latent per image (no posterior to sample); set model.latent_sample=mode"
        )
    if cfg.model.channels_last and not family.supports_channels_last:
        raise TrainError(
            f"model.channels_last: {family.class_name}'s decoder is 3-D (causal video "
            "convolutions); set model.channels_last=false"
        )
    return cfg


def trainable_decoder(cfg: TrainConfig, manifest: dict[str, Any]) -> nn.Module:
    """The trainable half of the manifest's VAE (or model.vae with the same encoder): AutoencoderKL's
    post_quant_conv + decoder (vae.TrainableDecoder), or its family's; the encoder is freed here and never
    reaches the device."""
    family, vae = load_manifest_vae(
        manifest["settings"]["vae"], cfg.model.vae, cfg.model.subfolder, cfg.data.shards
    )
    return decoder_of(cfg, family, vae)


def decoder_of(
    cfg: TrainConfig, family: Family, vae: nn.Module, build: Callable[[nn.Module], nn.Module] | None = None
) -> nn.Module:
    """The trainable half of `vae` (`build(vae)`, default the family's) with the run's model settings:
    gradient checkpointing, frozen parts, channels_last."""
    if cfg.model.gradient_checkpointing:
        try:
            family.gradient_checkpointing(
                vae
            )  # diffusers' own (AutoencoderKL: mid and up blocks, non-reentrant)
        except FamilyError as e:
            raise TrainError(str(e)) from None
    decoder = (build or family.trainable_decoder)(vae)
    del vae
    if getattr(decoder, "post_quant_conv", None) is not None and not cfg.model.train_post_quant_conv:
        freeze(decoder.post_quant_conv)
    freeze_all_but(decoder, cfg.model.trainable)
    if cfg.model.channels_last:
        decoder.to(memory_format=torch.channels_last)
    return decoder


def latent_noise_raw(cfg: TrainConfig, manifest: dict[str, Any]) -> float | torch.Tensor:
    """model.latent_noise_std (the diffusion model's units) in raw latent units: std / scaling_factor as ever,
    or a (C, h, w) map for a per-channel or batch-norm normalisation (`raw_noise_std`); 0 stays 0."""
    vae = manifest["settings"]["vae"]
    norm, std = manifest_normalisation(vae), cfg.model.latent_noise_std
    if not std:
        return 0.0
    if norm.kind == "scale_shift" and norm.scaling_factor is None:
        raise TrainError(
            "model.latent_noise_std: the shards' VAE has no scaling_factor, so the diffusion "
            "model's units are unknown; re-encode with --scaling-factor"
        )
    r = manifest["settings"]["preprocessing"]["resolution"] // vae["downsample_factor"]
    return raw_noise_std(norm, std, (vae["latent_channels"], r, r))


def zero_unreached_grads(decoder: nn.Module) -> None:
    """Causal 3-D kernels: the temporal slices one frame never reaches get an exact zero gradient (they only
    meet zero padding), whatever the convolution algorithm computes for them."""
    for name, idx in getattr(decoder, "unreached", {}).items():
        grad = decoder.get_parameter(name).grad
        if grad is not None:
            grad[idx] = 0
