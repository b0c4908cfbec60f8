"""The export's model card: OUT/README.md in the Hugging Face hub's format (YAML metadata + markdown), so an
export pushed with `hf upload USER/REPO OUT` is described on the hub as it is here.

It says what a user of the exported VAE must know and nobody can read off the weights: which VAE it came from
(and the fingerprint of the encoder it keeps), what was trained and how (decoder parts, steps, batch, loss
terms and weights, mixed sets, EMA), on what data (samples per set, the encode settings), how it scored (an
`eval` run of this run, `export --eval DIR`), how to load it (diffusers, ComfyUI, A1111) and under which
licence (the base VAE's).

Only names reach the card, never a local path or a data URL: a card is written to be published, and SHARDS
specs may carry credentials.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from vaedec.errors import VaedecError
from vaedec.io import atomic_write_bytes

log = logging.getLogger("vaedec")

CARD = "README.md"  # the name the hub and huggingface_hub read a card from
TAGS = ["vaedec", "vae"]  # + the decoder kind's tag and the class name
# A local copy of a hub repo in the Hugging Face cache: .../models--ORG--NAME/snapshots/<commit>/...
_HF_CACHE_RE = re.compile(r"models--([\w.-]+)--([\w.-]+)/snapshots/[0-9a-f]+")
_REPO_ID_RE = re.compile(r"^[\w.-]+/[\w.-]+$")


class ModelCardError(VaedecError):
    """An --eval DIR that cannot go into this export's card; the message says why and what to give instead."""


# ------------------------------------------------------------------------------------------------------------
# the base VAE


def hub_id(source: str) -> str | None:
    """The hub repo id behind a VAE source: the id itself, or the repo of a Hugging Face cache snapshot; None
    for a local folder or file of unknown origin."""
    m = _HF_CACHE_RE.search(source.replace("\\", "/"))
    if m:
        return f"{m.group(1)}/{m.group(2)}"
    if _REPO_ID_RE.match(source) and not Path(source).exists():
        return source
    return None


def base_licence(source: str, repo: str | None) -> dict[str, str]:
    """The base VAE's licence fields (license, license_name, license_link) from its own card, read offline: a
    local folder's README.md, or the hub repo's README.md in the Hugging Face cache. {} when no card is at
    hand."""
    local = Path(source)
    # A folder's own card (a pipeline folder's, for its vae/); a single file's, the card beside it.
    candidates = [local / CARD] if local.is_dir() else [local.parent / CARD] if local.is_file() else []
    if repo is not None:
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(repo, CARD)
            if isinstance(cached, str):
                candidates.append(Path(cached))
        except Exception as e:  # noqa: BLE001 - a cache lookup must never stop an export
            log.debug("no cached card of %s: %s", repo, e)
    for path in candidates:
        if path.is_file():
            try:
                data = ModelCard.load(path, ignore_metadata_errors=True).data.to_dict()
            except Exception as e:  # noqa: BLE001 - a malformed card of the base VAE: no licence read from it
                log.debug("unreadable card %s: %s", path, e)
                continue
            found = {k: str(data[k]) for k in ("license", "license_name", "license_link") if data.get(k)}
            if found:
                return found
    return {}


def _display_name(source: str, repo: str | None) -> str:
    return repo or Path(source).name


# ------------------------------------------------------------------------------------------------------------
# the eval of this run


@dataclass(frozen=True)
class AttachedEval:
    """An eval.json that scored this run, and which of its models is (or is nearest to) the export."""

    result: dict[str, Any]  # eval.json as `vaedec eval` wrote it
    label: str  # the model row that scored this run
    note: str  # "" when that row is exactly the exported weights; else what differs


