"""`cli.py train`: decoder-only GAN fine-tuning from latent shards. `train(cfg)` reads top to bottom in
phases:

 0. run folder, accelerator, logging
 1. shards: manifest, train/validation split; which checkpoint to resume (checked before the folder is
 touched) 2. model: the VAE named in the manifest, fingerprint check, its family's trainable decoder, the
    encoder dropped; or a new decoder for its latent space (vaedec/decoders.py), and the original decoder
    (grids, loss.teacher_weight)
 3. loss modules: LPIPS (frozen), PatchGAN, scalar logvar
 4. optimizers, EMA; accelerate.prepare
 5. the Evaluator: fixed grid/validation batches and the original decoder's outputs on them
 6. the TrainState, resumed from a checkpoint; the data stream from its position
 7. the loop (`_loop`): `train_step` (generator_step, discriminator_step, EMA; a non-finite phase is skipped,
    bad samples and bad steps are counted), logs, grids, validation, checkpoints, the stop signals
 8. final checkpoint, evaluation and export (`_finish`)

What a checkpoint holds is `checkpoint.TrainState`; the grids and validation are `metrics.Evaluator`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import resource
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers.training_utils import EMAModel
from torch import nn
from tqdm.auto import tqdm

from vaedec.checkpoint import (
    RUN_CONFIG,
    RUN_EXPORT,
    RUN_IMAGES,
    RUN_LOG,
    RUN_MANIFEST,
    RUN_METRICS,
    TrainState,
    checked_resume,
    export_run,
    load_train_state,
    save_train_state,
)
from vaedec.config import OptimConfig, TrainConfig, config_to_dict, default_run_dir, dump_config
from vaedec.decoders import PreviewDecoder, check_settings, run_decoders
from vaedec.device import keep_freed_heap
from vaedec.discriminator import build_discriminator
from vaedec.errors import TrainError
from vaedec.families import check_run_settings, latent_noise_raw, zero_unreached_grads
from vaedec.images import batch_to_model
from vaedec.io import atomic_write_bytes, atomic_write_json, setup_logging
from vaedec.latents import add_latent_noise, batch_latent, sample_latent
from vaedec.losses import (
    LPIPSWeightsMissing,
    add_anchor_grad,
    adopt_weight,
    discriminator_loss,
    generator_grads,
    load_lpips,
    pixel_loss_by_set,
    r1_due,
    r1_penalty,
    surrogate_loss,
)
from vaedec.metrics import Evaluator, grid_batch, val_batches
from vaedec.signals import StopRequest
from vaedec.stream import ShardSet, epoch_of, note_batch, shard_sets, train_batches
from vaedec.vae import freeze, named_trainable_parameters, trainable_parameters

log = logging.getLogger("vaedec")

MicroBatch = tuple[torch.Tensor, torch.Tensor]  # (x (B, C_out, H, W) in [-1, 1], z or x̂ (B, ...))


# ------------------------------------------------------------------------------------------------------------
# small pure helpers


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """LR multiplier at an optimizer step: linear warmup from 0, then constant or cosine to min_lr_ratio."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory (CUDA) or peak resident memory of this process (CPU), MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def param_count(module: torch.nn.Module, trainable: bool) -> int:
    """Parameters of `module` that train (trainable=True) or are frozen."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad == trainable)


@dataclass
class RunInfo:
    """What `train` leaves behind (tests and the CLI print it)."""

    run_dir: Path
    step: int
    export_dir: Path | None
    resumed_from: Path | None
    main_process: bool = True  # False on the other ranks of a multi-process run
    # the signal (SIGTERM, SIGUSR1) that stopped the run after a checkpoint; 0 = it ran to the end
    stopped_by: int = 0


# ------------------------------------------------------------------------------------------------------------


def train(cfg: TrainConfig, resume: str = "latest", export: bool = True) -> RunInfo:
    """Run (or resume) one training run; see the module docstring for the phases."""
    # 0. run folder, accelerator, logging --------------------------------------------------------------------
    run_dir = Path(cfg.run.output or default_run_dir(None))
    accelerator = _start(cfg, run_dir)
    is_main, device = accelerator.is_main_process, accelerator.device

    # 1. shards, and the checkpoint to continue: settled before anything in the run folder is rewritten ------
    manifest, sets = shard_sets(cfg)
    cfg = check_run_settings(cfg, manifest)  # what the shards' VAE family cannot take; its defaults filled in
    check_settings(cfg, manifest)  # and a new decoder for it (model.decoder_config)
    encoder = manifest["settings"]["vae"]["encoder_sha256"]
    ckpt = checked_resume(run_dir, resume, config_to_dict(cfg), encoder, accelerator.num_processes)
    if is_main:
        atomic_write_bytes(run_dir / RUN_CONFIG, dump_config(cfg).encode())
        atomic_write_json(run_dir / RUN_MANIFEST, manifest)  # export needs the VAE source and fingerprint

    # 2. model, the original decoder (frozen; None: the decoder starts as it) and loss.teacher_weight's ------
    decoder, original, teacher = run_decoders(cfg, manifest, device)

    # 3. loss modules ----------------------------------------------------------------------------------------
    lpips_model, val_lpips, disc, logvar = _loss_modules(cfg, decoder.out_channels, device)

    anchors = None  # the original decoder's weights for loss.anchor_weight, taken before any update or resume
    if cfg.loss.anchor_weight:
        anchors = [p.detach().clone().to(device) for p in trainable_parameters(decoder)]

    # 4. optimizers, EMA, prepare ----------------------------------------------------------------------------
    opt_g, opt_d, lrs = build_optimizers(cfg, decoder, disc, logvar, accelerator.num_processes)
    ema, ema_decoder = _ema(cfg, decoder, device)
    # after the EMA's deep copy: a copy of a compiled module would call the original's forward
    if cfg.run.compile:
        compile_decoder(decoder)
    # The shard stream is NOT passed to accelerator.prepare: prepare would re-shard or dispatch an
    # IterableDataset and cut the stream at its end, while TrainStream already splits by rank and worker,
    # never ends (every rank runs exactly max_steps, no uneven-batch hang) and can skip to an exact position.
    decoder, disc, opt_g, opt_d = accelerator.prepare(decoder, disc, opt_g, opt_d)
    _log_sizes(decoder, disc, lrs)

    # 5. fixed batches for grids and validation, and the original decoder's output on them ------------------
    # The original decoder, or the decoder before its first update (unwrapped: used outside the training
    # step).
    evaluators = _evaluators(cfg, sets, original or accelerator.unwrap_model(decoder), val_lpips, device)
    del original  # `teacher` keeps it when it is one

    # 6. the state of the run, resumed; the data stream from its position ------------------------------------
    noise = torch.Generator().manual_seed(cfg.run.seed * 1000 + accelerator.process_index)
    state = TrainState(accelerator, decoder, disc, logvar, opt_g, opt_d, ema, noise, config_to_dict(cfg))
    _resume(run_dir, cfg, state, ckpt, evaluators)
    # SIGTERM / SIGUSR1 (preemption): finish the step, checkpoint, exit (DataLoader workers ignore them).
    with StopRequest() as stop:
        batches = train_batches(cfg, sets, accelerator, state.data, state.step, state.batches_consumed,
                                manifest)
        if is_main:
            accelerator.init_trackers("tensorboard")

        # model.latent_noise_std is in the units a diffusion model sees; z is raw: divided by the scale, or a
        # (C, h, w) map of stds for a per-channel or FLUX.2's batch-norm normalisation.
        noise_raw = latent_noise_raw(cfg, manifest)

        # 7. the loop ----------------------------------------------------------------------------------------
        set_names = [st.name for st in sets]

        def step() -> dict[str, float]:
            return train_step(state, batches, lpips_model, cfg, lrs, set_names, anchors, noise_raw, teacher)

        saved_at, stopped_by = _loop(run_dir, cfg, state, step, evaluators, ema_decoder, stop)

    # 8. final checkpoint, evaluation and export (after a stop signal: the checkpoint alone) -----------------
    export_dir = _finish(run_dir, cfg, state, evaluators, ema_decoder, saved_at, stopped_by, export)
    accelerator.end_training()
    return RunInfo(run_dir=run_dir, step=state.step, export_dir=export_dir, resumed_from=ckpt,
                   main_process=is_main, stopped_by=stopped_by)


def _resume(
    run_dir: Path, cfg: TrainConfig, state: TrainState, ckpt: Path | None, evaluators: list[Evaluator]
) -> None:
    """Phase 6: the checkpoint's state loaded into `state` (ckpt None: a fresh run), metrics.jsonl cut back
    to its step."""
    if ckpt is not None:
        load_train_state(ckpt, state)
        log.info("resumed from %s at step %d", ckpt, state.step)
    # lines logged after the checkpoint (or by a try killed before its first one) are logged again
    if state.accelerator.is_main_process:
        _truncate_metrics(run_dir / RUN_METRICS, state.step)
    # a finished run, rerun: its final grid and validation are already there
    if state.step >= cfg.run.max_steps:
        log.info("run already at step %d >= max_steps %d", state.step, cfg.run.max_steps)
        for evaluator in evaluators:
            evaluator.mark_done(state.step)


def _loop(
    run_dir: Path, cfg: TrainConfig, state: TrainState, step: Callable[[], dict[str, float]],
    evaluators: list[Evaluator], ema_decoder: Any, stop: StopRequest,
) -> tuple[int, int]:
    """Phase 7: `step()` (one optimizer step, returning its logs) until run.max_steps or a stop signal every
    process agreed on, each step followed by the logs, grids, validation and checkpoint due at it. Returns
    (the step of the last checkpoint written, the stop signal or 0)."""
    accelerator = state.accelerator
    bar = tqdm(total=cfg.run.max_steps, initial=state.step, desc="train", unit="step",
               disable=not accelerator.is_main_process, dynamic_ncols=True)
    saved_at, t_last, steps_since, stopped_by = state.step, time.perf_counter(), 0, 0
    while state.step < cfg.run.max_steps:
        logs = step()
        at, steps_since = state.step, steps_since + 1
        bar.update(1)
        if at % cfg.run.log_every_steps == 0 or at == cfg.run.max_steps:
            images = (steps_since * cfg.data.batch_size_per_device * cfg.optim.grad_accum_steps
                      * accelerator.num_processes)
            now = time.perf_counter()
            _log_step(run_dir, state, logs, images / max(now - t_last, 1e-9), bar)
            t_last, steps_since = now, 0
        grid_due = bool(cfg.run.image_every_steps) and at % cfg.run.image_every_steps == 0
        val_due = bool(cfg.run.val_every_steps) and at % cfg.run.val_every_steps == 0
        if grid_due or val_due:
            _evaluate(run_dir, evaluators, state, ema_decoder, grid=grid_due, val=val_due)
        if cfg.run.checkpoint_every_steps and at % cfg.run.checkpoint_every_steps == 0:
            saved_at = _checkpoint(run_dir, state, cfg.run.keep_checkpoints)
        stopped_by = stop.agreed(accelerator)
        if stopped_by:
            break
    bar.close()
    return saved_at, stopped_by


def _finish(
    run_dir: Path, cfg: TrainConfig, state: TrainState, evaluators: list[Evaluator], ema_decoder: Any,
    saved_at: int, stopped_by: int, export: bool,
) -> Path | None:
    """Phase 8: the final checkpoint (unless the last step wrote it); after a stop signal nothing more, else
    the final grids and validation and, with `export`, the export. Returns the export folder (main process) or
    None."""
    if saved_at != state.step:
        _checkpoint(run_dir, state, cfg.run.keep_checkpoints)
    if stopped_by:
        log.warning("stopped by %s at step %d after a checkpoint; rerun the same command to resume",
                    signal.Signals(stopped_by).name, state.step)
        return None
    _evaluate(run_dir, evaluators, state, ema_decoder)
    state.accelerator.wait_for_everyone()
    export_dir = None
    if export and state.accelerator.is_main_process:
        # None: the EMA weights whenever the run kept them (checkpoint.default_use_ema, as `vaedec export`).
        export_dir = export_run(run_dir, run_dir / RUN_EXPORT, use_ema=None if cfg.run.export_ema else False)
        log.info("export: %s", export_dir)
    return export_dir


# ------------------------------------------------------------------------------------------------------------
# one optimizer step


def train_step(
    state: TrainState,
    batches: Iterator[dict[str, Any]],
    lpips_model: torch.nn.Module | None,
    cfg: TrainConfig,
    lrs: tuple[float, float],
    set_names: list[str] = (),
    anchors: list[torch.Tensor] | None = None,
    latent_noise_raw: float | torch.Tensor = 0.0,
    teacher: nn.Module | None = None,
) -> dict[str, float]:
    """One optimizer step of the run: the generator phase, then the discriminator phase on the same
    micro-batches, then EMA; advances `state.step` and the data position. Returns the step's logs; with mixed
    shard sets (`set_names`, data.shards first) also each set's pixel loss in this step. `anchors`, `teacher`:
    see generator_step. `latent_noise_raw`: std of the extra noise on z, in raw latent units
    (model.latent_noise_std / scaling_factor, or a (C, h, w) map: families.latent_noise_raw)."""
    state.decoder.train()
    state.disc.train()
    # The LR is a pure function of the optimizer step (no scheduler state to save or to desynchronise).
    for opt, base in ((state.opt_g, lrs[0]), (state.opt_d, lrs[1])):
        for group in opt.param_groups:
            group["lr"] = base * lr_at(state.step, cfg.optim, cfg.run.max_steps)
    device, k = state.accelerator.device, cfg.optim.grad_accum_steps
    micro_batches, sources, reports = [], [], []
    # A preview model's tiny encoder regresses the stored latent (the moments' mean), not the sampled z.
    targets = [] if isinstance(state.accelerator.unwrap_model(state.decoder), PreviewDecoder) else None
    for _ in range(k):
        batch = next(batches)
        reports += note_batch(batch, state.data)
        if "latent" in batch:  # a deterministic family's stored latent (model.latent_sample=mode, checked)
            z = batch["latent"].float()
        else:
            z = sample_latent(batch["moments"], cfg.model.latent_sample, state.noise)  # (B, C, h, w)
        z = add_latent_noise(z, latent_noise_raw, state.noise).to(device)
        if cfg.model.channels_last:
            z = z.contiguous(memory_format=torch.channels_last)
        micro_batches.append((batch_to_model(batch, device), z))
        sources.append(batch.get("source"))
        if targets is not None:
            targets.append(batch_latent(batch, "mode").to(device))
    acc, args = state.accelerator, (cfg, state.step)
    disc_buffers = [
        b.detach().clone() for b in state.disc.buffers()
    ]  # BatchNorm statistics, put back on a bad step
    stored, logs = generator_step(
        acc,
        state.decoder,
        state.disc,
        state.opt_g,
        state.logvar,
        lpips_model,
        micro_batches,
        *args,
        anchors=anchors,
        teacher=teacher,
        targets=targets,
    )
    if len(set_names) > 1:  # the forgetting curve next to the gain, while it happens
        logs.update(pixel_loss_by_set(stored, sources, set_names, cfg.loss.pixel_loss))
    logs.update(discriminator_step(acc, state.disc, state.opt_d, stored, *args))
    bad_step = bool(logs.get(SKIPPED_G)) or bool(logs.get(SKIPPED_D))
    if bad_step:
        for b, saved in zip(state.disc.buffers(), disc_buffers):
            b.copy_(saved)
    if state.ema is not None and not logs.get(SKIPPED_G):
        state.ema.step(trainable_parameters(state.decoder))
    state.step += 1
    state.batches_consumed += k
    logs.update(_count_faults(state, reports, bad_step, cfg.run.max_bad_steps))
    logs["data/epoch"] = float(epoch_of(batch))  # passes over data.shards (this reader's)
    return logs


# Logged by generator_step / discriminator_step: 1.0 when the phase's optimizer step was skipped.
SKIPPED_G, SKIPPED_D = "train/skipped_generator", "train/skipped_discriminator"


def step_is_finite(accelerator: Accelerator, values: list[float], params: list[torch.nn.Parameter]) -> bool:
    """Every logged loss value and every gradient of `params` is finite, on every process (so all ranks skip
    or step together)."""
    bad = not all(math.isfinite(v) for v in values)
    grads = [p.grad for p in params if p.grad is not None]
    # one fused norm per tensor, one sync: any inf/nan (or a norm past fp32) is non-finite
    if grads and not bad:
        bad = not bool(torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum()))
    if accelerator.num_processes > 1:
        flag = accelerator.reduce(torch.tensor([float(bad)], device=accelerator.device), reduction="sum")
        bad = bool(flag.item() > 0)
    return not bad


def _guarded_step(accelerator: Accelerator, opt: torch.optim.Optimizer, logs: dict[str, float]) -> bool:
    """opt.step() unless the phase's losses or gradients are non-finite; True when the weights were updated.

    Without a grad scaler a non-finite step is skipped here: no step() call, so weights and Adam state stay as
    they were. With fp16's GradScaler the scaler already skips a step with inf/nan gradients and lowers its
    scale; it is not checked twice, only counted (AcceleratedOptimizer.step_was_skipped).
    """
    params = [p for group in opt.param_groups for p in group["params"]]
    if accelerator.scaler is None and not step_is_finite(accelerator, list(logs.values()), params):
        return False
    opt.step()
    return not getattr(opt, "step_was_skipped", False)


def _count_faults(
    state: TrainState, reports: list[dict[str, Any]], bad_step: bool, max_bad_steps: int
) -> dict[str, float]:
    """Update the run's counts of bad samples (all processes) and non-finite steps; stop after max_bad_steps
    bad steps in a row. Returns them as logs."""
    f, acc = state.faults, state.accelerator
    n = len(reports)
    if acc.num_processes > 1:
        n = int(acc.reduce(torch.tensor([n], device=acc.device), reduction="sum").item())
    f["bad_samples"] += n
    if state.accelerator.scaler is not None and not f["scaler_settled"]:
        # fp16: the scaler starts at 2**16 and halves it on each overflowing step until one fits (about 10-20
        # skipped steps, more at high resolution): its normal start, not a fault that counts to max_bad_steps.
        f["scaler_settled"] = not bad_step
        f["scale_search_steps"] += int(bad_step)
        bad_step = False
    f["bad_steps"] += int(bad_step)
    f["bad_steps_in_a_row"] = f["bad_steps_in_a_row"] + 1 if bad_step else 0
    if bad_step:
        log.warning(
            "step %d: non-finite loss or gradient, optimizer step skipped (%d in a row)",
            state.step,
            f["bad_steps_in_a_row"],
        )
    if max_bad_steps and f["bad_steps_in_a_row"] >= max_bad_steps:
        raise TrainError(
            f"{f['bad_steps_in_a_row']} optimizer steps in a row had a non-finite loss or gradient (the last "
            f"at step {state.step}); each was skipped, the checkpoints hold the weights from before. Likely "
            "causes: fp16 overflow (the SDXL VAE overflows in fp16: use run.mixed_precision=bf16, or no for "
            "fp32); too high a learning rate (lower optim.lr / optim.disc_lr, or set optim.grad_clip_norm); "
            "bad data (check `vaedec inspect SHARDS --verify`). Rerun with the fix to resume from the "
            "newest checkpoint; run.max_bad_steps=0 never stops."
        )
    return {
        "data/bad_samples": f["bad_samples"],
        "train/bad_steps": f["bad_steps"],
        "train/bad_steps_in_a_row": f["bad_steps_in_a_row"],
        "train/scale_search_steps": f["scale_search_steps"],
    }


def generator_step(
    accelerator: Accelerator,
    decoder: torch.nn.Module,
    disc: torch.nn.Module,
    opt_g: torch.optim.Optimizer,
    logvar: torch.nn.Parameter,
    lpips_model: torch.nn.Module | None,
    micro_batches: list[MicroBatch],
    cfg: TrainConfig,
    step: int,
    anchors: list[torch.Tensor] | None = None,
    teacher: nn.Module | None = None,
    targets: list[torch.Tensor] | None = None,
) -> tuple[list[MicroBatch], dict[str, float]]:
    """The generator phase: k micro-batches (x, z), one optimizer step of the decoder (and logvar when
    learned). `anchors`: the original values of `trainable_parameters(decoder)` for loss.anchor_weight (None =
    off). `teacher`: the original decoder, frozen, for loss.teacher_weight (None = off). `targets`: a preview
    model's raw stored latent per micro-batch, which its tiny encoder regresses in the same forward and
    backward.

    The discriminator is only evaluated (its gradients are never asked for), so it runs under no_sync and its
    .grad stays untouched. Returns (x, x̂ detached) per micro-batch for the discriminator phase, and the logs
    averaged over the micro-batches.
    """
    k, scaler = len(micro_batches), accelerator.scaler
    raw = accelerator.unwrap_model(decoder)
    conv_out = raw.conv_out  # for λ: only its shape/stride/padding and input are used
    weight_grad = getattr(raw, "last_weight_grad", None)  # families whose x̂ is more than conv_out(h)
    logs: dict[str, float] = {}
    stored: list[MicroBatch] = []
    for i, (x, z) in enumerate(micro_batches):
        sync = contextlib.nullcontext() if i == k - 1 else accelerator.no_sync(decoder)
        with sync, accelerator.autocast():
            x_rec, h, *regression = decoder(z) if targets is None else decoder(z, x, targets[i])
            x_teacher = None
            if teacher is not None:
                with torch.no_grad():
                    x_teacher, _ = teacher(z)  # frozen: no graph, no .grad
            with accelerator.no_sync(disc):
                grads = generator_grads(
                    x,
                    x_rec,
                    h,
                    conv_out,
                    lpips_model,
                    disc,
                    logvar,
                    cfg.loss,
                    step,
                    loss_scale=scaler.get_scale() if scaler is not None else 1.0,
                    weight_grad=weight_grad,
                    x_teacher=x_teacher,
                )
            # One backward through the decoder with dL_G/dx̂ (no double backward for λ); accelerate applies the
            # grad scaler, and the 1/k of accumulation is ours since accumulation is done by hand here.
            loss = surrogate_loss(x_rec, grads, logvar) + sum(regression)
            accelerator.backward(loss / k)
        stored.append((x, x_rec.detach()))
        _accumulate(
            logs, grads.logs | ({"loss/encoder": float(regression[0].detach())} if regression else {}), k
        )
    if cfg.loss.learn_logvar and accelerator.num_processes > 1:
        # logvar lives outside the DDP-wrapped decoder, so its gradient is averaged across ranks by hand.
        logvar.grad = accelerator.reduce(logvar.grad, reduction="mean")
    if anchors is not None:  # L2-SP toward the original decoder, added to the gradient before clipping
        logs["loss/anchor"] = add_anchor_grad(
            trainable_parameters(decoder),
            anchors,
            cfg.loss.anchor_weight,
            scaler.get_scale() if scaler is not None else 1.0,
        )
    zero_unreached_grads(raw)  # causal 3-D kernels: what one frame never reaches stays as it was
    if cfg.optim.grad_clip_norm:
        logs |= _clip_grads(accelerator, raw, opt_g, cfg.optim.grad_clip_norm)
    # A non-finite step leaves the weights untouched.
    logs[SKIPPED_G] = float(not _guarded_step(accelerator, opt_g, logs))
    opt_g.zero_grad(set_to_none=True)
    return stored, logs


def _clip_grads(
    accelerator: Accelerator, raw: nn.Module, opt_g: torch.optim.Optimizer, max_norm: float
) -> dict[str, float]:
    """Clip the decoder's gradients to `max_norm`; a preview model's tiny encoder is clipped on its own (its
    regression gradients would otherwise set the decoder's scale). Returns the norms before clipping."""
    encoder = {id(p) for p in getattr(raw, "encoder_parameters", list)()}
    params = [p for group in opt_g.param_groups for p in group["params"] if id(p) not in encoder]
    logs = {"grad_norm/decoder": float(accelerator.clip_grad_norm_(params, max_norm))}
    if encoder:
        logs["grad_norm/encoder"] = float(accelerator.clip_grad_norm_(raw.encoder_parameters(), max_norm))
    return logs


def discriminator_step(
    accelerator: Accelerator,
    disc: torch.nn.Module,
    opt_d: torch.optim.Optimizer,
    stored: list[MicroBatch],
    cfg: TrainConfig,
    step: int,
) -> dict[str, float]:
    """The discriminator phase on the generator phase's micro-batches (x, x̂ detached); returns its logs.

    LDM's optimizer_idx 1: D sees x̂ from the decoder before this step's update, as LDM's second training_step
    call does. Before disc_start_step LDM steps D with a zero loss; skipping is the same update (Adam moves
    nothing on zero gradients) except that Adam's step count, and so its bias correction, starts at
    disc_start_step.
    """
    f = adopt_weight(cfg.loss.disc_factor, step, cfg.loss.disc_start_step)
    if f <= 0:
        return {}
    k, logs = len(stored), {}
    lecam = accelerator.unwrap_model(disc).lecam  # a buffer holder, never called: DDP is not bypassed
    for i, (x, x_rec) in enumerate(stored):
        sync = contextlib.nullcontext() if i == k - 1 else accelerator.no_sync(disc)
        with sync, accelerator.autocast():
            d_loss, d_logs = discriminator_loss(disc, x, x_rec, cfg.loss, step, lecam)
            if r1_due(cfg.loss, step):
                # Lazy R1 (StyleGAN2): every disc_r1_every steps, times disc_r1_every, so its mean strength is
                # γ/2·R1.
                r1 = r1_penalty(disc, x)
                d_loss = d_loss + f * cfg.loss.disc_r1_weight / 2 * cfg.loss.disc_r1_every * r1
                d_logs["disc/r1"] = float(r1.detach())
            accelerator.backward(d_loss / k)
        _accumulate(logs, d_logs, k)
    if cfg.optim.grad_clip_norm:
        logs["grad_norm/disc"] = float(
            accelerator.clip_grad_norm_(disc.parameters(), cfg.optim.grad_clip_norm)
        )
    # a non-finite step: weights untouched
    logs[SKIPPED_D] = float(not _guarded_step(accelerator, opt_d, logs))
    opt_d.zero_grad(set_to_none=True)
    return logs


def build_optimizers(
    cfg: TrainConfig,
    decoder: torch.nn.Module,
    disc: torch.nn.Module,
    logvar: torch.nn.Parameter,
    processes: int,
) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer, tuple[float, float]]:
    """Adam for exactly the trainable decoder parameters (+ logvar when learned) and for the PatchGAN, and
    their base LRs (scaled by the total batch with optim.scale_lr, as LDM's main.py)."""
    o = cfg.optim
    scale = cfg.data.batch_size_per_device * o.grad_accum_steps * processes if o.scale_lr else 1
    lr, disc_lr = o.lr * scale, (o.disc_lr or o.lr) * scale
    gen_params = trainable_parameters(decoder) + ([logvar] if cfg.loss.learn_logvar else [])
    # Weights with slices an image never reaches (causal 3-D kernels) get no weight decay, so those slices
    # come out bit-identical; AutoencoderKL has none and keeps its one group.
    unreached = {id(decoder.get_parameter(n)) for n in getattr(decoder, "unreached", {})}
    if o.weight_decay and unreached:
        gen_params = [
            {"params": [p for p in gen_params if id(p) not in unreached]},
            {"params": [p for p in gen_params if id(p) in unreached], "weight_decay": 0.0},
        ]
    opt_g = torch.optim.Adam(gen_params, lr=lr, betas=o.betas, weight_decay=o.weight_decay)
    opt_d = torch.optim.Adam(disc.parameters(), lr=disc_lr, betas=o.betas, weight_decay=o.weight_decay)
    return opt_g, opt_d, (lr, disc_lr)


