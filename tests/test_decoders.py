"""New decoders for a frozen latent space (vaedec/decoders.py, issue 17), on tiny random models at 32 px:

- a decoder from scratch: a smaller FLUX.2 decoder (decoder_block_out_channels) trains with a teacher,
  exports as AutoencoderKLFlux2 with the new config, loads with from_pretrained, its encoder and bn
  bit-identical; what a class cannot express is a message;
- a preview model (AutoencoderTiny) for an SD-shaped and a FLUX.2-shaped VAE: decoder and tiny encoder train
  (GAN, EMA, a crash and a resume equal to an uninterrupted run bit for bit), export, load as AutoencoderTiny
  with the latent space named in its config, and `eval` scores it next to the original on the normalised
  latents, with decoder parameters and decode images/s;
- the teacher term: its gradient against a plain autograd reference, λ untouched by it, and the teacher frozen
  (no gradient, in no optimizer, EMA or checkpoint).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import (
    FAST_TRAIN,
    assert_same_tensors,
    cli,
    crash_after,
    make_images,
    save_tiny_vae,
    train_lines,
)
from diffusers import AutoencoderKLFlux2, AutoencoderTiny
from huggingface_hub import ModelCard
from test_train import NOT_LOGGED_EXACTLY, checkpoint_tensors

from vaedec.config import LossConfig
from vaedec.decoders import LATENT_SPACE_KEY, decoder_parameters, preview_vae
from vaedec.families import FAMILIES, build_tiny, manifest_normalisation, normalise
from vaedec.losses import generator_grads, teacher_loss
from vaedec.shards import read_manifest, read_samples, shard_paths

RES = 32
RUN = [*FAST_TRAIN, "run.checkpoint_every_steps=2", "run.keep_checkpoints=0", "loss.disc_num_layers=2",
       "--no-export"]
# A preview model small enough for the tests (f2: two levels); the default is TAESD's 64 channels.
SMALL_TINY = ("model.decoder_config={encoder_block_out_channels: [8, 8], decoder_block_out_channels: [8, 8], "
              "num_encoder_blocks: [1, 1], num_decoder_blocks: [1, 1]}")
PREVIEW = ["model.decoder_init=scratch", "model.decoder_class=AutoencoderTiny", SMALL_TINY]

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


# ------------------------------------------------------------------------------------------------------------
# the teacher term


class FakeLPIPS(torch.nn.Module):
    """A differentiable per-sample distance with LPIPS's shape (B, 1, 1, 1): weighted squared differences."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([0.5, 1.0, 2.0]).view(1, 3, 1, 1), requires_grad=False)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return ((a - b) ** 2 * self.w).mean(dim=(1, 2, 3), keepdim=True)


def test_teacher_gradient_matches_a_plain_reference() -> None:
    g = torch.Generator().manual_seed(0)
    x, x_rec, x_t = (torch.rand(2, 3, 8, 8, generator=g, dtype=torch.float64) * 2 - 1 for _ in range(3))
    h = torch.rand(2, 4, 8, 8, generator=g, dtype=torch.float64)
    conv_out = torch.nn.Conv2d(4, 3, 3, padding=1).double()
    disc = torch.nn.Sequential(torch.nn.Conv2d(3, 1, 3, padding=1)).double()
    lpips, logvar = FakeLPIPS().double(), torch.zeros((), dtype=torch.float64)
    for gan_on in (False, True):
        cfg = LossConfig(perceptual_weight=0.7, teacher_weight=0.3, disc_start_step=0 if gan_on else 100)
        with_t = generator_grads(x, x_rec, h, conv_out, lpips, disc, logvar, cfg, 5, x_teacher=x_t)
        without = generator_grads(x, x_rec, h, conv_out, lpips, disc, logvar, cfg, 5)
        # The plain reference: autograd of T = w Σ(|x̂ - x_t| + pw LPIPS(x_t, x̂)) / B written out by hand.
        leaf = x_rec.clone().requires_grad_(True)
        plain = (
            0.3
            * (
                (leaf - x_t).abs() + 0.7 * ((x_t - leaf) ** 2 * lpips.w).mean(dim=(1, 2, 3), keepdim=True)
            ).sum()
            / 2
        )
        (ref,) = torch.autograd.grad(plain, [leaf])
        torch.testing.assert_close(with_t.grad_output - without.grad_output, ref, rtol=1e-12, atol=1e-12)
        assert with_t.logs["loss/teacher"] == pytest.approx(float(plain.detach()), rel=1e-12)
        assert (
            with_t.logs["loss/d_weight"] == without.logs["loss/d_weight"]
        )  # λ balances the GAN against nll only
        assert (with_t.logs["loss/d_weight"] > 0) == gan_on
        # The pure function is the same formula, and the teacher's output is a constant (no gradient to it).
        xt_leaf = x_t.clone().requires_grad_(True)
        value = teacher_loss(leaf, xt_leaf, lpips, 0.7)
        assert float(0.3 * value.detach()) == pytest.approx(float(plain.detach()), rel=1e-12)
        value.backward()
        assert xt_leaf.grad is None


