"""The run folder, training checkpoints (what they hold, save, find latest, prune, load, resume checks) and
the export.

A run folder RUN/ holds the files named by the RUN_* constants below: config.yaml, shards_manifest.json,
log.txt, metrics.jsonl, TensorBoard events, images/, checkpoints/ and export/.

A checkpoint is `RUN/checkpoints/step-%08d/`, the state_dict() of a `TrainState`:
    decoder.safetensors   the post_quant_conv + decoder parameters that train (the VAE's own names); frozen
                          ones (model.trainable, model.train_post_quant_conv) are the original VAE's and not
                          stored
    ema.safetensors       EMA of the same parameters (when EMA is on)
    disc.safetensors      the PatchGAN, BatchNorm buffers included
    extra.safetensors     logvar and the latent-noise generator state
    optim.pt              both optimizers' and the grad scaler's state dicts (tensors and numbers only;
                          read back with torch.load(weights_only=True))
    state.json            step, micro-batches consumed (the data position), EMA step, config
It is written under a temp name and renamed when complete (vaedec/io.py): a folder named step-* is always
whole.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file
from torch import nn

from vaedec.config import TrainConfig, config_to_dict
from vaedec.convert import replace_vae_in_checkpoint
from vaedec.decoders import run_family, run_model, trained_names
from vaedec.errors import VaedecError
from vaedec.families import FamilyError, family_for
from vaedec.io import atomic_folder, atomic_write_json
from vaedec.stream import loaded_stream_state, new_stream_state, saved_stream_state
from vaedec.vae import manifest_vae_source, named_trainable_parameters

# The run folder's names (train writes them, export and eval read them).
RUN_CONFIG = "config.yaml"  # the resolved config
RUN_MANIFEST = "shards_manifest.json"  # the shards' manifest: export finds the VAE and its fingerprint here
RUN_LOG = "log.txt"
RUN_METRICS = "metrics.jsonl"  # one JSON line per logged step and per validation
RUN_IMAGES = "images"  # step-%08d.png grids
RUN_EXPORT = "export"  # train's final export
CHECKPOINT_DIR = "checkpoints"
_STEP_RE = re.compile(r"^step-(\d{8})$")


class CheckpointError(VaedecError):
    """A checkpoint or run folder that cannot be used; the message says which and why."""


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [
        p for p in root.iterdir() if p.is_dir() and _STEP_RE.match(p.name) and (p / "state.json").is_file()
    ]
    return sorted(found, key=lambda p: int(_STEP_RE.match(p.name).group(1)))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    tensors: dict[str, dict[str, torch.Tensor]],
    optim_state: dict[str, Any],
    state: dict[str, Any],
    keep: int = 0,
) -> Path:
    """Write one checkpoint atomically and keep the newest `keep` (0 = all). `tensors`: file stem -> state
    dict."""
    root = Path(run_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    # the same step saved again (the final save after a periodic one) replaces it
    with atomic_folder(final) as tmp:
        for stem, sd in tensors.items():
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in sd.items()}, str(tmp / f"{stem}.safetensors")
            )
        torch.save(optim_state, tmp / "optim.pt")
        atomic_write_json(tmp / "state.json", state)
    if keep:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".step-*"):  # temp folders of saves killed at other steps
        shutil.rmtree(stale, ignore_errors=True)
    return final


def checkpoint_state(ckpt: str | Path) -> dict[str, Any]:
    """A checkpoint's state.json: step, data position, process count, the resolved config."""
    path = Path(ckpt) / "state.json"
    if not path.is_file():
        raise CheckpointError(
            f"{ckpt} is not a vaedec checkpoint (no state.json); give a checkpoints/step-* folder"
        )
    return json.loads(path.read_text())


def load_checkpoint(
    path: str | Path,
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any], dict[str, Any]]:
    """(tensors by file stem, optimizer states, state.json) of one checkpoint folder."""
    path = Path(path)
    state = checkpoint_state(path)
    tensors = {p.stem: load_file(str(p)) for p in sorted(path.glob("*.safetensors"))}
    optim_state = torch.load(path / "optim.pt", map_location="cpu", weights_only=True)
    return tensors, optim_state, state


def resolve_resume(run_dir: str | Path, resume: str) -> Path | None:
    """'latest' -> newest checkpoint of the run or None; 'none' -> None; else an explicit checkpoint
    folder."""
    if resume == "none":
        return None
    if resume == "latest":
        return latest_checkpoint(run_dir)
    p = Path(resume)
    if p.is_dir() and (p / "state.json").is_file():
        return p
    if p.is_dir() and latest_checkpoint(p) is not None:  # a run folder
        return latest_checkpoint(p)
    raise CheckpointError(f"--resume {resume}: not a checkpoint folder (checkpoints/step-*) or a run folder")


