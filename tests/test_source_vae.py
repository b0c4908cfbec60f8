"""The stand-in pretrained VAE's training: deterministic, loadable with diffusers, and its small math right."""

from __future__ import annotations

import math

import torch
from conftest import make_images
from diffusers import AutoencoderKL

from vaedec.source_vae import (
    SourceVAEConfig,
    kl_per_element,
    latent_stats,
    lr_at,
    save_atomic,
    train_source_vae,
)

TINY = SourceVAEConfig(block_out_channels=(8, 16), resolution=16, batch_size=2, steps=3, warmup_steps=1, threads=1)


def test_training_is_deterministic_and_restores_torch_settings(tmp_path):
    make_images(tmp_path / "img", 3, size=(40, 36))
    threads = torch.get_num_threads()
    a, losses_a = train_source_vae(tmp_path / "img", TINY, progress=False)
    b, losses_b = train_source_vae(tmp_path / "img", TINY, progress=False)
    c, _ = train_source_vae(tmp_path / "img", SourceVAEConfig(**{**TINY.__dict__, "seed": 1}), progress=False)
    assert len(losses_a) == 3 and losses_a == losses_b
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert torch.get_num_threads() == threads and not torch.are_deterministic_algorithms_enabled()


def test_saved_folder_loads_and_reproduces_outputs(tmp_path):
    make_images(tmp_path / "img", 3, size=(40, 36))
    vae, _ = train_source_vae(tmp_path / "img", TINY, progress=False)
    stats = latent_stats(vae, tmp_path / "img", TINY, n=8)
    vae.register_to_config(scaling_factor=stats["scaling_factor"])
    out = tmp_path / "source-vae"
    out.mkdir()
    (out / "README.md").write_text("model card")
    save_atomic(vae, out, {"steps": 3})
    assert (out / "README.md").read_text() == "model card"  # a retrain keeps the model card
    assert (out / "training.json").exists() and not list(tmp_path.glob(".source-vae-*"))
    loaded = AutoencoderKL.from_pretrained(out).eval()
    assert loaded.config.scaling_factor == stats["scaling_factor"]
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean
        assert torch.equal(loaded.encode(x).latent_dist.mean, z)
        assert torch.equal(loaded.decode(z).sample, vae.decode(z).sample)


def test_kl_matches_torch_distributions():
    mean, logvar = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    q = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    ref = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).sum(dim=(1, 2, 3)).mean()
    assert torch.allclose(kl_per_element(mean, logvar), ref, atol=1e-5)


def test_lr_warms_up_then_decays_to_zero():
    cfg = SourceVAEConfig(lr=1e-3, warmup_steps=10, steps=110)
    assert lr_at(0, cfg) == 1e-4 and lr_at(9, cfg) == 1e-3
    assert math.isclose(lr_at(60, cfg), 5e-4) and lr_at(110, cfg) == 0.0
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 110))


def test_qwenimage_source_vae_trains_deterministically_and_records_per_channel_statistics(tmp_path):
    from diffusers import AutoencoderKLQwenImage

    make_images(tmp_path / "img", 3, size=(40, 36))
    cfg = SourceVAEConfig(family="qwenimage", block_out_channels=(8, 16), latent_channels=16, resolution=16,
                          batch_size=2, steps=3, warmup_steps=1, threads=1)
    a, losses_a = train_source_vae(tmp_path / "img", cfg, progress=False)
    b, losses_b = train_source_vae(tmp_path / "img", cfg, progress=False)
    assert isinstance(a, AutoencoderKLQwenImage) and losses_a == losses_b and all(map(math.isfinite, losses_a))
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    stats = latent_stats(a, tmp_path / "img", cfg, n=8)
    assert len(stats["latents_mean"]) == len(stats["latents_std"]) == 16 and min(stats["latents_std"]) > 0
    a.register_to_config(latents_mean=stats["latents_mean"], latents_std=stats["latents_std"])
    save_atomic(a, tmp_path / "q", {"steps": 3})
    loaded = AutoencoderKLQwenImage.from_pretrained(tmp_path / "q").eval()
    assert loaded.config.latents_std == stats["latents_std"]
    x = torch.rand(2, 3, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded.encode(x).latent_dist.mean, a.eval().encode(x).latent_dist.mean)