def attach_eval(eval_dir: str | Path, run_dir: str | Path, ckpt: Path, use_ema: bool) -> AttachedEval:
    """Read `eval_dir`/eval.json and find this run among its models (by run folder, or an export of the run);
    a ModelCardError when it holds no eval of this run."""
    from vaedec.eval_report import EVAL_JSON

    path = Path(eval_dir) / EVAL_JSON
    if not path.is_file():
        raise ModelCardError(
            f"--eval {eval_dir}: no {EVAL_JSON} there; give the --out folder of a `vaedec eval` "
            "run that scored this run"
        )
    try:
        result = json.loads(path.read_text())
        models, sets = result["models"], result["sets"]
    except (ValueError, KeyError, TypeError) as e:
        raise ModelCardError(
            f"--eval {eval_dir}: {path} is not an eval.json of `vaedec eval` ({e})"
        ) from None
    run = Path(run_dir).resolve()
    candidates = []
    for m in models:
        if m.get("run") and Path(m["run"]).resolve() == run:
            step = int(Path(m["checkpoint"]).name.split("-")[-1]) if m.get("checkpoint") else None
            candidates.append((m["label"], step, m.get("ema")))
        elif m.get("source") and (Path(m["source"]) / "vaedec_export.json").is_file():
            record = json.loads((Path(m["source"]) / "vaedec_export.json").read_text())
            if record.get("run") and Path(record["run"]).resolve() == run:
                candidates.append((m["label"], record.get("step"), record.get("ema")))
    if not candidates:
        labels = ", ".join(f"{m['label']} ({m.get('run') or m.get('source')})" for m in models)
        raise ModelCardError(
            f"--eval {eval_dir} did not score this run ({run_dir}); it compared {labels}. Run `vaedec eval "
            "HELDOUT/ "
            f"--vae original=BASE_VAE --vae {run_dir} --out DIR` and pass that DIR"
        )
    step = int(ckpt.name.split("-")[-1])
    exact = [c for c in candidates if c[1] == step and c[2] == use_ema]
    label, their_step, their_ema = (exact or candidates)[0]
    note = ""
    if not exact:
        kind = {True: "EMA", False: "raw", None: "unknown"}
        note = (
            f"The eval scored `{label}`: step {their_step if their_step is not None else '?'}, "
            f"{kind[their_ema]} weights; this export holds step {step}, {kind[use_ema]} weights."
        )
    if not sets:
        raise ModelCardError(f"--eval {eval_dir}: {path} holds no data sets")
    return AttachedEval(result, label, note)


# ------------------------------------------------------------------------------------------------------------
# what was trained, on what


def _set_rows(config: dict[str, Any], manifest: dict[str, Any]) -> list[list[str]]:
    """One row per shard set: name, role, samples trained on, held out; mixed sets are read when local."""
    from vaedec.config import parse_mix
    from vaedec.shards import read_manifest
    from vaedec.transport import is_remote, local_folder, spec_name

    n_val = config["data"]["val_shards"]
    sets = [(config["data"]["shards"], None, manifest)]
    for entry in config["data"]["mix"]:
        path, p = parse_mix(entry)
        other = None
        if not is_remote(path):
            try:
                other = read_manifest(local_folder(path))
            except Exception:  # noqa: BLE001 - a set moved or deleted since training: counts unknown, said so
                other = None
        sets.append((path, p, other))
    p_rest = 1 - sum(p for _, p, _ in sets[1:] if p is not None)
    rows = []
    for path, p, m in sets:
        role = "target domain" if p is None else "mixed in (replay)"
        share = f"{p_rest if p is None else p:.2f}"
        if m is None:
            counts = ("not read (a remote set: its manifest is not fetched at export)", "")
        else:
            per_shard = [e["samples"] for e in m["shards"]]
            held = sum(per_shard[len(per_shard) - n_val :]) if n_val else 0
            counts = (f"{sum(per_shard) - held:,}", f"{held:,}")
        rows.append([f"`{spec_name(path)}`", role, share, *counts])
    return rows


