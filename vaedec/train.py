"""`cli.py train`: decoder-only GAN fine-tuning from latent shards. `train(cfg)` reads top to bottom in phases:

 0. run folder, accelerator, logging, resolved config
 1. shards: manifest, train/validation split, the data stream
 2. model: the VAE named in the manifest, fingerprint check, keep post_quant_conv + decoder, drop the encoder
 3. loss modules: LPIPS (frozen), PatchGAN, scalar logvar
 4. optimizers, LR schedules, EMA; accelerate.prepare
 5. fixed grid/validation batches and the original decoder's outputs on them
 6. resume from a checkpoint
 7. the loop: generator phase, discriminator phase, EMA, logs, grids, validation, checkpoints
 8. final checkpoint and export
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from vaedec.checkpoint import (
    checkpoint_state,
    latest_checkpoint,
    load_checkpoint,
    resolve_resume,
    resume_conflicts,
    save_checkpoint,
)
from vaedec.config import OptimConfig, TrainConfig, config_to_dict, dump_config
from vaedec.discriminator import build_discriminator
from vaedec.images import batch_to_model
from vaedec.io import atomic_write_bytes, atomic_write_json, setup_logging
from vaedec.latents import sample_latent
from vaedec.losses import (
    LPIPSWeightsMissing,
    discriminator_loss,
    generator_grads,
    load_lpips,
    surrogate_loss,
)
from vaedec.metrics import reconstruction_metrics, save_grid
from vaedec.shards import (
    TrainStream,
    collate,
    read_manifest,
    read_samples,
    shard_paths,
    unwrap_worker_errors,
)
from vaedec.vae import TrainableDecoder, encoder_fingerprint, freeze, load_vae

log = logging.getLogger("vaedec")


class TrainError(ValueError):
    """The run cannot start as configured; the message says what to change."""


# ----------------------------------------------------------------------------------------------------------------
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
    return sum(p.numel() for p in module.parameters() if p.requires_grad == trainable)


@dataclass
class RunInfo:
    """What `train` leaves behind (tests and the CLI print it)."""

    run_dir: Path
    step: int
    export_dir: Path | None
    resumed_from: Path | None
    main_process: bool = True  # False on the other ranks of a multi-process run


# ----------------------------------------------------------------------------------------------------------------


def train(cfg: TrainConfig, resume: str = "latest", export: bool = True) -> RunInfo:
    """Run (or resume) one training run; see the module docstring for the phases."""
    # 0. run folder, accelerator, logging ----------------------------------------------------------------------
    run_dir = Path(cfg.run.output or "runs/run")
    accelerator = Accelerator(
        mixed_precision=cfg.run.mixed_precision,
        log_with="tensorboard",
        project_dir=str(run_dir),
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun / `accelerate launch --multi_gpu`
    if launched > accelerator.num_processes:
        # Each process would run alone as rank 0 of 1, all writing the same run folder.
        raise TrainError(
            f"{launched} processes were launched but accelerate set up {accelerator.num_processes} "
            f"({accelerator.distributed_type}); without GPUs set ACCELERATE_USE_CPU=true, e.g. "
            "`ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 cli.py train ...`"
        )
    is_main = accelerator.is_main_process
    if not is_main:
        log.setLevel(logging.WARNING)  # one copy of the INFO log, from rank 0
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        setup_logging(run_dir / "log.txt")
    accelerator.wait_for_everyone()
    set_seed(cfg.run.seed)  # model init (discriminator) is identical on every rank
    device = accelerator.device
    if cfg.run.mixed_precision == "fp16" and device.type == "cpu":
        log.warning("run.mixed_precision=fp16 has no effect on CPU (accelerate runs fp32 there); use bf16 on CPU")

    # 1. shards --------------------------------------------------------------------------------------------------
    manifest = read_manifest(cfg.data.shards)
    if not manifest["complete"]:
        log.warning("%s is an unfinished encode (%d samples so far): training on those; rerun the encode command "
                    "to finish it", cfg.data.shards, manifest["totals"]["samples"])
    all_shards = shard_paths(cfg.data.shards, manifest)
    if not all_shards:
        raise TrainError(
            f"{cfg.data.shards} holds no samples: the encode skipped every input "
            f"(reasons in {Path(cfg.data.shards) / 'skipped.jsonl'}); fix the inputs and encode again"
        )
    n_val = cfg.data.val_shards
    if n_val >= len(all_shards):
        raise TrainError(
            f"data.val_shards={n_val} leaves no training shards ({len(all_shards)} in {cfg.data.shards}); "
            "lower it or encode with a smaller --shard-size-mb"
        )
    train_shards, val_shards = all_shards[: len(all_shards) - n_val], all_shards[len(all_shards) - n_val :]
    # Which checkpoint to continue, and whether it fits these shards and settings, is settled before anything in
    # the run folder is rewritten: a refused resume leaves the earlier run as it was.
    ckpt = _checked_resume(run_dir, resume, cfg, manifest, accelerator.num_processes)
    if is_main:
        (run_dir / "config.yaml").write_text(dump_config(cfg))
        atomic_write_json(run_dir / "shards_manifest.json", manifest)  # export needs the VAE source and fingerprint

    # 2. model ---------------------------------------------------------------------------------------------------
    vae_info = manifest["settings"]["vae"]
    source = cfg.model.vae or vae_info["source"]
    subfolder = cfg.model.subfolder if cfg.model.vae else vae_info.get("subfolder")
    vae = load_vae(source, subfolder, vae_info["scaling_factor"])  # the manifest's scale travels to the export
    if encoder_fingerprint(vae) != vae_info["encoder_sha256"]:
        raise TrainError(
            f"the encoder of {source} is not the one that made {cfg.data.shards} (sha256 differs from the "
            "manifest's): these latents would be decoded by a decoder trained for another latent space. "
            "Use the manifest's VAE, or re-encode the images with this one."
        )
    decoder = TrainableDecoder(vae)
    del vae  # the encoder and quant_conv are freed here and never reach the device
    if decoder.post_quant_conv is not None and not cfg.model.train_post_quant_conv:
        freeze(decoder.post_quant_conv)
    out_channels = decoder.conv_out.out_channels
    conv_out = decoder.conv_out  # for λ: only its shape/stride/padding and input are used

    # 3. loss modules ----------------------------------------------------------------------------------------------
    lpips_model = None
    if cfg.loss.perceptual_weight > 0:
        lpips_model = load_lpips(cfg.loss.lpips_vgg_weights, cfg.loss.lpips_random_backbone).to(device)
    val_lpips = lpips_model if lpips_model is not None else _validation_only_lpips(cfg, device)
    disc = build_discriminator(cfg.loss, out_channels)
    # LDM's scalar log-variance s; LDM never gives it to an optimizer, so by default it stays at logvar_init.
    logvar = torch.nn.Parameter(torch.full((), cfg.loss.logvar_init, device=device), requires_grad=cfg.loss.learn_logvar)

    # 4. optimizers, schedules, EMA, prepare -------------------------------------------------------------------------
    world, k = accelerator.num_processes, cfg.optim.grad_accum_steps
    scale = cfg.data.batch_size_per_device * k * world if cfg.optim.scale_lr else 1
    lr, disc_lr = cfg.optim.lr * scale, (cfg.optim.disc_lr or cfg.optim.lr) * scale
    gen_params = [p for p in decoder.parameters() if p.requires_grad] + ([logvar] if cfg.loss.learn_logvar else [])
    opt_g = torch.optim.Adam(gen_params, lr=lr, betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay)
    opt_d = torch.optim.Adam(disc.parameters(), lr=disc_lr, betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay)
    ema = None
    ema_decoder = None
    if cfg.optim.ema_decay > 0:
        # diffusers' EMAModel: decay = min(ema_decay, (1 + t) / (10 + t)) after ema_start_step, a warmup that
        # keeps early averages from being dominated by the initial weights.
        ema = EMAModel(decoder.parameters(), decay=cfg.optim.ema_decay, update_after_step=cfg.optim.ema_start_step)
        ema.to(device)
        ema_decoder = freeze(copy.deepcopy(decoder)).to(device)
    # The shard stream is NOT passed to accelerator.prepare: prepare would re-shard or dispatch an
    # IterableDataset and cut the stream at its end, while TrainStream already splits by rank and worker,
    # never ends (every rank runs exactly max_steps, no uneven-batch hang) and can skip to an exact position.
    decoder, disc, opt_g, opt_d = accelerator.prepare(decoder, disc, opt_g, opt_d)
    log.info(
        "decoder: %s trainable / %s frozen parameters; discriminator %s; encoder not loaded; lr %.3g, disc lr %.3g",
        f"{param_count(decoder, True):,}", f"{param_count(decoder, False):,}", f"{param_count(disc, True):,}", lr, disc_lr,
    )

    # 5. fixed batches for grids and validation, and the original decoder's output on them ---------------------
    look = val_shards or train_shards
    grid_batch = _grid_batch(look, cfg.run.grid_samples)
    val_batches = _val_batches(val_shards, cfg) if val_shards else []
    raw_decoder = accelerator.unwrap_model(decoder)  # for evaluation outside the training step only
    originals = _reconstruct_fixed(raw_decoder, grid_batch, val_batches, val_lpips, device)

    # 6. resume ----------------------------------------------------------------------------------------------------
    step, consumed = 0, 0
    noise = torch.Generator().manual_seed(cfg.run.seed * 1000 + accelerator.process_index)
    if ckpt is not None:
        tensors, optim_state, state = load_checkpoint(ckpt)
        try:
            raw_decoder.load_state_dict(tensors["decoder"])
            accelerator.unwrap_model(disc).load_state_dict(tensors["disc"])
            opt_g.load_state_dict(optim_state["opt_g"])
            opt_d.load_state_dict(optim_state["opt_d"])
        except (RuntimeError, ValueError) as e:  # what RESUME_FIELDS does not cover, e.g. another VAE via --vae
            raise TrainError(f"{ckpt} does not fit this model ({str(e).splitlines()[0]}); start a new run "
                             "with another --output") from None
        logvar.data.copy_(tensors["extra"]["logvar"])
        noise.set_state(tensors["extra"][f"noise_rank{accelerator.process_index}"])
        if accelerator.scaler is not None and "scaler" in optim_state:
            accelerator.scaler.load_state_dict(optim_state["scaler"])
        if ema is not None:
            names = [n for n, _ in raw_decoder.named_parameters()]
            ema.shadow_params = [tensors["ema"][n].to(device) for n in names]
            ema.optimization_step = state["ema_step"]
        step, consumed = state["step"], state["batches_consumed"]
        log.info("resumed from %s at step %d", ckpt, step)
    if is_main:  # lines logged after the checkpoint (or by a try killed before its first one) are logged again
        _truncate_metrics(run_dir / "metrics.jsonl", step)
    if step >= cfg.run.max_steps:
        log.info("run already at step %d >= max_steps %d", step, cfg.run.max_steps)

    stream = TrainStream(
        train_shards,
        cfg.data.batch_size_per_device,
        seed=cfg.run.seed,
        rank=accelerator.process_index,
        world_size=world,
        shuffle_buffer=cfg.data.shuffle_buffer,
        skip_batches=consumed,
    )
    loader = torch.utils.data.DataLoader(
        stream,
        batch_size=None,
        num_workers=cfg.data.num_workers,
        persistent_workers=False,
        prefetch_factor=4 if cfg.data.num_workers else None,
    )
    batches = unwrap_worker_errors(iter(loader))
    if is_main:
        accelerator.init_trackers("tensorboard")

    last_saved = step

    def save(at: int) -> None:
        nonlocal last_saved
        if at == last_saved:
            return
        noise_states = _noise_states(noise, accelerator)  # a collective (gather): every rank must call it
        last_saved = at
        if not is_main:
            return
        tensors = {
            "decoder": raw_decoder.state_dict(),
            "disc": accelerator.unwrap_model(disc).state_dict(),
            "extra": {"logvar": logvar.detach().reshape(()), **noise_states},
        }
        if ema is not None:
            tensors["ema"] = {n: p for (n, _), p in zip(raw_decoder.named_parameters(), ema.shadow_params)}
        optim_state = {
            "opt_g": opt_g.state_dict(),
            "opt_d": opt_d.state_dict(),
        }
        if accelerator.scaler is not None:
            optim_state["scaler"] = accelerator.scaler.state_dict()
        state = {
            "step": at,
            "batches_consumed": at * k,
            "ema_step": ema.optimization_step if ema is not None else 0,
            "num_processes": world,
            "config": config_to_dict(cfg),
        }
        path = save_checkpoint(run_dir, at, tensors, optim_state, state, keep=cfg.run.keep_checkpoints)
        log.info("checkpoint %s", path)

    done = {"grid": -1, "val": -1}  # the step each was last done at: the final evaluate() does only what is left
    if step >= cfg.run.max_steps:  # a finished run, rerun: its final grid and validation are already there
        done.update(grid=step, val=step)

    def evaluate(at: int, grid: bool = True, val: bool = True) -> None:
        grid = grid and done["grid"] != at
        val = val and bool(val_batches) and done["val"] != at
        if not is_main or not (grid or val):
            return
        if ema is not None:
            ema.copy_to(ema_decoder.parameters())
        models = {"": raw_decoder, "_ema": ema_decoder}
        if grid:
            _write_grid(run_dir / "images" / f"step-{at:08d}.png", grid_batch, originals["grid"], models, device)
            done["grid"] = at
        if val:
            done["val"] = at
            metrics = {f"val/{k}_orig": v for k, v in originals["val_metrics"].items()}
            for suffix, model in models.items():
                if model is not None:
                    for key, v in _val_metrics(model, val_batches, val_lpips, device).items():
                        metrics[f"val/{key}{suffix}"] = v
            _log_metrics(run_dir, accelerator, at, metrics)
            log.info(
                "step %d validation: %s", at, ", ".join(f"{k.split('/')[1]} {v:.4f}" for k, v in metrics.items())
            )

    # 7. the loop ----------------------------------------------------------------------------------------------
    bar = tqdm(total=cfg.run.max_steps, initial=step, desc="train", unit="step", disable=not is_main, dynamic_ncols=True)
    scaler = accelerator.scaler
    t_last, images_since = time.perf_counter(), 0
    while step < cfg.run.max_steps:
        decoder.train()
        disc.train()
        logs: dict[str, float] = {}
        # The LR is a pure function of the optimizer step (no scheduler state to save or to desynchronise).
        for opt, base in ((opt_g, lr), (opt_d, disc_lr)):
            for group in opt.param_groups:
                group["lr"] = base * lr_at(step, cfg.optim, cfg.run.max_steps)
        # 7a. generator phase: k micro-batches, one optimizer step. The discriminator is only evaluated (its
        # gradients are never asked for) so it runs under no_sync and its .grad stays untouched.
        stored: list[tuple[torch.Tensor, torch.Tensor]] = []
        for i in range(k):
            batch = next(batches)
            x = batch_to_model(batch, device)
            z = sample_latent(batch["moments"], cfg.model.latent_sample, noise).to(device)
            sync = contextlib.nullcontext() if i == k - 1 else accelerator.no_sync(decoder)
            with sync, accelerator.autocast():
                x_rec, h = decoder(z)
                with accelerator.no_sync(disc):
                    grads = generator_grads(
                        x, x_rec, h, conv_out, lpips_model, disc, logvar, cfg.loss, step,
                        loss_scale=scaler.get_scale() if scaler is not None else 1.0,
                    )
                # One backward through the decoder with dL_G/dx̂ (no double backward for λ); accelerate applies
                # the grad scaler, and the 1/k of accumulation is ours since accumulation is done by hand here.
                accelerator.backward(surrogate_loss(x_rec, grads, logvar) / k)
            stored.append((x, x_rec.detach()))
            _accumulate(logs, grads.logs, k)
        if cfg.loss.learn_logvar and world > 1:
            # logvar lives outside the DDP-wrapped decoder, so its gradient is averaged across ranks by hand.
            logvar.grad = accelerator.reduce(logvar.grad, reduction="mean")
        if cfg.optim.grad_clip_norm:
            logs["grad_norm/decoder"] = float(accelerator.clip_grad_norm_(gen_params, cfg.optim.grad_clip_norm))
        opt_g.step()
        opt_g.zero_grad(set_to_none=True)

        # 7b. discriminator phase on the same micro-batches, reconstructions detached (LDM's optimizer_idx 1:
        # D sees x̂ from the decoder before this step's update, as LDM's second training_step call does).
        # Before disc_start_step LDM steps D with a zero loss; skipping is the same update (Adam moves nothing
        # on zero gradients) except that Adam's step count, and so its bias correction, starts at disc_start_step.
        if grads.logs["loss/disc_factor"] > 0:
            for i, (x, x_rec) in enumerate(stored):
                sync = contextlib.nullcontext() if i == k - 1 else accelerator.no_sync(disc)
                with sync, accelerator.autocast():
                    d_loss, d_logs = discriminator_loss(disc, x, x_rec, cfg.loss, step)
                    accelerator.backward(d_loss / k)
                _accumulate(logs, d_logs, k)
            if cfg.optim.grad_clip_norm:
                logs["grad_norm/disc"] = float(accelerator.clip_grad_norm_(disc.parameters(), cfg.optim.grad_clip_norm))
            opt_d.step()
            opt_d.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(decoder.parameters())
        step += 1
        images_since += cfg.data.batch_size_per_device * k * world
        bar.update(1)

        # 7c. logs, grids, validation, checkpoints (main process writes)
        if step % cfg.run.log_every_steps == 0 or step == cfg.run.max_steps:
            now = time.perf_counter()
            logs.update(
                lr=opt_g.param_groups[0]["lr"],
                images_per_s=images_since / max(now - t_last, 1e-9),
                peak_memory_mb=peak_memory_mb(device),
            )
            if scaler is not None:
                logs["grad_scale"] = float(scaler.get_scale())  # fp16: drops when a step had inf/nan gradients
            t_last, images_since = now, 0
            _log_metrics(run_dir, accelerator, step, logs)
            bar.set_postfix(rec=f"{logs['loss/rec']:.4f}", lam=f"{logs['loss/d_weight']:.3g}")
        grid_due = bool(cfg.run.image_every_steps) and step % cfg.run.image_every_steps == 0
        val_due = bool(cfg.run.val_every_steps) and step % cfg.run.val_every_steps == 0
        if grid_due or val_due:
            evaluate(step, grid=grid_due, val=val_due)
        if cfg.run.checkpoint_every_steps and step % cfg.run.checkpoint_every_steps == 0:
            save(step)
    bar.close()

    # 8. final checkpoint and export ------------------------------------------------------------------------------
    save(step)
    evaluate(step)
    accelerator.wait_for_everyone()
    export_dir = None
    if export and is_main:
        from vaedec.checkpoint import export_run

        export_dir = export_run(run_dir, run_dir / "export", use_ema=cfg.run.export_ema and ema is not None)
        log.info("export: %s", export_dir)
    accelerator.end_training()
    return RunInfo(run_dir=run_dir, step=step, export_dir=export_dir, resumed_from=ckpt, main_process=is_main)


# ----------------------------------------------------------------------------------------------------------------
# helpers of the phases


def _validation_only_lpips(cfg: TrainConfig, device: torch.device) -> torch.nn.Module | None:
    """LPIPS for validation when the loss does not use it: only when real VGG16 weights are on this machine."""
    if not cfg.data.val_shards or cfg.loss.lpips_random_backbone:
        return None
    try:
        return load_lpips(cfg.loss.lpips_vgg_weights).to(device)
    except LPIPSWeightsMissing:  # a file that is there but wrong still stops the run with its message
        log.info("validation without LPIPS: no VGG16 weights on this machine (README, 'LPIPS offline')")
        return None


def _checked_resume(
    run_dir: Path, resume: str, cfg: TrainConfig, manifest: dict[str, Any], processes: int
) -> Path | None:
    """The checkpoint to continue from (None = start at step 0), refusing what would mix or break runs."""
    ckpt = resolve_resume(run_dir, resume)
    own = latest_checkpoint(run_dir)
    if own is not None and (ckpt is None or ckpt.resolve().parent.parent != run_dir.resolve()):
        # --resume none or another run's checkpoint: the new steps would land among this folder's checkpoints
        # (and the next plain rerun would continue whichever is newest).
        raise TrainError(
            f"--resume {resume}, but {run_dir} holds checkpoints of its own (newest {own.name}); rerun without "
            "--resume to continue them, or start the new run in another --output"
        )
    if ckpt is None:
        return None
    saved_manifest = ckpt.parent.parent / "shards_manifest.json"
    saved_encoder = (
        json.loads(saved_manifest.read_text())["settings"]["vae"]["encoder_sha256"] if saved_manifest.is_file() else None
    )
    state = checkpoint_state(ckpt)
    problems = resume_conflicts(
        state["config"], config_to_dict(cfg), saved_encoder, manifest["settings"]["vae"]["encoder_sha256"],
        state.get("num_processes", 1), processes,
    )
    if problems:
        raise TrainError(
            f"cannot resume from {ckpt}: " + "; ".join(problems) + ". Rerun with the settings the run was made with, "
            "or start a new run in another --output."
        )
    return ckpt


def _accumulate(into: dict[str, float], logs: dict[str, float], k: int) -> None:
    for key, v in logs.items():
        into[key] = into.get(key, 0.0) + v / k


def _noise_states(noise: torch.Generator, accelerator: Accelerator) -> dict[str, torch.Tensor]:
    """Every rank's latent-noise generator state, gathered to the main process."""
    state = noise.get_state()
    if accelerator.num_processes == 1:
        return {"noise_rank0": state}
    gathered = accelerator.gather(state.to(accelerator.device)[None]).cpu()
    return {f"noise_rank{r}": gathered[r] for r in range(accelerator.num_processes)}


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
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": step, **metrics}) + "\n")


