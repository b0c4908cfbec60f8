"""vaedec/losses.py and vaedec/discriminator.py: each term against a plain reference, the fast generator
gradients against LDM's double backward, gradient isolation, LPIPS loading offline, and the PatchGAN."""

from __future__ import annotations

import math
import os
import warnings

import pytest
import torch
import torchvision
from diffusers import AutoencoderKL
from torch import nn

from vaedec.config import LossConfig
from vaedec.discriminator import NLayerDiscriminator, build_discriminator, group_count
from vaedec.losses import (
    VGG16_FILE,
    VGG_SLICES,
    LPIPSWeightsMissing,
    adaptive_weight,
    adopt_weight,
    conv_weight_grad,
    discriminator_loss,
    generator_adv_loss,
    generator_grads,
    hinge_d_loss,
    ldm_generator_loss,
    load_lpips,
    nll_loss,
    perceptual_distance,
    pixel_loss,
    surrogate_loss,
    vanilla_d_loss,
    vgg_slice_state,
)

F64 = torch.float64


@pytest.fixture(scope="module")
def lpips64() -> nn.Module:
    """LPIPS in float64 for exact comparisons."""
    # The VGG16 backbone is random on purpose: the ImageNet weights cannot be downloaded offline, and these
    # tests need a fixed differentiable LPIPS network, not meaningful distances. (fp64 is also faster than
    # fp32 on this CPU: oneDNN re-packs VGG's large fp32 weights on every call.)
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="RANDOM"):
        model = load_lpips(None, random_backbone=True)
    return model.to(F64)


def flat(t: torch.Tensor) -> list[float]:
    return t.detach().flatten().tolist()


# ------------------------------------------------------------------------------------------------------------
# 1. each term against a plain hand-written reference


@pytest.mark.parametrize("kind", ["l1", "l2"])
def test_pixel_loss_matches_reference(kind: str) -> None:
    torch.manual_seed(0)
    x, y = torch.randn(2, 3, 4, 5, dtype=F64), torch.randn(2, 3, 4, 5, dtype=F64)
    ref = [abs(a - b) if kind == "l1" else (a - b) ** 2 for a, b in zip(flat(x), flat(y))]
    out = pixel_loss(x, y, kind)
    assert out.shape == x.shape
    assert flat(out) == pytest.approx(ref, rel=1e-12)


def test_pixel_loss_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match="l1"):
        pixel_loss(torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1), "huber")  # type: ignore[arg-type]


def test_nll_loss_matches_reference_with_nonzero_logvar() -> None:
    torch.manual_seed(0)
    rec = torch.rand(3, 2, 4, 4, dtype=F64)
    s = 0.7
    # Σ over every element of (rec / e^s + s), divided by the batch size only
    ref = sum(r / math.exp(s) + s for r in flat(rec)) / 3
    assert nll_loss(rec, torch.tensor(s, dtype=F64)).item() == pytest.approx(ref, rel=1e-12)


def test_gan_losses_match_reference() -> None:
    torch.manual_seed(0)
    real, fake = torch.randn(2, 1, 3, 3, dtype=F64) * 2, torch.randn(2, 1, 3, 3, dtype=F64) * 2
    r, f = flat(real), flat(fake)
    hinge = 0.5 * (sum(max(0.0, 1 - v) for v in r) / len(r) + sum(max(0.0, 1 + v) for v in f) / len(f))
    softplus_real = sum(math.log1p(math.exp(-v)) for v in r) / len(r)
    softplus_fake = sum(math.log1p(math.exp(v)) for v in f) / len(f)
    vanilla = 0.5 * (softplus_real + softplus_fake)
    assert hinge_d_loss(real, fake).item() == pytest.approx(hinge, rel=1e-12)
    assert vanilla_d_loss(real, fake).item() == pytest.approx(vanilla, rel=1e-12)
    assert generator_adv_loss(fake).item() == pytest.approx(-sum(f) / len(f), rel=1e-12)