def _loss_lines(config: dict[str, Any], steps: int) -> list[str]:
    """The loss terms and weights the run trained with, one markdown bullet each."""
    loss, model = config["loss"], config["model"]
    pixel = {"l1": "L1 |x − x̂|", "l2": "MSE (x − x̂)²"}[loss["pixel_loss"]]
    lines = [f"- pixel: {pixel}, weight 1"]
    if loss["perceptual_weight"] > 0:
        backbone = " (RANDOM VGG16 backbone: a test run)" if loss.get("lpips_random_backbone") else " (VGG16)"
        lines.append(f"- LPIPS{backbone}, weight {loss['perceptual_weight']:g}")
    else:
        lines.append("- LPIPS: off (weight 0)")
    lines.append(
        f"- nll = rec / exp(s) + s, s {'learned' if loss.get('learn_logvar') else 'fixed'} "
        f"(init {loss['logvar_init']:g}); the KL term is dropped (the encoder is frozen)"
    )
    gan_from = loss["disc_start_step"] + loss.get("disc_warmup_steps", 0)
    if loss["disc_factor"] > 0 and gan_from < steps:
        lines.append(
            f"- GAN: {loss['disc_loss']} PatchGAN ({loss['disc_num_layers']} layers, ndf {loss['disc_ndf']}, "
            f"{loss['disc_norm']} norm) from step {gan_from}, LDM's adaptive weight λ × "
            f"{loss['disc_weight']:g} × disc_factor {loss['disc_factor']:g}"
        )
        extras = [
            f"R1 γ {loss['disc_r1_weight']:g}" if loss.get("disc_r1_weight") else "",
            f"LeCAM {loss['disc_lecam_weight']:g}" if loss.get("disc_lecam_weight") else "",
        ]
        if any(extras):
            lines.append("  - discriminator regularisation: " + ", ".join(e for e in extras if e))
    else:
        lines.append(
            f"- GAN: off in this run (disc_factor {loss['disc_factor']:g}, from step {gan_from}, "
            f"{steps} steps trained)"
        )
    if loss.get("anchor_weight"):
        lines.append(f"- L2-SP anchor to the original decoder, α {loss['anchor_weight']:g}")
    if model.get("latent_noise_std"):
        lines.append(f"- noise on z: std {model['latent_noise_std']:g} in the diffusion model's units")
    if loss.get("teacher_weight"):
        lines.append(
            f"- teacher: L1 + LPIPS to the original decoder's output on the same z, weight "
            f"{loss['teacher_weight']:g}"
        )
    if decoder_kind(model) == "preview":
        lines.append("- tiny encoder: mean squared error to the stored latent (normalised), weight 1")
    return lines


def _trained_parts(config: dict[str, Any], vae: Any) -> str:
    """Which parameters trained, and how many of them."""
    from vaedec.families import family_for

    kind = decoder_kind(config["model"])
    if kind == "preview":  # both halves of the AutoencoderTiny, from random weights
        dec = sum(p.numel() for p in vae.decoder.parameters())
        enc = sum(p.numel() for p in vae.encoder.parameters())
        return (
            f"the whole {type(vae).__name__} from random weights: {dec:,} decoder + {enc:,} encoder "
            "parameters"
        )
    family = family_for(vae)
    named = {n: p.numel() for n, p in vae.named_parameters() if n.startswith(family.decoder_prefixes)}
    patterns = tuple(config["model"].get("trainable") or ())
    trained = family.trainable_names(vae, config["model"]["train_post_quant_conv"], patterns)
    what = ", ".join(f"`{p}`" for p in patterns) if patterns else "the whole decoder"
    if not patterns:
        what += (
            " + post_quant_conv" if config["model"]["train_post_quant_conv"] else " (post_quant_conv frozen)"
        )
    if kind == "scratch":
        what += ", from random weights"
    n, total = sum(named[k] for k in trained), sum(named.values())
    kept = "the encoder is" if n == total else "the rest of the decoder path and the encoder are"
    return f"{what}: {n:,} of the decoder path's {total:,} parameters; {kept} the base VAE's, bit for bit"


def manifest_normalisation_text(manifest: dict[str, Any]) -> str:
    """What a diffusion model applies to the base VAE's raw latents, in words (vaedec/families.py's
    Normalisation), from the shards' manifest: a preview model's own config says scaling 1.0."""
    from vaedec.families import manifest_family, manifest_normalisation

    vae_info = manifest["settings"]["vae"]
    cls, norm = manifest_family(vae_info).class_name, manifest_normalisation(vae_info)
    if norm.kind == "scale_shift":
        scale = "none" if norm.scaling_factor is None else f"{norm.scaling_factor:g}"
        shift = f", shift_factor {norm.shift_factor:g}" if norm.shift_factor is not None else ""
        return f"{cls}: scaling_factor {scale}{shift}"
    if norm.kind == "channel_mean_std":
        return f"{cls}: per-channel latents_mean / latents_std ({len(norm.mean)} channels, config.json)"
    return (
        f"{cls}: the `bn` running statistics over {norm.patch_size}x{norm.patch_size}-patchified "
        f"latents ({len(norm.mean)} channels), kept bit-identical"
    )


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