def _grid_batch(shards: list[str], n: int) -> dict[str, Any]:
    """n samples spread evenly over the first shards, so a grid is not n crops of one image."""
    pool = list(read_samples(shards, max(8 * n, 64)))
    picks = sorted({round(i * (len(pool) - 1) / max(n - 1, 1)) for i in range(min(n, len(pool)))})
    return collate([pool[i] for i in picks])


def _val_batches(val_shards: list[str], cfg: TrainConfig) -> list[dict[str, Any]]:
    samples = list(read_samples(val_shards, cfg.data.val_max_samples))
    bs = cfg.data.batch_size_per_device
    return [collate(samples[i : i + bs]) for i in range(0, len(samples), bs)]


@torch.no_grad()
def _decode_mean(model: torch.nn.Module, batch: dict[str, Any], device: torch.device) -> torch.Tensor:
    """Decode z = mean (deterministic) for grids and validation; fp32 output on CPU."""
    z = sample_latent(batch["moments"], "mode").to(device)
    was_training = model.training
    model.eval()
    x_rec, _ = model(z)
    model.train(was_training)
    return x_rec.float().cpu()


def _reconstruct_fixed(decoder, grid_batch, val_batches, lpips_model, device) -> dict[str, Any]:
    """The original decoder's outputs (computed once, before any update or resume)."""
    grid = _decode_mean(decoder, grid_batch, device)
    metrics = _val_metrics(decoder, val_batches, lpips_model, device) if val_batches else {}
    return {"grid": grid, "val_metrics": metrics}


def _write_grid(path: Path, batch, original_rec, models: dict[str, Any], device) -> None:
    columns = [batch_to_model(batch, torch.device("cpu")), original_rec]
    columns += [_decode_mean(m, batch, device) for m in models.values() if m is not None]
    save_grid(columns, path)


def _val_metrics(model, val_batches, lpips_model, device) -> dict[str, float]:
    rec = torch.cat([_decode_mean(model, b, device) for b in val_batches])
    x = torch.cat([batch_to_model(b, torch.device("cpu")) for b in val_batches])
    return reconstruction_metrics(x.to(device), rec.to(device), lpips_model)
