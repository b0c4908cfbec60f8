"""`cli.py eval`: decoders compared on the same held-out latents, with paired confidence intervals.

`evaluate(cfg)` reads top to bottom:

 1. data: each DATA is a shard folder, or an image folder that is encoded once into OUT/encoded/NAME with
    `encode`'s preprocessing and the first model's encoder
 2. models: each --vae resolved to something loadable; its encoder must be the one that made every data set
    (a decoder scored on another encoder's latents says nothing), checked by fingerprint before any decoding
 3. per data set and model: decode the same z (the mean, or mean + std·eps with eps a function of the seed and
    the sample key), per-image PSNR / SSIM / LPIPS / colour shift, and rFID when Inception weights are given
 4. deltas against the baseline (the first model) with paired bootstrap intervals; report.md (also printed),
    eval.json, per_image.csv, and grids/: a fixed sample, the most improved and the most worsened images
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import logging
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from vaedec.checkpoint import default_use_ema, finetuned_vae, latest_checkpoint, run_vae_source
from vaedec.config import EncodeConfig, EvalConfig, config_to_dict
from vaedec.decoders import decode as decode_any
from vaedec.decoders import decoder_parameters, latent_space_fingerprint
from vaedec.device import pick_device
from vaedec.encode import encode
from vaedec.errors import VaedecError
from vaedec.eval_report import EVAL_JSON, EVAL_REPORT, format_report
from vaedec.families import load as load_family_vae
from vaedec.images import batch_to_model
from vaedec.io import atomic_write_bytes, atomic_write_json
from vaedec.latents import split_moments
from vaedec.losses import LPIPSWeightsMissing, load_lpips
from vaedec.metrics import (
    FID_FEATURES,
    channel_names,
    fid_images,
    load_fid,
    paired_ci,
    per_image_metrics,
    save_grid,
)
from vaedec.shards import MANIFEST, collate, read_manifest, read_samples, shard_paths
from vaedec.transport import is_remote, local_folder, spec_name
from vaedec.vae import freeze

log = logging.getLogger("vaedec")

GRID_MIN_TILE = 192  # px: smaller crops are shown scaled up (nearest) in the grids, 64 px ones x3

# Metrics with a paired interval against the baseline, and which direction is better.
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "lpips": False}


class EvalError(VaedecError):
    """The evaluation cannot run as asked; the message says what to change."""


# ------------------------------------------------------------------------------------------------------------
# 1. data


@dataclass
class EvalSet:
    """One data set as evaluated: a shard folder (possibly made here from images) and the shards read."""

    name: str
    folder: Path | str  # a local folder, or the URL / pipe: spec of remote shards
    manifest: dict[str, Any]
    shards: list[str]
    samples: int  # how many samples are evaluated
    encoded_here: bool = False
    skipped: int = 0  # inputs skipped while encoding an image folder here

    @property
    def encoder_sha256(self) -> str:
        return self.manifest["settings"]["vae"]["encoder_sha256"]


def _set_name(path: str, taken: set[str]) -> str:
    base = re.sub(r"[^\w.-]+", "_", spec_name(path) or "data")
    name, i = base, 2
    while name in taken:
        name, i = f"{base}-{i}", i + 1
    taken.add(name)
    return name


def prepare_sets(cfg: EvalConfig, first: ModelSpec, out: Path) -> list[EvalSet]:
    """Every DATA as shards to read: shard folders (or their URL, file:// or pipe: spec) as they are, image
    folders encoded into OUT/encoded."""
    sets: list[EvalSet] = []
    taken: set[str] = set()
    for path in cfg.data:
        name = _set_name(path, taken)
        folder, encoded_here, skipped = path if is_remote(path) else local_folder(path), False, 0
        if not is_remote(path) and not (folder / MANIFEST).is_file():
            if not folder.exists():
                raise EvalError(
                    f"DATA {path} does not exist; give a shard folder (`vaedec encode` output) or "
                    "an image folder or file list"
                )
            src = path if folder == Path(path) else str(folder)  # file:///images/ names a local folder too
            folder, skipped = _encode_images(src, out / "encoded" / name, cfg, first)
            encoded_here = True
        manifest = read_manifest(folder)
        shards = shard_paths(folder, manifest)
        counts = [e["samples"] for e in manifest["shards"]]
        if cfg.val_shards:
            if cfg.val_shards > len(shards):
                raise EvalError(f"--val-shards {cfg.val_shards}: {folder} has only {len(shards)} shards")
            shards, counts = shards[-cfg.val_shards :], counts[-cfg.val_shards :]
        n = sum(counts) if cfg.max_samples is None else min(sum(counts), cfg.max_samples)
        if n == 0:
            raise EvalError(
                f"{folder} holds no samples to evaluate (every input skipped? see its skipped.jsonl)"
            )
        sets.append(EvalSet(name, folder, manifest, shards, n, encoded_here, skipped))
    return sets


def _encode_images(src: str, dst: Path, cfg: EvalConfig, first: ModelSpec) -> tuple[Path, int]:
    """Encode an image folder with the first model's encoder (`encode`, so the same preprocessing, skips and
    resume); a rerun with the same settings finds it complete and reads it as it is."""
    source, subfolder, scaling = encoder_source(first)
    log.info("encoding %s with the encoder of %s -> %s", src, first.label, dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    result = encode(
        EncodeConfig(
            src=src,
            out=str(dst),
            vae=source,
            subfolder=subfolder,
            resolution=cfg.resolution,
            batch_size=cfg.batch_size,
            device=cfg.device,
            scaling_factor=scaling,
        )
    )
    skipped = result.skipped_inputs + result.skipped_samples + result.skipped_list_entries
    if skipped:
        log.warning(
            "%s: %d inputs skipped while encoding (reasons in %s)", src, skipped, dst / "skipped.jsonl"
        )
    return dst, skipped


def iter_batches(evalset: EvalSet, batch_size: int) -> Iterator[dict[str, Any]]:
    """The set's samples in shard order, `batch_size` at a time."""
    pending: list[dict[str, Any]] = []
    for sample in read_samples(evalset.shards, evalset.samples):
        pending.append(sample)
        if len(pending) == batch_size:
            yield collate(pending)
            pending = []
    if pending:
        yield collate(pending)


