"""16-channel VAEs of SD3 and FLUX.1 through encode, train, export and convert, with tiny random models of
each family's shape: 16 latent channels, no quant_conv / post_quant_conv, a scaling_factor and a shift_factor
(the values of stabilityai/stable-diffusion-3-medium's and black-forest-labs/FLUX.1-dev's vae/config.json).
FLUX also as BFL's own `ae.safetensors`: LDM key names without a prefix and without quant convs, read
directly."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAST_TRAIN, assert_same_tensors, cli, frozen_part, make_images, tar_samples, trained_part
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file

from vaedec.convert import diffusers_to_ldm, load_single_file_vae
from vaedec.latents import scale_latents
from vaedec.vae import small_vae_config

RES = 32  # pixels; the tiny VAEs downsample by 2, so latents are (16, 16, 16)
FAMILIES = {  # (scaling_factor, shift_factor) of each family's vae/config.json
    "sd3": (1.5305, 0.0609),
    "flux": (0.3611, 0.1159),
}

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def family_vae(family: str, seed: int = 0) -> AutoencoderKL:
    """A tiny AutoencoderKL shaped like the family's VAE: 16 latent channels, no quant convs."""
    scaling, shift = FAMILIES[family]
    config = small_vae_config((8, 16), sample_size=RES) | {
        "latent_channels": 16, "use_quant_conv": False, "use_post_quant_conv": False,
        "scaling_factor": scaling, "shift_factor": shift,
    }
    torch.manual_seed(seed)
    return AutoencoderKL(**config)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("family-images") / "images"
    make_images(folder, 4)
    return folder