def test_the_teacher_is_frozen_and_held_nowhere(data) -> None:
    """The original decoder as teacher: no gradient, not in the optimizer or the EMA, unchanged by a step; at
    step 0 a pretrained decoder equals it (T = 0), after one update it does not."""
    from accelerate import Accelerator

    from vaedec.config import load_train_config
    from vaedec.decoders import run_decoders
    from vaedec.discriminator import build_discriminator
    from vaedec.images import batch_to_model
    from vaedec.latents import batch_latent
    from vaedec.shards import collate
    from vaedec.train import _ema, build_optimizers, generator_step
    from vaedec.vae import trainable_parameters

    cfg = load_train_config(None, [*FAST_TRAIN, f"data.shards={data['sd']}", "loss.teacher_weight=1"])
    decoder, original, teacher = run_decoders(cfg, read_manifest(data["sd"]), torch.device("cpu"))
    assert teacher is original and not any(p.requires_grad for p in teacher.parameters())
    disc, logvar = build_discriminator(cfg.loss, 3), torch.nn.Parameter(torch.zeros(()), requires_grad=False)
    opt_g, _, _ = build_optimizers(cfg, decoder, disc, logvar, 1)
    ema, _ = _ema(cfg, decoder, torch.device("cpu"))
    held = {id(p) for g in opt_g.param_groups for p in g["params"]}
    assert held == {id(p) for p in trainable_parameters(decoder)}
    assert not held & {id(p) for p in teacher.parameters()}
    assert len(ema.shadow_params) == len(trainable_parameters(decoder))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    batch = collate(list(read_samples(shard_paths(data["sd"], read_manifest(data["sd"])), 2)))
    micro = [(batch_to_model(batch, torch.device("cpu")), batch_latent(batch, "mode"))]
    accelerator = Accelerator(cpu=True)
    logs = [
        generator_step(accelerator, decoder, disc, opt_g, logvar, None, micro, cfg, s, teacher=teacher)[1]
        for s in range(2)
    ]
    assert logs[0]["loss/teacher"] == 0.0 and logs[1]["loss/teacher"] > 0
    assert all(p.grad is None for p in teacher.parameters())
    assert_same_tensors(teacher.state_dict(), before, "the teacher")


# ------------------------------------------------------------------------------------------------------------
# shared data: tiny SD-shaped and FLUX.2-shaped VAEs, their shards


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("decoders")
    make_images(root / "images", 8)
    save_tiny_vae(root / "vae-sd")
    flux2 = build_tiny(
        "AutoencoderKLFlux2", decoder_block_out_channels=None
    )  # as released: decoder = encoder
    with torch.no_grad():  # whitening statistics as a trained FLUX.2 VAE has them
        flux2.bn.running_mean.copy_(torch.linspace(-1, 1, flux2.bn.num_features))
        flux2.bn.running_var.copy_(torch.linspace(0.5, 3, flux2.bn.num_features))
    flux2.save_pretrained(root / "vae-flux2")
    for name in ("sd", "flux2"):
        cli(
            "encode",
            root / "images",
            root / f"shards-{name}",
            "--vae",
            root / f"vae-{name}",
            "--resolution",
            RES,
            "--num-workers",
            0,
            "--shard-size-mb",
            0.01,
        )
    return {
        "root": root,
        **{f"vae-{n}": root / f"vae-{n}" for n in ("sd", "flux2")},
        **{n: root / f"shards-{n}" for n in ("sd", "flux2")},
    }


