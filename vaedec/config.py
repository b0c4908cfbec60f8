"""Every setting vaedec reads, with its default, unit and meaning: the one source of truth.

YAML files and `key=value` overrides change fields of these dataclasses and nothing else; an unknown key or a
value of the wrong type is an error that names the key. `dump_config` writes what a run actually used.
"""

from __future__ import annotations

import dataclasses
import logging
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from vaedec.errors import VaedecError
from vaedec.redact import redact_tree

log = logging.getLogger("vaedec")


class ConfigError(VaedecError):
    """A config file or override the user has to fix; the message says which key and why."""


# ------------------------------------------------------------------------------------------------------------
# encode


@dataclass(frozen=True)
class EncodeConfig:
    """`cli.py encode`: images -> WebDataset shards of posterior moments."""

    src: str = ""  # folder of images (recursive) or a text file list, one path a line relative to the list
    out: str = ""  # output folder: shard-%06d.tar, manifest.json, skipped.jsonl
    vae: str = ""
    subfolder: str | None = None  # e.g. "vae" for a full pipeline repo; None = the VAE is at the root
    resolution: int = 256  # side of the square crop encoded, pixels (a multiple of the VAE's downsampling)
    resize: int | None = None  # shorter side is resized to this before cropping, pixels; None = resolution
    crops_per_image: int = 0  # 0 = one center crop; N > 0 = N seeded random crops per image instead
    flip: bool = False  # also encode the horizontally mirrored crop as its own sample
    seed: int = 0  # seeds the random crops (per image, so resume and order do not change them)
    batch_size: int = 16  # images per encoder forward
    num_workers: int = 2  # DataLoader processes decoding images; 0 = decode in the main process
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"  # encoder compute dtype; moments are stored as float16
    device: str | None = None  # torch device; None = cuda if available, else cpu
    shard_size_mb: float = 256.0  # a shard is closed once it holds at least this many MiB
    depth_dir: str | None = None  # RGB+depth VAEs: folder of 16-bit depth PNGs matched by file stem
    # The VAE's latent scale, recorded in the manifest and carried into exports. None = the VAE's config; LDM
    # single files do not store it, so they get SD 1.x/2.x's 0.18215 (SDXL's VAE: 0.13025).
    scaling_factor: float | None = None
    # The VAE's latent shift, (z - shift_factor) * scaling_factor, recorded like scaling_factor. None = the
    # VAE's config; LDM single files do not store it (BFL's FLUX.1 ae.safetensors: pass 0.1159).
    shift_factor: float | None = None
    # A single checkpoint file of another VAE class than AutoencoderKL (Wan, DC-AE: diffusers'
    # from_single_file): the diffusers folder or hub id whose config.json gives its class and architecture.
    # None = not needed.
    vae_config: str | None = None
    overwrite: bool = False  # delete OUT's shards and manifest and start again instead of resuming

    @property
    def crop_side(self) -> int:
        """Shorter side after resizing, pixels."""
        return self.resize or self.resolution


# ------------------------------------------------------------------------------------------------------------
# eval


@dataclass(frozen=True)
class EvalConfig:
    """`cli.py eval`: decoders compared on the same held-out latents."""

    # Shard folders (`encode` output) or image folders / file lists, which are encoded into OUT/encoded/NAME
    # with `encode`'s preprocessing and the first model's encoder. Each is reported on its own.
    data: tuple[str, ...] = ()
    # The models, `[LABEL=]SPEC`; the first is the baseline every other is compared with. SPEC: a diffusers
    # folder, hub id, single .safetensors/.ckpt, an `export` folder, a run folder (newest checkpoint; RUN:ema
    # / RUN:raw, default EMA when kept) or one checkpoints/step-* folder.
    vaes: tuple[str, ...] = ()
    out: str = "eval"  # output folder: report.md, eval.json, per_image.csv, grids/, encoded/
    max_samples: int | None = None  # samples per data set, the first in shard order; None = all
    val_shards: int = 0  # only the last N shards of each shard folder (train's data.val_shards); 0 = all
    latent_sample: Literal["mode", "sample"] = "mode"  # z = mean, or mean + std*eps with eps seeded per key
    seed: int = 0  # seeds eps for latent_sample=sample and the bootstrap resampling
    batch_size: int = 16  # samples per decoder forward
    device: str | None = None  # torch device; None = cuda if available, else cpu
    resolution: int = 256  # image folders only: side of the encoded center crop, pixels
    fid_weights: str | None = None  # torch-fidelity's InceptionV3 weights file; None = no rFID
    # Inception features for rFID: 2048 (the standard), or 768 / 192 / 64 (cheaper, not comparable)
    fid_features: int = 2048
    lpips_vgg_weights: str | None = None  # local torchvision vgg16 .pth; None = torch hub cache (see README)
    lpips_random_backbone: bool = False  # tests only: random VGG16 (LPIPS values are then meaningless; warns)
    grid_samples: int = 8  # rows in each PNG grid (fixed sample, most improved, most worsened)
    confidence: float = 0.95  # level of the paired bootstrap intervals of the deltas against the baseline
    # Decode images/s of each model, side by side: this many timed decodes of each set's first batch per model
    # (after one untimed warm-up; models interleaved; the median), on `device`. 0 = not measured.
    speed_rounds: int = 5


