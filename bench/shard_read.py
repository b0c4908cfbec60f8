"""`python bench/shard_read.py`: how fast training's reader turns shards into batches; what a sample weighs.

Encodes scikit-image's colour photographs (shorter side resized to 300 px, seeded random 256 px crops, plus
the mirrored copies) through vaedec's real encode path (`vaedec.encode.encode`) with a small random VAE that
downsamples by 8 like SD's, so a sample holds what an SD-family sample holds: (8, 32, 32) float16 moments and
a 256x256 RGB PNG of photographic pixels. Then, in one run:
  - reads the shards as `train` does: `TrainStream` (decode of moments.npy + image.png, collate) inside a
    DataLoader(batch_size=None, prefetch_factor 4), with 0 workers (the main process decodes) and 1 worker,
    interleaved; images/s per worker. The first batch of each read (worker start-up) is not timed. Each read
    checks that its first epoch holds every sample written, once;
  - bytes per sample on disk = shard bytes / samples, and the mean size of each member;
  - the cost of a resume: seconds to the first batch of a stream started fresh, from a position recorded a few
    epochs in, and from the same position moved 10,000 epochs on (a week-long run), next to the seconds a
    replay of those few epochs takes (what a resume cost before positions were recorded, growing with the
    step).
Timing does not depend on the VAE: the reader never runs it.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from bench.common import PHOTOS, Row, copy_photos, machine
from vaedec.config import EncodeConfig
from vaedec.encode import encode
from vaedec.shards import read_manifest, shard_paths
from vaedec.stream import TrainStream
from vaedec.transport import iter_samples
from vaedec.vae import small_vae_config

VAE_CHANNELS = (8, 16, 32, 32)  # 4 levels: downsampling factor 8, latent 4 channels, like SD's VAE
MODEL = f"small random VAE {VAE_CHANNELS} (factor 8, 4 latent channels, like SD's), encoded with `encode`"


@dataclass(frozen=True)
class ReadResult:
    rates: dict[int, float]  # DataLoader workers -> images/s, median of the rounds
    resume: dict[str, float]  # "fresh", "recorded", "far", "replay" -> seconds to the first batch (median)
    replay_epochs: int  # epochs in at the recorded position
    samples: int  # samples written (and read back in each first epoch)
    bytes_per_sample: float  # shard bytes / samples
    member_bytes: dict[str, float]  # member extension -> mean bytes
    resolution: int
    batch_size: int
    epochs: int
    rounds: int
    setup: str

    def per_worker(self, workers: int) -> float:
        return self.rates[workers] / max(1, workers)


def write_shards(root: Path, resolution: int, crops_per_image: int) -> Path:
    """Photographs -> shards through `encode`, with a small random SD-shaped VAE; returns the shard folder."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae_dir = root / "vae"
    AutoencoderKL(**small_vae_config(VAE_CHANNELS, sample_size=resolution)).save_pretrained(vae_dir)
    copy_photos(root / "photos")
    cfg = EncodeConfig(
        src=str(root / "photos"),
        out=str(root / "shards"),
        vae=str(vae_dir),
        resolution=resolution,
        resize=resolution * 300 // 256,
        crops_per_image=crops_per_image,
        flip=True,
        batch_size=16,
        num_workers=0,
        shard_size_mb=8.0,
    )
    result = encode(cfg)
    assert result.samples > 0 and result.skipped_inputs == 0, result
    return root / "shards"


def read_rate(shards: list[str], batch_size: int, workers: int, batches: int, expected: set[str]) -> float:
    """images/s of `batches` batches of TrainStream in a DataLoader as train builds it (first one untimed);
    fails unless the first len(expected) samples are exactly the samples written."""
    stream = TrainStream(shards, batch_size, seed=0, shuffle_buffer=0)  # no shuffle: the epoch check below
    loader = torch.utils.data.DataLoader(
        stream,
        batch_size=None,
        num_workers=workers,
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
    )
    it = iter(loader)
    keys = list(next(it)["key"])  # worker start-up: not timed
    t0 = time.perf_counter()
    for _ in range(batches - 1):
        batch = next(it)
        keys += batch["key"]
    elapsed = time.perf_counter() - t0
    del it  # stops the worker
    epoch = keys[: len(expected)]
    assert len(epoch) == len(expected) and set(epoch) == expected, (
        f"{workers} workers: first epoch read {len(set(epoch))} distinct of {len(epoch)} samples, "
        f"{len(expected)} written"
    )
    return (batches - 1) * batch_size / elapsed


