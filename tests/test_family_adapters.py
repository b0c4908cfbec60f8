"""The VAE family adapters (vaedec/families.py), each on a tiny random model of its class saved with
save_pretrained: the class is detected from the folder, encode stores what the class's own encode gives,
gradients reach only the trainable decoder (for the causal 3-D classes not the temporal kernel slices one
frame never reaches), the loss path sees the unclamped output, λ's last-layer gradient is autograd's, and the
export loads with the class's own from_pretrained with the encoder (and FLUX.2's bn) bit-identical."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import assert_same_tensors
from safetensors.torch import save_file

from vaedec.families import (
    FAMILIES,
    FamilyDecoder,
    FamilyError,
    Normalisation,
    WanFamily,
    build_tiny,
    denormalise,
    family_of,
    load,
    manifest_family,
    manifest_normalisation,
    normalise,
    patchify,
    raw_noise_std,
    unpatchify,
    vae_class_name,
)

warnings.filterwarnings("ignore", message=".*torch.utils._pytree.*")

# (class name, variant): every family once, and Wan 2.2's layout (patches, residual blocks) as its own case.
CASES = [(name, "") for name in FAMILIES] + [("AutoencoderKLWan", "2.2")]
IDS = [f"{n}{'-' + v if v else ''}" for n, v in CASES]
CAUSAL_3D = [c for c in CASES if FAMILIES[c[0]].latent_rank == 5]
IDS_3D = [f"{n}{'-' + v if v else ''}" for n, v in CAUSAL_3D]
RES = 16  # pixels; the tiny models downsample by 2 (Wan 2.2's by 8)


def tiny(name: str, variant: str = "", seed: int = 0) -> torch.nn.Module:
    if variant == "2.2":
        return build_tiny(name, seed, **WanFamily().tiny_config_22())
    return build_tiny(name, seed)


def pixels(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, RES, RES, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def latent_of(family, vae, x: torch.Tensor) -> torch.Tensor:
    """z the decoder takes: the stored latent, or the mean of the stored moments."""
    stored = family.encode(vae, x)
    return stored[:, : family.channels(vae)[2]] if family.store == "moments" else stored


def encoder_state(family, vae) -> dict[str, torch.Tensor]:
    return {
        f"{p}.{k}": v.clone() for p, m in family.encoder_parts(vae).items() for k, v in m.state_dict().items()
    }


def decoder_state(family, vae) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in vae.state_dict().items() if k.startswith(family.decoder_prefixes)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[tuple[str, str], Path]:
    """Every case saved as a diffusers folder once."""
    root = tmp_path_factory.mktemp("families")
    out = {}
    for name, variant in CASES:
        path = root / f"{name}{variant}"
        tiny(name, variant).save_pretrained(path)
        out[(name, variant)] = path
    return out


# ------------------------------------------------------------------------------------------------------------
# loading


@pytest.mark.parametrize(("name", "variant"), CASES, ids=IDS)
def test_class_detected_from_a_saved_folder(saved, tmp_path, name, variant):
    family, vae = load(str(saved[(name, variant)]))
    assert family.class_name == name and type(vae).__name__ == name
    assert all(p.dtype == torch.float32 for p in vae.parameters())
    assert_same_tensors(vae.state_dict(), tiny(name, variant).state_dict(), "loaded weights")
    # A pipeline folder: the VAE in vae/, found without --subfolder.
    pipeline = tmp_path / "pipeline"
    (pipeline / "vae").mkdir(parents=True)
    for f in saved[(name, variant)].iterdir():
        (pipeline / "vae" / f.name).write_bytes(f.read_bytes())
    assert vae_class_name(str(pipeline)) == name
    assert load(str(pipeline))[0].class_name == name


def test_unknown_class_is_refused_by_name(tmp_path):
    folder = tmp_path / "vq"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "VQModel", "in_channels": 3}))
    with pytest.raises(FamilyError) as e:
        load(str(folder))
    msg = str(e.value)
    assert "VQModel" in msg and str(folder) in msg
    for name in FAMILIES:
        assert name in msg
    with pytest.raises(FamilyError, match="AutoencoderRAE .*transformers"):
        family_of("AutoencoderRAE")
    # Shards whose manifest names an unknown family are refused the same way.
    with pytest.raises(FamilyError, match="AutoencoderKLCosmos"):
        manifest_family({"family": "AutoencoderKLCosmos"})


def test_a_config_without_class_name_is_autoencoderkl(tmp_path, saved):
    """Hand-made AutoencoderKL folders without `_class_name` keep loading as before."""
    folder = tmp_path / "kl"
    folder.mkdir()
    config = json.loads((saved[("AutoencoderKL", "")] / "config.json").read_text())
    del config["_class_name"]
    (folder / "config.json").write_text(json.dumps(config))
    assert vae_class_name(str(folder)) == "AutoencoderKL"


@pytest.mark.parametrize(
    "name", ["AutoencoderKLQwenImage", "AutoencoderKLFlux2", "AutoencoderKLHunyuanImage"]
)
def test_single_file_refused_where_diffusers_has_no_layout(tmp_path, name):
    path = tmp_path / "vae.safetensors"
    save_file({k: v.contiguous() for k, v in tiny(name).state_dict().items()}, str(path))
    with pytest.raises(FamilyError, match=f"no single-file layout for {name}"):
        load(str(path), class_name=name)


def test_a_single_wan_file_needs_a_config(tmp_path, saved):
    path = tmp_path / "wan.safetensors"
    save_file({"x": torch.zeros(1)}, str(path))
    with pytest.raises(FamilyError, match="does not say its architecture"):
        load(str(path), class_name="AutoencoderKLWan")
    # With a config folder its class is the config's, and diffusers' from_single_file reads it (here: refuses
    # a file that is no Wan checkpoint, with our message around diffusers').
    with pytest.raises(FamilyError, match="could not load .*wan.safetensors as a AutoencoderKLWan"):
        load(str(path), config=str(saved[("AutoencoderKLWan", "")]))


def test_scaling_factor_override_only_where_there_is_one(saved):
    for name in ("AutoencoderKL", "AutoencoderDC", "AutoencoderTiny", "AutoencoderKLHunyuanImage"):
        family, vae = load(str(saved[(name, "")]), scaling_factor=0.5)
        assert family.normalisation(vae).scaling_factor == 0.5
    for name in ("AutoencoderKLFlux2", "AutoencoderKLQwenImage", "AutoencoderKLWan"):
        with pytest.raises(FamilyError, match="--scaling-factor"):
            load(str(saved[(name, "")]), scaling_factor=0.5)


# ------------------------------------------------------------------------------------------------------------
# encode


@pytest.mark.parametrize(("name", "variant"), CASES, ids=IDS)
def test_encode_stores_what_the_class_encodes(name, variant):
    family, vae = FAMILIES[name], tiny(name, variant).eval()
    x = pixels()
    stored = family.encode(vae, x)
    f = family.downsample_factor(vae)
    assert stored.dtype == torch.float32
    assert stored.shape == (2, family.stored_channels(vae), RES // f, RES // f)
    with torch.no_grad():
        out = vae.encode(x.unsqueeze(2) if family.latent_rank == 5 else x)
    if family.store == "moments":
        dist = out.latent_dist  # diffusers' DiagonalGaussianDistribution: logvar clamped to [-30, 20]
        ref = torch.cat([dist.mean, dist.logvar], dim=1)
    else:
        ref = out.latent if hasattr(out, "latent") else out.latents
    assert torch.equal(stored, (ref.squeeze(2) if family.latent_rank == 5 else ref).float())


def test_the_autoencoderkl_adapter_is_vaedecs_own_path():
    from vaedec.latents import encode_moments
    from vaedec.vae import TrainableDecoder, encoder_fingerprint, vae_summary

    family, vae = FAMILIES["AutoencoderKL"], tiny("AutoencoderKL").eval()
    x = pixels()
    assert torch.equal(family.encode(vae, x), encode_moments(vae, x))
    assert family.fingerprint(vae) == encoder_fingerprint(vae)
    assert family.summary(vae) == vae_summary(vae)  # version-1 manifest fields, nothing added
    assert type(family.trainable_decoder(vae)) is TrainableDecoder


def test_qwen_image_and_wan_21_share_a_latent_space():
    """Qwen-Image's VAE is Wan 2.1's with another decoder: same names, so one fingerprint for one encoder."""
    qwen, wan = tiny("AutoencoderKLQwenImage"), tiny("AutoencoderKLWan", seed=1)
    wan.load_state_dict(qwen.state_dict())
    assert FAMILIES["AutoencoderKLQwenImage"].fingerprint(qwen) == FAMILIES["AutoencoderKLWan"].fingerprint(
        wan
    )
    assert FAMILIES["AutoencoderKLWan"].fingerprint(tiny("AutoencoderKLWan", seed=1)) != (
        FAMILIES["AutoencoderKLWan"].fingerprint(wan)
    )


def test_flux2_fingerprint_covers_bn():
    family, vae = FAMILIES["AutoencoderKLFlux2"], tiny("AutoencoderKLFlux2")
    before = family.fingerprint(vae)
    vae.bn.running_var[0] += 1  # another whitening = another latent space for the diffusion model
    assert family.fingerprint(vae) != before


# ------------------------------------------------------------------------------------------------------------
# the trainable decoder


@pytest.mark.parametrize(("name", "variant"), CASES, ids=IDS)
def test_decoder_grads_reach_only_the_decoder(name, variant):
    family, vae = FAMILIES[name], tiny(name, variant)
    z = latent_of(family, vae.eval(), pixels())
    decoder = family.trainable_decoder(vae).train()
    x_rec, h = decoder(z)
    assert x_rec.shape == (2, 3, RES, RES) and h is not None
    assert torch.allclose(
        x_rec.clamp(-1, 1) if family.latent_rank == 5 else x_rec, family.decode(vae, z), atol=1e-5
    )
    x_rec.square().mean().backward()
    for prefix, module in family.encoder_parts(vae).items():
        assert all(p.grad is None for p in module.parameters()), f"{prefix} got a gradient"
    unreached = getattr(decoder, "unreached", {})
    for n, p in decoder.named_parameters():
        if p.requires_grad:
            grad = p.grad.clone()
            if n in unreached:
                grad[unreached[n]] = 1.0  # checked in the 3-D test
            assert torch.count_nonzero(grad) > 0, f"{n} got no gradient"
    trained = {n for n, p in decoder.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith(family.decoder_prefixes) for n in trained)


@pytest.mark.parametrize(("name", "variant"), CAUSAL_3D, ids=IDS_3D)
def test_temporal_slices_an_image_never_reaches_get_no_gradient(name, variant):
    family, vae = FAMILIES[name], tiny(name, variant)
    original = decoder_state(family, vae)
    z = latent_of(family, vae.eval(), pixels())
    decoder = family.trainable_decoder(vae).train()
    assert decoder.unreached, "no causal 3-D kernel found"
    frozen = [n for n, p in decoder.named_parameters() if not p.requires_grad]
    assert frozen and all(".time_conv." in n for n in frozen)  # temporal upsamplers never run for one frame
    opt = torch.optim.Adam([p for p in decoder.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        x_rec, _ = decoder(z)
        x_rec.square().mean().backward()
        for n, idx in decoder.unreached.items():
            grad = decoder.get_parameter(n).grad
            assert torch.count_nonzero(grad[idx]) == 0, f"{n}: an unreached slice got a gradient"
            last = grad[:, :, -1]  # the slice that sees the frame
            assert torch.count_nonzero(last) > 0, f"{n}: the reached slice got no gradient"
        opt.step()
    after = decoder_state(family, vae)
    for n, idx in decoder.unreached.items():
        assert torch.equal(after[n][idx], original[n][idx]), f"{n}: an unreached slice changed"
        assert not torch.equal(after[n], original[n]), f"{n}: did not train at all"
    for n in frozen:
        assert torch.equal(after[n], original[n])


@pytest.mark.parametrize(("name", "variant"), CAUSAL_3D, ids=IDS_3D)
def test_the_loss_sees_the_unclamped_output(name, variant):
    family, vae = FAMILIES[name], tiny(name, variant)
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(20)  # outputs well outside [-1, 1]
    z = latent_of(family, vae.eval(), pixels())
    decoder = family.trainable_decoder(vae).train()
    x_rec, _ = decoder(z)
    clamped = family.decode(vae, z)  # what the class's decode (and a pipeline) gives
    outside = x_rec.detach().abs() > 1
    assert outside.float().mean() > 0.1 and clamped.abs().max() <= 1
    assert torch.allclose(x_rec.detach().clamp(-1, 1), clamped, atol=1e-5)
    # A loss on pixels beyond the clamp still moves the decoder: through clamp() their gradient would be zero.
    (x_rec[outside].abs().sum()).backward()
    assert decoder.decoder.conv_out.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(("name", "variant"), CASES, ids=IDS)
def test_last_layer_gradient_is_autograds(name, variant):
    """λ's ∇W of the last layer from its input h and ∇_x̂, as autograd gives it through the whole decoder."""
    from vaedec.losses import conv_weight_grad

    family, vae = FAMILIES[name], tiny(name, variant)
    z = latent_of(family, vae.eval(), pixels())
    decoder = family.trainable_decoder(vae)
    x_rec, h = decoder(z)
    g = torch.randn_like(x_rec)
    (expected,) = torch.autograd.grad((x_rec * g).sum(), decoder.conv_out.weight)
    if isinstance(decoder, FamilyDecoder):
        got = decoder.last_weight_grad(h, g)
    else:  # AutoencoderKL and FLUX.2: vaedec's TrainableDecoder and conv_weight_grad
        got = conv_weight_grad(h, g, decoder.conv_out)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    assert (
        decoder.out_channels == 3
        if isinstance(decoder, FamilyDecoder)
        else decoder.conv_out.out_channels == 3
    )


