"""What a training run reads, in what order, and where it stands: the seeded, rank- and worker-split stream of
batches (`TrainStream`: positions, block shuffle, mixing of shard sets) and the DataLoader over it."""

from __future__ import annotations

import copy
import random
from collections.abc import Iterator
from typing import Any

import torch

from vaedec.errors import ShardError, ShardUnreachable
from vaedec.shards import BadSample, checked_sample, collate
from vaedec.transport import iter_samples, shard_name


def _assign_shards(shards: list[str], rank: int, world: int, worker: int, workers: int) -> tuple[list[str], int, int]:
    """Shards for one (rank, worker) and, when there are too few shards, a sample-level split (stride, offset)."""
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
    (`_assign_shards`) and gives batches r, r+W, r+2W, ... of this rank (DataLoader's in-order fetch). Worker w
    plays role (w + first_role) % W, so that a resumed DataLoader, whose worker 0 always delivers first, goes on
    with the role whose batch is next.

    Order, a pure function of (seed, rank, role, set): each epoch permutes the reader's shards with seed+epoch and
    reads them in turn (every `stride`-th sample when there are fewer shards than readers); the samples are cut
    into blocks of `shuffle_buffer` and each block is permuted with a seed made of its start position. A block
    shuffle (as MosaicML streaming does) rather than webdataset's sliding buffer: a sliding buffer holds samples
    from arbitrarily far back, so recovering it means replaying the stream. With `mix` = [(shards, p), ...]
    each sample slot draws set i with probability p_i (else `shards`), by a choice seeded with the slot's number.

    Position. A set reader is at {"epoch", "shard" (index into that epoch's shard order), "sample" (raw samples
    of that shard before the current block), "count" (raw samples of the epoch before the block), "taken"
    (samples of the block already handed on)}; a role is at {"sets": [one per set], "mix": slots drawn}. Each
    batch carries its role's position after it (`position`); a checkpoint keeps the last one of every role and
    `positions` ({role: position}) starts the roles there: a reader opens the block's first shard, skips
    `sample` samples without decoding them, refills the block and drops `taken`.

    Bad samples (checked_sample) and the rest of a damaged tar are left out with on_bad_sample="skip": each batch
    carries `worker` (its role) and `bad_samples` (reports {shard, key, reason}). The position counts dropped
    samples too, so a resumed stream skips them as the killed one did.
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

    def _set_stream(self, index: int, role: int, workers: int, pos: dict[str, int]) -> Iterator[dict[str, Any]]:
        """Set `index`'s block-shuffled samples for one role, from `pos` on; `pos` is kept at the position after
        the last sample handed on."""
        size, tag = max(self.shuffle_buffer, 1), f"-set{index}" if index else ""
        raw = self._raw(index, role, workers, pos)
        while True:
            start = "-".join(str(pos[k]) for k in ("epoch", "shard", "sample", "count"))
            reported = len(self._reports)
            block = [next(raw) for _ in range(size)]  # [(raw sample, position after it)]
            if pos["taken"]:  # a resumed block: what its refill met was reported when the killed run filled it
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

    def _samples(self, role: int, workers: int, position: dict[str, Any]) -> Iterator[tuple[int, dict[str, Any]]]:
        """(set index, raw sample), the set drawn per sample slot with the mix probabilities; advances `position`."""
        streams = [self._set_stream(i, role, workers, position["sets"][i]) for i in range(len(self.sets))]
        indices = range(len(streams))
        while True:
            i = 0
            if len(streams) > 1:
                slot = position["mix"]
                i = random.Random(f"{self.seed}-{self.rank}-{role}-mix-{slot}").choices(indices, self.weights)[0]
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
                        raise ShardError(f"{bad} bad samples in a row (the last {raw.get('__key__')} in {shard}: "
                                         f"{e}); check the shards with `vaedec inspect SHARDS --verify`")
            batch = collate(good)
            # Reported with the batch: the main process logs and counts them and keeps the position (DataLoader
            # workers cannot).
            batch.update(worker=role, bad_samples=list(self._reports),
                         position=copy.deepcopy(position))
            self._reports.clear()
            yield batch


def unwrap_worker_errors(batches: Iterator[Any], timeout_s: float = 0) -> Iterator[Any]:
    """Re-raise a ShardError from a DataLoader worker with its own one-line message (torch re-raises it in the
    main process with the worker's whole traceback as the message), and a DataLoader timeout (`timeout_s`) as a
    ShardError that says what to look at."""
    try:
        yield from batches
    except ShardError as e:
        text, marker = str(e), "ShardError: "
        raise ShardError(text[text.rfind(marker) + len(marker) :].strip() if marker in text else text) from None
    except RuntimeError as e:
        if not timeout_s or "timed out" not in str(e):
            raise
        raise ShardError(
            f"no batch from the data loader in {timeout_s:g} s (data.read_timeout_s): a shard read is stuck (a "
            "pipe: command that does not end, a hung network mount or bucket). The newest checkpoint is intact: "
            "fix the cause and rerun the same command to resume, or raise data.read_timeout_s"
        ) from None
