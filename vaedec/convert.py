"""diffusers <-> LDM (CompVis latent-diffusion, SD `first_stage_model`) AutoencoderKL weights and their files.

The two layouts hold the same tensors under different names (diffusers' own converter, for reference:
diffusers/loaders/single_file_utils.py `convert_ldm_vae_checkpoint`):

| LDM                                      | diffusers                                              |
|------------------------------------------|--------------------------------------------------------|
| `encoder.down.{i}.block.{j}.*`           | `encoder.down_blocks.{i}.resnets.{j}.*`                |
| `encoder.down.{i}.downsample.conv.*`     | `encoder.down_blocks.{i}.downsamplers.0.conv.*`        |
| `decoder.up.{n-1-i}.block.{j}.*`         | `decoder.up_blocks.{i}.resnets.{j}.*`  (index reversed) |
| `decoder.up.{n-1-i}.upsample.conv.*`     | `decoder.up_blocks.{i}.upsamplers.0.conv.*`            |
| `*.mid.block_1` / `block_2`              | `*.mid_block.resnets.0` / `resnets.1`                  |
| `*.mid.attn_1.{norm,q,k,v,proj_out}`     | `*.mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}` |
| `*.norm_out`, `nin_shortcut`             | `*.conv_norm_out`, `conv_shortcut`                     |

LDM attention projections are 1x1 convs, (C, C, 1, 1); diffusers' are linears, (C, C). Everything else keeps
its name and shape. The mapping is strict: a key no rule maps is an error, never silently dropped.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from vaedec.errors import VaedecError
from vaedec.io import atomic_folder, atomic_write

FULL_CHECKPOINT_PREFIX = "first_stage_model."
# Not readable from weights. 0.18215 is the SD 1.x / 2.x value (LDM `scale_factor`, diffusers'
# LDM_VAE_DEFAULT_SCALING_FACTOR); SDXL's VAE uses 0.13025, so callers pass `scaling_factor` for it.
DEFAULT_SCALING_FACTOR = 0.18215
MAX_NORM_GROUPS = 32  # every SD-family VAE uses GroupNorm(32, C)

KIND_SD_CHECKPOINT = "sd_checkpoint"  # full SD checkpoint, VAE under `first_stage_model.`
KIND_LDM_VAE = "ldm_vae"  # stand-alone VAE file in LDM layout, as UIs load it
KIND_DIFFUSERS_VAE = "diffusers_vae"  # a single file holding a diffusers-layout AutoencoderKL state dict
KIND_DESCRIPTIONS = {
    KIND_SD_CHECKPOINT: "a full Stable Diffusion checkpoint (VAE under `first_stage_model.`)",
    KIND_LDM_VAE: "a stand-alone VAE file in LDM layout",
    KIND_DIFFUSERS_VAE: "a single file in diffusers layout",
}

TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# LDM training checkpoints carry their LPIPS net and discriminator under `loss.`: not part of the VAE.
LDM_TRAINING_ONLY_PREFIX = "loss."


class ConversionError(VaedecError):
    """A checkpoint that cannot be read, mapped or written; the message says what, where and how to fix it."""


# --- the key mapping ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Slot:
    """One `{name}` in a key template: what it matches on each side and how a value crosses over."""

    ldm: str  # regex matched on the LDM side
    diffusers: str  # regex matched on the diffusers side
    to_diffusers: Callable[[str, int], str] = lambda v, n: v
    to_ldm: Callable[[str, int], str] = lambda v, n: v


def _lookup(table: dict[str, str]) -> Callable[[str, int], str]:
    return lambda v, n: table[v]


def _reverse_index(v: str, n_up: int) -> str:
    # LDM indexes decoder.up by resolution level (0 = full size) and runs it in reverse; diffusers stores
    # up_blocks in run order (lowest resolution first).
    return str(n_up - 1 - int(v))


_RESNET_LDM_TO_DIFFUSERS = {
    "norm1": "norm1",
    "conv1": "conv1",
    "norm2": "norm2",
    "conv2": "conv2",
    "nin_shortcut": "conv_shortcut",
}
_ATTN_LDM_TO_DIFFUSERS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
# Names of diffusers' deprecated AttentionBlock, still found in old diffusers-layout files; read-only aliases.
_ATTN_LEGACY_DIFFUSERS_TO_LDM = {"query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}
_ATTN_DIFFUSERS_TO_LDM = {d: ld for ld, d in _ATTN_LDM_TO_DIFFUSERS.items()} | _ATTN_LEGACY_DIFFUSERS_TO_LDM


def _alternatives(names: Iterable[str]) -> str:
    return "|".join(re.escape(n) for n in names)


_SLOTS = {
    "coder": _Slot("encoder|decoder", "encoder|decoder"),
    "param": _Slot("weight|bias", "weight|bias"),
    "i": _Slot(r"\d+", r"\d+"),
    "j": _Slot(r"\d+", r"\d+"),
    "up": _Slot(r"\d+", r"\d+", _reverse_index, _reverse_index),
    "mid": _Slot("1|2", "0|1", lambda v, n: str(int(v) - 1), lambda v, n: str(int(v) + 1)),
    "res": _Slot(
        _alternatives(_RESNET_LDM_TO_DIFFUSERS),
        _alternatives(_RESNET_LDM_TO_DIFFUSERS.values()),
        _lookup(_RESNET_LDM_TO_DIFFUSERS),
        _lookup({d: ld for ld, d in _RESNET_LDM_TO_DIFFUSERS.items()}),
    ),
    "attn": _Slot(
        _alternatives(_ATTN_LDM_TO_DIFFUSERS),
        _alternatives(_ATTN_DIFFUSERS_TO_LDM),
        _lookup(_ATTN_LDM_TO_DIFFUSERS),
        _lookup(_ATTN_DIFFUSERS_TO_LDM),
    ),
    "quant": _Slot("quant_conv|post_quant_conv", "quant_conv|post_quant_conv"),
}

# (LDM template, diffusers template); every `{slot}` appears on both sides.
_RULES = [
    ("{coder}.conv_in.{param}", "{coder}.conv_in.{param}"),
    ("{coder}.norm_out.{param}", "{coder}.conv_norm_out.{param}"),
    ("{coder}.conv_out.{param}", "{coder}.conv_out.{param}"),
    ("encoder.down.{i}.block.{j}.{res}.{param}", "encoder.down_blocks.{i}.resnets.{j}.{res}.{param}"),
    ("encoder.down.{i}.downsample.conv.{param}", "encoder.down_blocks.{i}.downsamplers.0.conv.{param}"),
    ("decoder.up.{up}.block.{j}.{res}.{param}", "decoder.up_blocks.{up}.resnets.{j}.{res}.{param}"),
    ("decoder.up.{up}.upsample.conv.{param}", "decoder.up_blocks.{up}.upsamplers.0.conv.{param}"),
    ("{coder}.mid.block_{mid}.{res}.{param}", "{coder}.mid_block.resnets.{mid}.{res}.{param}"),
    ("{coder}.mid.attn_1.{attn}.{param}", "{coder}.mid_block.attentions.0.{attn}.{param}"),
    ("{quant}.{param}", "{quant}.{param}"),
]


def _compile(template: str, side: str) -> re.Pattern[str]:
    parts = re.split(r"(\{\w+\})", template)
    regex = "".join(
        f"(?P<{p[1:-1]}>{getattr(_SLOTS[p[1:-1]], side)})" if p.startswith("{") else re.escape(p)
        for p in parts
    )
    return re.compile(regex + r"\Z")


_LDM_PATTERNS = [(_compile(ldm, "ldm"), diff) for ldm, diff in _RULES]
_DIFFUSERS_PATTERNS = [(_compile(diff, "diffusers"), ldm) for ldm, diff in _RULES]
_LDM_UP = re.compile(r"decoder\.up\.(\d+)\.")
_DIFFUSERS_UP = re.compile(r"decoder\.up_blocks\.(\d+)\.")


def _count_up_blocks(keys: Iterable[str], pattern: re.Pattern[str]) -> int:
    indices = [int(m.group(1)) for k in keys if (m := pattern.match(k))]
    return max(indices) + 1 if indices else 0


def _rename(
    key: str, patterns: list[tuple[re.Pattern[str], str]], direction: str, n_up: int
) -> tuple[str, dict[str, str]] | None:
    for pattern, target in patterns:
        if m := pattern.match(key):
            slots = m.groupdict()
            new = {name: getattr(_SLOTS[name], direction)(v, n_up) for name, v in slots.items()}
            return target.format(**new), slots
    return None


def _is_attention_projection(slots: Mapping[str, str]) -> bool:
    return slots.get("attn") not in (None, "norm", "group_norm") and slots["param"] == "weight"


def _map_keys(sd: Mapping[str, Tensor], to_diffusers: bool) -> dict[str, Tensor]:
    source, target = ("LDM", "diffusers") if to_diffusers else ("diffusers", "LDM")
    patterns = _LDM_PATTERNS if to_diffusers else _DIFFUSERS_PATTERNS
    n_up = _count_up_blocks(sd, _LDM_UP if to_diffusers else _DIFFUSERS_UP)
    out: dict[str, Tensor] = {}
    unmapped: list[str] = []
    for key, tensor in sd.items():
        renamed = _rename(key, patterns, "to_diffusers" if to_diffusers else "to_ldm", n_up)
        if renamed is None:
            unmapped.append(key)
            continue
        new_key, slots = renamed
        if new_key in out:
            raise ConversionError(
                f"two {source} keys map to the same {target} key {new_key!r} (one is {key!r}); "
                "the state dict mixes naming schemes - keep one of them."
            )
        out[new_key] = (
            _reshape_attention(key, tensor, to_diffusers) if _is_attention_projection(slots) else tensor
        )
    if unmapped:
        raise ConversionError(
            f"{len(unmapped)} key(s) of the {source} state dict have no {target} counterpart: "
            f"{sorted(unmapped)}. Only an AutoencoderKL (SD-family VAE) is supported, with attention only in "
            f"the mid block; remove these keys if they are not VAE weights, or pass a state dict in {source} "
            "layout."
        )
    return out


def _reshape_attention(key: str, w: Tensor, to_diffusers: bool) -> Tensor:
    if not to_diffusers:
        return w.reshape(*w.shape, 1, 1) if w.ndim == 2 else w  # (C, C) linear -> (C, C, 1, 1) conv
    if w.ndim > 2 and all(s == 1 for s in w.shape[2:]):
        return w.reshape(w.shape[0], w.shape[1])  # (C, C, 1, 1) 1x1 conv -> (C, C) linear
    if w.ndim == 2:
        return w
    raise ConversionError(
        f"attention weight {key!r} has shape {tuple(w.shape)}; expected (C, C, 1, 1) or (C, C)."
    )


def ldm_to_diffusers(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """LDM-layout VAE state dict -> diffusers AutoencoderKL state dict; ConversionError on unmapped keys."""
    return _map_keys(sd, to_diffusers=True)


def diffusers_to_ldm(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """diffusers AutoencoderKL state dict -> LDM-layout VAE state dict; ConversionError on unmapped keys."""
    return _map_keys(sd, to_diffusers=False)


# --- config from shapes -------------------------------------------------------------------------------------


def _tensor(ldm_sd: Mapping[str, Tensor], key: str) -> Tensor:
    if key not in ldm_sd:
        raise ConversionError(
            f"cannot infer the VAE config: the LDM state dict has no {key!r}; "
            "the file is incomplete or is not an SD-family AutoencoderKL."
        )
    return ldm_sd[key]


def _indices(ldm_sd: Mapping[str, Tensor], pattern: str) -> list[int]:
    return sorted({int(m.group(1)) for k in ldm_sd if (m := re.match(pattern, k))})


def infer_norm_num_groups(widths: list[int] | tuple[int, ...]) -> int:
    """GroupNorm group count: 32 when every width allows it, else the largest g < 32 dividing every width."""
    # GroupNorm weights are (C,), so the group count is not in the file; 32 is what every SD-family VAE uses.
    return max(g for g in range(1, MAX_NORM_GROUPS + 1) if all(w % g == 0 for w in widths))


def infer_diffusers_config(ldm_sd: Mapping[str, Tensor], scaling_factor: float | None = None) -> dict:
    """AutoencoderKL constructor kwargs read from the shapes of an LDM-layout VAE state dict."""
    blocks = _indices(ldm_sd, r"encoder\.down\.(\d+)\.")
    if not blocks:
        raise ConversionError(
            "cannot infer the VAE config: no `encoder.down.{i}.` keys in the LDM state dict."
        )
    block_out_channels = [_tensor(ldm_sd, f"encoder.down.{i}.block.0.conv1.weight").shape[0] for i in blocks]
    moments = (
        ldm_sd["quant_conv.weight"]
        if "quant_conv.weight" in ldm_sd
        else _tensor(ldm_sd, "encoder.conv_out.weight")
    )  # (2 * latent, ...): mean ‖ logvar
    return {
        "in_channels": _tensor(ldm_sd, "encoder.conv_in.weight").shape[1],
        "out_channels": _tensor(ldm_sd, "decoder.conv_out.weight").shape[0],
        "latent_channels": moments.shape[0] // 2,
        "block_out_channels": tuple(block_out_channels),
        "layers_per_block": len(_indices(ldm_sd, r"encoder\.down\.0\.block\.(\d+)\.")),
        "down_block_types": ("DownEncoderBlock2D",) * len(blocks),
        "up_block_types": ("UpDecoderBlock2D",) * len(blocks),
        "norm_num_groups": infer_norm_num_groups(block_out_channels),
        "use_quant_conv": "quant_conv.weight" in ldm_sd,
        "use_post_quant_conv": "post_quant_conv.weight" in ldm_sd,
        "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in ldm_sd,
        "scaling_factor": DEFAULT_SCALING_FACTOR if scaling_factor is None else scaling_factor,
        "shift_factor": None,
    }


# --- reading ------------------------------------------------------------------------------------------------


def _unwrap(obj: object) -> object:
    # Lightning / LDM .ckpt files nest the weights under "state_dict" (sometimes twice).
    while isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    return obj


def _torch_load(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad file; all mean "not a readable checkpoint"
        if "Unsupported global" in str(e):  # torch words every failed load "Weights only load failed"
            culprit = next((ln.strip() for ln in str(e).splitlines() if "Unsupported global" in ln), "")
            raise ConversionError(
                f"{path}: refusing to load - the pickle holds objects other than tensors and plain "
                "containers, and unpickling them could run arbitrary code "
                f"({culprit or 'weights_only=True refused it'}). "
                "If you trust the file, convert it once to .safetensors in a throwaway environment "
                "(torch.load(..., weights_only=False) then safetensors.torch.save_file) and use that instead."
            ) from e
        raise ConversionError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e}).") from e


def _read_raw(path: str | os.PathLike) -> object:
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: no such file; pass the path of a .safetensors or .ckpt checkpoint.")
    if path.suffix.lower() == ".safetensors":
        try:
            return load_file(path)
        except Exception as e:  # safetensors raises SafetensorError or OSError on a corrupt header
            raise ConversionError(f"{path}: not a readable safetensors file ({e}).") from e
    if path.suffix.lower() in TORCH_SUFFIXES:
        return _torch_load(path)
    raise ConversionError(
        f"{path}: unknown checkpoint type {path.suffix!r}; "
        f"expected .safetensors or one of {', '.join(TORCH_SUFFIXES)}."
    )


def _check_state_dict(obj: object, path: str | os.PathLike) -> dict[str, Tensor]:
    if not isinstance(obj, Mapping) or not obj:
        raise ConversionError(
            f"{path}: not a checkpoint - expected a non-empty dict of tensors, got {type(obj).__name__}."
        )
    not_tensors = sorted(str(k) for k, v in obj.items() if not isinstance(v, Tensor))
    if not_tensors:
        raise ConversionError(
            f"{path}: not a state dict - these entries are not tensors: {not_tensors[:20]}."
        )
    return dict(obj)


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Tensors of a .safetensors or (weights_only) .ckpt/.pt/.pth/.bin file, unwrapped from "state_dict"."""
    return _check_state_dict(_unwrap(_read_raw(path)), path)


