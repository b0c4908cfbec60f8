"""`cli.py encode`: every input image through the frozen encoder once, into resumable WebDataset shards."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, parse_flag_from_env
from tqdm.auto import tqdm

from vaedec.config import EncodeConfig
from vaedec.device import pick_device
from vaedec.errors import ShardError, VaedecError
from vaedec.families import family_for
from vaedec.families import load as load_family_vae
from vaedec.images import (
    InputItem,
    Skip,
    SkipImage,
    check_unique_stems,
    crop_boxes,
    crop_resize,
    depth_to_model_range,
    discover_inputs,
    image_seed_rng,
    index_depth_maps,
    load_depth,
    load_rgb,
    make_key,
    resize_depth,
    to_model_range,
)
from vaedec.io import atomic_write_json
from vaedec.shards import (
    MANIFEST,
    RANK_SHARD_NAME,
    SKIPPED,
    ShardWriter,
    new_manifest,
    read_manifest,
    read_skipped,
    sample_members,
    write_manifest,
    write_skipped,
)
from vaedec.vae import DTYPES, freeze

log = logging.getLogger("vaedec")


class EncodeError(VaedecError):
    """The encode cannot start (bad settings, OUT belongs to another run); the message says how to fix it."""


@dataclass
class EncodeResult:
    out: Path
    samples: int  # samples in all shards
    inputs: int  # inputs considered
    skipped_inputs: int  # inputs not encoded at all
    skipped_list_entries: int  # file-list lines that named no file (or a duplicate)
    skipped_samples: int  # single samples dropped (non-finite moments)
    shards: int
    already_complete: bool = False
    skips: list[dict[str, Any]] = field(default_factory=list)
    processes: int = 1  # processes of this encode (accelerate launch --num_processes)
    main_process: bool = True  # False: another process reports the whole encode, this one only its block


# ------------------------------------------------------------------------------------------------------------
# per-input preprocessing (runs in DataLoader workers)


@dataclass
class PreparedSample:
    key: str
    pixels: np.ndarray  # uint8 (H, W, 3)
    depth: np.ndarray | None  # uint16 (H, W) for RGB+depth
    record: dict[str, Any]


class PreparedInputs(torch.utils.data.Dataset):
    """Input i -> its crops (and flips) as uint8 arrays, or the reason it cannot be encoded."""

    def __init__(self, items: list[InputItem], cfg: EncodeConfig, depth_index: dict[str, str] | None):
        self.items, self.cfg, self.depth_index = items, cfg, depth_index

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.items[i]
        try:
            return {"item": item, "samples": prepare_input(item, self.cfg, self.depth_index)}
        except SkipImage as e:
            return {"item": item, "skip": str(e)}


def prepare_input(
    item: InputItem, cfg: EncodeConfig, depth_index: dict[str, str] | None
) -> list[PreparedSample]:
    """Decode, crop and optionally mirror one input; depth maps get the same boxes."""
    im = load_rgb(item.path)
    depth_im = load_depth(item, depth_index, im.size) if depth_index is not None else None
    w, h = im.size
    rng = image_seed_rng(cfg.seed, item.rel) if cfg.crops_per_image else None
    boxes = crop_boxes(im.size, cfg.crop_side, cfg.resolution, cfg.crops_per_image, rng)
    base = make_key(item.rel)
    samples = []
    for c, box in enumerate(boxes):
        crop = crop_resize(im, box, cfg.resolution)
        depth = resize_depth(depth_im, box, cfg.resolution) if depth_im is not None else None
        record = {
            "source": item.rel,
            "orig_size": [w, h],
            "crop_box": list(box),
            "crop_index": c,
            "flip": False,
            "upscaled": min(w, h) < cfg.crop_side,
        }
        key = base if not cfg.crops_per_image else f"{base}-c{c}"
        samples.append(PreparedSample(key, np.asarray(crop), depth, record))
        if cfg.flip:
            # The mirrored crop is encoded on its own: a mirrored latent is not the latent of the mirrored
            # image.
            flipped = np.ascontiguousarray(np.asarray(crop)[:, ::-1])
            fdepth = None if depth is None else np.ascontiguousarray(depth[:, ::-1])
            samples.append(PreparedSample(f"{key}-flip", flipped, fdepth, {**record, "flip": True}))
    return samples


# ------------------------------------------------------------------------------------------------------------
# the run


def settings_of(cfg: EncodeConfig, vae_info: dict[str, Any], items: list[InputItem]) -> dict[str, Any]:
    """Everything that changes the shards' content: a rerun resumes only when these are equal."""
    inputs_sha = hashlib.sha256("\n".join(i.rel for i in items).encode()).hexdigest()
    return {
        "vae": vae_info,
        "preprocessing": {
            "resolution": cfg.resolution,
            "resize_shorter_side_to": cfg.crop_side,
            "crops_per_image": cfg.crops_per_image,
            "flip": cfg.flip,
            "seed": cfg.seed,
            "dtype": cfg.dtype,
            "resample": "lanczos (depth: bilinear)",
            "conversion_rule": "vaedec.images: EXIF transpose; alpha over white; 16-bit grey /257; CMYK via "
                               "Pillow",
            "depth": cfg.depth_dir is not None,
            "depth_dir": str(Path(cfg.depth_dir).resolve()) if cfg.depth_dir else None,
        },
        "source": {"src": str(Path(cfg.src).resolve()), "inputs": len(items), "inputs_sha256": inputs_sha},
        "shard_size_mb": cfg.shard_size_mb,
    }


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix[:-1]}: {a!r} -> {b!r}"]