# ------------------------------------------------------------------------------------------------------------
# train


@dataclass(frozen=True)
class DataConfig:
    # Shards written by `cli.py encode` (the SHARDS argument): their folder, file:///folder/, an http(s)://
    # URL of it, or pipe:CMD with {name} for the file name, e.g. "pipe:aws s3 cp s3://bucket/shards/{name} -"
    # (vaedec/transport.py).
    shards: str = ""
    batch_size_per_device: int = 12  # samples per micro-batch on each device (LDM: 12)
    num_workers: int = 2  # DataLoader processes reading shards; 0 = read in the main process
    # Samples per shuffle block (each reader permutes its stream in blocks of this many; a resume reads one
    # block again); 0 or 1 = no sample shuffle.
    shuffle_buffer: int = 1000
    val_shards: int = 0  # the last N shards of the manifest are held out for validation; 0 = no validation
    val_max_samples: int = 64  # validation uses at most this many held-out samples
    # Other shard sets mixed into every batch, each "PATH:P" (PATH as `shards`: a folder, URL or pipe: spec):
    # a sample comes from PATH with probability P, from `shards` otherwise (e.g. 10k general photos at 0.2
    # against forgetting outside the domain). Each set holds out its own last val_shards shards for its own
    # validation. () = train on `shards` alone.
    mix: tuple[str, ...] = ()
    # A damaged tar, or a sample with an unreadable moments.npy / image.png, missing members, another shape or
    # non-finite moments: "skip" drops it (a damaged tar from the point it breaks), counts it in metrics
    # (data/bad_samples) and logs shard and key; "error" stops the run with a message naming the shard.
    on_bad_sample: Literal["skip", "error"] = "skip"
    # Seconds to wait for the next batch from a DataLoader worker before the run stops with a message (a stuck
    # pipe: command, a hung network mount); the newest checkpoint stays, a rerun resumes. 0 = wait for ever.
    # Needs num_workers >= 1 (the main process cannot time out its own read).
    read_timeout_s: float = 600.0