# ------------------------------------------------------------------------------------------------------------
# the card


def decoder_kind(model: dict[str, Any]) -> str:
    """What an export's decoder is: "fine-tune" (the base decoder trained further), "scratch" (the base class,
    a new decoder from random weights) or "preview" (a TAESD-style AutoencoderTiny for the latent space)."""
    if model.get("decoder_class", "vae") == "AutoencoderTiny":
        return "preview"
    return "scratch" if model.get("decoder_init", "pretrained") == "scratch" else "fine-tune"


_KIND_TAG = {"fine-tune": "decoder-fine-tune", "scratch": "new-decoder", "preview": "preview-decoder"}

# Title and opening paragraph per decoder kind; {name} the base VAE, {steps} the steps trained.
_OPENING = {
    "fine-tune": """# {name}, decoder fine-tuned with vaedec

The base VAE's **encoder** (bit for bit) with a **fine-tuned decoder**: the latent space, and every diffusion
model trained on it, is unchanged; only how latents become pixels differs. Written by `vaedec export` from
step {steps:,} of a decoder-only fine-tune.""",
    "scratch": """# {name}, new decoder trained with vaedec

The base VAE's **encoder** (bit for bit) with a **new decoder** trained from random weights on its latents
(model.decoder_config: {changes}): the latent space, and every diffusion model trained on it, is unchanged.
Written by `vaedec export` from step {steps:,}.""",
    "preview": """# Preview decoder for {name} latents, trained with vaedec

A small TAESD-style `AutoencoderTiny` for the base VAE's latent space, trained from random weights: its
**decoder** takes the latents a diffusion model sees (the base VAE's normalisation applied; this config says
scaling_factor 1.0 and shift_factor 0.0), its tiny **encoder** was trained to give the base encoder's
latents. It holds none of the base VAE's weights; `_vaedec_latent_space` in config.json names the latent
space it belongs to. Written by `vaedec export` from step {steps:,}.""",
}

CARD_BODY = """
{opening}

## Base VAE

{base_table}

## Training

{training}

Loss (the terms of LDM's `LPIPSWithDiscriminator`):

{loss_lines}

## Data

Latents were encoded once by the frozen encoder (`vaedec encode`); training read them from shards.

{sets}

Encode settings (from the shards' manifest):

{encoding}

## Evaluation

{eval_text}

## Use

Files: {files}, `decoder.safetensors` (only the decoder path's weights).

**diffusers**{diffusers}

{single_file}

Use it only with diffusion models of the base VAE's latent space ({latent_channels} channels, {factors}).
From this folder, `hf upload USER/REPO .` (older huggingface_hub: `huggingface-cli upload USER/REPO .`)
pushes it to the hub with this card.

## Licence

The licence is {licence_text}: a trained decoder of the base VAE's latents is a derivative of the base VAE.
"""