def test_adopt_weight_before_at_after_threshold() -> None:
    assert adopt_weight(0.7, 9, 10) == 0.0
    assert adopt_weight(0.7, 10, 10) == 0.7
    assert adopt_weight(0.7, 11, 10) == 0.7


def test_adaptive_weight_formula_clamps_and_scaling() -> None:
    nll_grad = torch.tensor([3.0, 4.0], dtype=F64, requires_grad=True)  # norm 5
    g_grad = torch.tensor([0.0, 2.0], dtype=F64, requires_grad=True)  # norm 2
    lam = adaptive_weight(nll_grad, g_grad, 0.5)
    assert lam.item() == pytest.approx(5 / (2 + 1e-4) * 0.5, rel=1e-12)
    assert not lam.requires_grad  # λ is a constant for the backward
    assert adaptive_weight(nll_grad, g_grad, 2.0).item() == pytest.approx(4 * lam.item(), rel=1e-12)
    # upper clamp: ‖∇g‖ = 0 gives 5 / 1e-4 = 5e4, clamped to 1e4 before disc_weight
    assert adaptive_weight(nll_grad, torch.zeros(2, dtype=F64), 0.5).item() == pytest.approx(1e4 * 0.5)
    # lower end: no reconstruction gradient gives exactly 0
    assert adaptive_weight(torch.zeros(2, dtype=F64), g_grad, 0.5).item() == 0.0


# ------------------------------------------------------------------------------------------------------------
# 2. conv_weight_grad against autograd


@pytest.mark.parametrize(
    "stride, padding, dilation, size",
    [(1, 1, 1, 8), (2, 1, 1, 9), (2, 0, 2, 11)],
    ids=["s1p1", "s2p1", "s2p0d2"],
)
def test_conv_weight_grad_matches_autograd(stride: int, padding: int, dilation: int, size: int) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 3, 3, stride=stride, padding=padding, dilation=dilation).to(F64)
    h = torch.randn(2, 5, size, size, dtype=F64)
    out = conv(h)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    torch.testing.assert_close(conv_weight_grad(h, grad_out, conv), conv.weight.grad, rtol=1e-10, atol=1e-12)


def test_conv_weight_grad_computes_low_precision_inputs_in_fp32() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 2, 3, padding=1)
    h, grad_out = torch.randn(1, 4, 6, 6), torch.randn(1, 2, 6, 6)
    out = conv_weight_grad(h.bfloat16(), grad_out.bfloat16(), conv)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, conv_weight_grad(h.bfloat16().float(), grad_out.bfloat16().float(), conv))


# ------------------------------------------------------------------------------------------------------------
# 3. generator_grads + one backward == LDM's double backward


def tiny_cfg(**changes) -> LossConfig:
    """A PatchGAN small enough for 16x16 images: 16 -> 8 -> 4 -> 3 -> 2 logits."""
    return LossConfig(**{"disc_num_layers": 2, "disc_ndf": 8, **changes})


def tiny_vae64() -> AutoencoderKL:
    """A 2-level AutoencoderKL in float64: 4x8x8 latents decode to 3x16x16 images."""
    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    ).to(F64)