def _clear_out(out: Path) -> None:
    for p in list(out.glob("shard-*.tar")) + list(out.glob(".shard-*.partial")) + list(out.glob(RANK_FILES)):
        p.unlink()
    for name in (MANIFEST, SKIPPED):
        (out / name).unlink(missing_ok=True)


def encode(cfg: EncodeConfig) -> EncodeResult:
    """Encode SRC into OUT; resumes a killed run with the same settings; see the module docstring. Under
    `accelerate launch` with several processes, this process encodes its own block of the inputs
    (`_encode_ranks`)."""
    # 1. inputs and settings -------------------------------------------------------------------------------
    items, list_skips, depth_index = _inputs(cfg)
    procs = launched_processes(cfg)  # None: this one process encodes everything (no accelerate involved)
    device = procs.device if procs else pick_device(cfg.device)
    dtype = DTYPES[cfg.dtype]
    vae, vae_info = _encoder_vae(cfg, depth_index is not None)
    settings = settings_of(cfg, vae_info, items)
    if procs is not None:
        return _encode_ranks(cfg, procs, items, list_skips, depth_index, vae, settings, dtype)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)  # only now: a refused encode leaves no empty OUT behind

    # 2. resume or refuse ----------------------------------------------------------------------------------
    manifest = _resume_or_refuse(out, settings, cfg.overwrite)
    skips = [Skip(-1, s.rel, s.reason) for s in list_skips]
    skips += [
        Skip(r["input_index"], r["source"], r["reason"], r.get("key"))
        for r in read_skipped(out)
        if 0 <= r["input_index"] < manifest["next_input"]
    ]
    if manifest["complete"]:
        log.info("%s is already complete (%d samples); nothing to do", out, manifest["totals"]["samples"])
        return _result(out, manifest, skips, already_complete=True)

    # 3. encode ---------------------------------------------------------------------------------------------
    _encoder_on(vae, device, dtype)
    start = manifest["next_input"]
    todo = items[start:]
    sink = _ShardSink(
        out,
        manifest,
        skips,
        cfg.shard_size_mb * 2**20,
        lambda b: _encode_batch(vae, b, device, dtype),
        save=lambda m, sk: _write_state(out, m, sk),
        store=family_for(vae).store,
    )
    t0 = time.perf_counter()
    bar = tqdm(total=len(items), initial=start, unit="img", desc="encode", dynamic_ncols=True)
    _feed(cfg, todo, depth_index, sink, skips, len(items), bar)
    elapsed = time.perf_counter() - t0
    log.info("encoded %d inputs in %.1f s (%.1f img/s)", len(todo), elapsed, len(todo) / max(elapsed, 1e-9))
    return _result(out, manifest, skips)


