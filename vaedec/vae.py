"""Loading an `AutoencoderKL` (diffusers folder, hub id, or single LDM file), the encoder fingerprint, loading
the VAE a shard manifest names with that fingerprint checked, its trainable decoder (post_quant_conv +
decoder) and the freezing helpers every family's decoder uses. Other VAE classes, and the run's decoder of any
class (`families.trainable_decoder`), are vaedec/families.py's, one floor up."""

from __future__ import annotations

import fnmatch
import hashlib
import logging
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from torch import nn

from vaedec.convert import DEFAULT_SCALING_FACTOR, ConversionError, load_single_file_vae
from vaedec.errors import TrainError, VaedecError

log = logging.getLogger(__name__)

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
# The Stable Diffusion 1.x/2.x VAE architecture (stable-diffusion-v1-5/vae/config.json), for benchmarks and
# tests that need the real shapes with random weights.
SD_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}


def small_vae_config(
    block_out_channels: tuple[int, ...], in_channels: int = 3, sample_size: int = 64
) -> dict:
    """SD's block layout at a fraction of its width and depth (one block per channel count, one layer each):
    the random-weight VAEs of the demo and the tests. Downsampling factor 2 ** (len(block_out_channels) -
    1)."""
    levels = len(block_out_channels)
    return {
        "in_channels": in_channels,
        "out_channels": in_channels,
        "down_block_types": ("DownEncoderBlock2D",) * levels,
        "up_block_types": ("UpDecoderBlock2D",) * levels,
        "block_out_channels": tuple(block_out_channels),
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 8,
        "sample_size": sample_size,
    }


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class VAELoadError(VaedecError):
    """The VAE could not be loaded; the message says from where and what to check."""


def is_single_file(source: str) -> bool:
    """True when `source` names one checkpoint file rather than a folder or hub id."""
    return Path(source).suffix.lower() in SINGLE_FILE_SUFFIXES and Path(source).is_file()


def load_vae(source: str, subfolder: str | None = None, scaling_factor: float | None = None) -> AutoencoderKL:
    """A diffusers folder, a hub id (with `subfolder="vae"` for pipeline repos) or a single LDM file, in fp32.

    `scaling_factor` replaces the config's; a single file, which does not store one, gets 0.18215 with a
    warning.
    """
    if is_single_file(source):
        if subfolder:
            raise VAELoadError(
                f"{source} is a single file: --subfolder {subfolder} applies only to folders and hub ids"
            )

        if scaling_factor is None:
            log.warning(
                "%s: LDM files do not store the latent scaling_factor; assuming %s (SD 1.x/2.x). For SDXL's "
                "VAE pass --scaling-factor 0.13025.",
                source,
                DEFAULT_SCALING_FACTOR,
            )
        try:
            return load_single_file_vae(source, scaling_factor)
        except ConversionError as e:
            raise VAELoadError(str(e)) from None
    local = Path(source)
    if (
        local.is_dir()
        and subfolder is None
        and not (local / "config.json").exists()
        and (local / "vae").is_dir()
    ):
        subfolder = "vae"  # a whole pipeline folder: its VAE lives in vae/
    try:
        kwargs = {"subfolder": subfolder} if subfolder else {}
        vae = AutoencoderKL.from_pretrained(source, torch_dtype=torch.float32, **kwargs)
    except Exception as e:  # noqa: BLE001 - diffusers raises many types (OSError, ValueError, HF errors) here
        where = f"{source}" + (f" (subfolder {subfolder})" if subfolder else "")
        raise VAELoadError(
            f"could not load an AutoencoderKL from {where}: {e}\nGive a diffusers VAE folder (config.json + "
            "diffusion_pytorch_model.safetensors), a pipeline folder or hub id with --subfolder vae, or a "
            "single .safetensors/.ckpt VAE file. Offline, a hub id only works if it is already in the "
            "Hugging Face cache."
        ) from None
    if scaling_factor is not None:
        vae.register_to_config(scaling_factor=scaling_factor)
    return vae


def encoder_fingerprint(vae: AutoencoderKL) -> str:
    """sha256 over encoder + quant_conv weights (names, shapes and fp32 values): which latent space this
    is."""
    h = hashlib.sha256()
    modules = {"encoder": vae.encoder}
    if vae.quant_conv is not None:
        modules["quant_conv"] = vae.quant_conv
    for prefix, module in modules.items():
        for name, t in sorted(module.state_dict().items()):
            t = t.detach().to("cpu", torch.float32).contiguous()
            h.update(f"{prefix}.{name}:{tuple(t.shape)}".encode())
            h.update(t.numpy().tobytes())
    return h.hexdigest()


class EncoderMismatchError(VAELoadError):
    """The VAE loads, but its encoder is not the one that made the latents."""


def manifest_vae_source(
    vae_info: dict, vae: str | None = None, subfolder: str | None = None
) -> tuple[str, str | None, float]:
    """(source, subfolder, scaling_factor) to load for a manifest's `settings.vae`, or `vae` in its place."""
    if vae:
        return vae, subfolder, vae_info["scaling_factor"]
    return vae_info["source"], vae_info.get("subfolder"), vae_info["scaling_factor"]