def decode(vae: AutoencoderKL, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x_rec and h, the input of decoder.conv_out, captured with a forward hook."""
    captured = {}
    handle = vae.decoder.conv_out.register_forward_hook(lambda m, args, out: captured.update(h=args[0]))
    x_rec = vae.decode(z).sample
    handle.remove()
    return x_rec, captured["h"]


def decoder_grads(vae: AutoencoderKL) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in vae.decoder.named_parameters() if p.grad is not None}
    vae.zero_grad(set_to_none=True)
    return grads


CASES = {
    # id: pixel_loss, GAN on, learn_logvar, perceptual_weight, loss_scale, disc_norm
    "l1-gan-lpips": ("l1", True, False, 1.0, 1.0, "batch"),
    "l2-gan-lpips-logvar-scaled": ("l2", True, True, 1.0, 512.0, "group"),
    "l1-gan-logvar": ("l1", True, True, 0.0, 1.0, "batch"),
    "l1-off-logvar": ("l1", False, True, 0.0, 1.0, "batch"),
    "l2-off": ("l2", False, False, 0.0, 1.0, "batch"),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_generator_grads_equal_ldm_double_backward(case: tuple, lpips64: nn.Module) -> None:
    pixel, gan_on, learn_logvar, perceptual_weight, loss_scale, disc_norm = case
    cfg = tiny_cfg(
        pixel_loss=pixel,
        perceptual_weight=perceptual_weight,
        disc_start_step=5,
        disc_weight=0.5,
        disc_norm=disc_norm,
    )
    step = 5 if gan_on else 4  # on exactly at disc_start_step, off one step before
    vae = tiny_vae64()
    # D must not be needed while the GAN term is off
    disc = build_discriminator(cfg, 3).to(F64) if gan_on else None
    lp = lpips64 if perceptual_weight > 0 else None
    z = torch.randn(2, 4, 8, 8, dtype=F64)
    x = torch.rand(2, 3, 16, 16, dtype=F64) * 2 - 1

    # fast path: one backward through the decoder
    logvar = torch.tensor(0.3, dtype=F64, requires_grad=learn_logvar)
    x_rec, h = decode(vae, z)
    conv_out = vae.decoder.conv_out
    out = generator_grads(x, x_rec, h, conv_out, lp, disc, logvar, cfg, step, loss_scale=loss_scale)
    x_rec.backward(out.grad_output)
    fast = decoder_grads(vae)

    # LDM reference: λ from autograd on conv_out.weight, then backward of the whole loss
    logvar_ref = torch.tensor(0.3, dtype=F64, requires_grad=learn_logvar)
    x_rec, _ = decode(vae, z)
    loss, ref_logs = ldm_generator_loss(x, x_rec, conv_out.weight, lp, disc, logvar_ref, cfg, step)
    loss.backward()
    ref = decoder_grads(vae)

    assert fast.keys() == ref.keys() and len(ref) > 10
    for name in ref:
        torch.testing.assert_close(fast[name], ref[name], rtol=1e-9, atol=1e-12, msg=name)
    assert out.logs.keys() == ref_logs.keys()
    for key, value in ref_logs.items():
        assert out.logs[key] == pytest.approx(value, rel=1e-9), key
    lam = out.logs["loss/d_weight"]
    if gan_on:
        assert 1.0 < lam < 1e4 * cfg.disc_weight  # λ matters and is not clamped
        assert out.logs["loss/total"] != pytest.approx(out.logs["loss/nll"])
    else:
        assert lam == 0.0 and out.logs["loss/disc_factor"] == 0.0
    if learn_logvar:
        torch.testing.assert_close(out.logvar_grad, logvar_ref.grad, rtol=1e-9, atol=1e-12)
    else:
        assert out.logvar_grad is None


def test_surrogate_loss_backward_equals_reference() -> None:
    cfg = tiny_cfg(perceptual_weight=0.0, disc_start_step=0, disc_norm="group")
    vae, disc = tiny_vae64(), build_discriminator(cfg, 3).to(F64)
    z, x = torch.randn(2, 4, 8, 8, dtype=F64), torch.rand(2, 3, 16, 16, dtype=F64) * 2 - 1
    logvar = torch.tensor(-0.2, dtype=F64, requires_grad=True)
    x_rec, h = decode(vae, z)
    out = generator_grads(x, x_rec, h, vae.decoder.conv_out, None, disc, logvar, cfg, step=0)
    surrogate_loss(x_rec, out, logvar).backward()
    fast, fast_logvar = decoder_grads(vae), logvar.grad.clone()
    logvar.grad = None
    x_rec, _ = decode(vae, z)
    ldm_generator_loss(x, x_rec, vae.decoder.conv_out.weight, None, disc, logvar, cfg, step=0)[0].backward()
    for name, grad in decoder_grads(vae).items():
        torch.testing.assert_close(fast[name], grad, rtol=1e-9, atol=1e-12, msg=name)
    torch.testing.assert_close(fast_logvar, logvar.grad, rtol=1e-9, atol=1e-12)


def test_generator_grads_needs_lpips_and_disc_when_their_terms_are_on() -> None:
    vae = tiny_vae64()
    z, x = torch.randn(1, 4, 8, 8, dtype=F64), torch.rand(1, 3, 16, 16, dtype=F64)
    x_rec, h = decode(vae, z)
    logvar = torch.zeros((), dtype=F64)
    with pytest.raises(ValueError, match="LPIPS"):
        generator_grads(x, x_rec, h, vae.decoder.conv_out, None, None, logvar, LossConfig(), 0)
    with pytest.raises(ValueError, match="disc is None"):
        cfg = LossConfig(perceptual_weight=0.0, disc_start_step=0)
        generator_grads(x, x_rec, h, vae.decoder.conv_out, None, None, logvar, cfg, 0)


# ------------------------------------------------------------------------------------------------------------
# 4. gradient isolation between decoder and discriminator


@pytest.mark.parametrize("kind", ["hinge", "vanilla"])
def test_discriminator_loss_does_not_reach_decoder(kind: str) -> None:
    cfg = tiny_cfg(disc_loss=kind, disc_start_step=3, disc_factor=0.8)
    vae, disc = tiny_vae64(), build_discriminator(cfg, 3).to(F64)
    z, x = torch.randn(2, 4, 8, 8, dtype=F64), torch.rand(2, 3, 16, 16, dtype=F64) * 2 - 1
    x_rec, _ = decode(vae, z)
    loss, logs = discriminator_loss(disc, x, x_rec, cfg, step=3)
    loss.backward()
    assert all(p.grad is None for p in vae.parameters())
    assert all(p.grad is not None for p in disc.parameters())
    disc.eval()  # fixed BatchNorm statistics, so a second call reproduces the logits
    d_ref = (hinge_d_loss if kind == "hinge" else vanilla_d_loss)(disc(x), disc(x_rec.detach()))
    loss_eval, _ = discriminator_loss(disc, x, x_rec, cfg, step=3)
    assert loss_eval.item() == pytest.approx(0.8 * d_ref.item(), rel=1e-12)
    assert set(logs) == {"disc/loss", "disc/logits_real", "disc/logits_fake"}
    assert discriminator_loss(disc, x, x_rec, cfg, step=2)[0].item() == 0.0  # before disc_start_step


def test_generator_grads_leaves_disc_grads_none() -> None:
    cfg = tiny_cfg(perceptual_weight=0.0, disc_start_step=0)
    vae, disc = tiny_vae64(), build_discriminator(cfg, 3).to(F64)
    z, x = torch.randn(2, 4, 8, 8, dtype=F64), torch.rand(2, 3, 16, 16, dtype=F64) * 2 - 1
    x_rec, h = decode(vae, z)
    out = generator_grads(x, x_rec, h, vae.decoder.conv_out, None, disc, torch.zeros((), dtype=F64), cfg, 0)
    assert out.logs["loss/d_weight"] > 0
    assert all(p.requires_grad and p.grad is None for p in disc.parameters())
    assert all(p.grad is None for p in vae.parameters())  # and nothing reached the decoder yet either
    x_rec.backward(out.grad_output)
    assert all(p.grad is None for p in disc.parameters())


# ------------------------------------------------------------------------------------------------------------
# 5. LPIPS on any channel count


def test_perceptual_distance_rgb_plus_depth(lpips64: nn.Module) -> None:
    torch.manual_seed(0)
    x, y = torch.rand(2, 4, 16, 16, dtype=F64) * 2 - 1, torch.rand(2, 4, 16, 16, dtype=F64) * 2 - 1
    rgb = lpips64(x[:, :3], y[:, :3])  # (B, 1, 1, 1)
    depth = lpips64(x[:, 3:].repeat(1, 3, 1, 1), y[:, 3:].repeat(1, 3, 1, 1))
    out = perceptual_distance(lpips64, x, y)
    assert out.shape == (2, 1, 1, 1)
    exact = {"rtol": 1e-10, "atol": 1e-12}
    torch.testing.assert_close(out, rgb + depth, **exact)
    torch.testing.assert_close(perceptual_distance(lpips64, x[:, :3], y[:, :3]), rgb, **exact)
    torch.testing.assert_close(
        perceptual_distance(lpips64, x[:, 3:], y[:, 3:]), depth, **exact
    )  # grey: C == 1


# ------------------------------------------------------------------------------------------------------------
# LPIPS weights, offline


def test_load_lpips_maps_a_local_vgg16_file(tmp_path) -> None:
    with torch.device(
        "meta"
    ):  # skip the slow random init of VGG's 120M-parameter classifier, unused by LPIPS
        vgg = torchvision.models.vgg16(weights=None)
    vgg = vgg.to_empty(device="cpu")
    torch.manual_seed(1)
    for layer in vgg.features:
        if isinstance(layer, nn.Conv2d):
            layer.reset_parameters()
    for p in vgg.classifier.parameters():
        p.data.zero_()
    # vgg now has exactly the keys and shapes of vgg16-397923af.pth, with random conv weights
    path = tmp_path / VGG16_FILE
    torch.save(vgg.state_dict(), path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "RANDOM backbone" warning, nor torchvision's deprecation noise
        model = load_lpips(str(path))
    filled = 0
    for k, indices in VGG_SLICES.items():
        block = getattr(model.net, f"slice{k}")
        for i in indices:
            for name, p in getattr(
                block, str(i)
            ).named_parameters():  # lpips keeps torchvision's index as name
                torch.testing.assert_close(p, getattr(vgg.features[i], name), rtol=0, atol=0)
                filled += 1
    assert filled == 26  # VGG16's 13 conv layers up to features.28, weight and bias each
    assert not model.training and not any(p.requires_grad for p in model.parameters())


@pytest.mark.filterwarnings("ignore:LPIPS is using a RANDOM")
def test_building_lpips_leaves_the_global_rng_alone() -> None:
    """Else whether LPIPS is built (validation only, when weights are present) would change the PatchGAN's
    init."""
    torch.manual_seed(0)
    state = torch.get_rng_state()
    load_lpips(None, random_backbone=True)
    assert torch.equal(torch.get_rng_state(), state)


def test_load_lpips_missing_file_says_what_to_do(tmp_path, monkeypatch) -> None:
    missing = str(tmp_path / "nowhere" / VGG16_FILE)
    with pytest.raises(LPIPSWeightsMissing) as err:
        load_lpips(missing)
    message = str(err.value)
    for needle in (missing, "lpips_vgg_weights", "perceptual_weight=0", "IMAGENET1K_V1", "TORCH_HOME"):
        assert needle in message
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(
        LPIPSWeightsMissing, match=os.path.join("torch_home", "hub", "checkpoints", VGG16_FILE)
    ):
        load_lpips(None)


def test_load_lpips_rejects_a_wrong_file(tmp_path) -> None:
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(ValueError, match="not torchvision's VGG16 state dict.*conv1.weight"):
        load_lpips(str(path))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="could not be read"):
        load_lpips(str(garbage))


def test_vgg_slice_state_reports_missing_keys_and_shape_mismatch() -> None:
    # lpips's slice keys -> torchvision's features keys; e.g. a VGG11 or VGG16-BN file gets this far
    target = {"slice1.0.weight": torch.zeros(64, 3, 3, 3), "slice1.0.bias": torch.zeros(64)}
    features = {"features.0.weight": torch.zeros(64, 1, 3, 3)}
    with pytest.raises(ValueError, match=r"f.pth is not torchvision's VGG16.*missing features.0.bias"):
        vgg_slice_state(features, target, "f.pth")
    features["features.0.bias"] = torch.ones(64)
    with pytest.raises(
        ValueError, match=r"features.0.weight has shape \(64, 1, 3, 3\), expected \(64, 3, 3, 3\)"
    ):
        vgg_slice_state(features, target, "f.pth")
    features["features.0.weight"] = torch.ones(64, 3, 3, 3)
    assert vgg_slice_state(features, target, "f.pth")["slice1.0.weight"].sum() == 64 * 27


# ------------------------------------------------------------------------------------------------------------
# 6. the PatchGAN


def test_discriminator_shapes() -> None:
    torch.manual_seed(0)
    disc = NLayerDiscriminator(in_channels=3, ndf=8, n_layers=3)  # width does not change the output size
    with torch.no_grad():
        assert disc(torch.randn(2, 3, 256, 256)).shape == (2, 1, 30, 30)  # LDM's 30x30 patches
        rgbd = build_discriminator(LossConfig(disc_ndf=8), in_channels=4)
        assert rgbd(torch.randn(1, 4, 64, 64)).shape == (1, 1, 6, 6)


def test_discriminator_group_norm_trains_at_batch_one() -> None:
    torch.manual_seed(0)
    disc = NLayerDiscriminator(in_channels=3, ndf=16, n_layers=3, norm="group").train()
    out = disc(torch.randn(1, 3, 32, 32))  # 2x2 logits: BatchNorm's last layer would see only 4 values
    out.mean().backward()
    assert out.shape == (1, 1, 2, 2) and torch.isfinite(out).all()
    assert [m.num_groups for m in disc.modules() if isinstance(m, nn.GroupNorm)] == [32, 32, 32]
    assert (group_count(8), group_count(48), group_count(7)) == (8, 24, 7)


def test_discriminator_parameter_count_and_keys_match_taming() -> None:
    disc = NLayerDiscriminator()  # in_channels=3, ndf=64, n_layers=3, BatchNorm: LDM's default
    # By hand, kernel 4x4 = 16 taps; BatchNorm'd convs have no bias; each BatchNorm has weight and bias:
    #   3->64 (+bias)        3*64*16 + 64    =     3,136
    #   64->128 + BN(128)    64*128*16 + 256 =   131,328
    #   128->256 + BN(256)   128*256*16 + 512 =  524,800
    #   256->512 + BN(512)   256*512*16 + 1024 = 2,098,176
    #   512->1 (+bias)       512*16 + 1      =     8,193
    #                                     total 2,765,633
    # (2,764,737 would be short by 896 = 128 + 256 + 512: one BatchNorm vector per layer left out.)
    assert sum(p.numel() for p in disc.parameters()) == 2_765_633
    keys = {
        k for k in disc.state_dict() if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
    }
    assert keys == {
        "main.0.weight", "main.0.bias", "main.2.weight", "main.3.weight", "main.3.bias", "main.5.weight",
        "main.6.weight", "main.6.bias", "main.8.weight", "main.9.weight", "main.9.bias", "main.11.weight",
        "main.11.bias",
    }  # fmt: skip
    # LDM weights_init: conv weights N(0, 0.02), norm weights N(1, 0.02), norm biases 0
    assert disc.main[8].weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert disc.main[9].weight.mean().item() == pytest.approx(1.0, abs=0.01)
    assert disc.main[9].bias.abs().sum().item() == 0.0
    no_norm = NLayerDiscriminator(norm="none")
    assert no_norm.main[2].bias is not None  # a conv bias wherever the norm is not BatchNorm (taming)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in no_norm.modules())