@pytest.mark.parametrize(("name", "variant"), CASES, ids=IDS)
def test_trainable_names_are_what_the_decoder_trains(name, variant):
    """What a checkpoint must hold (export and eval check it) is what the trainable decoder trains."""
    family, vae = FAMILIES[name], tiny(name, variant)
    names = family.trainable_names(vae, True, ())
    decoder = family.trainable_decoder(vae)
    assert names == [n for n, p in decoder.named_parameters() if p.requires_grad]
    last = next(
        n for n, m in decoder.named_modules() if m is decoder.conv_out
    )  # decoder.conv_out, decoder.layers.6
    only = family.trainable_names(vae, False, (f"{last}.*",))
    assert only == [f"{last}.{n}" for n, _ in decoder.conv_out.named_parameters()]
    if family.latent_rank == 5:
        assert not any(".time_conv." in n for n in names)
        assert any(".time_conv." in n for n, _ in vae.named_parameters() if n.startswith("decoder."))


def test_batchnorm_in_a_dc_ae_decoder_stays_in_eval_mode():
    family, vae = FAMILIES["AutoencoderDC"], tiny("AutoencoderDC")
    z = latent_of(family, vae.eval(), pixels())
    decoder = family.trainable_decoder(vae).train()
    bns = [m for m in decoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and decoder.eval_module_names
    stats = [(m.running_mean.clone(), m.running_var.clone()) for m in bns]
    decoder(z)[0].mean().backward()
    assert decoder.training and not any(m.training for m in bns)
    for m, (mean, var) in zip(bns, stats):
        assert torch.equal(m.running_mean, mean) and torch.equal(m.running_var, var)
        assert m.weight.grad is not None  # its affine weights still train


def test_gradient_checkpointing_where_the_class_has_it():
    for name in ("AutoencoderKLQwenImage", "AutoencoderKLWan", "AutoencoderDC", "AutoencoderKLHunyuanImage"):
        with pytest.raises(FamilyError, match=f"{name} does not support gradient checkpointing"):
            FAMILIES[name].gradient_checkpointing(tiny(name))
    for name in ("AutoencoderKLFlux2", "AutoencoderTiny"):
        family, vae = FAMILIES[name], tiny(name)
        z = latent_of(family, vae.eval(), pixels())
        plain = family.trainable_decoder(vae)(z)[0]
        family.gradient_checkpointing(vae)
        with_ckpt = family.trainable_decoder(vae).train()(z)[0]
        torch.testing.assert_close(with_ckpt, plain)
        assert family.encode(vae, pixels()).shape[0] == 2  # the encoder still maps [-1, 1] itself


# ------------------------------------------------------------------------------------------------------------
# normalisation


def test_flux2_normalisation_is_the_pipelines_bn_whitening():
    family, vae = FAMILIES["AutoencoderKLFlux2"], tiny("AutoencoderKLFlux2")
    with torch.no_grad():  # running statistics as a trained FLUX.2 VAE has them
        vae.bn.running_mean.copy_(torch.linspace(-1, 1, vae.bn.num_features))
        vae.bn.running_var.copy_(torch.linspace(0.5, 3, vae.bn.num_features))
    norm = family.normalisation(vae)
    assert norm.kind == "patched_batch_norm" and norm.patch_size == 2 and len(norm.mean) == 4 * 8
    z = torch.randn(2, 8, 8, 8)
    with (
        torch.no_grad()
    ):  # Flux2Pipeline: patchify, then (z - running_mean) / sqrt(running_var + eps) = bn in eval
        expected = unpatchify(vae.bn.eval()(patchify(z, 2)), 2)
    torch.testing.assert_close(normalise(z, norm), expected)
    torch.testing.assert_close(denormalise(normalise(z, norm), norm), z)
    assert Normalisation.from_dict(json.loads(json.dumps(norm.as_dict()))) == norm


@pytest.mark.parametrize("name", ["AutoencoderKL", "AutoencoderKLFlux2", "AutoencoderKLQwenImage"])
def test_raw_noise_std_is_diffusion_noise_in_raw_units(name):
    family, vae = FAMILIES[name], tiny(name)
    if name == "AutoencoderKLFlux2":
        with torch.no_grad():
            vae.bn.running_var.copy_(torch.linspace(0.5, 3, vae.bn.num_features))
    else:
        vae.register_to_config(scaling_factor=0.5, shift_factor=0.1) if name == "AutoencoderKL" else None
    norm = family.normalisation(vae)
    c = family.channels(vae)[2]
    z, eps = torch.randn(1, c, 8, 8), torch.randn(1, c, 8, 8)
    noisy = denormalise(normalise(z, norm) + 0.1 * eps, norm)  # noise added where the diffusion model works
    torch.testing.assert_close(noisy - z, raw_noise_std(norm, 0.1, (c, 8, 8)) * eps, rtol=1e-4, atol=1e-5)


def test_manifests_from_before_families_are_autoencoderkl():
    info = {"scaling_factor": 0.18215, "shift_factor": None}
    assert manifest_family(info).class_name == "AutoencoderKL"
    assert manifest_normalisation(info) == Normalisation("scale_shift", 0.18215, None)


@pytest.mark.parametrize(("name", "variant"), CASES, ids=IDS)
def test_summary_is_plain_data(name, variant):
    family, vae = FAMILIES[name], tiny(name, variant)
    summary = json.loads(json.dumps(family.summary(vae)))
    assert summary["latent_channels"] == family.channels(vae)[2] and summary["in_channels"] == 3
    if name != "AutoencoderKL":
        assert summary["family"] == name and summary["store"] == family.store
        assert manifest_normalisation(summary) == family.normalisation(vae)


# ------------------------------------------------------------------------------------------------------------
# export


@pytest.mark.parametrize(("name", "variant"), CASES, ids=IDS)
def test_export_round_trips_with_the_class_own_from_pretrained(saved, tmp_path, name, variant):
    family, vae = load(str(saved[(name, variant)]))
    encoder_before, decoder_before = encoder_state(family, vae), decoder_state(family, vae)
    z = latent_of(family, vae.eval(), pixels())
    decoder = family.trainable_decoder(vae).train()
    opt = torch.optim.Adam([p for p in decoder.parameters() if p.requires_grad], lr=1e-2)
    decoder(z)[0].square().mean().backward()
    opt.step()
    family.export(vae, tmp_path / "export")
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["_class_name"] == name
    exported = family.model_class.from_pretrained(tmp_path / "export")
    assert_same_tensors(encoder_state(family, exported), encoder_before, "encoder (and FLUX.2 bn)")
    changed = [k for k, v in decoder_state(family, exported).items() if not torch.equal(v, decoder_before[k])]
    assert changed, "the decoder did not change"
    if name == "AutoencoderKLFlux2":
        assert "bn" in family.encoder_parts(exported)
    if family.latent_rank == 5:  # what one frame never reaches comes out as it went in
        after = decoder_state(family, exported)
        for n, idx in decoder.unreached.items():
            assert torch.equal(after[n][idx], decoder_before[n][idx])


def test_single_file_export_only_for_autoencoderkl(tmp_path):
    FAMILIES["AutoencoderKL"].export_single_file(tiny("AutoencoderKL"), tmp_path / "vae.safetensors")
    assert (tmp_path / "vae.safetensors").is_file()
    with pytest.raises(FamilyError, match="no single-file layout"):
        FAMILIES["AutoencoderKLQwenImage"].export_single_file(
            tiny("AutoencoderKLQwenImage"), tmp_path / "q.st"
        )
