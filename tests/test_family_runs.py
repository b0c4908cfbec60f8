"""Every VAE family through vaedec's whole path, one test each, on a tiny random model of its class:
encode (what the manifest says: family, store, rank, normalisation) -> inspect --verify -> train with the GAN
on from the first step, latent noise in the diffusion model's units, weight decay and the anchor -> a crash
after a checkpoint and a resume that equals an uninterrupted run bit for bit -> export, loaded with the
class's own from_pretrained (encoder, and FLUX.2's bn, bit-identical; decoder changed; the temporal kernel
slices one frame never reaches unchanged) -> eval against the source VAE."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import FAST_TRAIN, assert_same_tensors, cli, crash_after, make_images, train_lines
from test_family_adapters import CASES, IDS, decoder_state, encoder_state, tiny
from test_train import NOT_LOGGED_EXACTLY, checkpoint_tensors

from vaedec.families import FAMILIES, FamilyDecoder
from vaedec.shards import FORMAT_VERSION, FORMAT_VERSION_FAMILIES, read_manifest

RES = 32  # pixels; latents 16x16 (Wan 2.2's layout: 4x4)
RUN = [
    *FAST_TRAIN,
    "run.checkpoint_every_steps=2",
    "run.keep_checkpoints=0",
    "loss.disc_num_layers=2",
    "model.latent_noise_std=0.1",
    "optim.weight_decay=0.01",
    "loss.anchor_weight=0.1",
    "--no-export",
]

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("family-run-images") / "images"
    make_images(folder, 6)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize(("name", "variant"), CASES, ids=IDS)
def test_family_encode_train_resume_export_eval(tmp_path, images, monkeypatch, name, variant):
    family, source = FAMILIES[name], tiny(name, variant)
    if name == "AutoencoderKLFlux2":
        with torch.no_grad():  # whitening statistics as a trained FLUX.2 VAE has them
            source.bn.running_mean.copy_(torch.linspace(-1, 1, source.bn.num_features))
            source.bn.running_var.copy_(torch.linspace(0.5, 3, source.bn.num_features))
    source.save_pretrained(tmp_path / "vae")

    # --- encode: the manifest says what is stored and how a diffusion model normalises it
    shards = tmp_path / "shards"
    cli(
        "encode",
        images,
        shards,
        "--vae",
        tmp_path / "vae",
        "--resolution",
        RES,
        "--num-workers",
        0,
        "--shard-size-mb",
        0.01,
    )
    manifest = read_manifest(shards)
    info, f = manifest["settings"]["vae"], family.downsample_factor(source)
    assert info["downsample_factor"] == f and info["encoder_sha256"] == family.fingerprint(source)
    if name == "AutoencoderKL":
        assert manifest["format_version"] == FORMAT_VERSION and "family" not in info  # unchanged
    else:
        assert manifest["format_version"] == FORMAT_VERSION_FAMILIES
        assert (info["family"], info["store"], info["latent_rank"]) == (
            name,
            family.store,
            family.latent_rank,
        )
        assert info["normalisation"] == family.normalisation(source).as_dict()
    member = {"moments": "moments.npy", "latent": "latent.npy"}[family.store]
    assert member in manifest["sample"]
    verified = cli("inspect", shards, "--verify")
    assert "every sample read back" in verified.output, verified.output

    # --- train: A uninterrupted; B killed after step 3 (checkpoint at 2), then rerun to resume
    args = ["train", shards, *RUN]  # model.latent_sample: the family's default (mode for a deterministic one)
    a, b = tmp_path / "a", tmp_path / "b"
    cli(*args, "--output", a, "run.max_steps=4")
    crash_after(3, monkeypatch)
    crashed = CliRunner().invoke(train_mod_cli(), [str(x) for x in [*args, "--output", b, "run.max_steps=4"]])
    assert isinstance(crashed.exception, RuntimeError) and (b / "checkpoints/step-00000002").is_dir()
    assert not (b / "checkpoints/step-00000004").exists()
    monkeypatch.undo()
    resumed = cli(*args, "--output", b, "run.max_steps=4")
    assert "resumed from" in resumed.output and "at step 2" in resumed.output

    ref = train_lines(a)
    assert [m["step"] for m in ref] == [1, 2, 3, 4] and all(m["loss/d_weight"] > 0 for m in ref)  # GAN on, λ
    got = train_lines(b)
    assert [m["step"] for m in got] == [1, 2, 3, 4]
    for m, r in zip(got, ref):
        drop = NOT_LOGGED_EXACTLY
        assert {k: v for k, v in m.items() if k not in drop} == {k: v for k, v in r.items() if k not in drop}
    final_a, final_b = (checkpoint_tensors(r / "checkpoints/step-00000004") for r in (a, b))
    for stem in final_a:
        assert_same_tensors(final_b[stem], final_a[stem], f"resumed {stem}")

    # --- export: the family's own folder, loaded by its class
    cli("export", b, tmp_path / "export")
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["_class_name"] == name
    exported = family.model_class.from_pretrained(tmp_path / "export")
    assert_same_tensors(
        encoder_state(family, exported), encoder_state(family, source), "encoder (and FLUX.2 bn)"
    )
    before, after = decoder_state(family, source), decoder_state(family, exported)
    assert [k for k in after if not torch.equal(after[k], before[k])], "the decoder did not change"
    decoder = family.trainable_decoder(tiny(name, variant))
    if (
        isinstance(decoder, FamilyDecoder) and decoder.unreached
    ):  # one frame: the rest of each kernel as it was
        for n, idx in decoder.unreached.items():
            assert torch.equal(after[n][idx], before[n][idx]), f"{n}: an unreached slice changed"
            assert not torch.equal(after[n], before[n]), f"{n}: did not train"
        for n, p in decoder.named_parameters():
            if not p.requires_grad:
                assert torch.equal(after[n], before[n]), f"{n} (never reached) changed"
    if family.single_file != "ldm":
        refused = cli("export", b, tmp_path / "ldm", "--format", "ldm", code=1)
        assert "no single-file layout" in refused.output

    # --- eval: the run against the source VAE on the same latents (the encoder check passes for both)
    report = cli(
        "eval",
        shards,
        "--vae",
        f"source={tmp_path / 'vae'}",
        "--vae",
        f"run={b}",
        "--out",
        tmp_path / "eval",
        "--max-samples",
        4,
        "--batch-size",
        2,
    )
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    models = result["sets"][0]["models"] if "sets" in result else result["models"]
    assert {"source", "run"} <= set(models), report.output


def train_mod_cli():
    from vaedec.cli import main

    return main


# ------------------------------------------------------------------------------------------------------------
# what a family cannot take is a message


@pytest.fixture(scope="module")
def family_shards(tmp_path_factory, images) -> dict[str, Path]:
    """DC-AE, Qwen-Image and Wan 2.1 (Qwen-Image's encoder) VAEs saved, and their images encoded."""
    root = tmp_path_factory.mktemp("family-shards")
    qwen = tiny("AutoencoderKLQwenImage")
    wan = tiny("AutoencoderKLWan", seed=1)
    wan.load_state_dict(qwen.state_dict())  # Wan 2.1's VAE with Qwen-Image's weights: one encoder
    out = {}
    for name, vae in (
        ("AutoencoderDC", tiny("AutoencoderDC")),
        ("AutoencoderKLQwenImage", qwen),
        ("AutoencoderKLWan", wan),
    ):
        vae.save_pretrained(root / f"vae-{name}")
        cli(
            "encode",
            images,
            root / name,
            "--vae",
            root / f"vae-{name}",
            "--resolution",
            RES,
            "--num-workers",
            0,
        )
        out[name], out[f"vae-{name}"] = root / name, root / f"vae-{name}"
    return out


def test_settings_a_family_cannot_take_are_refused(tmp_path, family_shards):
    run = ["--output", tmp_path / "run", *FAST_TRAIN, "run.max_steps=1", "--no-export"]
    dc, qwen = family_shards["AutoencoderDC"], family_shards["AutoencoderKLQwenImage"]
    refused = cli("train", dc, *run, "model.latent_sample=sample", code=1)  # asked for: refused
    assert (
        "model.latent_sample=mode" in refused.output
        and "deterministic AutoencoderDC latent" in refused.output
    )
    refused = cli("train", qwen, *run, "model.channels_last=true", code=1)
    assert "model.channels_last" in refused.output and "3-D" in refused.output
    refused = cli("train", qwen, *run, "model.gradient_checkpointing=true", code=1)
    assert "does not support gradient checkpointing" in refused.output
    refused = cli(
        "eval",
        dc,
        "--vae",
        family_shards["vae-AutoencoderDC"],
        "--out",
        tmp_path / "eval",
        "--sample",
        code=1,
    )
    assert "no posterior to sample" in refused.output
    # A decoder of another kind of latent than the shards' is refused by class before any fingerprint talk.
    refused = cli("train", qwen, *run, "--vae", family_shards["vae-AutoencoderDC"], code=1)
    assert "is a AutoencoderDC, whose latents are not those of" in refused.output


@pytest.mark.slow
def test_qwen_image_decoder_trains_on_wan_21_latents(tmp_path, family_shards):
    """Qwen-Image's VAE is Wan 2.1's with its decoder fine-tuned: one encoder, so Wan's shards train it."""
    run = tmp_path / "run"
    out = cli(
        "train",
        family_shards["AutoencoderKLWan"],
        "--output",
        run,
        "--vae",
        family_shards["vae-AutoencoderKLQwenImage"],
        *FAST_TRAIN,
        "run.max_steps=1",
    ).output
    assert json.loads((run / "export" / "config.json").read_text())["_class_name"] == "AutoencoderKLQwenImage"
    assert "(AutoencoderKLQwenImage.from_pretrained)" in out  # what the closing lines tell the user to load


def test_convert_refuses_other_classes(tmp_path):
    from vaedec.families import build_tiny

    # Decoder widths as the encoder's, as the released FLUX.2 VAE: AutoencoderKL.from_pretrained would load it
    # without a word (and without bn).
    build_tiny("AutoencoderKLFlux2", decoder_block_out_channels=None).save_pretrained(tmp_path / "flux2")
    refused = cli("convert", tmp_path / "flux2", tmp_path / "vae.safetensors", code=1)
    assert "holds a AutoencoderKLFlux2" in refused.output and not (tmp_path / "vae.safetensors").exists()