def model_card(
    vae: Any,
    state: dict[str, Any],
    manifest: dict[str, Any],
    vae_source: tuple[str, str | None],
    use_ema: bool,
    fmt: str,
    evaluation: AttachedEval | None = None,
) -> ModelCard:
    """The card of an export (`vae`: the exported VAE, of its family's class) of the run whose checkpoint's
    state.json is `state`, shards' manifest `manifest` and base VAE (source, subfolder) `vae_source`;
    checkpoint.py reads them, so this module does not import it."""
    config, steps = state["config"], state["step"]
    kind = decoder_kind(config["model"])
    source, subfolder = vae_source
    repo = hub_id(source)
    licence = base_licence(source, repo)
    meta = ModelCardData(
        library_name="diffusers",
        base_model=repo,  # None (left out) for a local VAE: the hub accepts only repo ids here
        tags=[*TAGS, _KIND_TAG[kind], type(vae).__name__],
        **(licence or {"license": "other", "license_name": "same-as-base-vae"}),
    )
    licence_text = (
        f"the base VAE's: `{licence.get('license_name') or licence['license']}` (read from its model card)"
        if licence
        else "the same as the base VAE's (its card was not at hand offline: check it before publishing)"
    )
    base = _display_name(source, repo) + (f" (subfolder `{subfolder}`)" if subfolder else "")
    factors = manifest_normalisation_text(manifest)
    latent_channels = manifest["settings"]["vae"]["latent_channels"]
    changes = ", ".join(f"`{k}: {v}`" for k, v in (config["model"].get("decoder_config") or {}).items())
    body = CARD_BODY.format(
        opening=_OPENING[kind].format(
            name=_display_name(source, repo),
            steps=steps,
            changes=changes or "none, the class's own architecture",
        ),
        base_table=_base_table(base, manifest, latent_channels, factors, licence_text),
        training=_training_table(config, state, vae, use_ema),
        loss_lines="\n".join(_loss_lines(config, steps)),
        sets=_table(
            ["set", "role", "share of samples", "training samples", "held out (data.val_shards)"],
            _set_rows(config, manifest),
        ),
        encoding=_encoding_table(manifest),
        eval_text=_eval_text(evaluation),
        files=", ".join(f"`{f}`" for f in EXPORT_FILES[fmt]),
        diffusers=_diffusers_text(type(vae).__name__, fmt, kind),
        single_file=_single_file_text(type(vae).__name__, fmt),
        latent_channels=latent_channels,
        factors=factors,
        licence_text=licence_text,
    )
    return ModelCard(f"---\n{meta.to_yaml()}\n---\n{body}")


EXPORT_FILES = {
    "diffusers": ["config.json", "diffusion_pytorch_model.safetensors"],
    "ldm": ["vae.safetensors"],
    "both": ["config.json", "diffusion_pytorch_model.safetensors", "vae.safetensors"],
}


def _base_table(base: str, manifest: dict[str, Any], channels: int, factors: str, licence_text: str) -> str:
    sha = manifest["settings"]["vae"]["encoder_sha256"]
    return _table(
        ["", ""],
        [
            ["base VAE", f"`{base}`"],
            [
                "encoder fingerprint",
                f"sha256 `{sha}` (encoder + quant_conv weights; vaedec refuses latents of any other encoder)",
            ],
            ["latents", f"{channels} channels, {factors}"],
            ["licence", licence_text],
        ],
    )


def _training_table(config: dict[str, Any], state: dict[str, Any], vae: Any, use_ema: bool) -> str:
    """How the run trained: parts, steps, batch, optimiser, latents, precision, EMA."""
    o, d, r = config["optim"], config["data"], config["run"]
    processes = state.get("num_processes", 1)
    batch = d["batch_size_per_device"] * o["grad_accum_steps"] * processes
    ema = (
        f"yes, decay {o['ema_decay']:g} (from step {o['ema_start_step']}); this export holds the "
        f"{'EMA' if use_ema else 'raw (not EMA)'} weights"
        if o["ema_decay"] > 0
        else "no"
    )
    optimiser = (
        f"Adam β {tuple(o['betas'])}, lr {o['lr']:g}"
        + (" × batch (scale_lr)" if o["scale_lr"] else "")
        + f", {o['schedule']} after {o['warmup_steps']} warmup steps"
        + (f", grad clip {o['grad_clip_norm']:g}" if o.get("grad_clip_norm") else "")
    )
    precision = {
        "no": "fp32",
        "bf16": "bf16 autocast, fp32 weights",
        "fp16": "fp16 autocast + grad scaler, fp32 weights",
    }[r["mixed_precision"]]
    sampled = config["model"]["latent_sample"] == "sample"
    return _table(
        ["", ""],
        [
            ["trained", _trained_parts(config, vae)],
            ["steps", f"{state['step']:,} optimizer steps (run.max_steps {r['max_steps']:,})"],
            [
                "batch",
                (
                    f"{batch} samples per step = {d['batch_size_per_device']} per device × "
                    f"{o['grad_accum_steps']} accumulated × {processes} process(es)"
                ),
            ],
            ["optimiser", optimiser],
            ["latents", "z = mean + std·ε (sampled each step)" if sampled else "z = mean"],
            ["precision", precision],
            ["EMA", ema],
        ],
    )