# --- detecting what a file holds ----------------------------------------------------------------------------


_DIFFUSERS_MARKERS = re.compile(r"(?:encoder|decoder)\.(?:down_blocks|up_blocks|mid_block|conv_norm_out)\.")
_LDM_MARKERS = re.compile(r"(?:encoder|decoder)\.(?:down|up|mid|norm_out)\.")


def split_checkpoint(sd: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], str]:
    """VAE state dict in LDM layout, and the kind of checkpoint it came from (one of the KIND_* constants)."""
    sd = _unwrap(sd)
    if any(k.startswith(FULL_CHECKPOINT_PREFIX) for k in sd):
        n = len(FULL_CHECKPOINT_PREFIX)
        vae, kind = (
            {k[n:]: v for k, v in sd.items() if k.startswith(FULL_CHECKPOINT_PREFIX)},
            KIND_SD_CHECKPOINT,
        )
    else:
        vae, kind = dict(sd), None
    is_ldm = any(_LDM_MARKERS.match(k) for k in vae)
    is_diffusers = any(_DIFFUSERS_MARKERS.match(k) for k in vae)
    if is_ldm and is_diffusers:
        raise ConversionError(
            "the VAE keys mix LDM (`encoder.down.0...`) and diffusers (`encoder.down_blocks.0...`) "
            "names; the file is damaged or was merged from two layouts."
        )
    if is_diffusers:
        return diffusers_to_ldm(vae), kind or KIND_DIFFUSERS_VAE
    if not is_ldm:
        raise ConversionError(
            f"no VAE weights found: expected keys like `{FULL_CHECKPOINT_PREFIX}encoder.down.0...`, "
            f"`encoder.down.0...` or `encoder.down_blocks.0...`; first keys: {list(vae)[:5]}."
        )
    return {k: v for k, v in vae.items() if not k.startswith(LDM_TRAINING_ONLY_PREFIX)}, kind or KIND_LDM_VAE


