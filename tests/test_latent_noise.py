"""model.latent_noise_std: extra Gaussian noise on z in training, in the units a diffusion model sees."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FAST_TRAIN, cli

import vaedec.vae as vae_mod
from vaedec.latents import add_latent_noise
from vaedec.shards import read_manifest

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def test_add_latent_noise_formula_and_off_draws_nothing() -> None:
    z = torch.randn(2, 4, 8, 8)
    g = torch.Generator().manual_seed(3)
    out = add_latent_noise(z, 0.5, g)
    assert torch.equal(out, z + 0.5 * torch.randn(z.shape, generator=torch.Generator().manual_seed(3)))
    g0 = torch.Generator().manual_seed(3)
    assert add_latent_noise(z, 0.0, g0) is z
    assert torch.equal(g0.get_state(), torch.Generator().manual_seed(3).get_state())  # nothing drawn


def test_training_decodes_noisy_latents_at_the_scaled_std(tmp_path, shards, monkeypatch) -> None:
    seen = []
    real = vae_mod.TrainableDecoder

    def spy(vae):
        decoder = real(vae)
        decoder.register_forward_pre_hook(
            lambda m, args: seen.append(args[0].detach().clone()) if m.training else None)
        return decoder

    monkeypatch.setattr(vae_mod, "TrainableDecoder", spy)
    scale = read_manifest(shards)["settings"]["vae"]["scaling_factor"]
    common = [
        *FAST_TRAIN,
        "model.latent_sample=mode",
        "data.shuffle_buffer=0",
        "run.max_steps=2",
        "--no-export",
        "loss.disc_start_step=100",
    ]
    cli("train", shards, "--output", tmp_path / "plain", *common)
    plain, seen[:] = list(seen), []
    cli("train", shards, "--output", tmp_path / "noisy", *common, "model.latent_noise_std=0.1")
    noisy = list(seen)
    assert len(plain) == len(noisy) == 2
    # latent_sample=mode, same data order: the only difference is the extra noise, of std 0.1 / scaling_factor
    diff = torch.cat([(b - a).flatten() for a, b in zip(plain, noisy)])
    assert (
        diff.std().item() == pytest.approx(0.1 / scale, rel=0.1)
        and abs(diff.mean().item()) < 0.1 / scale * 0.1
    )
    for run in ("plain", "noisy"):
        lines = [json.loads(s) for s in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        assert all(m["loss/total"] == m["loss/total"] for m in lines if "loss/total" in m)