@dataclass(frozen=True)
class ModelConfig:
    vae: str | None = None  # None = the VAE named in the shard manifest; else a folder, hub id or single file
    subfolder: str | None = None  # with a hub id or pipeline folder: "vae"; None = the manifest's choice
    train_post_quant_conv: bool = True  # also train the 1x1 conv in front of the decoder
    # z = mean + std*eps drawn each step ("sample"), or z = mean ("mode"). None = the VAE's kind: sample for a
    # Gaussian posterior, mode (the stored latent) for deterministic encoders (DC-AE, TAESD), which refuse
    # sample.
    latent_sample: Literal["sample", "mode"] | None = None
    # Extra Gaussian noise added to z in training, std in the units a diffusion model sees ((z - shift) *
    # scale, about unit variance), so the decoder tolerates the small errors of generated latents; 0 = off.
    # Typical: 0.05-0.2.
    latent_noise_std: float = 0.0
    # Memory for 512-1024 px on one GPU: diffusers' own checkpointing of the decoder's mid and up blocks
    # (recomputed in the backward, non-reentrant); False = keep every activation.
    gradient_checkpointing: bool = False
    channels_last: bool = False  # decoder, PatchGAN and z in channels-last memory format (faster GPU convs)
    # Train only the parameters whose names (AutoencoderKL names: decoder.up_blocks.3.resnets.0.conv1.weight,
    # post_quant_conv.weight) match one of these fnmatch patterns, e.g. [decoder.up_blocks.3.*,
    # decoder.conv_out.*]; the rest stays frozen at the original weights. () = the whole decoder (and
    # post_quant_conv, see above).
    trainable: tuple[str, ...] = ()
    # A new decoder for the same frozen latent space (vaedec/decoders.py; README "New decoders").
    # "pretrained" = start from the VAE's decoder weights (a fine-tune); "scratch" = the same class with
    # model.decoder_config over its config, the decoder initialised at random from run.seed, the encoder
    # copied unchanged.
    decoder_init: Literal["pretrained", "scratch"] = "pretrained"
    # Overrides of the class's config for the new decoder, e.g. {decoder_block_out_channels: [96, 192, 384,
    # 384]} for FLUX.2's smaller decoder. Only keys that shape the decoder alone (decoders.DECODER_KEYS; plain
    # AutoencoderKL has none); with decoder_class=AutoencoderTiny, any AutoencoderTiny key but
    # latent_channels. {} = the class's own config.
    decoder_config: dict[str, Any] = field(default_factory=dict)
    # "vae" = the shards' VAE class; "AutoencoderTiny" = a TAESD-style preview model for the shards' latent
    # space: its decoder takes the latents a diffusion model sees (the family's normalisation applied; config
    # scaling_factor 1.0) and its tiny encoder learns to regress the stored latents, both trained here
    # (needs decoder_init=scratch).
    decoder_class: Literal["vae", "AutoencoderTiny"] = "vae"


@dataclass(frozen=True)
class LossConfig:
    """LDM `LPIPSWithDiscriminator`; formulas in vaedec/losses.py."""

    pixel_loss: Literal["l1", "l2"] = "l1"  # |x - x_rec| (LDM) or (x - x_rec)^2
    perceptual_weight: float = 1.0  # weight of LPIPS in rec; 0 = LPIPS not loaded
    logvar_init: float = 0.0  # initial value of the scalar log-variance s in nll = rec/exp(s) + s
    learn_logvar: bool = False  # LDM never hands s to an optimizer: it stays at logvar_init; True trains it
    disc_start_step: int = 50001  # optimizer step at which the GAN terms switch on (LDM: 50001)
    disc_factor: float = 1.0  # multiplies the GAN terms once on
    disc_weight: float = 0.5  # multiplies the adaptive weight lambda (LDM: 0.5)
    disc_loss: Literal["hinge", "vanilla"] = "hinge"  # discriminator loss
    disc_num_layers: int = 3  # PatchGAN depth (LDM: 3)
    disc_ndf: int = 64  # PatchGAN width of the first layer (LDM: 64)
    # "batch" = LDM; "group" also works at batch size 1; "spectral" = spectral norm on every conv, no norm
    # layers
    disc_norm: Literal["batch", "group", "none", "spectral"] = "batch"
    # Steadier GAN, each off by default (LDM semantics); README "A steadier GAN" says when to use which.
    disc_r1_weight: float = 0.0  # γ of the R1 penalty γ/2·E‖∇_x D(x)‖² on real images; 0 = off
    disc_r1_every: int = 16  # lazy R1: every N optimizer steps, scaled by N (StyleGAN2); 1 = every step
    disc_lecam_weight: float = 0.0  # weight of LeCAM regularisation (Tseng et al. 2021) in L_D; 0 = off
    disc_lecam_decay: float = 0.99  # EMA decay of LeCAM's anchors (mean real and fake logits), per D step
    # Optimizer steps from disc_start_step during which only D trains; the GAN term reaches the decoder at
    # disc_start_step + disc_warmup_steps. 0 = both at disc_start_step (LDM).
    disc_warmup_steps: int = 0
    lpips_vgg_weights: str | None = None  # local torchvision vgg16 .pth; None = torch hub cache (see README)
    lpips_random_backbone: bool = False  # tests only: random VGG16 (LPIPS is then meaningless; warns)
    # L2-SP (Li et al. 2018): alpha in alpha/2 * sum ||theta - theta_0||^2 over the trained weights, pulling
    # them toward the original decoder's, which keeps it good outside the domain; 0 = off. Costs one fp32 copy
    # of the trained weights and one elementwise pass over them per step.
    anchor_weight: float = 0.0
    # Distillation from the original decoder: teacher_weight * sum(|x_rec - x_teacher| + perceptual_weight *
    # LPIPS(x_teacher, x_rec)) / B, in rec's units (so 1.0 weighs the teacher as much as the image), with
    # x_teacher the original (frozen, no gradients) decoder's output on the same z, as preview decoders are
    # trained. Costs one forward of the original decoder per micro-batch (`make bench`). 0 = off.
    teacher_weight: float = 0.0


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 4.5e-6  # decoder learning rate (LDM base_learning_rate)
    disc_lr: float | None = None  # discriminator learning rate; None = lr
    scale_lr: bool = False  # multiply both by batch_size_per_device * grad_accum_steps * processes (LDM)
    betas: tuple[float, float] = (0.5, 0.9)  # Adam betas for both optimizers (LDM)
    weight_decay: float = 0.0  # Adam(W) weight decay
    schedule: Literal["constant", "cosine"] = "constant"  # after warmup
    warmup_steps: int = 0  # linear warmup from 0, optimizer steps
    min_lr_ratio: float = 0.0  # cosine ends at lr * min_lr_ratio
    grad_clip_norm: float | None = None  # clip each model's gradient norm; None = no clipping
    grad_accum_steps: int = 1  # micro-batches per optimizer step (LDM: 2)
    ema_decay: float = 0.999  # EMA of the trained decoder weights; 0 = no EMA
    ema_start_step: int = 0  # EMA copies the weights until this step, then averages