# --- building a diffusers model -----------------------------------------------------------------------------


def _vae_from_ldm(ldm_sd: Mapping[str, Tensor], scaling_factor: float | None, source: str) -> AutoencoderKL:
    model = AutoencoderKL(**infer_diffusers_config(ldm_sd, scaling_factor=scaling_factor))
    # Compare in LDM names so the error speaks the file's language.
    expected = diffusers_to_ldm(model.state_dict())
    missing = sorted(set(expected) - set(ldm_sd))
    unexpected = sorted(set(ldm_sd) - set(expected))
    if missing or unexpected:
        raise ConversionError(
            f"{source}: the weights do not fit the AutoencoderKL config inferred from their shapes; "
            f"missing keys: {missing}; unexpected keys: {unexpected}. The file is incomplete or "
            "holds an architecture other than an SD-family AutoencoderKL."
        )
    wrong = [
        f"{k}: {tuple(v.shape)} vs {tuple(expected[k].shape)}"
        for k, v in ldm_sd.items()
        if v.shape != expected[k].shape
    ]
    if wrong:
        raise ConversionError(
            f"{source}: tensor shapes do not fit the inferred config (file vs model): {wrong}."
        )
    model.load_state_dict(ldm_to_diffusers(ldm_sd), strict=True)
    return model.eval()