def state_of(vae: torch.nn.Module, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in vae.state_dict().items() if k.startswith(prefixes)}


# ------------------------------------------------------------------------------------------------------------
# a decoder from scratch


def test_scratch_smaller_flux2_decoder_trains_exports_and_loads_with_its_class(tmp_path, data) -> None:
    run = tmp_path / "run"
    out = cli(
        "train",
        data["flux2"],
        "--output",
        run,
        *RUN,
        "run.max_steps=3",
        "model.decoder_init=scratch",
        "model.decoder_config={decoder_block_out_channels: [4, 8]}",
        "loss.teacher_weight=1.0",
    )
    lines = train_lines(run)
    assert [m["step"] for m in lines] == [1, 2, 3] and all(m["loss/teacher"] > 0 for m in lines), out.output
    assert all(m["loss/d_weight"] > 0 for m in lines)  # the GAN and λ run as for any decoder
    cli("export", run, tmp_path / "export")
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderKLFlux2" and config["decoder_block_out_channels"] == [4, 8]
    exported = AutoencoderKLFlux2.from_pretrained(tmp_path / "export")
    source = AutoencoderKLFlux2.from_pretrained(data["vae-flux2"])
    frozen = ("encoder.", "quant_conv.", "bn.")
    assert_same_tensors(state_of(exported, frozen), state_of(source, frozen), "encoder, quant_conv and bn")
    assert decoder_parameters(exported) < decoder_parameters(source) / 2
    assert exported.decoder.conv_in.out_channels == 8 and exported.decoder.conv_out.in_channels == 4
    # What the checkpoint holds is every parameter of the new decoder (the teacher is in none of its files).
    held = checkpoint_tensors(run / "checkpoints" / "step-00000003")
    names = {n for n, _ in exported.named_parameters() if n.startswith(("decoder.", "post_quant_conv."))}
    assert set(held["ema"]) == names and set(held["decoder"]) == names  # no buffers in this decoder
    # The grids' "original decoder" column is the source's decoder, not the random new one.
    assert (run / "images" / "step-00000003.png").is_file()
    # The card says what this is: a new decoder (with its config change) for the unchanged encoder, a FLUX.2
    # folder for diffusers, and no single-file route vaedec cannot write for this class.
    card = ModelCard.load(tmp_path / "export" / "README.md")
    assert "new-decoder" in card.data.tags and "decoder-fine-tune" not in card.data.tags
    assert "new decoder trained with vaedec" in card.text
    assert "`decoder_block_out_channels: [4, 8]`" in card.text
    assert "from random weights" in card.text and "AutoencoderKLFlux2.from_pretrained" in card.text
    assert "teacher: L1 + LPIPS" in card.text and "ComfyUI/models/vae/" not in card.text