def first_batch_seconds(shards: list[str], batch_size: int, positions: dict | None) -> float:
    """Seconds until a TrainStream (main process, blocks of 64) gives its first batch from `positions`."""
    t0 = time.perf_counter()
    next(iter(TrainStream(shards, batch_size, seed=0, shuffle_buffer=64, positions=positions)))
    return time.perf_counter() - t0


def resume_seconds(shards: list[str], batch_size: int, epochs: int, rounds: int) -> dict[str, float]:
    """First-batch seconds: fresh, from a position `epochs` epochs in, from it 10,000 epochs on, and the
    replay of those epochs' raw samples (tar parsing only, no decode) that a resume used to cost."""
    it = iter(TrainStream(shards, batch_size, seed=0, shuffle_buffer=64))
    batch = next(it)
    while batch["position"]["sets"][0]["epoch"] < epochs:
        batch = next(it)
    recorded = batch["position"]
    set_pos = recorded["sets"][0]
    far = {**recorded, "sets": [{**set_pos, "epoch": set_pos["epoch"] + 10_000}]}
    times: dict[str, list[float]] = {"fresh": [], "recorded": [], "far": [], "replay": []}
    for _ in range(rounds):
        times["fresh"].append(first_batch_seconds(shards, batch_size, None))
        times["recorded"].append(first_batch_seconds(shards, batch_size, {0: recorded}))
        times["far"].append(first_batch_seconds(shards, batch_size, {0: far}))
        t0 = time.perf_counter()
        for _ in range(epochs):
            for p in shards:
                for _ in iter_samples(p):
                    pass
        times["replay"].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def disk_bytes(folder: Path) -> tuple[int, float, dict[str, float]]:
    """(samples, shard bytes / sample, mean bytes of each member) of a shard folder."""
    manifest = read_manifest(folder)
    paths = shard_paths(folder, manifest)
    total = sum(Path(p).stat().st_size for p in paths)
    sizes: dict[str, list[int]] = {}
    for p in paths:
        for sample in iter_samples(p):
            for ext, data in sample.items():
                if not ext.startswith("__"):
                    sizes.setdefault(ext, []).append(len(data))
    samples = manifest["totals"]["samples"]
    return samples, total / samples, {ext: statistics.mean(v) for ext, v in sizes.items()}