def load_single_file_vae(
    path: str | os.PathLike, scaling_factor: float | None = None, torch_dtype: torch.dtype | None = None
) -> AutoencoderKL:
    """AutoencoderKL from one LDM / full-SD / diffusers-layout file; config from shapes; fp32 by default."""
    ldm_sd, _ = split_checkpoint(read_state_dict(path))
    model = _vae_from_ldm(ldm_sd, scaling_factor, str(path))
    return model if torch_dtype is None else model.to(torch_dtype)


# --- writing ------------------------------------------------------------------------------------------------


def _diffusers_state_dict(vae_or_state_dict: AutoencoderKL | Mapping[str, Tensor]) -> dict[str, Tensor]:
    if isinstance(vae_or_state_dict, torch.nn.Module):
        return vae_or_state_dict.state_dict()
    return dict(vae_or_state_dict)


def _ldm_tensors(vae_or_state_dict: AutoencoderKL | Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    ldm = diffusers_to_ldm(_diffusers_state_dict(vae_or_state_dict))
    # safetensors wants contiguous CPU tensors with their own storage; torch.save is happy with them too.
    return {prefix + k: v.detach().cpu().contiguous() for k, v in ldm.items()}


def _save(tensors: object, path: Path, metadata: dict[str, str] | None = None) -> None:
    if path.suffix.lower() == ".safetensors":
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    elif path.suffix.lower() == ".ckpt":
        atomic_write(path, lambda tmp: torch.save(tensors, tmp))
    else:
        raise ConversionError(f"{path}: cannot write {path.suffix!r}; use a .safetensors or .ckpt file name.")


def write_single_file(
    vae_or_state_dict: AutoencoderKL | Mapping[str, Tensor], path: str | os.PathLike, prefix: str = ""
) -> None:
    """Write a diffusers VAE or state dict as one LDM-layout .safetensors or .ckpt file, atomically."""
    path = Path(path)
    tensors = _ldm_tensors(vae_or_state_dict, prefix)
    if path.suffix.lower() == ".ckpt":
        _save({"state_dict": tensors}, path)  # the LDM / Lightning checkpoint shape
        return
    metadata = {"format": "pt", "vaedec_layout": "ldm", "vaedec_prefix": prefix}
    if isinstance(vae_or_state_dict, AutoencoderKL):
        metadata["vaedec_diffusers_config"] = json.dumps(dict(vae_or_state_dict.config), default=str)
    _save(tensors, path, metadata)


def _key_set_errors(old: Mapping[str, Tensor], new: Mapping[str, Tensor]) -> list[str]:
    errors = []
    if only_old := sorted(set(old) - set(new)):
        errors.append(f"only in the checkpoint: {only_old}")
    if only_new := sorted(set(new) - set(old)):
        errors.append(f"only in the new VAE: {only_new}")
    errors += [
        f"{k}: checkpoint {tuple(old[k].shape)} vs new VAE {tuple(v.shape)}"
        for k, v in new.items()
        if k in old and v.shape != old[k].shape
    ]
    return errors


def replace_vae_in_checkpoint(
    sd_checkpoint_path: str | os.PathLike,
    vae: AutoencoderKL | Mapping[str, Tensor],
    out_path: str | os.PathLike,
) -> None:
    """Copy a full SD checkpoint with every `first_stage_model.*` tensor from `vae`; other keys untouched."""
    raw = _read_raw(sd_checkpoint_path)
    sd = _check_state_dict(_unwrap(raw), sd_checkpoint_path)
    old = {k: v for k, v in sd.items() if k.startswith(FULL_CHECKPOINT_PREFIX)}
    if not old:
        raise ConversionError(
            f"{sd_checkpoint_path}: no `{FULL_CHECKPOINT_PREFIX}*` keys - not a full SD checkpoint; "
            "export --format ldm writes a stand-alone VAE file instead."
        )
    new = _ldm_tensors(vae, FULL_CHECKPOINT_PREFIX)
    if errors := _key_set_errors(old, new):
        raise ConversionError(
            f"the new VAE does not match the VAE in {sd_checkpoint_path}: " + "; ".join(errors)
        )
    # Keep the checkpoint's dtypes: an fp16 checkpoint stays fp16 and the same size.
    sd.update({k: v.to(old[k].dtype) for k, v in new.items()})
    _write_like(raw, sd, Path(sd_checkpoint_path), Path(out_path))


def _write_like(raw: object, sd: dict[str, Tensor], src: Path, dst: Path) -> None:
    # Keep what surrounds the weights: a .safetensors' metadata, or a .ckpt's wrapper dict (global_step, ...).
    if dst.suffix.lower() == ".safetensors":
        metadata = None
        if src.suffix.lower() == ".safetensors":
            with safe_open(src, framework="pt") as f:
                metadata = f.metadata()
        _save({k: v.contiguous() for k, v in sd.items()}, dst, metadata)
    elif isinstance(raw, dict) and isinstance(raw.get("state_dict"), Mapping):
        _save(_replace_innermost(raw, sd), dst)
    else:
        _save({"state_dict": sd}, dst)


def _replace_innermost(obj: dict, sd: dict[str, Tensor]) -> dict:
    inner = obj["state_dict"]
    if isinstance(inner.get("state_dict"), Mapping):
        return {**obj, "state_dict": _replace_innermost(dict(inner), sd)}
    return {**obj, "state_dict": sd}


# --- the `convert` command ----------------------------------------------------------------------------------


def _diffusers_folder(src: Path) -> tuple[Path, str | None] | None:
    if (src / "config.json").is_file():
        return src, None
    if (src / "vae" / "config.json").is_file():
        return src, "vae"  # a pipeline folder
    return None


def _describe_config(config: Mapping) -> str:
    keys = (
        "block_out_channels",
        "layers_per_block",
        "in_channels",
        "out_channels",
        "latent_channels",
        "norm_num_groups",
        "use_quant_conv",
        "mid_block_add_attention",
        "scaling_factor",
    )
    return ", ".join(f"{k}={tuple(v) if isinstance(v, list) else v}" for k, v in config.items() if k in keys)


def _folder_class(folder: Path) -> str:
    """The `_class_name` of a diffusers folder's config.json; AutoencoderKL when it has none (or none is read:
    from_pretrained then says what is wrong)."""
    try:
        name = json.loads((folder / "config.json").read_text()).get("_class_name", "AutoencoderKL")
    except (OSError, ValueError, AttributeError):
        return "AutoencoderKL"
    return name if isinstance(name, str) else "AutoencoderKL"


def _folder_to_file(src: Path, subfolder: str | None, dst: Path, prefix: str) -> str:
    name = _folder_class(src / subfolder if subfolder else src)
    if name != "AutoencoderKL":  # FLUX.2's would load as an AutoencoderKL without its bn, and be written so
        raise ConversionError(
            f"{src} holds a {name}: the LDM layout is AutoencoderKL's only, and diffusers has "
            f"no single-file layout vaedec can write for {name}; use the diffusers folder"
        )
    try:
        vae = AutoencoderKL.from_pretrained(src, subfolder=subfolder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConversionError(f"{src}: could not load a diffusers AutoencoderKL from it ({e}).") from e
    write_single_file(vae, dst, prefix=prefix)
    where = f"{src}/{subfolder}" if subfolder else str(src)
    style = (
        f"full-checkpoint style (prefix {prefix!r})"
        if prefix
        else "stand-alone VAE style (no prefix, as UIs load it)"
    )
    return (
        f"Read the diffusers AutoencoderKL folder {where} ({_describe_config(vae.config)}). "
        f"Wrote {len(vae.state_dict())} tensors in LDM layout, {style}, to {dst}."
    )


def _file_to_folder(src: Path, dst: Path, scaling_factor: float | None) -> str:
    ldm_sd, kind = split_checkpoint(read_state_dict(src))
    vae = _vae_from_ldm(ldm_sd, scaling_factor, str(src))
    with atomic_folder(dst) as tmp:  # a killed run never leaves a half-written dst
        vae.save_pretrained(tmp)
    note = ""
    if scaling_factor is None:
        note = (
            " scaling_factor is not stored in LDM weights: the SD 1.x/2.x value "
            f"{DEFAULT_SCALING_FACTOR} was used; pass --scaling-factor for other families (SDXL: 0.13025)."
        )
    return (
        f"Read {KIND_DESCRIPTIONS[kind]} from {src} ({len(ldm_sd)} VAE tensors). "
        f"Inferred config from tensor shapes: {_describe_config(vae.config)}.{note} "
        f"Wrote a diffusers AutoencoderKL folder to {dst}."
    )


def _file_to_file(src: Path, dst: Path, prefix: str) -> str:
    ldm_sd, kind = split_checkpoint(read_state_dict(src))
    vae = _vae_from_ldm(ldm_sd, None, str(src))  # the scale is not written to LDM files, so its value is moot
    write_single_file(vae, dst, prefix=prefix)
    style = f"full-checkpoint style (prefix {prefix!r})" if prefix else "stand-alone VAE style (no prefix)"
    return (
        f"Read {KIND_DESCRIPTIONS[kind]} from {src} ({len(ldm_sd)} VAE tensors; "
        f"{_describe_config(vae.config)}). "
        f"Wrote them in LDM layout, {style}, to {dst}."
    )


def convert_path(
    src: str | os.PathLike, dst: str | os.PathLike, *, prefix: str = "", scaling_factor: float | None = None
) -> str:
    """diffusers folder -> one LDM file, one file -> diffusers folder, or one file -> another LDM file (.ckpt
    -> .safetensors, another key prefix, the VAE out of a full SD checkpoint); returns a one-paragraph
    summary."""
    src, dst = Path(src), Path(dst)
    if dst.exists():
        raise ConversionError(f"{dst} already exists; remove it first or choose another output path.")
    if src.is_dir():
        folder = _diffusers_folder(src)
        if folder is None:
            raise ConversionError(
                f"{src}: a folder, but neither it nor {src}/vae has a config.json; "
                "pass a diffusers AutoencoderKL folder, a pipeline folder, or a single file."
            )
        if dst.suffix.lower() not in (".safetensors", ".ckpt"):
            raise ConversionError(
                f"{dst}: the output of a folder is one file; name it *.safetensors or *.ckpt."
            )
        if scaling_factor is not None:
            raise ConversionError(
                "scaling_factor only applies when converting a single file to a diffusers folder; "
                "LDM files do not store it."
            )
        return _folder_to_file(folder[0], folder[1], dst, prefix)
    # file -> file: .ckpt -> .safetensors, prefix, extraction
    if dst.suffix.lower() in (".safetensors", ".ckpt"):
        if scaling_factor is not None:
            raise ConversionError(
                "scaling_factor only applies when writing a diffusers folder; LDM files do not store it."
            )
        return _file_to_file(src, dst, prefix)
    if dst.suffix.lower() in (".pt", ".pth", ".bin"):  # a weights file name, which would become a folder
        raise ConversionError(
            f"{dst}: vaedec writes a diffusers folder or one LDM file named *.safetensors or *.ckpt."
        )
    if prefix:
        raise ConversionError(
            "prefix only applies when writing a single file; the output here is a diffusers folder."
        )
    return _file_to_folder(src, dst, scaling_factor)


__all__ = [
    "DEFAULT_SCALING_FACTOR",
    "FULL_CHECKPOINT_PREFIX",
    "KIND_DIFFUSERS_VAE",
    "KIND_LDM_VAE",
    "KIND_SD_CHECKPOINT",
    "ConversionError",
    "convert_path",
    "diffusers_to_ldm",
    "infer_diffusers_config",
    "infer_norm_num_groups",
    "ldm_to_diffusers",
    "load_single_file_vae",
    "read_state_dict",
    "replace_vae_in_checkpoint",
    "split_checkpoint",
    "write_single_file",
]