# ------------------------------------------------------------------------------------------------------------
# helpers of the phases


def _start(cfg: TrainConfig, run_dir: Path) -> Accelerator:
    """The accelerator, the run folder and its log (main process), and the seed every rank starts from."""
    accelerator = Accelerator(
        mixed_precision=cfg.run.mixed_precision, log_with="tensorboard", project_dir=str(run_dir)
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun / `accelerate launch --multi_gpu`
    if launched > accelerator.num_processes:
        # Each process would run alone as rank 0 of 1, all writing the same run folder.
        raise TrainError(
            f"{launched} processes were launched but accelerate set up {accelerator.num_processes} "
            f"({accelerator.distributed_type}); without GPUs set ACCELERATE_USE_CPU=true, e.g. "
            "`ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 cli.py train ...`"
        )
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        setup_logging(run_dir / RUN_LOG)
    else:
        log.setLevel(logging.WARNING)  # one copy of the INFO log, from rank 0
    accelerator.wait_for_everyone()
    if accelerator.device.type == "cpu":
        keep_freed_heap()  # else each step gives its activations' pages back and faults them in again
    set_seed(cfg.run.seed)  # model init (discriminator) is identical on every rank
    if cfg.run.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        log.warning(
            "run.mixed_precision=fp16 has no effect on CPU (accelerate runs fp32 there); use bf16 on CPU"
        )
    return accelerator


def compile_decoder(decoder: nn.Module, backend: str = "inductor") -> None:
    """torch.compile the decoder in place (nn.Module.compile keeps its state-dict names); the first steps are
    slow."""
    decoder.compile(backend=backend)


def _evaluators(
    cfg: TrainConfig,
    sets: list[ShardSet],
    original: torch.nn.Module,
    lpips_model: torch.nn.Module | None,
    device: torch.device,
) -> list[Evaluator]:
    """The target set's grids and validation, then each mixed-in set's validation under its own name."""
    skip_bad = cfg.data.on_bad_sample == "skip"  # bad samples here are left out with a warning in log.txt
    return [
        Evaluator(
            original,
            grid_batch(s.val or s.train, cfg.run.grid_samples, skip_bad) if i == 0 else None,
            val_batches(s.val, cfg.data.val_max_samples, cfg.data.batch_size_per_device, skip_bad)
            if s.val
            else [],
            lpips_model,
            device,
            name=s.name if i else "",
        )
        for i, s in enumerate(sets)
    ]


def _log_sizes(decoder: torch.nn.Module, disc: torch.nn.Module, lrs: tuple[float, float]) -> None:
    """The run log's line on what trains: parameter counts and both learning rates."""
    log.info(
        "decoder: %s trainable / %s frozen parameters; discriminator %s; encoder not loaded; lr %.3g, "
        "disc lr %.3g",
        f"{param_count(decoder, True):,}",
        f"{param_count(decoder, False):,}",
        f"{param_count(disc, True):,}",
        *lrs,
    )


def _loss_modules(
    cfg: TrainConfig, out_channels: int, device: torch.device
) -> tuple[torch.nn.Module | None, torch.nn.Module | None, torch.nn.Module, torch.nn.Parameter]:
    """Phase 3: (LPIPS of the loss or None, LPIPS for validation or None, the PatchGAN, LDM's scalar
    logvar)."""
    lpips_model = None
    if cfg.loss.perceptual_weight > 0:
        lpips_model = load_lpips(cfg.loss.lpips_vgg_weights, cfg.loss.lpips_random_backbone).to(device)
    val_lpips = lpips_model if lpips_model is not None else _validation_only_lpips(cfg, device)
    disc = build_discriminator(cfg.loss, out_channels)
    if cfg.model.channels_last:
        disc.to(memory_format=torch.channels_last)
    # LDM's scalar log-variance s; LDM never gives it to an optimizer, so by default it stays at logvar_init.
    logvar = torch.nn.Parameter(
        torch.full((), cfg.loss.logvar_init, device=device), requires_grad=cfg.loss.learn_logvar
    )
    return lpips_model, val_lpips, disc, logvar


def _validation_only_lpips(cfg: TrainConfig, device: torch.device) -> torch.nn.Module | None:
    """LPIPS for validation when the loss does not use it: only when real VGG16 weights are on this
    machine."""
    if not cfg.data.val_shards or cfg.loss.lpips_random_backbone:
        return None
    try:
        return load_lpips(cfg.loss.lpips_vgg_weights).to(device)
    except LPIPSWeightsMissing:  # a file that is there but wrong still stops the run with its message
        log.info("validation without LPIPS: no VGG16 weights on this machine (README, 'LPIPS offline')")
        return None


def _ema(cfg: TrainConfig, decoder: torch.nn.Module, device: torch.device) -> tuple[EMAModel | None, Any]:
    """(EMA of the decoder's parameters, a frozen decoder copy to evaluate it with), or (None, None)."""
    if cfg.optim.ema_decay <= 0:
        return None, None
    # diffusers' EMAModel: decay = min(ema_decay, (1 + t) / (10 + t)) after ema_start_step, a warmup that
    # keeps early averages from being dominated by the initial weights.
    # Only what trains: EMAModel.step copies frozen parameters instead of averaging them, which would cost
    # memory.
    ema = EMAModel(
        trainable_parameters(decoder), decay=cfg.optim.ema_decay, update_after_step=cfg.optim.ema_start_step
    )
    ema.to(device)
    return ema, freeze(copy.deepcopy(decoder)).to(device)


def _checkpoint(run_dir: Path, state: TrainState, keep: int) -> int:
    """Save a checkpoint at the state's step (a collective: every rank calls it); returns that step."""
    path = save_train_state(run_dir, state, keep)
    if path is not None:
        log.info("checkpoint %s", path)
    return state.step


def _evaluate(
    run_dir: Path,
    evaluators: list[Evaluator],
    state: TrainState,
    ema_decoder: Any,
    grid: bool = True,
    val: bool = True,
) -> None:
    """Grid and/or validation of every shard set at the state's step, each unless already done there (main
    process only)."""
    at, accelerator = state.step, state.accelerator
    due = [(e, *e.pending(at, grid, val)) for e in evaluators]
    if not accelerator.is_main_process or not any(g or v for _, g, v in due):
        return
    models = {"": accelerator.unwrap_model(state.decoder)}
    if state.ema is not None:
        # frozen copy: its frozen parts are the decoder's already
        params = dict(ema_decoder.named_parameters())
        state.ema.copy_to([params[n] for n, _ in named_trainable_parameters(models[""])])
        models["_ema"] = ema_decoder
    metrics: dict[str, float] = {}
    for evaluator, grid_due, val_due in due:
        if grid_due:
            evaluator.write_grid(run_dir / RUN_IMAGES / f"step-{at:08d}.png", at, list(models.values()))
        if val_due:
            metrics.update(evaluator.validate(at, models))
    if metrics:  # one line for every set's validation at this step
        _log_metrics(run_dir, accelerator, at, metrics)
        log.info(
            "step %d validation: %s",
            at,
            ", ".join(f"{k.removeprefix('val/')} {v:.4f}" for k, v in metrics.items()),
        )


def _log_step(
    run_dir: Path, state: TrainState, logs: dict[str, float], images_per_s: float, bar: tqdm
) -> None:
    """A training line of metrics.jsonl and TensorBoard: the step's losses and the run's pace."""
    scaler = state.accelerator.scaler
    logs.update(
        lr=state.opt_g.param_groups[0]["lr"],
        images_per_s=images_per_s,
        peak_memory_mb=peak_memory_mb(state.accelerator.device),
    )
    if scaler is not None:
        logs["grad_scale"] = float(scaler.get_scale())  # fp16: drops when a step had inf/nan gradients
    _log_metrics(run_dir, state.accelerator, state.step, logs)
    bar.set_postfix(rec=f"{logs['loss/rec']:.4f}", lam=f"{logs['loss/d_weight']:.3g}")


def _accumulate(into: dict[str, float], logs: dict[str, float], k: int) -> None:
    for key, v in logs.items():
        into[key] = into.get(key, 0.0) + v / k


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop lines a killed run logged after its last checkpoint: the resumed run logs those steps again."""
    if path.is_file():
        kept = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                pass  # a line torn by the kill
        atomic_write_bytes(path, "".join(ln + "\n" for ln in kept).encode())


def _log_metrics(run_dir: Path, accelerator: Accelerator, step: int, metrics: dict[str, float]) -> None:
    if not accelerator.is_main_process:
        return
    accelerator.log(metrics, step=step)
    with open(run_dir / RUN_METRICS, "a") as f:
        f.write(json.dumps({"step": step, **metrics}) + "\n")