@pytest.mark.parametrize("family", FAMILIES)
def test_16_channel_vae_encodes_trains_exports_and_converts(tmp_path, images, family) -> None:
    scaling, shift = FAMILIES[family]
    source = family_vae(family)
    source.save_pretrained(tmp_path / "vae")
    assert source.quant_conv is None and source.post_quant_conv is None

    shards = tmp_path / "shards"
    cli("encode", images, shards, "--vae", tmp_path / "vae", "--resolution", RES, "--num-workers", 0)
    vae_info = json.loads((shards / "manifest.json").read_text())["settings"]["vae"]
    assert vae_info["latent_channels"] == 16
    assert vae_info["scaling_factor"] == scaling and vae_info["shift_factor"] == shift

    run = tmp_path / "run"
    cli("train", shards, "--output", run, *FAST_TRAIN, "run.max_steps=2", "--no-export")
    cli("export", run, tmp_path / "export", "--format", "both")
    exported = AutoencoderKL.from_pretrained(tmp_path / "export")
    # the family's latent convention survives the export: a pipeline scales with these
    assert exported.config.scaling_factor == scaling and exported.config.shift_factor == shift
    assert exported.config.latent_channels == 16 and not exported.config.use_post_quant_conv
    sd, src = exported.state_dict(), source.state_dict()
    assert not any(k.startswith(("quant_conv.", "post_quant_conv.")) for k in sd)
    assert_same_tensors(frozen_part(sd), frozen_part(src), f"{family} encoder")
    assert any(not torch.equal(v, src[k]) for k, v in trained_part(sd).items()), "decoder did not train"

    # The LDM file of the export: diffusers' own loader reads it back to the same weights and outputs.
    judged = AutoencoderKL.from_single_file(
        str(tmp_path / "export" / "vae.safetensors"), config=str(tmp_path / "export"), local_files_only=True
    )
    assert_same_tensors(judged.state_dict(), sd, f"{family} from_single_file")
    z = torch.randn(2, 16, RES // 2, RES // 2)
    with torch.no_grad():
        assert torch.equal(judged.decode(z).sample, exported.decode(z).sample)

    # convert: folder -> LDM file -> folder is bit-identical (the scale is given back, LDM files do not hold
    # it)
    cli("convert", tmp_path / "export", tmp_path / "vae.safetensors")
    cli("convert", tmp_path / "vae.safetensors", tmp_path / "back", "--scaling-factor", scaling)
    back = AutoencoderKL.from_pretrained(tmp_path / "back")
    assert_same_tensors(back.state_dict(), sd, f"{family} convert round trip")
    assert back.config.scaling_factor == scaling

    # the latents a diffusion model sees: (z - shift) * scale
    assert torch.allclose(scale_latents(z, scaling, shift), (z - shift) * scaling)


def test_flux_ae_safetensors_in_bfl_layout_is_read_directly(tmp_path, images) -> None:
    scaling, _ = FAMILIES["flux"]
    folder_vae = family_vae("flux")
    folder_vae.save_pretrained(tmp_path / "vae")
    # BFL's ae.safetensors: encoder.down.0.block.0.conv1.weight ... decoder.up.*, no prefix, no quant convs
    ae = diffusers_to_ldm(folder_vae.state_dict())
    assert not any("quant_conv" in k for k in ae) and "encoder.down.0.block.0.conv1.weight" in ae
    assert ae["encoder.conv_out.weight"].shape[0] == 32  # mean ‖ logvar of 16 channels straight out
    save_file({k: v.contiguous() for k, v in ae.items()}, str(tmp_path / "ae.safetensors"))

    loaded = load_single_file_vae(tmp_path / "ae.safetensors", scaling_factor=scaling)
    assert loaded.config.latent_channels == 16 and not loaded.config.use_quant_conv
    x = torch.rand(2, 3, RES, RES) * 2 - 1
    assert_same_tensors(loaded.state_dict(), folder_vae.state_dict(), "ae.safetensors read directly")
    with torch.no_grad():  # same weights; the attention weights' memory layout may pick another kernel order
        a, b = loaded(x, sample_posterior=False).sample, folder_vae(x, sample_posterior=False).sample
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

    a, b = tmp_path / "from-file", tmp_path / "from-folder"
    common = ["--resolution", RES, "--num-workers", 0]
    shift = FAMILIES["flux"][1]
    cli("encode", images, a, "--vae", tmp_path / "ae.safetensors", "--scaling-factor", scaling,
        "--shift-factor", shift, *common)
    cli("encode", images, b, "--vae", tmp_path / "vae", *common)
    info_a, info_b = (json.loads((p / "manifest.json").read_text())["settings"]["vae"] for p in (a, b))
    assert info_a["encoder_sha256"] == info_b["encoder_sha256"] and info_a["scaling_factor"] == scaling
    samples_a, samples_b = list(tar_samples(a)), list(tar_samples(b))
    assert [s[1] for s in samples_a] == [s[1] for s in samples_b]
    for (_, _, fa), (_, _, fb) in zip(samples_a, samples_b):
        assert fa["image.png"] == fb["image.png"]
        ma, mb = (np.load(io.BytesIO(f["moments.npy"])).astype(np.float32) for f in (fa, fb))
        assert ma.shape == (32, RES // 2, RES // 2)
        np.testing.assert_allclose(ma, mb, rtol=1e-3, atol=1e-3)  # float16 storage of the same encoder
    # the file does not hold shift_factor: --shift-factor gives it, the manifest records it, the export keeps
    # it
    assert info_a["shift_factor"] == shift == info_b["shift_factor"]

    run = tmp_path / "run"
    cli("train", a, "--output", run, *FAST_TRAIN, "run.max_steps=1")
    exported = load_file(str(run / "export" / "diffusion_pytorch_model.safetensors"))
    assert_same_tensors(
        frozen_part(exported), frozen_part(folder_vae.state_dict()), "encoder of ae.safetensors run"
    )
    assert np.isfinite(json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["loss/total"])
    config = json.loads((run / "export" / "config.json").read_text())
    assert (config["scaling_factor"], config["shift_factor"]) == (scaling, shift)
