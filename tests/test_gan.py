"""A steadier GAN: spectral norm in the PatchGAN, lazy R1 on real images, LeCAM, a discriminator-only warm-up.
Each term against its formula on a plain reference; each off by default; all on in a real run that resumes
exactly."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FAST_TRAIN, assert_same_tensors, cli
from safetensors.torch import load_file

from vaedec.config import ConfigError, LossConfig, load_train_config
from vaedec.discriminator import LeCAMAnchors, NLayerDiscriminator, build_discriminator
from vaedec.losses import discriminator_loss, generator_gan_factor, lecam_reg, r1_due, r1_penalty

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def test_defaults_keep_ldm_semantics() -> None:
    cfg = LossConfig()
    assert (cfg.disc_norm, cfg.disc_r1_weight, cfg.disc_lecam_weight, cfg.disc_warmup_steps) == (
        "batch",
        0,
        0,
        0,
    )
    disc = build_discriminator(cfg, 3)
    assert disc.lecam is None and not any("parametrizations" in k or "lecam" in k for k in disc.state_dict())
    assert not r1_due(cfg, 0)


def test_spectral_norm_bounds_every_conv_to_unit_spectral_norm() -> None:
    torch.manual_seed(0)
    disc = build_discriminator(LossConfig(disc_norm="spectral", disc_ndf=8), 3)
    convs = [m for m in disc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 5 and all(torch.nn.utils.parametrize.is_parametrized(c, "weight") for c in convs)
    assert not any(isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm)) for m in disc.modules())
    x = torch.randn(2, 3, 32, 32)
    for _ in range(200):  # one power iteration per training forward; the estimate converges
        disc(x)
    disc.eval()
    for c in convs:
        w = c.weight  # the normalised weight, W / σ(W)
        sigma = torch.linalg.matrix_norm(w.reshape(w.shape[0], -1), ord=2)
        assert sigma.item() == pytest.approx(1.0, abs=5e-3)
        raw = c.parametrizations.weight.original
        exact = raw.detach() / torch.linalg.matrix_norm(raw.reshape(raw.shape[0], -1), ord=2)
        assert torch.allclose(w.detach(), exact, rtol=5e-3, atol=1e-5)


def test_r1_penalty_matches_a_per_sample_reference() -> None:
    torch.manual_seed(0)
    disc = NLayerDiscriminator(3, ndf=8, n_layers=2, norm="group")  # per-sample: no batch statistics
    x = torch.randn(3, 3, 32, 32)
    r1 = r1_penalty(disc, x)
    norms = []
    for b in range(3):  # R1 = E_b ‖∇_x D(x_b)‖², D(x_b) the sum of its patch logits
        xb = x[b : b + 1].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(disc(xb).sum(), [xb])
        norms.append(g.square().sum())
    assert r1.item() == pytest.approx(torch.stack(norms).mean().item(), rel=1e-5)
    r1.backward()  # the penalty trains D (a gradient of a gradient), not the images
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in disc.parameters() if p.ndim > 1)
    assert [s for s in range(10) if r1_due(LossConfig(disc_r1_weight=1.0, disc_r1_every=4), s)] == [0, 4, 8]


def test_lecam_matches_its_formula_and_anchors_are_emas() -> None:
    real, fake = torch.randn(2, 1, 6, 6), torch.randn(2, 1, 6, 6)
    a_real, a_fake = torch.tensor(0.3), torch.tensor(-0.2)
    ref = sum(max(0.0, r - a_fake.item()) ** 2 for r in real.flatten().tolist()) / real.numel() + sum(
        max(0.0, a_real.item() - f) ** 2 for f in fake.flatten().tolist()) / fake.numel()
    assert lecam_reg(real, fake, a_real, a_fake).item() == pytest.approx(ref, rel=1e-5)

    anchors, decay = LeCAMAnchors(0.9), 0.9
    means = [(torch.randn(4) + i, torch.randn(4) - i) for i in range(3)]
    expect_r, expect_f = means[0][0].mean().item(), means[0][1].mean().item()  # the first call sets them
    anchors.update(*means[0])
    for r, f in means[1:]:
        anchors.update(r, f)
        expect_r = decay * expect_r + (1 - decay) * r.mean().item()
        expect_f = decay * expect_f + (1 - decay) * f.mean().item()
    assert anchors.real.item() == pytest.approx(expect_r, rel=1e-6)
    assert anchors.fake.item() == pytest.approx(expect_f, rel=1e-6)

    # in L_D: hinge + weight * LeCAM, times f_t
    torch.manual_seed(0)
    cfg = LossConfig(disc_start_step=0, disc_ndf=8, disc_norm="group", disc_lecam_weight=0.5)
    disc = build_discriminator(cfg, 3)
    x, x_rec = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    plain, _ = discriminator_loss(
        disc, x, x_rec, LossConfig(disc_start_step=0, disc_ndf=8, disc_norm="group"), 0
    )
    loss, logs = discriminator_loss(disc, x, x_rec, cfg, 0, disc.lecam)
    lr, lf = disc(x), disc(x_rec)
    assert logs["disc/lecam"] == pytest.approx(lecam_reg(lr, lf, lr.mean(), lf.mean()).item(), rel=1e-5)
    assert loss.item() == pytest.approx(plain.item() + 0.5 * logs["disc/lecam"], rel=1e-5)


def test_warmup_delays_the_gan_term_for_the_decoder_only() -> None:
    cfg = LossConfig(disc_start_step=10, disc_warmup_steps=5, disc_factor=1.0)
    assert [generator_gan_factor(cfg, s) for s in (9, 10, 14, 15)] == [0.0, 0.0, 0.0, 1.0]
    assert generator_gan_factor(LossConfig(disc_start_step=10), 10) == 1.0  # no warm-up: LDM


@pytest.mark.parametrize(
    "bad",
    [
        "loss.disc_r1_every=0",
        "loss.disc_r1_weight=-1",
        "loss.disc_lecam_weight=-1",
        "loss.disc_lecam_decay=1.0",
        "loss.disc_warmup_steps=-1",
    ],
)
def test_bad_values_are_refused(bad: str) -> None:
    with pytest.raises(ConfigError, match=bad.split("=")[0]):
        load_train_config(None, [bad])


STEADY = [*FAST_TRAIN, "loss.disc_norm=spectral", "loss.disc_r1_weight=1.0", "loss.disc_r1_every=2",
          "loss.disc_lecam_weight=0.3", "loss.disc_warmup_steps=2", "run.keep_checkpoints=0", "--no-export"]


def test_steady_gan_run_logs_each_term_and_resumes_exactly(tmp_path, shards) -> None:
    a, c = tmp_path / "a", tmp_path / "c"
    cli("train", shards, "--output", a, *STEADY, "run.max_steps=4")
    lines = [json.loads(s) for s in (a / "metrics.jsonl").read_text().splitlines()]
    lines = [m for m in lines if "loss/total" in m]
    # warm-up: D trains from step 0 (FAST_TRAIN's disc_start_step=0), the decoder meets it from step 2 on
    assert [m["loss/disc_factor"] for m in lines] == [0.0, 0.0, 1.0, 1.0]
    assert [m["loss/d_weight"] > 0 for m in lines] == [False, False, True, True]
    assert all("disc/loss" in m and "disc/lecam" in m for m in lines)
    assert ["disc/r1" in m for m in lines] == [True, False, True, False]  # steps 0 and 2 (logged as 1 and 3)
    disc = load_file(str(a / "checkpoints/step-00000004/disc.safetensors"))
    assert "lecam.real" in disc and int(disc["lecam.count"]) == 4
    assert any(".parametrizations.weight.original" in k for k in disc)

    cli("train", shards, "--output", c, *STEADY, "run.max_steps=3")
    cli("train", shards, "--output", c, *STEADY, "run.max_steps=4")
    for stem in ("decoder", "disc", "ema", "extra"):
        assert_same_tensors(load_file(str(c / f"checkpoints/step-00000004/{stem}.safetensors")),
                            load_file(str(a / f"checkpoints/step-00000004/{stem}.safetensors")), stem)


def test_resume_refuses_lecam_switched_and_takes_checkpoints_older_than_the_new_fields() -> None:
    from vaedec.checkpoint import resume_conflicts
    from vaedec.config import TrainConfig, config_to_dict

    cfg = config_to_dict(TrainConfig())
    on = {**cfg, "loss": {**cfg["loss"], "disc_lecam_weight": 0.3}}
    assert any("LeCAM switched on or off" in p for p in resume_conflicts(cfg, on, None, "a", 1, 1))
    assert (
        resume_conflicts(on, {**on, "loss": {**on["loss"], "disc_lecam_weight": 0.5}}, None, "a", 1, 1) == []
    )
    # a checkpoint written before model.trainable and the GAN fields existed: their defaults, so it resumes
    old = {
        **cfg,
        "model": {k: v for k, v in cfg["model"].items() if k != "trainable"},
        "loss": {
            k: v for k, v in cfg["loss"].items() if not k.startswith(("disc_lecam", "disc_r1", "disc_warmup"))
        },
    }
    assert resume_conflicts(old, cfg, None, "a", 1, 1) == []