# Config fields that shape what a checkpoint holds: resuming with another value cannot load it (or, for the
# encoder, would continue a decoder in another latent space).
RESUME_FIELDS = (
    ("model", "train_post_quant_conv"),
    ("loss", "disc_num_layers"),
    ("loss", "disc_ndf"),
    ("loss", "disc_norm"),
    ("loss", "learn_logvar"),  # adds a parameter group to the decoder's optimizer
    ("model", "trainable"),  # which parameters the optimizer, EMA and checkpoint hold
    ("model", "decoder_init"),  # pretrained or a new decoder (vaedec/decoders.py)
    ("model", "decoder_config"),  # the new decoder's architecture
    ("model", "decoder_class"),  # the VAE's class or a preview AutoencoderTiny
)


_DEFAULTS = config_to_dict(TrainConfig())


def checkpoint_config(ckpt: str | Path) -> dict[str, Any]:
    """The resolved config a checkpoint was written with."""
    return checkpoint_state(ckpt)["config"]


def resume_conflicts(
    saved: dict[str, Any], now: dict[str, Any], saved_encoder: str | None, encoder: str,
    saved_processes: int, processes: int,
) -> list[str]:
    """Why a checkpoint written with config `saved` (shards of encoder fingerprint `saved_encoder`, by
    `saved_processes` processes) cannot continue under config `now` with `processes`; empty when it can.
    Settings such as lr or max_steps may change freely."""
    problems = []
    if saved_processes != processes:  # each rank's latent noise and data position are its own
        problems.append(f"it was written by {saved_processes} process(es), this run has {processes} "
                        f"(accelerate launch --num_processes {saved_processes})")
    if saved_encoder is not None and saved_encoder != encoder:
        problems.append("the shards come from another encoder (the manifest's encoder sha256 differs)")
    for section, key in RESUME_FIELDS:
        # a field newer than the checkpoint: its default
        before = saved[section].get(key, _DEFAULTS[section][key])
        if before != now[section][key]:
            problems.append(f"{section}.{key} was {before!r}, now {now[section][key]!r}")
    lecam_before = saved["loss"].get("disc_lecam_weight", 0.0)
    # the PatchGAN gains or loses LeCAM's anchors
    if (lecam_before > 0) != (now["loss"]["disc_lecam_weight"] > 0):
        problems.append(f"loss.disc_lecam_weight was {lecam_before}, now {now['loss']['disc_lecam_weight']} "
                        "(LeCAM switched on or off)")
    if (saved["optim"]["ema_decay"] > 0) != (now["optim"]["ema_decay"] > 0):
        problems.append(f"optim.ema_decay was {saved['optim']['ema_decay']}, now {now['optim']['ema_decay']} "
                        "(EMA switched on or off)")
    return problems


# ------------------------------------------------------------------------------------------------------------
# the state of a run


