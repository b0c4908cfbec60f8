"""What a training run reads, in what order, and where it stands: the run's shard sets (data.shards and each
data.mix entry, split into training and validation shards), the seeded, rank- and worker-split stream of
batches (`TrainStream`: positions, block shuffle, mixing), the DataLoader over it, and the position a
checkpoint keeps."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from vaedec.config import TrainConfig, parse_mix
from vaedec.errors import ShardError, ShardUnreachable, TrainError
from vaedec.shards import SKIPPED, BadSample, checked_sample, collate, read_manifest, shard_paths
from vaedec.signals import ignore_stop_signals
from vaedec.transport import is_remote, iter_samples, local_folder, shard_name, spec_name

log = logging.getLogger("vaedec")


def _assign_shards(
    shards: list[str], rank: int, world: int, worker: int, workers: int
) -> tuple[list[str], int, int]:
    """Shards for one (rank, worker) and, when there are too few shards, a sample-level split (stride,
    offset)."""
    slots, slot = world * workers, rank * workers + worker
    if len(shards) >= slots:
        return shards[slot::slots], 1, 0
    # Fewer shards than readers: every reader reads all shards and keeps every `slots`-th sample, so no reader
    # is ever empty (an empty reader would hang the DataLoader) and ranks never see the same sample.
    return shards, slots, slot


def new_position() -> dict[str, int]:
    """A set reader's position at the start of its stream (TrainStream: "Position")."""
    return {"epoch": 0, "shard": 0, "sample": 0, "count": 0, "taken": 0}