def load_manifest_vae(
    vae_info: dict, vae: str | None = None, subfolder: str | None = None, latents: str = "these latents"
) -> AutoencoderKL:
    """The VAE a shard manifest's `settings.vae` names (or `vae`, with `subfolder`, in its place), with the
    manifest's scaling_factor, refused unless its encoder fingerprint is the manifest's. `latents` names the
    latents in the message (a shard folder)."""
    source, subfolder, scaling_factor = manifest_vae_source(vae_info, vae, subfolder)
    model = load_vae(source, subfolder, scaling_factor)
    if encoder_fingerprint(model) != vae_info["encoder_sha256"]:
        raise EncoderMismatchError(
            f"the encoder of {source} is not the one that made {latents} (sha256 differs from the "
            "manifest's): these latents would be decoded by a decoder trained for another latent space. Use "
            "the manifest's VAE, or re-encode the images with this one."
        )
    return model


def freeze(module: nn.Module) -> nn.Module:
    """eval mode and no gradients: the frozen half of the model."""
    return module.eval().requires_grad_(False)


def select_trainable(names: list[str], patterns: tuple[str, ...] | list[str]) -> tuple[list[str], list[str]]:
    """(names matching any fnmatch pattern, patterns that match no name); no patterns = every name."""
    if not patterns:
        return list(names), []
    chosen = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    return chosen, unmatched


def named_trainable_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every parameter that trains, in module order: what optimizer, EMA and checkpoints
    hold."""
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


class TrainableDecoder(nn.Module):
    """post_quant_conv + decoder of an AutoencoderKL; also hands back the input of `decoder.conv_out`.

    The adaptive GAN weight needs the gradient at conv_out.weight; with conv_out's input h
    (B, C_last, H, W) that gradient is one cheap convolution (losses.conv_weight_grad), so the decoder is
    back-propagated once.
    """

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.post_quant_conv = vae.post_quant_conv  # may be None (use_post_quant_conv=False)
        self.decoder = vae.decoder
        self._h: torch.Tensor | None = None
        self.decoder.conv_out.register_forward_pre_hook(self._keep_conv_out_input)

    def _keep_conv_out_input(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        self._h = args[0]

    @property
    def conv_out(self) -> nn.Conv2d:
        return self.decoder.conv_out

    @property
    def out_channels(self) -> int:
        """Pixel channels of x_rec (the discriminator's input)."""
        return int(self.decoder.conv_out.out_channels)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw z (B, C, h, w) -> (x_rec (B, C_out, 8h, 8w), conv_out input (B, C_last, 8h, 8w))."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        x_rec = self.decoder(z)
        h, self._h = self._h, None
        return x_rec, h


def vae_summary(vae: AutoencoderKL) -> dict:
    """The config facts the manifest and the logs record."""
    c = vae.config
    return {
        "in_channels": int(c.in_channels),
        "out_channels": int(c.out_channels),
        "latent_channels": int(c.latent_channels),
        "downsample_factor": 2 ** (len(c.block_out_channels) - 1),
        "scaling_factor": float(c.scaling_factor),
        "shift_factor": None if c.get("shift_factor") is None else float(c.shift_factor),
    }


# ------------------------------------------------------------------------------------------------------------
# the decoder that trains


def trainable_parameters(decoder: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The decoder parameters that train, in module order (what opt_g holds, logvar aside)."""
    return [p for _, p in named_trainable_parameters(decoder)]


def freeze_all_but(decoder: nn.Module, patterns: tuple[str, ...]) -> None:
    """model.trainable: freeze every parameter no pattern matches; a pattern that matches nothing, or a
    selection that leaves nothing to train, is a TrainError naming the decoder's parts."""
    if not patterns:
        return
    names = [n for n, _ in decoder.named_parameters()]
    chosen, unmatched = select_trainable(names, patterns)
    if unmatched:
        parts = sorted({_part(n) + ".*" for n in names})
        raise TrainError(
            f"model.trainable: {', '.join(map(repr, unmatched))} match(es) no parameter of the decoder. "
            "Patterns are "
            f"fnmatch patterns on the VAE's parameter names, e.g. 'decoder.up_blocks.3.*'; its parts: "
            f"{', '.join(parts)}"
        )
    chosen_set = set(chosen)
    for name, p in decoder.named_parameters():
        if name not in chosen_set:
            p.requires_grad_(False)
    if not named_trainable_parameters(decoder):
        raise TrainError(
            f"model.trainable={list(patterns)} leaves nothing to train (model.train_post_quant_conv "
            "is false, so post_quant_conv stays frozen)"
        )


def _part(name: str) -> str:
    """A parameter's block, for messages: decoder.up_blocks.3, decoder.conv_out, post_quant_conv."""
    bits = name.split(".")
    if bits[0] != "decoder":
        return bits[0]
    return ".".join(bits[:3] if bits[1] in ("up_blocks", "mid_block") else bits[:2])