@dataclass(frozen=True)
class RunConfig:
    output: str | None = None  # run folder; None = runs/<config name>
    max_steps: int = 1000  # optimizer steps
    seed: int = 0  # seeds data order, latent noise and model init
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"  # autocast dtype; master weights stay fp32
    checkpoint_every_steps: int = 1000  # 0 = only the final checkpoint
    keep_checkpoints: int = 3  # newest K checkpoints kept; 0 = keep all
    log_every_steps: int = 50  # scalars to metrics.jsonl and TensorBoard
    image_every_steps: int = 500  # PNG grid original | original decoder | decoder | EMA; 0 = only at the end
    val_every_steps: int = 1000  # PSNR/SSIM/LPIPS on held-out shards; 0 = only at the end
    grid_samples: int = 4  # rows in the image grids
    export_ema: bool = True  # the final export uses the EMA weights (when EMA is on)
    # torch.compile the decoder (its forward and, through AOTAutograd, its backward); False = eager
    compile: bool = False
    # Optimizer steps in a row whose loss or gradient was non-finite (each is skipped: weights, Adam state and
    # EMA untouched) before the run stops with a message; 0 = never stop. fp16's grad scaler skips such steps
    # itself.
    max_bad_steps: int = 20


@dataclass(frozen=True)
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)