def measure(
    resolution: int = 256, crops_per_image: int = 16, batch_size: int = 8, epochs: int = 2, rounds: int = 3
) -> ReadResult:
    """Write the shards, then read them with 0 and 1 workers, interleaved, `rounds` times."""
    with tempfile.TemporaryDirectory(prefix="vaedec-bench-") as tmp:
        folder = write_shards(Path(tmp), resolution, crops_per_image)
        samples, per_sample, members = disk_bytes(folder)
        paths = shard_paths(folder, read_manifest(folder))
        expected = {s["__key__"] for p in paths for s in iter_samples(p)}
        assert len(expected) == samples, f"{len(expected)} distinct keys, manifest says {samples}"
        batches = max(2, epochs * -(-samples // batch_size))
        times: dict[int, list[float]] = {0: [], 1: []}
        for _ in range(rounds):
            for workers, rates in times.items():  # interleaved: a busy machine slows both alike
                rates.append(read_rate(paths, batch_size, workers, batches, expected))
        replay_epochs = 4
        resume = resume_seconds(paths, batch_size, replay_epochs, rounds)
    setup = (
        f"{samples} samples ({len(paths)} shards) from {len(PHOTOS)} photos, {resolution} px, batch size "
        f"{batch_size}, {epochs} epochs a read, median of {rounds} interleaved rounds"
    )
    rates = {w: statistics.median(t) for w, t in times.items()}
    return ReadResult(
        rates,
        resume,
        replay_epochs,
        samples,
        per_sample,
        members,
        resolution,
        batch_size,
        epochs,
        rounds,
        setup,
    )


def rows(r: ReadResult) -> list[Row]:
    """The shard-read and bytes sections of bench/all.py's table."""
    px = f"{r.resolution} px"
    raw = r.resolution * r.resolution * 3
    return [
        Row("shard read", f"0 workers (main process decodes), {px}", r.rates[0], "images/s", 1.0),
        Row(
            "shard read",
            f"1 DataLoader worker, {px}",
            r.per_worker(1),
            "images/s per worker",
            r.per_worker(1) / r.rates[0],
            "of 0 workers",
        ),
        Row("resume", "first batch of a fresh stream (reference)", r.resume["fresh"], "s", 1.0),
        Row(
            "resume",
            f"first batch from a position {r.replay_epochs} epochs in",
            r.resume["recorded"],
            "s",
            r.resume["recorded"] / r.resume["fresh"],
            "of fresh",
        ),
        Row(
            "resume",
            f"first batch from a position {r.replay_epochs} + 10,000 epochs in",
            r.resume["far"],
            "s",
            r.resume["far"] / r.resume["fresh"],
            "of fresh",
        ),
        Row(
            "resume",
            f"replay of {r.replay_epochs} epochs (the cost before positions; x2,500 for the row above)",
            r.resume["replay"],
            "s",
            r.resume["replay"] / r.resume["fresh"],
            "of fresh",
        ),
        Row("bytes on disk", f"raw uint8 pixels, {px} (reference)", raw, "bytes/sample", 1.0),
        Row(
            "bytes on disk",
            f"shard bytes / samples, {px}",
            r.bytes_per_sample,
            "bytes/sample",
            r.bytes_per_sample / raw,
            "of raw pixels",
        ),
    ]


@click.command(context_settings={"show_default": True})
@click.option("--resolution", type=click.IntRange(8), default=256, help="Crop side, pixels (multiple of 8).")
@click.option(
    "--crops-per-image",
    type=click.IntRange(1),
    default=16,
    help="Random crops per photograph (each also mirrored): 8 photos x 2 x this = samples.",
)
@click.option("--batch-size", type=click.IntRange(1), default=8, help="Samples per batch.")
@click.option("--epochs", type=click.IntRange(1), default=2, help="Passes over the data in each timed read.")
@click.option("--rounds", type=click.IntRange(1), default=3, help="Interleaved rounds; the median counts.")
def main(resolution: int, crops_per_image: int, batch_size: int, epochs: int, rounds: int) -> None:
    """Shard reading images/s per DataLoader worker, and bytes per sample on disk."""
    r = measure(resolution, crops_per_image, batch_size, epochs, rounds)
    print("vaedec shard-read benchmark (bench/shard_read.py)")
    print(f"machine  {machine(torch.device('cpu'))}")
    print(f"model    {MODEL}")
    print(f"setup    {r.setup}")
    print(f"read     0 workers {r.rates[0]:8.1f} images/s (main process decodes)")
    print(
        f"read     1 worker  {r.per_worker(1):8.1f} images/s per worker ({r.per_worker(1) / r.rates[0]:.2f}x)"
    )
    for key, what in (("fresh", "fresh stream"), ("recorded", f"position {r.replay_epochs} epochs in"),
                      ("far", f"position {r.replay_epochs} + 10,000 epochs in")):
        print(f"resume   first batch, {what}: {r.resume[key]:.3f} s")
    print(
        f"resume   replay of {r.replay_epochs} epochs (the cost before positions): {r.resume['replay']:.3f} s"
    )
    members = ", ".join(f"{ext} {b:,.0f}" for ext, b in sorted(r.member_bytes.items()))
    print(
        f"disk     {r.bytes_per_sample:,.0f} bytes/sample on disk (members, mean bytes: {members}; "
        "the rest is tar headers and padding)"
    )


if __name__ == "__main__":
    main()