def test_what_a_class_cannot_express_is_a_message(tmp_path, data) -> None:
    base = ["train", data["sd"], "--output", tmp_path / "run", *RUN, "run.max_steps=1"]
    refused = cli(
        *base, "model.decoder_init=scratch", "model.decoder_config={block_out_channels: [4, 8]}", code=1
    )
    assert "AutoencoderKL has no config key that shapes its decoder alone" in refused.output
    assert "model.decoder_class=AutoencoderTiny" in refused.output
    assert not (tmp_path / "run" / "config.yaml").exists()  # refused before the run folder is written
    refused = cli(
        "train",
        data["flux2"],
        "--output",
        tmp_path / "run",
        *RUN,
        "run.max_steps=1",
        "model.decoder_init=scratch",
        "model.decoder_config={layers_per_block: 1}",
        code=1,
    )
    assert "decoder-only keys are decoder_block_out_channels" in refused.output
    refused = cli(*base, "model.decoder_config={decoder_block_out_channels: [4, 8]}", code=1)
    assert "set model.decoder_init=scratch" in refused.output
    refused = cli(*base, "model.decoder_class=AutoencoderTiny", code=1)
    assert "set model.decoder_init=scratch" in refused.output
    refused = cli(*base, "model.decoder_init=scratch", "loss.anchor_weight=1", code=1)
    assert "loss.teacher_weight instead" in refused.output
    refused = cli(
        "train",
        data["flux2"],
        "--output",
        tmp_path / "run2",
        *RUN,
        "run.max_steps=1",
        "model.decoder_init=scratch",
        "model.decoder_config={decoder_block_out_channels: [4, 8, 8]}",
        code=1,
    )
    assert "keep the number of decoder levels" in refused.output
    # The same architecture from scratch is fine for any class: a new random decoder, the encoder kept.
    cli(*base[:3], tmp_path / "same", *RUN, "run.max_steps=1", "model.decoder_init=scratch")


# ------------------------------------------------------------------------------------------------------------
# a preview model


@pytest.mark.parametrize("name", ["sd", "flux2"])
def test_preview_model_trains_exports_loads_and_is_scored(tmp_path, data, monkeypatch, name) -> None:
    shards, vae = data[name], data[f"vae-{name}"]
    args = ["train", shards, *RUN, *PREVIEW, "loss.teacher_weight=0.5", "run.max_steps=4"]
    a, b = tmp_path / "a", tmp_path / "b"
    cli(*args, "--output", a)
    crash_after(3, monkeypatch)
    from vaedec.cli import main

    crashed = CliRunner().invoke(main, [str(x) for x in [*args, "--output", b]])
    assert isinstance(crashed.exception, RuntimeError) and (b / "checkpoints/step-00000002").is_dir()
    monkeypatch.undo()
    assert "resumed from" in cli(*args, "--output", b).output
    ref, got = train_lines(a), train_lines(b)
    assert [m["step"] for m in got] == [1, 2, 3, 4]
    for m, r in zip(got, ref):
        assert {k: v for k, v in m.items() if k not in NOT_LOGGED_EXACTLY} == {
            k: v for k, v in r.items() if k not in NOT_LOGGED_EXACTLY
        }
    assert all(m["loss/encoder"] > 0 and m["loss/teacher"] > 0 and m["loss/d_weight"] > 0 for m in ref)
    final_a, final_b = (checkpoint_tensors(r / "checkpoints/step-00000004") for r in (a, b))
    for stem in final_a:
        assert_same_tensors(final_b[stem], final_a[stem], f"resumed {stem}")
    assert any(k.startswith("encoder.") for k in final_a["ema"])  # the tiny encoder trains, with EMA

    # --- export: a complete AutoencoderTiny folder naming its latent space; both halves trained
    cli("export", b, tmp_path / "export")
    preview = AutoencoderTiny.from_pretrained(tmp_path / "export")
    manifest = read_manifest(shards)["settings"]["vae"]
    record = preview.config[LATENT_SPACE_KEY]
    assert record["encoder_sha256"] == manifest["encoder_sha256"]
    assert record["normalisation"] == manifest_normalisation(manifest).as_dict()
    assert (preview.config.scaling_factor, preview.config.shift_factor) == (1.0, 0.0)
    init = preview_vae(
        manifest,
        {
            "encoder_block_out_channels": [8, 8],
            "decoder_block_out_channels": [8, 8],
            "num_encoder_blocks": [1, 1],
            "num_decoder_blocks": [1, 1],
        },
        seed=0,
    )
    for half in ("encoder.", "decoder."):
        after, before = state_of(preview, (half,)), state_of(init, (half,))
        assert all(not torch.equal(after[k], before[k]) for k in after if k.endswith("weight")), half
    # Its card: a preview model, not a fine-tune of the base VAE, whose latent space it names.
    card = ModelCard.load(tmp_path / "export" / "README.md")
    assert "preview-decoder" in card.data.tags and "Preview decoder for" in card.text
    assert "none of the base VAE's weights" in card.text and "fine-tuned decoder" not in card.text
    assert manifest["encoder_sha256"] in card.text and "AutoencoderTiny.from_pretrained" in card.text
    assert "tiny encoder: mean squared error" in card.text and "bit for bit" not in card.text
    refused = cli("export", b, tmp_path / "ldm", "--format", "ldm", code=1)
    assert "no single-file layout" in refused.output

    # --- eval: next to the original decoder, on the same latents; the preview model decodes them normalised
    report = cli(
        "eval",
        shards,
        "--vae",
        f"original={vae}",
        "--vae",
        f"preview={tmp_path / 'export'}",
        "--vae",
        f"run={b}",
        "--out",
        tmp_path / "eval",
        "--batch-size",
        4,
        "--speed-rounds",
        2,
    ).output
    assert "decoder params" in report and "decode img/s" in report
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    models = result["sets"][0]["models"]
    assert all(m["decode_images_per_s"] > 0 for m in models.values())
    assert models["preview"]["decoder_parameters"] == sum(p.numel() for p in preview.decoder.parameters())
    assert models["preview"]["decoder_parameters"] < models["original"]["decoder_parameters"]
    assert models["preview"]["psnr"] == models["run"]["psnr"]  # the run's EMA weights are the export's
    # eval's figure is a plain decode of normalise(mean) by the exported model
    sample = next(read_samples(shard_paths(shards, read_manifest(shards)), 1))
    mean = sample["moments"].float()[None, : manifest["latent_channels"]]
    with torch.no_grad():
        x_rec = preview.decode(normalise(mean, manifest_normalisation(manifest))).sample.clamp(-1, 1)
    x = sample["pixels"].float()[None] / 127.5 - 1
    mse = float((((x_rec + 1) / 2 - (x + 1) / 2) ** 2).mean())
    rows = [r for r in (tmp_path / "eval" / "per_image.csv").read_text().splitlines() if ",preview," in r]
    assert float(rows[0].split(",")[3]) == pytest.approx(10 * np.log10(1 / mse), abs=1e-3)


