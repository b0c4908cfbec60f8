"""model.trainable: only the decoder parts the patterns name train; optimizer, EMA and checkpoints hold only
those, the export is the whole VAE (frozen parts bit for bit the original's), mistakes end in a message."""

from __future__ import annotations

import pytest
import torch
from conftest import FAST_TRAIN, assert_same_tensors, cli, frozen_part, step_parts
from diffusers import AutoencoderKL
from safetensors.torch import load_file

import vaedec.train as train_mod
from vaedec.checkpoint import list_checkpoints
from vaedec.config import ConfigError, load_train_config
from vaedec.vae import select_trainable

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

# The tiny VAE has up_blocks 0 and 1: train the last one and conv_out.
PATTERNS = "model.trainable=[decoder.up_blocks.1.*, decoder.conv_out.*]"


def is_trained(name: str) -> bool:
    return name.startswith(("decoder.up_blocks.1.", "decoder.conv_out."))


def test_select_trainable_and_the_config_field() -> None:
    names = ["post_quant_conv.weight", "decoder.up_blocks.1.resnets.0.conv1.weight", "decoder.conv_out.bias"]
    assert select_trainable(names, ()) == (names, [])
    assert select_trainable(names, ("decoder.up_blocks.1.*", "decoder.nothing.*")) == (
        ["decoder.up_blocks.1.resnets.0.conv1.weight"], ["decoder.nothing.*"])
    assert load_train_config(None, [PATTERNS]).model.trainable == (
        "decoder.up_blocks.1.*",
        "decoder.conv_out.*",
    )
    assert load_train_config(None, ["model.trainable=decoder.conv_out.*"]).model.trainable == (
        "decoder.conv_out.*",
    )
    assert load_train_config(None, []).model.trainable == ()
    with pytest.raises(ConfigError, match="model.trainable"):
        load_train_config(None, ["model.trainable={a: 1}"])


def test_partial_decoder_trains_only_its_parts(tmp_path, shards, vae_dir) -> None:
    run = tmp_path / "run"
    cli("train", shards, "--output", run, *FAST_TRAIN, PATTERNS, "run.max_steps=2")
    source = AutoencoderKL.from_pretrained(vae_dir).state_dict()
    trained_names = {k for k in source if is_trained(k)}
    n_trained = sum(source[k].numel() for k in trained_names)
    n_frozen = (
        sum(v.numel() for k, v in source.items() if k.startswith(("decoder.", "post_quant_conv.")))
        - n_trained
    )
    assert (
        f"decoder: {n_trained:,} trainable / {n_frozen:,} frozen parameters" in (run / "log.txt").read_text()
    )

    # the checkpoint holds only what trains: weights, EMA and the decoder's Adam state
    ckpt = list_checkpoints(run)[-1]
    for stem in ("decoder", "ema"):
        assert set(load_file(str(ckpt / f"{stem}.safetensors"))) == trained_names, stem
    opt_g = torch.load(ckpt / "optim.pt", weights_only=True)["opt_g"]
    assert len(opt_g["state"]) == len(opt_g["param_groups"][0]["params"]) == len(trained_names)

    # the export is the whole VAE: encoder and frozen decoder parts bit for bit the original's, the rest
    # trained
    exported = AutoencoderKL.from_pretrained(run / "export").state_dict()
    assert exported.keys() == source.keys()
    assert_same_tensors(frozen_part(exported), frozen_part(source), "encoder")
    frozen_decoder = {k: v for k, v in exported.items()
                      if k.startswith(("decoder.", "post_quant_conv.")) and not is_trained(k)}
    assert frozen_decoder and all(torch.equal(v, source[k]) for k, v in frozen_decoder.items())
    assert all(not torch.equal(exported[k], source[k]) for k in trained_names if k.endswith("weight"))

    # resumed with the same patterns: fine; with others: refused before anything is written
    cli("train", shards, "--output", run, *FAST_TRAIN, PATTERNS, "run.max_steps=3", "--no-export")
    assert list_checkpoints(run)[-1].name == "step-00000003"
    r = cli(
        "train",
        shards,
        "--output",
        run,
        *FAST_TRAIN,
        "model.trainable=[decoder.conv_out.*]",
        "run.max_steps=4",
        code=1,
    )
    assert "model.trainable was" in r.output and "decoder.conv_out.*" in r.output
    assert list_checkpoints(run)[-1].name == "step-00000003"


def test_frozen_parts_get_no_gradient_in_the_real_step(shards) -> None:
    from accelerate import Accelerator

    from vaedec.images import batch_to_model
    from vaedec.latents import sample_latent
    from vaedec.shards import collate

    parts = step_parts(shards, [PATTERNS], 2, seed=None)
    cfg, decoder, disc, logvar, opt_g = parts.cfg, parts.decoder, parts.disc, parts.logvar, parts.opt_g
    before = {k: v.clone() for k, v in decoder.state_dict().items()}
    in_optimizer = {id(p) for g in opt_g.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for n, p in decoder.named_parameters() if is_trained(n)}

    grads = {}
    real_step = opt_g.step

    def spy_step(*a, **k):
        grads.update({n: p.grad for n, p in decoder.named_parameters()})
        return real_step(*a, **k)

    opt_g.step = spy_step
    batch, noise = collate(parts.samples), torch.Generator().manual_seed(0)
    micro = [(batch_to_model(batch, torch.device("cpu")), sample_latent(batch["moments"], "sample", noise))]
    _, logs = train_mod.generator_step(Accelerator(), decoder, disc, opt_g, logvar, None, micro, cfg, 0)
    assert logs["loss/d_weight"] > 0  # λ still comes from conv_out's input
    for name, g in grads.items():
        assert (g is not None) == is_trained(name), name
    after = decoder.state_dict()
    for k, v in after.items():
        assert torch.equal(v, before[k]) != is_trained(k), k  # frozen: bit for bit; trained: moved


def test_a_pattern_that_matches_nothing_is_a_message(tmp_path, shards) -> None:
    r = cli(
        "train",
        shards,
        "--output",
        tmp_path / "run",
        *FAST_TRAIN,
        "model.trainable=[decoder.up_blocks.7.*]",
        "run.max_steps=1",
        code=1,
    )
    assert (
        "'decoder.up_blocks.7.*'" in r.output
        and "decoder.up_blocks.1" in r.output
        and "Traceback" not in r.output
    )
    r = cli(
        "train",
        shards,
        "--output",
        tmp_path / "run2",
        *FAST_TRAIN,
        "model.trainable=[post_quant_conv.*]",
        "model.train_post_quant_conv=false",
        "run.max_steps=1",
        code=1,
    )
    assert "leaves nothing to train" in r.output