# ------------------------------------------------------------------------------------------------------------
# loading, overrides, validation


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp` (after YAML parsing) and convert where lossless."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is dict:  # model.decoder_config: a mapping of config keys to YAML values, kept as given
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(
                f"{key}: expected a mapping of key: value, e.g. {{decoder_block_out_channels: [64, "
                f"128]}}, got {value!r}"
            )
        return dict(value)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:  # tuple[T, ...]: a list of any length
        if isinstance(value, str):
            value = [value]  # `model.trainable=decoder.conv_out.*` on the command line: a list of one
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(_coerce(v, args[0], key) for v in value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _looks_numeric(value):
            return float(value)  # YAML 1.1 reads "1e-5" (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover - a bug in this file


def _section_types() -> dict[str, type]:
    hints = typing.get_type_hints(TrainConfig)
    return {name: hints[name] for name in hints}


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _resolve_key(key: str) -> tuple[str, str]:
    """'loss.disc_weight' or a bare 'disc_weight' (when unique) -> ('loss', 'disc_weight')."""
    sections = _section_types()
    if "." in key:
        section, name = key.split(".", 1)
        if section not in sections or name not in _field_types(sections[section]):
            raise ConfigError(f"unknown config key {key!r}; `cli.py train --dry-run` lists every key")
        return section, name
    owners = [s for s, cls in sections.items() if key in _field_types(cls)]
    if not owners:
        raise ConfigError(f"unknown config key {key!r}; `cli.py train --dry-run` lists every key")
    if len(owners) > 1:
        raise ConfigError(f"{key!r} is ambiguous; write one of: {', '.join(f'{o}.{key}' for o in owners)}")
    return owners[0], key


def apply_overrides(cfg: TrainConfig, updates: dict[str, Any]) -> TrainConfig:
    """Return a copy of `cfg` with flat `{'section.key' or 'key': value}` updates applied and type-checked."""
    per_section: dict[str, dict[str, Any]] = {}
    for key, value in updates.items():
        section, name = _resolve_key(key)
        tp = _field_types(_section_types()[section])[name]
        per_section.setdefault(section, {})[name] = _coerce(value, tp, f"{section}.{name}")
    return dataclasses.replace(
        cfg, **{s: dataclasses.replace(getattr(cfg, s), **kv) for s, kv in per_section.items()}
    )


def flatten(nested: dict[str, Any], where: str) -> dict[str, Any]:
    """{'loss': {'disc_weight': 1}} -> {'loss.disc_weight': 1}; sections must be mappings."""
    flat: dict[str, Any] = {}
    for section, values in (nested or {}).items():
        if section not in _section_types():
            raise ConfigError(f"{where}: unknown section {section!r}; expected {', '.join(_section_types())}")
        if values is None:  # `loss:` with every key commented out
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: section {section!r} must be a mapping of key: value")
        for k, v in values.items():
            flat[f"{section}.{k}"] = v
    return flat


def parse_override(text: str) -> tuple[str, Any]:
    """'loss.disc_weight=0.3' -> ('loss.disc_weight', 0.3); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value, e.g. optim.lr=1e-5")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({e})") from None
    return key.strip(), value


def _looks_numeric(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with errors that name the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{p} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p} must hold a mapping of sections (data, model, loss, optim, run)")
    return data


def default_run_dir(config_paths: str | Path | list | tuple | None) -> str:
    """The run folder when run.output is not given: runs/<stem of the (last) config file>, else runs/run."""
    last = config_paths if isinstance(config_paths, (str, Path)) else (config_paths or [None])[-1]
    return f"runs/{Path(last).stem if last else 'run'}"


def load_train_config(
    path: str | Path | list[str | Path] | tuple[str | Path, ...] | None,
    overrides: list[str] = (),
    values: dict[str, Any] | None = None,
) -> TrainConfig:
    """Defaults, then the YAML file(s) in order (ours or a classic LDM autoencoder YAML; a later file
    overrides an earlier one field by field), then `key=value` overrides (text, read as YAML), then `values`:
    {'section.key' or 'key': value} already typed (the CLI's SHARDS, --output, --vae, --mix), checked like the
    rest but never parsed, so a path keeps every character."""
    cfg = TrainConfig()
    files = [] if path is None else [path] if isinstance(path, (str, Path)) else list(path)
    for file in files:
        data = read_yaml(file)
        if is_ldm_yaml(data):
            flat, mapped, ignored = ldm_yaml_to_overrides(data)
            log.info(
                "%s is an LDM autoencoder config; mapped onto vaedec's:\n  %s", file, "\n  ".join(mapped)
            )
            for key, why in ignored:
                log.warning("LDM key %s ignored: %s", key, why)
        else:
            flat = flatten(data, str(file))
        try:
            cfg = apply_overrides(cfg, flat)
        except ConfigError as e:
            raise ConfigError(f"{file}: {e}") from None
    cfg = apply_overrides(cfg, dict(parse_override(o) for o in overrides))
    cfg = apply_overrides(cfg, values or {})
    validate_train_config(cfg)
    return cfg


def parse_mix(entry: str) -> tuple[str, float]:
    """'PATH:P' (data.mix, --mix) -> (PATH, P) with 0 < P < 1."""
    path, sep, p = entry.rpartition(":")
    if not sep or not path or not _looks_numeric(p):
        raise ConfigError(f"data.mix entry {entry!r} must look like PATH:P, e.g. shards/general:0.2")
    if not 0 < float(p) < 1:
        raise ConfigError(f"data.mix entry {entry!r}: the probability must be in (0, 1)")
    return path, float(p)


def validate_train_config(cfg: TrainConfig) -> None:
    """Reject values that would fail later, deep inside a run."""
    mixed = [parse_mix(e) for e in cfg.data.mix]
    if sum(p for _, p in mixed) >= 1:
        raise ConfigError(
            f"data.mix probabilities add up to {sum(p for _, p in mixed):g}: they must leave some "
            "of each batch to data.shards (sum < 1)"
        )
    checks = [
        (cfg.data.batch_size_per_device >= 1, "data.batch_size_per_device must be >= 1"),
        (cfg.data.num_workers >= 0, "data.num_workers must be >= 0"),
        (cfg.data.shuffle_buffer >= 0, "data.shuffle_buffer must be >= 0"),
        (cfg.data.read_timeout_s >= 0, "data.read_timeout_s must be >= 0 (0 = wait for ever)"),
        (cfg.data.val_shards >= 0, "data.val_shards must be >= 0"),
        (cfg.model.latent_noise_std >= 0, "model.latent_noise_std must be >= 0"),
        (cfg.optim.lr > 0, "optim.lr must be > 0"),
        (cfg.optim.disc_lr is None or cfg.optim.disc_lr > 0, "optim.disc_lr must be > 0"),
        (cfg.optim.grad_accum_steps >= 1, "optim.grad_accum_steps must be >= 1"),
        (0.0 <= cfg.optim.ema_decay < 1.0, "optim.ema_decay must be in [0, 1)"),
        (cfg.optim.warmup_steps >= 0, "optim.warmup_steps must be >= 0"),
        (
            cfg.optim.grad_clip_norm is None or cfg.optim.grad_clip_norm > 0,
            "optim.grad_clip_norm must be > 0",
        ),
        (cfg.loss.perceptual_weight >= 0, "loss.perceptual_weight must be >= 0"),
        (cfg.loss.disc_weight >= 0, "loss.disc_weight must be >= 0"),
        (cfg.loss.anchor_weight >= 0, "loss.anchor_weight must be >= 0"),
        (cfg.loss.teacher_weight >= 0, "loss.teacher_weight must be >= 0"),
        (cfg.loss.disc_num_layers >= 1, "loss.disc_num_layers must be >= 1"),
        (cfg.loss.disc_r1_weight >= 0, "loss.disc_r1_weight must be >= 0"),
        (cfg.loss.disc_r1_every >= 1, "loss.disc_r1_every must be >= 1"),
        (cfg.loss.disc_lecam_weight >= 0, "loss.disc_lecam_weight must be >= 0"),
        (0.0 <= cfg.loss.disc_lecam_decay < 1.0, "loss.disc_lecam_decay must be in [0, 1)"),
        (cfg.loss.disc_warmup_steps >= 0, "loss.disc_warmup_steps must be >= 0"),
        (cfg.run.max_steps >= 1, "run.max_steps must be >= 1"),
        (cfg.run.checkpoint_every_steps >= 0, "run.checkpoint_every_steps must be >= 0"),
        (cfg.run.keep_checkpoints >= 0, "run.keep_checkpoints must be >= 0"),
        (cfg.run.log_every_steps >= 1, "run.log_every_steps must be >= 1"),
        (cfg.run.grid_samples >= 1, "run.grid_samples must be >= 1"),
        (cfg.run.max_bad_steps >= 0, "run.max_bad_steps must be >= 0 (0 = never stop)"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    validate_new_decoder(cfg)


def validate_new_decoder(cfg: TrainConfig) -> None:
    """model.decoder_init / decoder_config / decoder_class: the combinations that cannot mean anything."""
    m, scratch = cfg.model, cfg.model.decoder_init == "scratch"
    if m.decoder_class != "vae" and not scratch:
        raise ConfigError(
            f"model.decoder_class={m.decoder_class} is a new model with no pretrained weights for "
            "this latent space: set model.decoder_init=scratch"
        )
    if m.decoder_config and not scratch:
        raise ConfigError(
            "model.decoder_config changes the decoder's architecture, so it cannot start from the "
            "pretrained weights: set model.decoder_init=scratch"
        )
    if scratch and m.trainable:
        raise ConfigError(
            "model.trainable with model.decoder_init=scratch would keep random layers frozen: a new "
            "decoder trains whole; leave model.trainable empty"
        )
    if scratch and not m.train_post_quant_conv:
        raise ConfigError(
            "model.train_post_quant_conv=false with model.decoder_init=scratch would keep a random "
            "post_quant_conv; set it to true"
        )
    if scratch and cfg.loss.anchor_weight > 0:
        raise ConfigError(
            "loss.anchor_weight pulls weights toward the original decoder's, which a decoder from "
            "scratch does not have; learn from the original decoder's outputs with "
            "loss.teacher_weight instead"
        )


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Dataclass -> plain dict (tuples as lists) for YAML/JSON: what run folders, checkpoints and reports
    store and resume checks compare, so secrets in SHARDS (a signed URL's token) are `redact`ed."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return redact_tree(plain(dataclasses.asdict(cfg)))


def dump_config(cfg: Any) -> str:
    """The resolved config as YAML, in field order."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


# ------------------------------------------------------------------------------------------------------------
# classic LDM autoencoder YAML (CompVis latent-diffusion configs/autoencoder/*.yaml)

# lossconfig.params of ldm.modules.losses.LPIPSWithDiscriminator -> our keys
_LDM_LOSS_KEYS = {
    "disc_start": "loss.disc_start_step",
    "disc_weight": "loss.disc_weight",
    "disc_factor": "loss.disc_factor",
    "perceptual_weight": "loss.perceptual_weight",
    "logvar_init": "loss.logvar_init",
    "disc_num_layers": "loss.disc_num_layers",
    "disc_loss": "loss.disc_loss",
}
_LDM_LOSS_IGNORED = {
    "kl_weight": "the encoder is frozen, so the KL term is a constant with no gradient for the decoder",
    "pixelloss_weight": "LDM's LPIPSWithDiscriminator stores it but never uses it",
    "disc_in_channels": "taken from the VAE's output channels",
    "use_actnorm": "ActNorm is not offered; loss.disc_norm chooses batch (LDM default), group or none",
    "disc_conditional": "conditional discriminators are not offered",
}


def is_ldm_yaml(data: dict[str, Any]) -> bool:
    """True for an LDM config (model.params holding lossconfig or ddconfig)."""
    params = (data.get("model") or {}).get("params") if isinstance(data.get("model"), dict) else None
    return isinstance(params, dict) and ("lossconfig" in params or "ddconfig" in params)


def _walk(d: dict[str, Any], prefix: str) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out += _walk(v, key) if isinstance(v, dict) and v else [(key, v)]
    return out


def ldm_yaml_to_overrides(data: dict[str, Any]) -> tuple[dict[str, Any], list[str], list[tuple[str, str]]]:
    """LDM YAML -> (flat overrides, 'ldm.key -> our.key = value' lines, [(ignored ldm key, why)])."""
    flat: dict[str, Any] = {}
    mapped: list[str] = []
    ignored: list[tuple[str, str]] = []

    def take(ldm_key: str, ours: str, value: Any) -> None:
        flat[ours] = value
        mapped.append(f"{ldm_key} -> {ours} = {value!r}")

    take("(LDM keeps no EMA of the autoencoder)", "optim.ema_decay", 0.0)
    for key, value in _walk(data, ""):
        if key in ("model.target", "model.params.monitor", "data.target"):
            ignored.append((key, "LDM/Lightning plumbing; vaedec trains the decoder of the manifest's VAE"))
        elif key == "model.base_learning_rate":
            take(key, "optim.lr", value)
            take("(main.py --scale_lr, on by default)", "optim.scale_lr", True)
        elif key.startswith("model.params.lossconfig.params."):
            name = key.rsplit(".", 1)[1]
            if name in _LDM_LOSS_KEYS:
                take(key, _LDM_LOSS_KEYS[name], value)
            else:
                ignored.append((key, _LDM_LOSS_IGNORED.get(name, "no vaedec equivalent")))
        elif key == "model.params.lossconfig.target":
            if not str(value).endswith("LPIPSWithDiscriminator"):
                ignored.append((key, f"only LPIPSWithDiscriminator semantics are implemented, not {value}"))
        elif key.startswith(("model.params.ddconfig", "model.params.embed_dim")):
            ignored.append(
                (key, "the architecture comes from the VAE named in the shard manifest (or --vae)")
            )
        elif key == "data.params.batch_size":
            take(key, "data.batch_size_per_device", value)
        elif key == "data.params.num_workers":
            take(key, "data.num_workers", value)
        elif key == "lightning.trainer.accumulate_grad_batches":
            take(key, "optim.grad_accum_steps", value)
        elif key == "lightning.trainer.max_steps":
            take(key, "run.max_steps", value)
        elif key.endswith("image_logger.params.batch_frequency"):
            take(key, "run.image_every_steps", value)
        elif key.endswith("image_logger.params.max_images"):
            take(key, "run.grid_samples", value)
        elif key.startswith("data.params."):
            ignored.append((key, "data comes from the shard folder given to `cli.py train`"))
        else:
            ignored.append((key, "no vaedec equivalent"))
    return flat, mapped, ignored