def _encoding_table(manifest: dict[str, Any]) -> str:
    """The encode settings the shards' manifest records."""
    prep = manifest["settings"]["preprocessing"]
    crops = (
        f"{prep['crops_per_image']} seeded random crops (seed {prep['seed']})"
        if prep["crops_per_image"]
        else "one center crop"
    )
    return _table(
        ["", ""],
        [
            [
                "crop",
                (
                    f"{prep['resolution']} px square, shorter side resized to "
                    f"{prep['resize_shorter_side_to']} px; resampling {prep['resample']}"
                ),
            ],
            ["crops per image", crops],
            ["mirrored copies", "yes" if prep["flip"] else "no"],
            ["encoder dtype", prep["dtype"]],
            [
                "inputs",
                (
                    f"{manifest['settings']['source']['inputs']:,} images; "
                    f"{manifest['totals'].get('inputs_skipped', 0)} skipped as unreadable"
                ),
            ],
        ],
    )


def _eval_text(evaluation: AttachedEval | None) -> str:
    """The eval table of `export --eval`, or how to make one."""
    if evaluation is None:
        return (
            "No evaluation was attached to this export. Score it against the base VAE on held-out data "
            "of the target domain and of general images:\n\n```bash\nvaedec eval HELDOUT/ GENERAL/ "
            "--vae original=BASE_VAE --vae RUN/ --out eval/\nvaedec export RUN/ OUT/ --eval eval/\n```"
        )
    from vaedec.eval_report import format_report

    return (
        f"`vaedec eval` of this run; the row **{evaluation.label}** is this export"
        + (f" ({evaluation.note})" if evaluation.note else "")
        + ". Every model decodes the same latents of each data set below.\n\n"
        + format_report(evaluation.result).replace("### ", "#### ")
    )


def _diffusers_text(cls: str, fmt: str, kind: str) -> str:
    """How diffusers loads the export (`cls`: its class), or why it cannot (an LDM-only export)."""
    if fmt == "ldm":
        return (
            ": this export has no diffusers folder (`--format ldm`); "
            "`vaedec convert vae.safetensors my-vae/` writes one, or export with `--format both`."
        )
    use = (
        "latents = ...  # what the diffusion model made, normalised as its pipeline hands them to its VAE\n"
        "image = vae.decode(latents).sample  # in [-1, 1]\n"
        if kind == "preview"
        else 'pipe = DiffusionPipeline.from_pretrained("PIPELINE", vae=vae)   '
        "# any pipeline whose VAE is the base VAE\n"
    )
    imports = cls if kind == "preview" else f"{cls}, DiffusionPipeline"
    return (
        f"\n\n```python\nfrom diffusers import {imports}\n\n"
        f'vae = {cls}.from_pretrained("PATH_OR_REPO_ID")        # this folder, or its hub repo\n{use}```'
    )


def _single_file_text(cls: str, fmt: str) -> str:
    """ComfyUI and AUTOMATIC1111 load one LDM-layout file, which vaedec writes for AutoencoderKL alone."""
    if cls != "AutoencoderKL":
        return (
            f"**ComfyUI / AUTOMATIC1111** load a single file in the original repository's layout; vaedec "
            f"writes that layout for AutoencoderKL only, so use this {cls} through diffusers."
        )
    single = (
        "`vae.safetensors` (LDM layout, plain keys)"
        if fmt in ("ldm", "both")
        else "`vae.safetensors`, which this export lacks: write it with `vaedec convert OUT vae.safetensors` "
        "(or export with `--format both`)"
    )
    return (
        f"**ComfyUI**: copy {single} into `ComfyUI/models/vae/` and load it with a *Load VAE* node wired to\n"
        f"*VAE Decode*.\n\n**AUTOMATIC1111 / Forge**: copy {single} into "
        "`stable-diffusion-webui/models/VAE/`, then pick it under\nSettings → Stable Diffusion → SD VAE."
    )


def write_model_card(path: str | Path, card: ModelCard) -> None:
    """The card as `path` (README.md), atomically (vaedec/io.py), as every file vaedec writes."""
    atomic_write_bytes(path, str(card).encode())