# ------------------------------------------------------------------------------------------------------------
# 2. models


@dataclass(frozen=True)
class ModelSpec:
    """One --vae: what the user named and how it loads."""

    label: str  # the name in tables, files and CSV rows
    source: str  # the path or hub id as given, without LABEL= and :ema/:raw
    run: Path | None = None  # the run folder, when source is a run or one of its checkpoints
    ckpt: Path | None = None  # the checkpoint folder (run: its newest)
    # run weights: the EMA copy (default when the checkpoint kept one) or the raw weights
    use_ema: bool = False


_LABEL_RE = re.compile(r"^([A-Za-z0-9][\w.+:-]*)=(.+)$")


def parse_model_spec(text: str) -> ModelSpec:
    """`[LABEL=]SPEC[:ema|:raw]` -> a ModelSpec; runs and checkpoints are located here, nothing is loaded."""
    label = None
    m = _LABEL_RE.match(text)
    if m:
        label, text = m.group(1), m.group(2)
    choice = None
    if text.endswith((":ema", ":raw")):
        text, choice = text[:-4], text[-3:]
    path = Path(text)
    ckpt = run = None
    if (path / "state.json").is_file() and path.parent.name == "checkpoints":
        ckpt, run = path, path.parent.parent
    elif path.is_dir() and latest_checkpoint(path) is not None:
        run, ckpt = path, latest_checkpoint(path)
    if choice is not None and ckpt is None:
        raise EvalError(
            f"--vae {text}:{choice}: ':{choice}' applies to run folders only, and {text} is not one "
            "(no checkpoints/step-* inside)"
        )
    if ckpt is None:
        return ModelSpec(label or _default_label(path, text), text)
    has_ema = default_use_ema(ckpt)  # export's default too: the EMA weights whenever the run kept them
    if choice == "ema" and not has_ema:
        raise EvalError(f"--vae {text}:ema: the run kept no EMA (optim.ema_decay=0); use {text}:raw")
    use_ema = has_ema if choice is None else choice == "ema"
    newest = ckpt.resolve() == latest_checkpoint(run).resolve()
    default = f"{run.resolve().name}{'' if newest else '/' + ckpt.name}:{'ema' if use_ema else 'raw'}"
    return ModelSpec(label or default, text, run=run, ckpt=ckpt, use_ema=use_ema)