def _encoder_on(vae: Any, device: torch.device, dtype: torch.dtype) -> None:
    """Freeze the encoder half and move it to `device`; drop the decoder half, never used here."""
    family = family_for(vae)
    freeze(vae)
    family.drop_decoder(vae)  # free its memory
    for module in family.encoder_parts(vae).values():
        module.to(device=device, dtype=dtype)


def _feed(
    cfg: EncodeConfig,
    todo: list[InputItem],
    depth_index: dict[str, str] | None,
    sink: _ShardSink,
    skips: list[Skip],
    end: int,
    bar: Any,
) -> None:
    """Prepare `todo` in DataLoader workers and pass it to the sink; `end` = the index after the last
    input."""
    loader = torch.utils.data.DataLoader(
        PreparedInputs(todo, cfg, depth_index),
        batch_size=None,
        num_workers=cfg.num_workers if len(todo) > 1 else 0,
        collate_fn=lambda x: x,
        prefetch_factor=4 if cfg.num_workers and len(todo) > 1 else None,
    )
    try:
        for prepared in loader:
            item: InputItem = prepared["item"]
            if "skip" in prepared:
                skips.append(Skip(item.index, item.rel, prepared["skip"]))
            else:
                sink.add(item.index, prepared["samples"], cfg.batch_size)
            bar.update(1)
        sink.finish(end)
    finally:
        bar.close()
        sink.abort()


def _inputs(cfg: EncodeConfig) -> tuple[list[InputItem], list[Skip], dict[str, str] | None]:
    """(inputs, file-list entries that are no input, depth index or None), checking what needs no VAE."""
    if cfg.resolution < 8:
        # the VAE's own factor: _encoder_vae
        raise EncodeError(f"--resolution {cfg.resolution} must be at least 8")
    if cfg.resize is not None and cfg.resize < cfg.resolution:
        raise EncodeError(f"--resize {cfg.resize} must be >= --resolution {cfg.resolution}")
    items, list_skips = discover_inputs(cfg.src)
    depth_index = index_depth_maps(cfg.depth_dir) if cfg.depth_dir else None
    if depth_index is not None:
        check_unique_stems(items)
    if Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        raise EncodeError(f"OUT {cfg.out} exists and is not a folder")
    return items, list_skips, depth_index


def _encoder_vae(cfg: EncodeConfig, depth: bool) -> tuple[Any, dict[str, Any]]:
    """The VAE and its manifest record (source, fingerprint, channels, factors), refused when it cannot encode
    these inputs at this resolution."""
    family, vae = load_family_vae(cfg.vae, cfg.subfolder, cfg.scaling_factor, config=cfg.vae_config)
    if cfg.shift_factor is not None:
        family.set_shift_factor(vae, cfg.shift_factor)
    info = family.summary(vae)
    expected_in = 4 if depth else 3
    if info["in_channels"] != expected_in:
        hint = "give --depth-dir for an RGB+depth VAE" if info["in_channels"] == 4 else "drop --depth-dir"
        raise EncodeError(
            f"the VAE takes {info['in_channels']} input channels, this encode gives {expected_in}: {hint}"
        )
    if cfg.resolution % info["downsample_factor"]:
        raise EncodeError(
            f"--resolution {cfg.resolution} must be a multiple of the VAE's downsampling factor "
            f"{info['downsample_factor']}"
        )
    # A local path is recorded absolute so `train` finds the VAE from any working directory; a hub id as
    # given.
    source = str(Path(cfg.vae).resolve()) if Path(cfg.vae).exists() else cfg.vae
    record = {"source": source, "subfolder": cfg.subfolder, "encoder_sha256": family.fingerprint(vae), **info}
    if cfg.vae_config is not None:  # a single file's architecture: train and export load it with the same
        record["config"] = (
            str(Path(cfg.vae_config).resolve()) if Path(cfg.vae_config).exists() else cfg.vae_config
        )
    return vae, record


