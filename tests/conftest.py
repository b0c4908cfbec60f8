"""Shared fixtures and helpers: tiny random AutoencoderKLs saved as diffusers folders, small image sets made
here, one set of shards encoded once a session, a run's metrics, the pieces of a training step built as
train() builds them, and the comparisons several test files make."""

from __future__ import annotations

import json
import os
import socket
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach a hub
ROOT = Path(__file__).resolve().parent.parent


def tiny_vae(in_channels: int = 3, seed: int = 0):
    """A 2-level AutoencoderKL (downsampling factor 2) small enough for CPU tests."""
    from diffusers import AutoencoderKL

    from vaedec.vae import small_vae_config

    torch.manual_seed(seed)
    return AutoencoderKL(**small_vae_config((8, 16), in_channels, sample_size=32))


def save_tiny_vae(path: Path, in_channels: int = 3, seed: int = 0) -> Path:
    """tiny_vae(in_channels, seed) saved as a diffusers folder at `path`."""
    tiny_vae(in_channels, seed).save_pretrained(path)
    return path


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps its state in process-wide singletons; each in-process run starts from none."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(scope="session")
def vae_dir(tmp_path_factory) -> Path:
    return save_tiny_vae(tmp_path_factory.mktemp("vae") / "tiny-vae")


def smooth_image(seed: int, size: tuple[int, int]) -> np.ndarray:
    """A smooth random colour field (uint8 H, W, 3): compressible, and something a decoder can learn."""
    rng = np.random.default_rng(seed)
    w, h = size
    small = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC))


def make_images(folder: Path, n: int, size: tuple[int, int] = (40, 36), suffix: str = ".png") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"img{i:03d}{suffix}"
        Image.fromarray(smooth_image(i, size)).save(p)
        paths.append(p)
    return paths


# Training overrides shared by the train and format tests: tiny and fast. LPIPS is off unless a test is about
# it (its VGG16 takes seconds to build); the GAN is on from the first step, so λ, the discriminator step and
# both optimizers always run. EMA 0.9 so the EMA weights differ from the raw ones after two steps.
FAST_TRAIN = [
    "data.batch_size_per_device=2",
    "data.num_workers=0",
    "data.shuffle_buffer=8",
    "loss.perceptual_weight=0",
    "loss.disc_start_step=0",
    "loss.disc_ndf=8",
    "optim.lr=1e-3",
    "optim.ema_decay=0.9",
    "run.log_every_steps=1",
    "run.image_every_steps=0",
    "run.val_every_steps=0",
    "run.checkpoint_every_steps=0",
    "run.grid_samples=2",
]
# LPIPS with a RANDOM VGG16 backbone, on purpose: the ImageNet weights cannot be downloaded offline, and the
# tests need LPIPS's code path (and its cost), not meaningful distances.
RANDOM_LPIPS = ["loss.perceptual_weight=1.0", "loss.lpips_random_backbone=true"]


def tar_samples(shards: Path) -> Iterator[tuple[str, str, dict[str, bytes]]]:
    """(shard name, key, {extension: bytes}) for every sample of every shard in `shards`, in file order, read
    with plain tarfile (not vaedec's reader); a file stored twice under one key fails the test."""
    for tar_path in sorted(shards.glob("shard-*.tar")):
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)  # WebDataset's rule: the key ends at the first dot
                assert ext not in members.setdefault(key, {}), f"{tar_path.name}: {m.name} twice"
                members[key][ext] = tar.extractfile(m).read()
        for key, files in members.items():
            yield tar_path.name, key, files