def _default_label(path: Path, text: str) -> str:
    if path.exists():
        return path.resolve().stem if path.is_file() else path.resolve().name
    return text  # a hub id


def unique_labels(specs: list[ModelSpec]) -> list[ModelSpec]:
    """Two models may not share a label (tables and file names are keyed by it): later ones get #2, #3."""
    seen: dict[str, int] = {}
    out = []
    for s in specs:
        n = seen.get(s.label, 0) + 1
        seen[s.label] = n
        out.append(s if n == 1 else dataclasses.replace(s, label=f"{s.label}#{n}"))
    return out


def encoder_source(spec: ModelSpec) -> tuple[str, str | None, float | None]:
    """(source, subfolder, scaling_factor) that `load_vae` / `encode` take for this model's encoder."""
    if spec.run is not None:
        return run_vae_source(spec.run, spec.ckpt)
    return spec.source, None, None


def load_model(spec: ModelSpec):
    """The VAE of a spec in fp32, frozen, of its own class (vaedec/families.py): a run's original encoder +
    its trained decoder, or a VAE."""
    if spec.run is not None:
        return freeze(finetuned_vae(spec.run, spec.use_ema, spec.ckpt))
    return freeze(load_family_vae(spec.source)[1])


# ------------------------------------------------------------------------------------------------------------
# 3. decoding and scoring


def sample_seed(seed: int, key: str) -> int:
    """The noise seed of one sample: every model, batch size and order sees the same eps for a key."""
    return int(hashlib.sha256(f"{seed}/{key}".encode()).hexdigest()[:15], 16)


def eval_latents(batch: dict[str, Any], mode: str, seed: int) -> torch.Tensor:
    """A batch's z (B, C, h, w): the mean of its (B, 2C, h, w) moments, or mean + std·eps with per-key seeded
    eps; a deterministic family's stored latent as it is."""
    if "latent" in batch:
        if mode != "mode":
            raise EvalError(
                "--sample: these shards hold one deterministic latent per image (DC-AE, TAESD), there "
                "is no posterior to sample; leave --sample out"
            )
        return batch["latent"].float()
    keys = batch["key"]
    mean, logvar = split_moments(batch["moments"])
    if mode == "mode":
        return mean
    eps = torch.stack(
        [
            torch.randn(mean.shape[1:], generator=torch.Generator().manual_seed(sample_seed(seed, k)))
            for k in keys
        ]
    )
    return mean + torch.exp(0.5 * logvar) * eps