def _resume_or_refuse(
    out: Path, settings: dict[str, Any], overwrite: bool, processes: int = 1
) -> dict[str, Any]:
    """OUT's manifest to continue (a new one for a fresh or overwritten OUT), refusing OUT of other settings,
    and an unfinished OUT of another process count (each process resumes its own block of inputs)."""
    manifest = None
    if overwrite:
        _clear_out(out)
    elif (out / MANIFEST).exists():
        manifest = read_manifest(out)
        changed = _diff(manifest["settings"], settings)
        if changed:
            raise EncodeError(
                f"{out} holds shards made with other settings:\n  "
                + "\n  ".join(changed)
                + "\nRerun with the original settings to resume, choose another OUT, or pass --overwrite to "
                "replace them."
            )
        before = manifest.get("processes", 1)
        if not manifest["complete"] and before != processes:
            by, how = (
                (f"{before} processes", f"`accelerate launch --num_processes {before} ... encode`")
                if before > 1
                else ("one process", "one process, without accelerate launch")
            )
            raise EncodeError(
                f"{out} is an unfinished encode by {by}, this run has {processes}: each process resumes its "
                f"own block of the inputs. Rerun the same command with {how} to finish it, or pass "
                "--overwrite to start again."
            )
    elif any(out.glob("shard-*.tar")):
        raise EncodeError(f"{out} holds shard files but no manifest.json; pass --overwrite to replace them")
    for stale in out.glob(".shard-*.partial"):
        stale.unlink()  # the unfinished tar of a killed run; its inputs are encoded again below
    for pattern in (f".{MANIFEST}.*.tmp", f".{SKIPPED}.*.tmp", f"{RANK_FILES}.*.tmp"):
        for stale in out.glob(pattern):
            # a record a killed run was replacing (vaedec/io.py's temp names); the old one stands
            stale.unlink()
    if manifest is None:
        manifest = new_manifest(settings)
        if processes > 1:
            manifest["processes"] = processes
            for stale in out.glob(RANK_FILES):
                stale.unlink()  # progress of no manifest's encode: never resumed from
        # Recorded before the first shard exists: a kill between that shard's rename and its manifest update
        # must leave a folder this command resumes, not "shard files but no manifest.json".
        write_manifest(out, manifest)
    return manifest


# ------------------------------------------------------------------------------------------------------------
# several processes (accelerate launch): each encodes a contiguous block of the inputs into its own shards

RANK_FILES = ".rank-*-of-*.json"


def launched_processes(cfg: EncodeConfig) -> Any:
    """accelerate's PartialState when launched as several processes (torchrun's WORLD_SIZE > 1), else None: a
    one-process encode never initialises accelerate, so it stays exactly what it was."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched <= 1:
        return None
    if cfg.device is not None:
        raise EncodeError(
            f"--device {cfg.device}: under accelerate launch each process uses its own device; drop "
            "--device (for CPU processes set ACCELERATE_USE_CPU=true)"
        )

    # CPU processes (gloo): AcceleratorState reads ACCELERATE_USE_CPU itself, PartialState has to be told.
    procs = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    if procs.num_processes != launched:
        # Each process would encode everything alone as rank 0 of 1, all into the same OUT.
        raise EncodeError(
            f"{launched} processes were launched but accelerate set up {procs.num_processes} "
            f"({procs.distributed_type}); without GPUs set ACCELERATE_USE_CPU=true, e.g. "
            "`ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 cli.py encode ...`"
        )
    return procs


def share_of(n_inputs: int, rank: int, processes: int) -> tuple[int, int]:
    """Rank r's inputs [lo, hi): contiguous blocks of the one-process order, so the shards listed rank after
    rank hold the inputs in that order and every shard covers one contiguous input range, as in a one-process
    encode."""
    return n_inputs * rank // processes, n_inputs * (rank + 1) // processes


def _rank_file(out: Path, rank: int, processes: int) -> Path:
    return out / f".rank-{rank:03d}-of-{processes:03d}.json"


def _rank_state(out: Path, rank: int, processes: int, n_inputs: int) -> dict[str, Any]:
    """A rank's progress as its file records it (a fresh one when it has none): shards, next input, skips."""
    path = _rank_file(out, rank, processes)
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise EncodeError(f"{path} is not valid JSON ({e}); pass --overwrite to encode again") from None
    lo, hi = share_of(n_inputs, rank, processes)
    return {
        "rank": rank,
        "processes": processes,
        "inputs": [lo, hi],
        "next_input": lo,
        "complete": False,
        "shards": [],
        "skipped": [],
    }