@dataclass
class TrainState:
    """Everything a run continues from. `decoder`, `disc` and the optimizers are as accelerate.prepare
    returned them; `state_dict()` is what a checkpoint holds, file by file, and `load_state_dict()` puts it
    back."""

    accelerator: Accelerator
    decoder: nn.Module  # TrainableDecoder: post_quant_conv + decoder
    disc: nn.Module  # the PatchGAN
    logvar: nn.Parameter  # LDM's scalar log-variance s
    opt_g: torch.optim.Optimizer  # decoder (and logvar when learned)
    opt_d: torch.optim.Optimizer  # discriminator
    ema: EMAModel | None  # EMA of the decoder's parameters; None = no EMA
    noise: torch.Generator  # this rank's latent noise (z = mean + std * eps)
    config: dict[str, Any]  # the resolved config, recorded in state.json for resume checks
    step: int = 0  # optimizer steps done
    batches_consumed: int = 0  # micro-batches this rank has taken from its data stream
    # Where this rank's data stream is (stream.new_stream_state: the stream settings and the TrainStream
    # position of each DataLoader role after the last batch consumed from it).
    data: dict[str, Any] = field(default_factory=new_stream_state)
    # Bad data and numerical faults (train.py counts them): bad samples skipped (all ranks), non-finite steps
    # skipped (in total, in a row).
    faults: dict[str, Any] = field(default_factory=lambda: new_faults())

    def state_dict(self) -> dict[str, Any]:
        """{"tensors": {file stem: state dict}, "optim": optimizer states, "state": state.json}. A collective:
        every rank must call it (the noise states are gathered); only the main process's result is whole."""
        acc = self.accelerator
        raw = acc.unwrap_model(self.decoder)
        trained = named_trainable_parameters(raw)
        frozen = {n for n, p in raw.named_parameters() if not p.requires_grad}
        tensors = {
            "decoder": {k: v for k, v in raw.state_dict().items() if k not in frozen},  # buffers stay
            "disc": acc.unwrap_model(self.disc).state_dict(),
            "extra": {"logvar": self.logvar.detach().reshape(()), **_noise_states(self.noise, acc)},
        }
        if self.ema is not None:
            tensors["ema"] = {n: p for (n, _), p in zip(trained, self.ema.shadow_params, strict=True)}
        optim = {"opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict()}
        if acc.scaler is not None:
            optim["scaler"] = acc.scaler.state_dict()
        state = {
            "step": self.step,
            "batches_consumed": self.batches_consumed,
            "ema_step": self.ema.optimization_step if self.ema is not None else 0,
            "num_processes": acc.num_processes,
            "config": self.config,
            "faults": self.faults,
            "data": saved_stream_state(self.data, acc),
        }
        return {"tensors": tensors, "optim": optim, "state": state}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Continue from `sd` (as `state_dict` or `load_checkpoint` gives it); raises RuntimeError/ValueError
        when the weights do not fit these modules."""
        acc, tensors, optim, state = self.accelerator, sd["tensors"], sd["optim"], sd["state"]
        raw = acc.unwrap_model(self.decoder)
        names = [n for n, _ in named_trainable_parameters(raw)]
        for stem in ("decoder", "ema") if self.ema is not None else ("decoder",):
            absent = [n for n in names if n not in tensors.get(stem, {})]
            # another model.trainable / train_post_quant_conv: these would restart from the original
            if absent:
                raise ValueError(f"its {stem} weights lack {len(absent)} parameter(s) this run trains, e.g. "
                                 f"{absent[0]}")
        _, unexpected = raw.load_state_dict(tensors["decoder"], strict=False)  # frozen ones: the original's
        if unexpected:
            raise ValueError(f"unexpected decoder keys {unexpected[:3]}")
        acc.unwrap_model(self.disc).load_state_dict(tensors["disc"])
        self.opt_g.load_state_dict(optim["opt_g"])
        self.opt_d.load_state_dict(optim["opt_d"])
        self.logvar.data.copy_(tensors["extra"]["logvar"])
        self.noise.set_state(tensors["extra"][f"noise_rank{acc.process_index}"])
        if acc.scaler is not None and "scaler" in optim:
            acc.scaler.load_state_dict(optim["scaler"])
        if self.ema is not None:
            self.ema.shadow_params = [tensors["ema"][n].to(acc.device) for n in names]
            self.ema.optimization_step = state["ema_step"]
        self.step, self.batches_consumed = state["step"], state["batches_consumed"]
        saved = state.get("faults", {})  # absent in checkpoints written before faults were counted
        self.faults = {**new_faults(), **{k: v for k, v in saved.items() if k in new_faults()}}
        self.data = loaded_stream_state(state.get("data", {}), acc.process_index)


def new_faults() -> dict[str, Any]:
    """TrainState.faults of a run that has met none."""
    # scale_search_steps: fp16 steps the grad scaler skipped while finding its scale at the start of the run
    # (expected, not faults); scaler_settled: it has made its first update.
    return {"bad_samples": 0, "bad_steps": 0, "bad_steps_in_a_row": 0, "scale_search_steps": 0,
            "scaler_settled": False}


def _noise_states(noise: torch.Generator, accelerator: Accelerator) -> dict[str, torch.Tensor]:
    """Every rank's latent-noise generator state, gathered to the main process."""
    state = noise.get_state()
    if accelerator.num_processes == 1:
        return {"noise_rank0": state}
    gathered = accelerator.gather(state.to(accelerator.device)[None]).cpu()
    return {f"noise_rank{r}": gathered[r] for r in range(accelerator.num_processes)}


def save_train_state(run_dir: str | Path, ts: TrainState, keep: int = 0) -> Path | None:
    """Checkpoint `ts` at its step (every rank calls this; the main process writes); the path, or None
    elsewhere."""
    sd = ts.state_dict()
    if not ts.accelerator.is_main_process:
        return None
    return save_checkpoint(run_dir, ts.step, sd["tensors"], sd["optim"], sd["state"], keep=keep)


def load_train_state(ckpt: str | Path, ts: TrainState) -> None:
    """Continue `ts` from a checkpoint folder, or a CheckpointError saying it does not fit."""
    tensors, optim, state = load_checkpoint(ckpt)
    try:
        ts.load_state_dict({"tensors": tensors, "optim": optim, "state": state})
    except (RuntimeError, ValueError) as e:  # what RESUME_FIELDS does not cover, e.g. another VAE via --vae
        raise CheckpointError(f"{ckpt} does not fit this model ({str(e).splitlines()[0]}); start a new run "
                              "with another --output") from None


def checked_resume(
    run_dir: Path, resume: str, config: dict[str, Any], encoder: str, processes: int
) -> Path | None:
    """The checkpoint to continue from (None = start at step 0), refusing what would mix or break runs: called
    before anything in the run folder is rewritten, so a refused resume leaves the earlier run as it was."""
    ckpt = resolve_resume(run_dir, resume)
    own = latest_checkpoint(run_dir)
    if own is not None and (ckpt is None or ckpt.resolve().parent.parent != run_dir.resolve()):
        # --resume none or another run's checkpoint: the new steps would land among this folder's checkpoints
        # (and the next plain rerun would continue whichever is newest).
        raise CheckpointError(
            f"--resume {resume}, but {run_dir} holds checkpoints of its own (newest {own.name}); rerun "
            "without --resume to continue them, or start the new run in another --output"
        )
    if ckpt is None:
        return None
    saved_manifest = ckpt.parent.parent / RUN_MANIFEST
    saved_encoder = (
        json.loads(saved_manifest.read_text())["settings"]["vae"]["encoder_sha256"]
        if saved_manifest.is_file()
        else None
    )
    state = checkpoint_state(ckpt)
    problems = resume_conflicts(
        state["config"], config, saved_encoder, encoder, state.get("num_processes", 1), processes
    )
    if problems:
        raise CheckpointError(
            f"cannot resume from {ckpt}: "
            + "; ".join(problems)
            + ". Rerun with the settings the run was made with, "
            "or start a new run in another --output."
        )
    return ckpt


# ------------------------------------------------------------------------------------------------------------
# export


def run_checkpoint(run_dir: str | Path) -> Path:
    """The newest checkpoint of a run folder, or a clear error."""
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise CheckpointError(
            f"{run_dir} has no checkpoints (checkpoints/step-*): is it a `cli.py train` run folder?"
        )
    return ckpt


def trained_weights(ckpt: str | Path, use_ema: bool) -> dict[str, torch.Tensor]:
    """decoder.* / post_quant_conv.* weights of a checkpoint: the EMA ones when asked and present."""
    stem = "ema" if use_ema else "decoder"
    path = Path(ckpt) / f"{stem}.safetensors"
    if not path.is_file():
        raise CheckpointError(
            f"{path} not found" + (" (the run had no EMA; export with --no-ema)" if use_ema else "")
        )
    weights = load_file(str(path))
    # EMA holds parameters only; buffers (none in diffusers' decoder today) come from the raw weights
    if use_ema:
        raw = load_file(str(Path(ckpt) / "decoder.safetensors"))
        weights = {**raw, **weights}
    return weights


def run_manifest(run_dir: str | Path) -> dict[str, Any]:
    """The shard manifest a run was trained on (copied into the run folder by train)."""
    path = Path(run_dir) / RUN_MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{path} not found: {run_dir} is not a vaedec run folder")
    return json.loads(path.read_text())


def run_vae_source(run_dir: str | Path, ckpt: str | Path | None = None) -> tuple[str, str | None, float]:
    """(source, subfolder, scaling_factor) of the VAE a run fine-tunes: its `--vae`, else the manifest's."""
    model = checkpoint_config(ckpt or run_checkpoint(run_dir))["model"]
    return manifest_vae_source(run_manifest(run_dir)["settings"]["vae"], model["vae"], model["subfolder"])


def finetuned_vae(run_dir: str | Path, use_ema: bool = True, ckpt: str | Path | None = None):
    """The run's VAE, of its family's class: original encoder (checked against the shards' fingerprint) +
    trained decoder; or the run's new model (vaedec/decoders.py: a decoder from scratch, a preview model)."""
    config = checkpoint_config(ckpt or run_checkpoint(run_dir))
    model = config["model"]
    family, vae = run_model(model, config["run"]["seed"], run_manifest(run_dir)["settings"]["vae"],
                            f"the shards of run {run_dir}")
    weights = trained_weights(ckpt or run_checkpoint(run_dir), use_ema)
    missing, unexpected = vae.load_state_dict(weights, strict=False)
    # Parameters the run kept frozen are not in the checkpoint and stay the original VAE's (a new decoder's:
    # rebuilt from run.seed); the ones it trained must all be there.
    trained = trained_names(family, vae, model)
    missing = [k for k in missing if k in trained]
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint does not fit the VAE: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return vae


def check_export_target(run_dir: str | Path, ckpt: Path, out: Path, overwrite: bool) -> None:
    """Refuse an OUT whose replacement would delete the run, the checkpoint, or files that are not an
    export."""
    dst = out.resolve()
    for keep in (Path(run_dir).resolve(), ckpt.resolve()):
        if dst == keep or dst in keep.parents:
            raise CheckpointError(
                f"{out} is or holds {keep}, which the export would delete; export into a new "
                f"folder (e.g. {Path(run_dir) / 'export'} or my-vae/)"
            )
    if dst.exists() and not dst.is_dir():
        raise CheckpointError(f"{out} is a file; the export is a folder: give a folder path")
    if dst.is_dir() and any(dst.iterdir()) and not (dst / "vaedec_export.json").is_file() and not overwrite:
        raise CheckpointError(
            f"{out} already holds files that are not a vaedec export; choose another folder, "
            "or pass --overwrite to replace it"
        )


def default_use_ema(ckpt: str | Path) -> bool:
    """Which weights an export takes when not told: the EMA ones whenever the run kept them."""
    return (Path(ckpt) / "ema.safetensors").is_file()


def export_run(
    run_dir: str | Path,
    out: str | Path,
    use_ema: bool | None = None,
    fmt: str = "diffusers",
    ckpt: str | Path | None = None,
    into: str | Path | None = None,
    overwrite: bool = False,
    eval_dir: str | Path | None = None,
) -> Path:
    """Write OUT/: a diffusers folder and/or an LDM vae.safetensors, decoder.safetensors, the model card
    README.md (vaedec/model_card.py; with `eval_dir`, the table of that `vaedec eval` of this run), and with
    `into` a copy of that full SD checkpoint with its VAE replaced. OUT is replaced only when it is empty, an
    earlier export, or `overwrite`. use_ema None = `default_use_ema`."""
    from vaedec.model_card import CARD, attach_eval, model_card, write_model_card

    out = Path(out).resolve()  # "." has no name to put a temp folder next to
    ckpt = Path(ckpt) if ckpt is not None else run_checkpoint(run_dir)
    if use_ema is None:
        use_ema = default_use_ema(ckpt)
    check_export_target(run_dir, ckpt, out, overwrite)
    model = checkpoint_config(ckpt)["model"]
    single_file = run_family(model, run_manifest(run_dir)["settings"]["vae"]).single_file == "ldm"
    if (fmt in ("ldm", "both") or into is not None) and not single_file:
        raise FamilyError(
            f"--format {fmt}{' --into' if into else ''}: the run's VAE class has no single-file "
            "layout vaedec can write; export the diffusers folder (--format diffusers), which its "
            "pipelines load with from_pretrained"
        )
    evaluation = (
        attach_eval(eval_dir, run_dir, ckpt, use_ema) if eval_dir is not None else None
    )  # before writing
    vae = finetuned_vae(run_dir, use_ema, ckpt)
    family = family_for(vae)  # model.vae may be another class with the same latents (Qwen-Image on Wan 2.1's)
    card = model_card(vae, checkpoint_state(ckpt), run_manifest(run_dir), run_vae_source(run_dir, ckpt)[:2],
                      use_ema, fmt, evaluation)
    with atomic_folder(out) as tmp:
        if fmt in ("diffusers", "both"):
            family.export(vae, tmp)
        if fmt in ("ldm", "both"):
            family.export_single_file(vae, tmp / "vae.safetensors")
        if into is not None:
            replace_vae_in_checkpoint(into, vae, tmp / Path(into).name)
        trained = {k: v for k, v in vae.state_dict().items() if k.startswith(family.decoder_prefixes)}
        save_file({k: v.contiguous() for k, v in trained.items()}, str(tmp / "decoder.safetensors"))
        write_model_card(tmp / CARD, card)
        record = {
            "run": str(Path(run_dir).resolve()),
            "step": checkpoint_state(ckpt)["step"],
            "ema": use_ema,
            "format": fmt,
            "into": str(into) if into else None,
        }
        atomic_write_json(tmp / "vaedec_export.json", record)
    return out