@torch.no_grad()
def decode(vae: Any, z: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Raw z (B, C, h, w) -> reconstruction, fp32 on the CPU (B, C_out, H, W), by the class's own decode as
    its pipelines call it (5-D classes: one frame, clamped to [-1, 1] as they clamp; a preview model: on the
    normalised z, vaedec/decoders.py)."""
    return decode_any(vae, z.to(device)).float().cpu()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def decode_speed(
    models: dict[str, Any], z: torch.Tensor, device: torch.device, rounds: int
) -> dict[str, float]:
    """Decode images/s of each model on the same z (B, C, h, w): one untimed warm-up decode each, then
    `rounds` rounds in which every model decodes once (interleaved, so a busy machine slows them alike);
    B / the median."""
    z = z.to(device)
    times: dict[str, list[float]] = {label: [] for label in models}
    for r in range(rounds + 1):
        for label, vae in models.items():
            _sync(device)
            t0 = time.perf_counter()
            decode_any(vae, z)
            _sync(device)
            if r:  # round 0 is the warm-up
                times[label].append(time.perf_counter() - t0)
    return {label: z.shape[0] / max(float(np.median(t)), 1e-9) for label, t in times.items()}


@dataclass
class ModelScores:
    """Per-image metrics of one model on one set, in the set's sample order."""

    keys: list[str] = field(default_factory=list)
    values: dict[str, list[np.ndarray]] = field(default_factory=dict)
    fid: float | None = None

    def add(self, keys: list[str], metrics: dict[str, torch.Tensor]) -> None:
        self.keys += keys
        for k, v in metrics.items():
            self.values.setdefault(k, []).append(v.double().cpu().numpy())

    def array(self, name: str) -> np.ndarray:
        """(N,) or (N, C) for colour_shift."""
        return np.concatenate(self.values[name]) if name in self.values else np.empty(0)


def score_model(
    vae: Any, evalset: EvalSet, cfg: EvalConfig, device: torch.device, lpips_model: Any, fid: Any, label: str
) -> ModelScores:
    """Decode every sample of the set with one model and score it; rFID when `fid` is given."""
    scores = ModelScores()
    real_known = fid is not None and int(fid.real_features_num_samples) > 0
    bar = tqdm(total=evalset.samples, desc=f"eval {label} on {evalset.name}", unit="img", dynamic_ncols=True)
    for batch in iter_batches(evalset, cfg.batch_size):
        x = batch_to_model(batch, torch.device("cpu"))
        x_rec = decode(vae, eval_latents(batch, cfg.latent_sample, cfg.seed), device)
        scores.add(batch["key"], per_image_metrics(x.to(device), x_rec.to(device), lpips_model))
        if fid is not None:
            if not real_known:  # the first model's pass: the real images' statistics, kept across reset()
                fid.update(fid_images(x).to(device), real=True)
            fid.update(fid_images(x_rec).to(device), real=False)
        bar.update(len(batch["key"]))
    bar.close()
    if fid is not None:
        scores.fid = float(fid.compute()) if evalset.samples >= 2 else None
        fid.reset()  # the fake statistics only (reset_real_features=False)
    return scores


# ------------------------------------------------------------------------------------------------------------
# 4. summaries, files


def summarize_set(
    evalset: EvalSet,
    specs: list[ModelSpec],
    scores: dict[str, ModelScores],
    cfg: EvalConfig,
    params: dict[str, int] | None = None,
    speed: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Means per model and paired deltas (with intervals) of every model against the baseline; with each
    model's decoder parameters and decode images/s when given."""
    base = scores[specs[0].label]
    channels = channel_names(base.array("colour_shift").shape[1])
    out: dict[str, Any] = {
        "name": evalset.name,
        "folder": str(evalset.folder),
        "samples": evalset.samples,
        "encoded_here": evalset.encoded_here,
        "skipped_inputs": evalset.skipped,
        "latent": cfg.latent_sample,
        "models": {},
        "deltas": {},
    }
    for spec in specs:
        s = scores[spec.label]
        assert s.keys == base.keys  # same samples in the same order: the deltas below are paired by position
        shift = s.array("colour_shift").mean(axis=0)
        out["models"][spec.label] = {
            **{m: float(s.array(m).mean()) if m in s.values else None for m in HIGHER_IS_BETTER},
            "colour_shift": dict(zip(channels, map(float, shift))),
            "fid": s.fid,
            "decoder_parameters": (params or {}).get(spec.label),
            "decode_images_per_s": (speed or {}).get(spec.label),
        }
        if spec is specs[0]:
            continue
        deltas = {}
        for m, higher in HIGHER_IS_BETTER.items():
            if m not in s.values:
                continue
            mean, lo, hi = paired_ci(s.array(m) - base.array(m), cfg.seed, cfg.confidence)
            better = (lo > 0) if higher else (hi < 0)
            worse = (hi < 0) if higher else (lo > 0)
            deltas[m] = {
                "mean": mean,
                "low": lo,
                "high": hi,
                "verdict": "better" if better else "worse" if worse else "no clear difference",
            }
        out["deltas"][spec.label] = deltas
    return out


def write_per_image_csv(path: Path, sets: list[EvalSet], scores: dict[str, dict[str, ModelScores]]) -> None:
    """One row per (set, sample, model): set,key,model,psnr,ssim,lpips,shift_<channel>..."""
    buf = io.StringIO()
    writer = None
    for evalset in sets:
        for label, s in scores[evalset.name].items():
            shift = s.array("colour_shift")
            channels = channel_names(shift.shape[1])
            if writer is None:
                writer = csv.writer(buf)
                writer.writerow(
                    ["set", "key", "model", "psnr", "ssim", "lpips", *(f"shift_{c}" for c in channels)]
                )
            lp = s.array("lpips")
            for i, key in enumerate(s.keys):
                row = [
                    evalset.name,
                    key,
                    label,
                    f"{s.array('psnr')[i]:.4f}",
                    f"{s.array('ssim')[i]:.5f}",
                    f"{lp[i]:.5f}" if lp.size else "",
                ]
                writer.writerow(row + [f"{v:.3f}" for v in shift[i]])
    atomic_write_bytes(path, buf.getvalue().encode())


def grid_keys(scores: dict[str, ModelScores], specs: list[ModelSpec], n: int) -> dict[str, list[str]]:
    """Which samples each grid shows: a fixed spread over the set, and per model the n most improved and the
    n most worsened images by PSNR against the baseline."""
    base = scores[specs[0].label]
    keys = base.keys
    spread = sorted({round(i * (len(keys) - 1) / max(n - 1, 1)) for i in range(min(n, len(keys)))})
    picks = {"sample": [keys[i] for i in spread]}
    for spec in specs[1:]:
        delta = scores[spec.label].array("psnr") - base.array("psnr")
        order = np.argsort(delta, kind="stable")
        picks[f"improved-{spec.label}"] = [keys[i] for i in order[::-1][:n]]
        picks[f"worsened-{spec.label}"] = [keys[i] for i in order[:n]]
    return picks


def write_grids(
    out: Path,
    evalset: EvalSet,
    specs: list[ModelSpec],
    models: dict[str, Any],
    picks: dict[str, list[str]],
    cfg: EvalConfig,
    device: torch.device,
) -> list[Path]:
    """PNG grids, one row per sample: input | baseline | model (improved/worsened) or | every model
    (sample), each column labelled (the input is the image that was encoded; the baseline is often called
    "original")."""
    wanted = {k for keys in picks.values() for k in keys}
    found = {s["key"]: s for s in read_samples(evalset.shards, evalset.samples) if s["key"] in wanted}
    written = []
    for name, keys in picks.items():
        batch = collate([found[k] for k in keys])
        z = eval_latents(batch, cfg.latent_sample, cfg.seed)
        labels = [s.label for s in specs] if name == "sample" else [specs[0].label, name.split("-", 1)[1]]
        columns = [batch_to_model(batch, torch.device("cpu"))] + [
            decode(models[lb], z, device) for lb in labels
        ]
        path = out / "grids" / f"{evalset.name}-{_file_safe(name)}.png"
        # "input": the pixels that were encoded (the baseline model is often labelled "original")
        save_grid(columns, path, labels=["input", *labels], min_tile=GRID_MIN_TILE)
        written.append(path)
    return written


def _file_safe(text: str) -> str:
    return re.sub(r"[^\w.+-]+", "_", text)


# ------------------------------------------------------------------------------------------------------------


@dataclass
class EvalResult:
    out: Path
    report: str  # the markdown printed and saved as report.md
    result: dict[str, Any]  # what eval.json holds
    grids: list[Path]


def evaluate(cfg: EvalConfig) -> EvalResult:
    """Compare cfg.vaes (the first is the baseline) on every data set; see the module docstring."""
    _check_options(cfg)
    device = pick_device(cfg.device)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    # 1-2. models resolved, data sets ready, every encoder checked against every set before any decoding
    specs = unique_labels([parse_model_spec(v) for v in cfg.vaes])
    sets = prepare_sets(cfg, specs[0], out)
    models = _load_models(specs, sets, device)
    lpips_model, notes = _load_lpips_noted(cfg, device)

    # 3. every model on every set; each set gets its own FID object, whose real statistics the first model
    # fills; decode speed side by side on the set's first batch
    scores: dict[str, dict[str, ModelScores]] = {}
    speeds: dict[str, dict[str, float]] = {}
    for s in sets:
        fid = load_fid(cfg.fid_weights, device, cfg.fid_features) if cfg.fid_weights else None
        scores[s.name] = {
            spec.label: score_model(models[spec.label], s, cfg, device, lpips_model, fid, spec.label)
            for spec in specs
        }
        if cfg.speed_rounds:
            z = eval_latents(next(iter_batches(s, cfg.batch_size)), cfg.latent_sample, cfg.seed)
            speeds[s.name] = decode_speed(models, z, device, cfg.speed_rounds)
    notes["speed"] = (
        f"decode images/s: {cfg.speed_rounds} timed decodes of the set's first batch (batch size "
        f"{cfg.batch_size}) per model on {device}, models interleaved, after one warm-up; the median."
        if cfg.speed_rounds
        else "decode speed not measured (--speed-rounds 0)."
    )
    params = {spec.label: decoder_parameters(models[spec.label]) for spec in specs}

    # 4. summaries and files
    result = {
        "config": config_to_dict(cfg),
        "models": [_model_record(sp) for sp in specs],
        "baseline": specs[0].label,
        "sets": [summarize_set(s, specs, scores[s.name], cfg, params, speeds.get(s.name, {})) for s in sets],
        "notes": notes,
    }
    report = format_report(result)
    grids = []
    for s in sets:
        picks = grid_keys(scores[s.name], specs, cfg.grid_samples)
        grids += write_grids(out, s, specs, models, picks, cfg, device)
    write_per_image_csv(out / "per_image.csv", sets, scores)
    atomic_write_json(out / EVAL_JSON, result)
    atomic_write_bytes(out / EVAL_REPORT, report.encode())
    return EvalResult(out=out, report=report, result=result, grids=grids)


def _check_options(cfg: EvalConfig) -> None:
    """The options that need no file: refused before any model or data set is loaded."""
    if not cfg.data:
        raise EvalError("give at least one DATA: a shard folder or an image folder")
    if not cfg.vaes:
        raise EvalError(
            "give at least one --vae (the first is the baseline; add the decoders to compare with it)"
        )
    if cfg.fid_features not in FID_FEATURES:
        raise EvalError(
            f"--fid-features {cfg.fid_features}: InceptionV3 offers {', '.join(map(str, FID_FEATURES))}"
        )


def _load_models(specs: list[ModelSpec], sets: list[EvalSet], device: torch.device) -> dict[str, Any]:
    """label -> model on `device`, each checked against every set's encoder before any decoding."""
    models = {}
    for spec in specs:
        vae = load_model(spec)
        fingerprint = latent_space_fingerprint(vae)  # a preview model: the base encoder it was trained for
        for s in sets:
            if fingerprint != s.encoder_sha256:
                raise EvalError(
                    f"--vae {spec.label} ({spec.source}) has another encoder than the one that made {s.name} "
                    f"({s.folder}): its decoder would be scored on latents it was never meant to decode. "
                    "Compare decoders of the same encoder, or re-encode the data with this model."
                )
        models[spec.label] = vae.to(device)
    return models


def _load_lpips_noted(cfg: EvalConfig, device: torch.device) -> tuple[Any, dict[str, str]]:
    """The LPIPS model (None without VGG16 weights) and the report's notes on LPIPS and rFID."""
    notes = {"lpips": "", "fid": ""}
    try:
        lpips_model = load_lpips(cfg.lpips_vgg_weights, cfg.lpips_random_backbone).to(device)
        notes["lpips"] = (
            "LPIPS with a RANDOM VGG16 backbone (tests only): its values are meaningless."
            if cfg.lpips_random_backbone
            else "LPIPS: VGG16 (torchvision ImageNet weights)."
        )
    except LPIPSWeightsMissing:  # a file that is there but wrong still stops with its own message
        lpips_model = None
        notes["lpips"] = (
            "LPIPS not computed: no VGG16 weights on this machine (--lpips-vgg-weights, "
            "README 'LPIPS offline')."
        )
    notes["fid"] = (
        f"rFID: torchmetrics FID on torch-fidelity's InceptionV3 ({cfg.fid_features} features), RGB "
        "channels, the set's originals as the reference (small sets give a biased FID: compare models, not "
        "papers)."
        if cfg.fid_weights
        else "rFID not computed (--fid-weights)."
    )
    return lpips_model, notes


def _model_record(spec: ModelSpec) -> dict[str, Any]:
    """How eval.json names a model. Paths absolute: export --eval finds its run here from any directory."""
    return {
        "label": spec.label,
        "source": spec.source,
        "run": str(spec.run.resolve()) if spec.run else None,
        "checkpoint": str(spec.ckpt.resolve()) if spec.ckpt else None,
        "ema": spec.use_ema if spec.run else None,
    }