def _save_rank(out: Path, state: dict[str, Any], skips: list[Skip]) -> None:
    """This rank's progress, atomically: the shards it committed, where it resumes, its skips so far."""
    state["skipped"] = _skip_records([s for s in skips if s.index < state["next_input"]])
    atomic_write_json(_rank_file(out, state["rank"], state["processes"]), state)


def _merge(
    out: Path, manifest: dict[str, Any], states: list[dict[str, Any]], list_skips: list[Skip]
) -> list[Skip]:
    """Write the one manifest (and skipped.jsonl) of all ranks' committed shards, rank after rank; returns its
    skips. `next_input`: every input before it is encoded (the first unfinished rank's position)."""
    manifest["shards"] = [e for st in states for e in st["shards"]]
    manifest["complete"] = all(st["complete"] for st in states)
    manifest["next_input"] = min(
        (st["next_input"] for st in states if not st["complete"]),
        default=manifest["settings"]["source"]["inputs"],
    )
    skips = list_skips + [s for st in states for s in _skips_of(st["skipped"])]
    _publish(out, manifest, skips)
    return skips


def _encode_ranks(
    cfg: EncodeConfig,
    procs: Any,
    items: list[InputItem],
    list_skips: list[Skip],
    depth_index: dict[str, str] | None,
    vae: Any,
    settings: dict[str, Any],
    dtype: torch.dtype,
) -> EncodeResult:
    """This process' part of a multi-process encode. The main process decides resume or refusal for all; each
    rank then encodes its block into shard-rRRR-*.tar, recording its progress in OUT/.rank-RRR-of-NNN.json
    after every commit (a rerun of the same command resumes each rank from its file); the main process merges
    the rank files into manifest.json as they progress and, once every file says complete, writes the final
    one."""
    rank, world, main = procs.process_index, procs.num_processes, procs.is_main_process
    out, n = Path(cfg.out), len(items)
    list_skips = [Skip(-1, s.rel, s.reason) for s in list_skips]
    if not main:
        log.setLevel(logging.WARNING)  # one copy of the INFO log, from the main process

    manifest, states = _agree_on_start(cfg, procs, settings, list_skips, n)
    if manifest["complete"]:
        log.info("%s is already complete (%d samples); nothing to do", out, manifest["totals"]["samples"])
        skips = list_skips + [s for s in _skips_of(read_skipped(out)) if s.index >= 0]
        return replace(
            _result(out, manifest, skips, already_complete=True), processes=world, main_process=main
        )
    log.info(
        "%d processes encode %d inputs, a block of about %d each (%d already encoded)",
        world,
        n,
        n // world,
        sum(st["next_input"] - st["inputs"][0] for st in states),
    )
    state = states[rank]
    skips = _encode_block(cfg, procs, items, depth_index, vae, dtype, manifest, state, list_skips)
    if not main:
        lo, hi = state["inputs"]
        return _rank_result(out, state, skips, hi - lo, world)

    # The main process: wait until every rank's file says complete, then write the one manifest.
    states = _wait_for_ranks(out, manifest, state, list_skips, n)
    skips = _merge(out, manifest, states, list_skips)
    for p in out.glob(RANK_FILES):
        p.unlink()  # the manifest now records all they did
    return replace(_result(out, manifest, skips), processes=world)


