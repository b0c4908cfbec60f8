"""The shard-read benchmark counts what it reads: a first epoch through training's reader is exactly the
samples written, with 0 and with 1 DataLoader worker. No timing is asserted (benchmarks are not tests)."""

from __future__ import annotations

import importlib
import sys

from conftest import ROOT


def load_bench(name: str):
    """bench/NAME.py as a module (bench/ is a namespace package at the repository root, not installed)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module(f"bench.{name}")


def test_shard_read_bench_reads_every_sample_written_once() -> None:
    shard_read = load_bench("shard_read")
    # 8 photographs x 1 crop x 2 (mirrors) = 16 samples at 32 px; batch size 3 does not divide 16, so an epoch
    # ends inside a batch and the check covers the epoch boundary.
    r = shard_read.measure(resolution=32, crops_per_image=1, batch_size=3, epochs=2, rounds=1)
    assert r.samples == 2 * len(shard_read.PHOTOS)
    assert set(r.rates) == {0, 1} and all(v > 0 for v in r.rates.values())
    assert set(r.member_bytes) == {"moments.npy", "image.png", "json"}
    assert r.bytes_per_sample > sum(r.member_bytes.values())  # tar headers come on top of the members
    assert set(r.resume) == {"fresh", "recorded", "far", "replay"} and all(v > 0 for v in r.resume.values())