class TrainStream(torch.utils.data.IterableDataset):
    """An endless, seeded, rank- and worker-split stream of batches from shards, optionally mixing shard sets,
    that starts at any recorded position by reading again at most the shards of one shuffle block.

    Roles. Each DataLoader worker plays a role r in [0, W): role r reads its own share of every set's shards
    (`_assign_shards`) and gives batches r, r+W, r+2W, ... of this rank (DataLoader's in-order fetch). Worker
    w plays role (w + first_role) % W, so that a resumed DataLoader, whose worker 0 always delivers first,
    goes on with the role whose batch is next.

    Order, a pure function of (seed, rank, role, set): each epoch permutes the reader's shards with seed+epoch
    and reads them in turn (every `stride`-th sample when there are fewer shards than readers); the samples
    are cut into blocks of `shuffle_buffer` and each block is permuted with a seed made of its start position.
    A block shuffle (as MosaicML streaming does) rather than webdataset's sliding buffer: a sliding buffer
    holds samples from arbitrarily far back, so recovering it means replaying the stream. With `mix` =
    [(shards, p), ...] each sample slot draws set i with probability p_i (else `shards`), by a choice seeded
    with the slot's number.

    Position. A set reader is at {"epoch", "shard" (index into that epoch's shard order), "sample" (raw
    samples of that shard before the current block), "count" (raw samples of the epoch before the block),
    "taken" (samples of the block already handed on)}; a role is at {"sets": [one per set], "mix": slots
    drawn}. Each batch carries its role's position after it (`position`); a checkpoint keeps the last one of
    every role and `positions` ({role: position}) starts the roles there: a reader opens the block's first
    shard, skips `sample` samples without decoding them, refills the block and drops `taken`.

    Bad samples (checked_sample) and the rest of a damaged tar are left out with on_bad_sample="skip": each
    batch carries `worker` (its role) and `bad_samples` (reports {shard, key, reason}). The position counts
    dropped samples too, so a resumed stream skips them as the killed one did.
    """

    def __init__(
        self,
        shards: list[str],
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 1000,
        mix: list[tuple[list[str], float]] = (),
        on_bad_sample: str = "error",
        expect: dict[str, tuple[int, ...]] | None = None,
        positions: dict[int, dict[str, Any]] | None = None,
        first_role: int = 0,
    ):
        super().__init__()
        if not shards or any(not m for m, _ in mix):
            raise ShardError("no training shards")
        self.sets = [list(shards)] + [list(m) for m, _ in mix]
        self.weights = [1 - sum(p for _, p in mix)] + [p for _, p in mix]  # the first is data.shards
        self.batch_size, self.seed = batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.shuffle_buffer = shuffle_buffer
        # "skip": bad samples and the rest of a damaged tar are left out of the stream and reported with the
        # batch (bad_samples); "error": a ShardError. expect: shapes checked per sample.
        self.on_bad_sample, self.expect = on_bad_sample, expect
        self.positions, self.first_role = dict(positions or {}), first_role
        self._reports: list[dict[str, Any]] = []  # this reader's bad samples not yet attached to a batch

    def _raw(self, index: int, role: int, workers: int, pos: dict[str, int]) -> Iterator[tuple[dict, dict]]:
        """(raw sample, the reader's position just after it) of set `index`, from `pos` on, for ever."""
        mine, stride, offset = _assign_shards(self.sets[index], self.rank, self.world_size, role, workers)
        tag = f"-set{index}" if index else ""
        epoch, first, skip, count = pos["epoch"], pos["shard"], pos["sample"], pos["count"]
        while True:
            order = list(mine)
            random.Random(f"{self.seed}-{epoch}{tag}").shuffle(order)
            whole, kept = first == 0 and skip == 0, 0
            for j in range(first, len(order)):
                tar = self._tar_samples(order[j])
                k, ahead = -1, next(tar, None)
                while ahead is not None:
                    # One sample read ahead: after a tar's last sample the position is the next tar's start,
                    # so that a resume never opens a tar only to find it finished.
                    sample, ahead, k = ahead, next(tar, None), k + 1
                    if k < skip:  # read again to reach the position, not decoded
                        continue
                    count += 1
                    if (count - 1) % stride == offset:
                        kept += 1
                        at = (j, k + 1) if ahead is not None else (j + 1, 0)
                        yield sample, {"epoch": epoch, "shard": at[0], "sample": at[1], "count": count}
                skip = 0
            if whole and kept == 0:  # every tar damaged at its start: an endless loop over nothing otherwise
                raise ShardError(f"none of {len(mine)} shards gave a readable sample: "
                                 + "; ".join(r["reason"] for r in self._reports[-3:]))
            epoch, first, skip, count = epoch + 1, 0, 0, 0

    def _tar_samples(self, path: str) -> Iterator[dict[str, Any]]:
        """iter_samples; with on_bad_sample=skip a damaged tar ends where it breaks and is reported."""
        last = None
        try:
            for sample in iter_samples(path):
                last = sample.get("__key__")
                yield sample
        except ShardUnreachable:
            raise  # not damage: a shard that cannot be fetched stops the run, as a missing local one does
        except ShardError as e:
            if self.on_bad_sample != "skip":
                raise
            where = f"after {last}" if last else "before its first sample"
            self._reports.append({"shard": shard_name(path), "key": last,
                                  "reason": f"damaged tar, rest skipped {where}: {e}"})

    def _set_stream(
        self, index: int, role: int, workers: int, pos: dict[str, int]
    ) -> Iterator[dict[str, Any]]:
        """Set `index`'s block-shuffled samples for one role, from `pos` on; `pos` is kept at the position
        after the last sample handed on."""
        size, tag = max(self.shuffle_buffer, 1), f"-set{index}" if index else ""
        raw = self._raw(index, role, workers, pos)
        while True:
            start = "-".join(str(pos[k]) for k in ("epoch", "shard", "sample", "count"))
            reported = len(self._reports)
            block = [next(raw) for _ in range(size)]  # [(raw sample, position after it)]
            # a resumed block: what its refill met was reported when the killed run filled it
            if pos["taken"]:
                del self._reports[reported:]
            order = list(range(size))
            if size > 1:
                random.Random(f"{self.seed}-{self.rank}-{role}{tag}-block-{start}").shuffle(order)
            for t in range(pos["taken"], size):
                if t + 1 < size:
                    pos["taken"] = t + 1
                else:  # the block is done: the next one starts after its last raw sample
                    pos.update(block[-1][1], taken=0)
                yield block[order[t]][0]

    def _samples(
        self, role: int, workers: int, position: dict[str, Any]
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        """(set index, raw sample), the set drawn per sample slot with the mix probabilities; advances
        `position`."""
        streams = [self._set_stream(i, role, workers, position["sets"][i]) for i in range(len(self.sets))]
        indices = range(len(streams))
        while True:
            i = 0
            if len(streams) > 1:
                slot = position["mix"]
                i = random.Random(f"{self.seed}-{self.rank}-{role}-mix-{slot}").choices(
                    indices, self.weights
                )[0]
                position["mix"] = slot + 1
            yield i, next(streams[i])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        role = (worker + self.first_role) % workers
        start = self.positions.get(role) or {"sets": [new_position() for _ in self.sets], "mix": 0}
        position = copy.deepcopy(start)
        samples = self._samples(role, workers, position)
        mixing = len(self.sets) > 1
        while True:
            good, bad = [], 0
            while len(good) < self.batch_size:
                i, raw = next(samples)
                try:
                    good.append(checked_sample(raw, i if mixing else None, self.expect))
                except BadSample as e:
                    shard = shard_name(raw.get("__url__", "?"))
                    if self.on_bad_sample != "skip":
                        raise ShardError(f"{raw.get('__url__', shard)}: sample {raw.get('__key__')}: {e}. "
                                         "Set data.on_bad_sample=skip to train without it") from None
                    self._reports.append({"shard": shard, "key": raw.get("__key__"), "reason": str(e)})
                    bad += 1
                    if bad > 100 * self.batch_size + 1000:
                        raise ShardError(
                            f"{bad} bad samples in a row (the last {raw.get('__key__')} in {shard}: "
                            f"{e}); check the shards with `vaedec inspect SHARDS --verify`"
                        )
            batch = collate(good)
            # Reported with the batch: the main process logs and counts them and keeps the position
            # (DataLoader workers cannot).
            batch.update(worker=role, bad_samples=list(self._reports),
                         position=copy.deepcopy(position))
            self._reports.clear()
            yield batch


def unwrap_worker_errors(batches: Iterator[Any], timeout_s: float = 0) -> Iterator[Any]:
    """Re-raise a ShardError from a DataLoader worker with its own one-line message (torch re-raises it in the
    main process with the worker's whole traceback as the message), and a DataLoader timeout (`timeout_s`) as
    a ShardError that says what to look at."""
    try:
        yield from batches
    except ShardError as e:
        text, marker = str(e), "ShardError: "
        raise ShardError(
            text[text.rfind(marker) + len(marker) :].strip() if marker in text else text
        ) from None
    except RuntimeError as e:
        if not timeout_s or "timed out" not in str(e):
            raise
        raise ShardError(
            f"no batch from the data loader in {timeout_s:g} s (data.read_timeout_s): a shard read is stuck "
            "(a pipe: command that does not end, a hung network mount or bucket). The newest checkpoint is "
            "intact: fix the cause and rerun the same command to resume, or raise data.read_timeout_s"
        ) from None


# ------------------------------------------------------------------------------------------------------------
# the run's shard sets and its batch stream


@dataclass
class ShardSet:
    """One shard folder of the run: data.shards or a data.mix entry."""

    name: str  # its folder's name (spec_name): the key of its logs (loss/pixel/NAME, val/NAME/...)
    folder: str  # as given: a folder, file://, http(s):// URL or pipe: spec
    train: list[str]
    val: list[str]  # its last data.val_shards shards, held out for its own validation
    # a data.mix set's P, parsed once: the chance a sample slot draws it; None = data.shards
    mix_p: float | None = None


def split_shards(folder: str, n_val: int, mixed: bool = False) -> tuple[dict[str, Any], list[str], list[str]]:
    """(manifest, training shards, validation shards) of one shard folder: the last n_val shards are held
    out. A `mixed` set (data.mix) too small for that holds out none, with a warning that says how to."""
    manifest = read_manifest(folder)
    if not manifest["complete"]:
        log.warning(
            "%s is an unfinished encode (%d samples so far): training on those; rerun the encode command to "
            "finish it",
            folder,
            manifest["totals"]["samples"],
        )
    all_shards = shard_paths(folder, manifest)
    if not all_shards:
        raise TrainError(
            f"{folder} holds no samples: the encode skipped every input (reasons in "
            f"{f'its {SKIPPED}' if is_remote(folder) else local_folder(folder) / SKIPPED}); fix the inputs "
            "and encode again"
        )
    if mixed and n_val >= len(all_shards):  # a small replay set: training on it is what matters
        log.warning(
            "data.mix set %s has %d shard(s), not more than data.val_shards=%d: none held out from it, "
            "all of it trains. To validate on it too, encode it with a smaller --shard-size-mb (more "
            "shards than data.val_shards)",
            folder,
            len(all_shards),
            n_val,
        )
        n_val = 0
    if n_val >= len(all_shards):
        raise TrainError(
            f"data.val_shards={n_val} leaves no training shards ({len(all_shards)} in {folder}); "
            "lower it or encode with a smaller --shard-size-mb"
        )
    return manifest, all_shards[: len(all_shards) - n_val], all_shards[len(all_shards) - n_val :]


# What must agree between data.shards and a mixed-in set: one latent space, one sample shape.
MIX_MUST_MATCH = (
    ("vae", "encoder_sha256"),
    ("vae", "in_channels"),
    ("vae", "out_channels"),
    ("vae", "latent_channels"),
    ("preprocessing", "resolution"),
)


def shard_sets(cfg: TrainConfig) -> tuple[dict[str, Any], list[ShardSet]]:
    """data.shards' manifest, and its ShardSet followed by one per data.mix entry (checked to fit it)."""
    manifest, train, val = split_shards(cfg.data.shards, cfg.data.val_shards)
    sets = [ShardSet(_set_name(cfg.data.shards), cfg.data.shards, train, val)]
    for path, p in map(parse_mix, cfg.data.mix):
        other, train, val = split_shards(path, cfg.data.val_shards, mixed=True)
        for section, key in MIX_MUST_MATCH:
            mine, theirs = manifest["settings"][section][key], other["settings"][section][key]
            if mine != theirs:
                raise TrainError(
                    f"data.mix set {path} does not fit {cfg.data.shards}: its {section}.{key} is {theirs!r}, "
                    f"not {mine!r}. Mixed sets must be encoded with the same VAE at the same resolution."
                )
        name = _set_name(path)
        if name in {s.name for s in sets}:
            raise TrainError(f"data.mix set {path}: another set is also named {name!r}; rename one folder")
        sets.append(ShardSet(name, path, train, val, p))
    return manifest, sets


def _set_name(folder: str) -> str:
    """The name a set logs under: its folder's name, or the last path component of its URL or pipe: path."""
    return spec_name(folder)


def train_batches(
    cfg: TrainConfig,
    sets: list[ShardSet],
    accelerator: Accelerator,
    data: dict[str, Any],
    step: int,
    consumed: int,
    manifest: dict[str, Any] | None = None,
) -> Iterator[dict[str, Any]]:
    """This rank's endless batch stream, from the position `data` holds (a TrainState's: `step` optimizer
    steps, `consumed` micro-batches in; the start for a new run); samples not of `manifest`'s shapes are
    bad."""
    expect = None
    if manifest is not None:
        vae, res = manifest["settings"]["vae"], manifest["settings"]["preprocessing"]["resolution"]
        r, store = res // vae["downsample_factor"], vae.get("store", "moments")  # families: moments or latent
        channels = 2 * vae["latent_channels"] if store == "moments" else vae["latent_channels"]
        expect = {store: (channels, r, r), "pixels": (3, res, res)}
    positions, first_role = stream_start(cfg, sets, data, step, consumed)
    stream = TrainStream(
        sets[0].train,
        cfg.data.batch_size_per_device,
        seed=cfg.run.seed,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        shuffle_buffer=cfg.data.shuffle_buffer,
        mix=[(st.train, st.mix_p) for st in sets[1:]],
        on_bad_sample=cfg.data.on_bad_sample,
        expect=expect,
        positions=positions,
        first_role=first_role,
    )
    loader = torch.utils.data.DataLoader(
        stream,
        batch_size=None,
        num_workers=cfg.data.num_workers,
        persistent_workers=False,
        prefetch_factor=4 if cfg.data.num_workers else None,
        worker_init_fn=ignore_stop_signals,
        timeout=cfg.data.read_timeout_s if cfg.data.num_workers else 0,
    )
    return unwrap_worker_errors(iter(loader), cfg.data.read_timeout_s if cfg.data.num_workers else 0)


def stream_start(
    cfg: TrainConfig, sets: list[ShardSet], data: dict[str, Any], step: int, consumed: int
) -> tuple[dict[int, dict[str, Any]], int]:
    """(positions by DataLoader role, the role whose batch comes next) to start the data stream from. A
    position holds only for the stream settings it was recorded under; after a change (other shards, seed,
    shuffle_buffer, num_workers, mix) the stream starts its order afresh, and the weights still resume
    exactly."""
    # Shard names, not locations: the same shards moved to object storage keep their positions.
    spec = {
        "sets": [[shard_name(p) for p in s.train] for s in sets],
        "weights": [s.mix_p for s in sets[1:]],
        "seed": cfg.run.seed,
        "shuffle_buffer": cfg.data.shuffle_buffer,
        "num_workers": cfg.data.num_workers,
    }
    fingerprint = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    saved, positions = data["fingerprint"], data["positions"]
    data["fingerprint"] = fingerprint
    if step == 0:
        return {}, 0
    if not positions or saved != fingerprint:
        why = (
            "data.shards, data.mix, run.seed, data.shuffle_buffer or data.num_workers changed"
            if positions
            else "the checkpoint predates recorded data positions"
        )
        log.warning(
            "resuming at step %d with a fresh data order (%s): the weights, optimizers and step resume "
            "exactly, the sample order does not",
            step,
            why,
        )
        data["positions"] = {}
        return {}, 0
    return {int(role): p for role, p in positions.items()}, consumed % max(cfg.data.num_workers, 1)


def note_batch(batch: dict[str, Any], data: dict[str, Any]) -> list[dict[str, Any]]:
    """Keep the data position a consumed batch carries in `data` (its role's, for the next checkpoint) and log
    the bad samples its reader skipped, each once per run (a damaged sample is met again every epoch; the log
    would repeat it for ever); returns them all (train._count_faults counts every skip)."""
    data["positions"][str(batch.get("worker", 0))] = batch["position"]
    reports = batch.get("bad_samples", [])
    logged = data.setdefault("logged_bad_samples", set())  # (shard, key); in memory only, not in checkpoints
    for r in reports:
        if (r["shard"], r["key"]) not in logged:
            logged.add((r["shard"], r["key"]))
            log.warning(
                "bad sample skipped: shard %s, key %s: %s (logged once; data/bad_samples counts every skip)",
                r["shard"],
                r["key"],
                r["reason"],
            )
    return reports


def epoch_of(batch: dict[str, Any]) -> int:
    """The passes over data.shards the reader of `batch` had begun when it made the batch (its role's)."""
    return batch["position"]["sets"][0]["epoch"]


# ------------------------------------------------------------------------------------------------------------
# the position a checkpoint keeps


def new_stream_state() -> dict[str, Any]:
    """A TrainState's `data` before any batch: {"fingerprint": the stream settings its positions hold for
    (stream_start), "positions": {role: TrainStream position after the last batch consumed from that
    role}}."""
    return {"fingerprint": "", "positions": {}}


def saved_stream_state(data: dict[str, Any], accelerator: Accelerator) -> dict[str, Any]:
    """What state.json keeps of every rank's `data`: the fingerprint and {"rank0": positions, ...}. A
    collective: every rank calls it; only the main process's result is whole."""
    return {"fingerprint": data["fingerprint"], "positions": _positions_of_ranks(data, accelerator)}


def _positions_of_ranks(data: dict[str, Any], accelerator: Accelerator) -> dict[str, dict[str, Any]]:
    """Every rank's stream positions ({role: position}), gathered to the main process: {"rank0": {...},
    ...}."""
    if accelerator.num_processes == 1:
        return {"rank0": data["positions"]}
    return {f"rank{r}": p for r, p in enumerate(gather_object([data["positions"]]))}


def loaded_stream_state(saved: dict[str, Any], rank: int) -> dict[str, Any]:
    """This rank's `data` from what state.json kept (`saved_stream_state`); {} (a checkpoint from before
    positions were recorded) gives no positions, and the stream starts afresh."""
    return {
        "fingerprint": saved.get("fingerprint", ""),
        "positions": saved.get("positions", {}).get(f"rank{rank}", {}),
    }