def _agree_on_start(
    cfg: EncodeConfig, procs: Any, settings: dict[str, Any], list_skips: list[Skip], n: int
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Resume or refuse, decided once: the main process reads OUT and tells the others the manifest and every
    rank's state (or the error all of them raise)."""
    out, world = Path(cfg.out), procs.num_processes
    decision: list[Any] = [None, None, None]  # (error message, manifest, rank states)
    if procs.is_main_process:
        try:
            out.mkdir(parents=True, exist_ok=True)
            manifest = _resume_or_refuse(out, settings, cfg.overwrite, world)
            states = [_rank_state(out, r, world, n) for r in range(world)]
            if not manifest["complete"]:  # what a killed run's ranks committed after its last merge
                _merge(out, manifest, states, list_skips)
            decision = [None, manifest, states]
        except (EncodeError, ShardError) as e:
            decision = [str(e), None, None]
    broadcast_object_list(decision)
    # The only collective: from here on ranks meet through OUT's files, so a rank that finishes its block long
    # before another never waits in a collective (those time out: 10 min NCCL, 30 min gloo).
    procs.destroy_process_group()
    error, manifest, states = decision
    if error:
        raise EncodeError(error)
    differ = _diff(manifest["settings"], settings)
    if differ:  # blocks are index ranges: every process must see the same inputs (and encoder)
        raise EncodeError(
            f"process {procs.process_index} sees other settings than the main process:\n  "
            + "\n  ".join(differ)
            + "\nSRC, --vae and --depth-dir must be the same files at "
            "the same paths on every machine."
        )
    return manifest, states


def _encode_block(
    cfg: EncodeConfig,
    procs: Any,
    items: list[InputItem],
    depth_index: dict[str, str] | None,
    vae: Any,
    dtype: torch.dtype,
    manifest: dict[str, Any],
    state: dict[str, Any],
    list_skips: list[Skip],
) -> list[Skip]:
    """Encode this rank's block [lo, hi) from where its file left off into shard-rRRR-*.tar; returns its
    skips. After each committed shard the rank file is saved, and the main process refreshes manifest.json."""
    rank, world, main = procs.process_index, procs.num_processes, procs.is_main_process
    out, n = Path(cfg.out), len(items)
    (lo, hi), start = state["inputs"], state["next_input"]
    skips = _skips_of(state["skipped"])
    t0 = time.perf_counter()
    if not state["complete"]:
        _encoder_on(vae, procs.device, dtype)

        def save(st: dict[str, Any], sk: list[Skip]) -> None:
            _save_rank(out, st, sk)
            if main:  # the main process alone writes manifest.json: one writer, no race between ranks
                ranks = [st if r == rank else _rank_state(out, r, world, n) for r in range(world)]
                _merge(out, manifest, ranks, list_skips)

        sink = _ShardSink(
            out,
            state,
            skips,
            cfg.shard_size_mb * 2**20,
            lambda b: _encode_batch(vae, b, procs.device, dtype),
            save=save,
            shard_name=lambda i: RANK_SHARD_NAME.format(rank, i),
            store=family_for(vae).store,
        )
        bar = tqdm(
            total=hi - lo,
            initial=start - lo,
            unit="img",
            desc=f"encode (rank 0 of {world})",
            dynamic_ncols=True,
            disable=not main,
        )
        _feed(cfg, items[start:hi], depth_index, sink, skips, hi, bar)
    elapsed = time.perf_counter() - t0
    log.info(
        "rank 0 encoded %d inputs in %.1f s (%.1f img/s)",
        hi - start,
        elapsed,
        (hi - start) / max(elapsed, 1e-9),
    )
    return skips


def _rank_result(
    out: Path, state: dict[str, Any], skips: list[Skip], inputs: int, world: int
) -> EncodeResult:
    """What a process other than the main one reports of its block (the main one reports the whole encode)."""
    return EncodeResult(
        out=out,
        samples=sum(e["samples"] for e in state["shards"]),
        inputs=inputs,
        skipped_inputs=sum(1 for s in skips if s.key is None),
        skipped_list_entries=0,
        skipped_samples=sum(1 for s in skips if s.key is not None),
        shards=len(state["shards"]),
        processes=world,
        main_process=False,
    )


def _wait_for_ranks(
    out: Path,
    manifest: dict[str, Any],
    own: dict[str, Any],
    list_skips: list[Skip],
    n: int,
    poll_s: float = 0.5,
) -> list[dict[str, Any]]:
    """Every rank's state once all are complete, refreshing manifest.json whenever one has committed a
    shard."""
    world, seen, last_log = own["processes"], None, time.monotonic()
    while True:
        states = [own if r == own["rank"] else _rank_state(out, r, world, n) for r in range(world)]
        if all(st["complete"] for st in states):
            return states
        progress = [st["next_input"] for st in states]
        if progress != seen:
            _merge(out, manifest, states, list_skips)
            seen = progress
        if time.monotonic() - last_log > 300:
            last_log = time.monotonic()
            left = {st["rank"]: st["inputs"][1] - st["next_input"] for st in states if not st["complete"]}
            log.info("waiting for ranks %s (inputs left: %s)", sorted(left), list(left.values()))
        time.sleep(poll_s)


class _ShardSink:
    """Encodes prepared samples in batches and writes them into shards. A shard is committed (then the
    manifest updated) only at the end of an input, once it holds `limit` bytes: an input's samples never span
    two shards, so a resumed encode restarts at an input boundary.

    `manifest` is OUT's manifest, or in a multi-process encode this rank's state (the same "shards",
    "next_input" and "complete" fields); `save(manifest, skips)` records it after each commit; `shard_name(i)`
    names the i-th shard (None = SHARD_NAME)."""

    def __init__(
        self,
        out: Path,
        manifest: dict,
        skips: list[Skip],
        limit: float,
        encode_batch: Any,
        save: Callable[[dict, list[Skip]], None],
        shard_name: Callable[[int], str] | None = None,
        store: str = "moments",
    ):
        self.out, self.manifest, self.skips, self.limit, self.encode_batch = (
            out,
            manifest,
            skips,
            limit,
            encode_batch,
        )
        self.save, self.shard_name, self.store = save, shard_name, store
        self.writer: ShardWriter | None = None
        # (input index, sample, last sample of its input)
        self.pending: list[tuple[int, PreparedSample, bool]] = []

    def add(self, index: int, samples: list[PreparedSample], batch_size: int) -> None:
        """Queue one input's samples; encode once a batch is full."""
        self.pending.extend((index, s, j == len(samples) - 1) for j, s in enumerate(samples))
        if len(self.pending) >= batch_size:
            self.flush()

    def flush(self) -> None:
        """Encode the queued samples; a non-finite one is skipped, not stored."""
        batch, self.pending = self.pending, []
        for (index, sample, last), m in zip(batch, self.encode_batch(batch)):
            if not np.isfinite(m).all():
                self.skips.append(
                    Skip(
                        index,
                        sample.record["source"],
                        f"non-finite {self.store} from the encoder",
                        sample.key,
                    )
                )
            else:
                if self.writer is None:
                    i = len(self.manifest["shards"])
                    self.writer = ShardWriter(self.out, i, self.shard_name(i) if self.shard_name else None)
                self.writer.write(
                    sample_members(sample.key, m, sample.pixels, sample.record, sample.depth, self.store)
                )
            if last and self.writer is not None and self.writer.bytes >= self.limit:
                _commit(self.manifest, self.writer, index + 1, self.skips, self.save)
                self.writer = None

    def finish(self, n_inputs: int) -> None:
        """Encode what is queued, commit the last shard and mark the manifest complete."""
        if self.pending:
            self.flush()
        writer, self.writer = self.writer, None
        if writer is not None and writer.samples:
            _commit(self.manifest, writer, n_inputs, self.skips, self.save)
        elif writer is not None:
            writer.abort()
        self.manifest["complete"] = True
        self.manifest["next_input"] = n_inputs
        self.save(self.manifest, self.skips)

    def abort(self) -> None:
        """Drop an unfinished shard (after an error; a no-op after finish)."""
        if self.writer is not None:
            self.writer.abort()


def _encode_batch(vae: Any, batch: list, device: torch.device, dtype: torch.dtype) -> list[np.ndarray]:
    """uint8 crops -> float16-ready moments (or latents), one (2C or C, h, w) array per sample (fp32)."""
    pixels = torch.from_numpy(np.stack([s.pixels for _, s, _ in batch])).permute(0, 3, 1, 2)  # (B, 3, H, W)
    x = to_model_range(pixels)
    if batch[0][1].depth is not None:
        # (B, 1, H, W)
        depth = torch.from_numpy(np.stack([s.depth.astype(np.int32) for _, s, _ in batch]))[:, None]
        x = torch.cat([x, depth_to_model_range(depth)], dim=1)
    moments = family_for(vae).encode(vae, x.to(device=device, dtype=dtype))
    # fp16 storage: values beyond its range become inf and are caught as non-finite, not silently clipped.
    return list(moments.to(torch.float16).float().cpu().numpy())


def _commit(manifest: dict, writer: ShardWriter, next_input: int, skips: list[Skip], save: Callable) -> None:
    """Shard first, then skipped.jsonl, then the manifest: the manifest only names complete files."""
    entry = writer.commit()
    entry["inputs"] = [manifest["next_input"], next_input]
    manifest["shards"].append(entry)
    manifest["next_input"] = next_input
    save(manifest, skips)


def _write_state(out: Path, manifest: dict, skips: list[Skip]) -> None:
    _publish(out, manifest, [s for s in skips if s.index < manifest["next_input"]])


def _publish(out: Path, manifest: dict, done: list[Skip]) -> None:
    """skipped.jsonl, then the manifest with its totals; `done` = the skips of the inputs it covers."""
    manifest["totals"] = _totals(manifest["shards"], done)
    write_skipped(out, _skip_records(done))
    write_manifest(out, manifest)


def _totals(shards: list[dict], done: list[Skip]) -> dict[str, int]:
    return {
        "samples": sum(s["samples"] for s in shards),
        "shards": len(shards),
        "inputs_skipped": sum(1 for s in done if s.key is None and s.index >= 0),
        "samples_skipped": sum(1 for s in done if s.key is not None),
        # missing/duplicate list lines, broken links
        "list_entries_skipped": sum(1 for s in done if s.index < 0),
    }


def _skip_records(skips: list[Skip]) -> list[dict[str, Any]]:
    return [{"input_index": s.index, "source": s.rel, "reason": s.reason, "key": s.key} for s in skips]


def _skips_of(records: list[dict[str, Any]]) -> list[Skip]:
    return [Skip(r["input_index"], r["source"], r["reason"], r.get("key")) for r in records]


def _result(out: Path, manifest: dict, skips: list[Skip], already_complete: bool = False) -> EncodeResult:
    t = manifest["totals"]
    return EncodeResult(
        out=out,
        samples=t["samples"],
        inputs=manifest["settings"]["source"]["inputs"],
        skipped_inputs=t["inputs_skipped"],
        skipped_samples=t["samples_skipped"],
        skipped_list_entries=t["list_entries_skipped"],
        shards=len(manifest["shards"]),
        already_complete=already_complete,
        skips=[{"source": s.rel, "reason": s.reason, "key": s.key} for s in skips],
    )