def test_preview_config_follows_the_latent_space(data) -> None:
    """TAESD's layout, one level per factor 2: f2 -> two levels; the fixed keys are refused."""
    from vaedec.errors import TrainError

    manifest = read_manifest(data["flux2"])["settings"]["vae"]
    vae = preview_vae(manifest, {}, seed=0)
    assert vae.config.encoder_block_out_channels == (64, 64) and tuple(vae.config.num_decoder_blocks) == (
        3,
        1,
    )
    assert vae.config.latent_channels == FAMILIES["AutoencoderKLFlux2"].tiny_config()["latent_channels"]
    with pytest.raises(TrainError, match="follow from the latent space"):
        preview_vae(manifest, {"latent_channels": 4}, seed=0)
    with pytest.raises(TrainError, match="as many encoder and decoder levels"):
        preview_vae(
            manifest, {"encoder_block_out_channels": [8, 8, 8], "num_encoder_blocks": [1, 1, 1]}, seed=0
        )


def test_make_experiment_keeps_the_preview_section_and_make_preview_replaces_it(tmp_path) -> None:
    from vaedec.experiment import PREVIEW_END, PREVIEW_START, VARIANTS, write_quality_doc
    from vaedec.preview_experiment import write_section

    doc = tmp_path / "quality.md"
    write_section(doc, f"{PREVIEW_START}\nfirst\n{PREVIEW_END}\n")
    write_section(doc, f"{PREVIEW_START}\nsecond\n{PREVIEW_END}\n")
    assert doc.read_text().count(PREVIEW_START) == 1 and "second" in doc.read_text()
    facts = dict.fromkeys(("wall", "machine", "date", "commit", "schedule", "lpips", "encoders"), "-")
    write_quality_doc(doc, "THE REPORT", {}, facts, {v.name: 1.0 for v in VARIANTS})
    text = doc.read_text()
    assert "THE REPORT" in text and text.count(PREVIEW_START) == 1 and "second" in text