def cli(*args: object, code: int | None = 0):
    """Invoke vaedec's click group in this process. A traceback (any exception but SystemExit) fails the test:
    a user mistake must end in a message. `code`: the exit code expected (None: any)."""
    import traceback

    from click.testing import CliRunner

    from vaedec.cli import main

    result = CliRunner().invoke(main, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        tb = "".join(traceback.format_exception(*result.exc_info))
        raise AssertionError(f"traceback instead of a clean exit:\n{result.output}\n{tb}")
    assert code is None or result.exit_code == code, (
        f"exit {result.exit_code}, expected {code}:\n{result.output}"
    )
    return result


# ------------------------------------------------------------------------------------------------------------
# shards shared by the train and user-error tests

SHARDS_RES = 32  # pixels; the tiny VAE downsamples by 2, so latents are (4, 16, 16)


@pytest.fixture(scope="session")
def shards(tmp_path_factory, vae_dir) -> Path:
    """16 images encoded at 32 px into several small shards (some runs hold the last one out); root/images
    next to root/shards. Tests that change shards copy them first."""
    from vaedec.config import EncodeConfig
    from vaedec.encode import encode

    root = tmp_path_factory.mktemp("train-data")
    make_images(root / "images", 16)
    cfg = EncodeConfig(
        src=str(root / "images"), out=str(root / "shards"), vae=str(vae_dir), resolution=SHARDS_RES,
        shard_size_mb=0.02, num_workers=0, batch_size=8,
    )
    result = encode(cfg)
    assert result.samples == 16 and result.shards >= 4
    return root / "shards"


# ------------------------------------------------------------------------------------------------------------
# comparisons


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    """Same keys, every tensor bit for bit equal."""
    assert a.keys() == b.keys(), f"{what}: keys differ {sorted(set(a) ^ set(b))[:5]}"
    for k, v in a.items():
        assert torch.equal(v, b[k]), (
            f"{what}: {k} differs (max |diff| {(v.float() - b[k].float()).abs().max():.3g})"
        )


def frozen_part(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The encoder half of an AutoencoderKL state dict (encoder.*, quant_conv.*)."""
    return {k: v for k, v in sd.items() if k.startswith(("encoder.", "quant_conv."))}


def trained_part(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The half vaedec trains (decoder.*, post_quant_conv.*)."""
    return {k: v for k, v in sd.items() if k.startswith(("decoder.", "post_quant_conv."))}


def assert_moments_match(stored: np.ndarray, fresh: np.ndarray) -> None:
    """Stored float16 moments equal a fresh fp32 forward within fp16 storage precision."""
    # fp16 storage: half an ulp is 2^-11 relative; batched vs single forward adds ~1e-6.
    assert stored.dtype == np.float16 and stored.shape == fresh.shape
    np.testing.assert_allclose(stored.astype(np.float32), fresh, rtol=1e-3, atol=1e-3)


def same_nested(a, b) -> bool:
    """Equal nested dicts/lists/tuples of tensors and plain values (state dicts, optimizer states), tensors
    bit for bit."""
    if torch.is_tensor(a):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_nested(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_nested(x, y) for x, y in zip(a, b))
    return a == b


def same_sample(a: dict, b: dict) -> bool:
    """Two decoded samples (as TrainStream or read_samples give them) with the same key, moments and
    pixels."""
    return (
        a["key"] == b["key"]
        and torch.equal(a["moments"], b["moments"])
        and torch.equal(a["pixels"], b["pixels"])
    )


# ------------------------------------------------------------------------------------------------------------
# runs


def metrics(run: Path) -> list[dict]:
    """Every line of a run's metrics.jsonl (training steps and validations)."""
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def train_lines(run: Path) -> list[dict]:
    """The per-step training lines of metrics.jsonl (validation lines are separate)."""
    return [m for m in metrics(run) if "loss/total" in m]


def shard_list(folder: Path | str) -> list[str]:
    """The shards a manifest lists, as the training stream takes them (paths, URLs or pipe: commands)."""
    from vaedec.shards import read_manifest, shard_paths

    return shard_paths(folder, read_manifest(folder))


def free_port() -> int:
    """A TCP port nothing listens on now (for accelerate's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sd_checkpoint_parts(vae, seed: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A stand-in full SD checkpoint around `vae`: (its VAE in LDM layout under first_stage_model., a few
    seeded UNet and text-encoder tensors that an export --into must leave alone)."""
    from vaedec.convert import diffusers_to_ldm

    g = torch.Generator().manual_seed(seed)
    others = {
        "model.diffusion_model.input_blocks.0.0.weight": torch.randn(8, 4, 3, 3, generator=g),
        "model.diffusion_model.out.2.bias": torch.randn(4, generator=g),
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.randn(8, generator=g),
    }
    vae_part = {
        f"first_stage_model.{k}": v.contiguous() for k, v in diffusers_to_ldm(vae.state_dict()).items()
    }
    return vae_part, others


@dataclass
class StepParts:
    """What train() steps with, built by the functions train() builds it with, for tests that call
    train.generator_step / discriminator_step themselves."""

    cfg: object  # TrainConfig
    decoder: torch.nn.Module  # families.trainable_decoder: post_quant_conv + decoder, frozen parts frozen
    disc: torch.nn.Module
    logvar: torch.nn.Parameter  # not learned
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    samples: list[dict]  # the first decoded samples of the shards, in shard order


def step_parts(shards: Path, overrides: list[str], samples: int, seed: int | None = 0) -> StepParts:
    """FAST_TRAIN + `overrides` on `shards`: the decoder, PatchGAN, logvar and both optimizers as train()
    makes them (torch seeded with `seed` first unless None), and `samples` decoded samples."""
    from vaedec.config import load_train_config
    from vaedec.discriminator import build_discriminator
    from vaedec.families import trainable_decoder
    from vaedec.shards import read_manifest, read_samples, shard_paths
    from vaedec.train import build_optimizers

    manifest = read_manifest(shards)
    cfg = load_train_config(None, [*FAST_TRAIN, f"data.shards={shards}", *overrides])
    if seed is not None:
        torch.manual_seed(seed)
    decoder = trainable_decoder(cfg, manifest)
    disc = build_discriminator(cfg.loss, 3)
    if cfg.model.channels_last:
        disc.to(memory_format=torch.channels_last)
    logvar = torch.nn.Parameter(torch.zeros(()), requires_grad=False)
    opt_g, opt_d, _ = build_optimizers(cfg, decoder, disc, logvar, 1)
    return StepParts(
        cfg, decoder, disc, logvar, opt_g, opt_d, list(read_samples(shard_paths(shards, manifest), samples))
    )


def crash_after(step: int, monkeypatch) -> None:
    """The run dies (an exception, as a kill would end it) right after logging `step`, before any later
    checkpoint."""
    import vaedec.train as train_mod

    real = train_mod._log_step

    def log_then_die(run_dir, state, *args, **kwargs):
        real(run_dir, state, *args, **kwargs)
        if state.step == step:
            raise RuntimeError("killed")

    monkeypatch.setattr(train_mod, "_log_step", log_then_die)
