"""Keeping the decoder good outside the domain: mixed shard sets (proportions, rank/worker split, exact
resume, refusals, per-set metrics) and the L2-SP anchor to the original weights (its formula, its effect)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAST_TRAIN, cli, make_images, save_tiny_vae, shard_list
from PIL import Image
from safetensors.torch import load_file

from vaedec.config import ConfigError, EncodeConfig, load_train_config, parse_mix
from vaedec.encode import encode
from vaedec.losses import add_anchor_grad, anchor_penalty
from vaedec.stream import TrainStream

RES = 32
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def encode_folder(images: Path, out: Path, vae: Path) -> Path:
    encode(EncodeConfig(src=str(images), out=str(out), vae=str(vae), resolution=RES, shard_size_mb=0.02,
                        num_workers=0, batch_size=8))
    return out


@pytest.fixture(scope="module")
def general(tmp_path_factory, vae_dir) -> Path:
    """A second set of the same VAE: 12 other images (inverted colour fields), several shards."""
    root = tmp_path_factory.mktemp("general")
    for p in make_images(root / "images", 12, size=(36, 36)):
        Image.fromarray(255 - np.asarray(Image.open(p))).save(p)
    return encode_folder(root / "images", root / "general", vae_dir)


def keys_of(folder: Path) -> set[str]:
    from vaedec.shards import read_samples

    return {s["key"] for s in read_samples(shard_list(folder))}


def take(stream: TrainStream, n: int) -> list[dict]:
    it = iter(stream)
    return [next(it) for _ in range(n)]


def test_mix_proportions_are_within_sampling_error(shards, general) -> None:
    p, batch, n = 0.3, 8, 150
    batches = take(
        TrainStream(shard_list(shards), batch, seed=0, shuffle_buffer=8, mix=[(shard_list(general), p)]), n
    )
    source = torch.cat([b["source"] for b in batches]).numpy()
    total = n * batch
    sigma = np.sqrt(total * p * (1 - p))
    assert abs((source == 1).sum() - total * p) < 4 * sigma, (source == 1).sum()
    # Each sample comes from the set its source says.
    target_keys, general_keys = keys_of(shards), keys_of(general)
    for b in batches:
        for key, s in zip(b["key"], b["source"].tolist()):
            assert key in (general_keys if s == 1 else target_keys)


def test_each_set_is_split_by_rank(shards, general) -> None:
    """Within one pass over the general set, two ranks never draw the same general sample."""
    seen = []
    for rank in (0, 1):
        stream = TrainStream(shard_list(shards), 4, seed=0, rank=rank, world_size=2, shuffle_buffer=0,
                             mix=[(shard_list(general), 0.5)])
        batches = take(stream, 3)
        seen.append({k for b in batches for k, s in zip(b["key"], b["source"].tolist()) if s == 1})
    assert seen[0] and seen[1] and not seen[0] & seen[1]


def test_mixed_stream_resumes_exactly(shards, general) -> None:
    def make(positions: dict | None = None) -> TrainStream:
        return TrainStream(shard_list(shards), 3, seed=5, shuffle_buffer=6, mix=[(shard_list(general), 0.4)],
                           positions=positions)

    full = take(make(), 12)
    resumed = take(make({0: full[6]["position"]}), 5)
    for a, b in zip(full[7:], resumed):
        assert a["key"] == b["key"] and torch.equal(a["source"], b["source"])
        assert torch.equal(a["moments"], b["moments"])


def test_unmixed_stream_is_unchanged_by_the_mix_machinery(shards) -> None:
    """No data.mix: no `source` in the batches and the order of a plain run (bit-exact resume relies on
    it)."""
    a = take(TrainStream(shard_list(shards), 2, seed=1, shuffle_buffer=4), 4)
    b = take(TrainStream(shard_list(shards), 2, seed=1, shuffle_buffer=4, mix=[]), 4)
    assert [x["key"] for x in a] == [x["key"] for x in b] and "source" not in a[0]


def test_mixed_training_resumes_exactly_and_logs_each_set(tmp_path, shards, general) -> None:
    """4 steps in one go against 2 steps + a resumed run to 4: the same weights; per-set loss and
    validation."""
    args = [*FAST_TRAIN, "data.val_shards=1", "run.val_every_steps=2", "loss.disc_norm=group"]
    cli("train", shards, "--mix", f"{general}:0.4", "--output", tmp_path / "full", *args, "run.max_steps=4",
        "--no-export")
    cli("train", shards, "--mix", f"{general}:0.4", "--output", tmp_path / "half", *args, "run.max_steps=2",
        "--no-export")
    cli("train", shards, "--mix", f"{general}:0.4", "--output", tmp_path / "half", *args, "run.max_steps=4",
        "--no-export")
    a = load_file(str(tmp_path / "full" / "checkpoints" / "step-00000004" / "decoder.safetensors"))
    b = load_file(str(tmp_path / "half" / "checkpoints" / "step-00000004" / "decoder.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    lines = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    logged = set().union(*lines)
    assert f"loss/pixel/{shards.name}" in logged and f"loss/pixel/{general.name}" in logged
    val = [x for x in lines if "val/psnr" in x]
    assert val and all(f"val/{general.name}/psnr" in x and f"val/{general.name}/psnr_orig" in x for x in val)
    # The per-set pixel losses are this step's samples' losses: their weighted mean is the step's pixel loss.
    assert all(0 < x[f"loss/pixel/{general.name}"] < 2 for x in lines if f"loss/pixel/{general.name}" in x)


def test_a_set_of_another_encoder_is_refused(tmp_path, shards) -> None:
    other_vae = save_tiny_vae(tmp_path / "other-vae", seed=3)
    make_images(tmp_path / "imgs", 4)
    other = encode_folder(tmp_path / "imgs", tmp_path / "other-set", other_vae)
    res = cli("train", shards, "--mix", f"{other}:0.2", "--output", tmp_path / "run", *FAST_TRAIN,
              "run.max_steps=1", code=1)
    assert "data.mix set" in res.output and "other-set" in res.output and "encoder_sha256" in res.output


def test_mix_entries_are_checked() -> None:
    assert parse_mix("s3/bucket:x/set:0.25") == ("s3/bucket:x/set", 0.25)
    for bad, why in (("general", "PATH:P"), ("general:1.5", "(0, 1)"), ("general:0", "(0, 1)")):
        with pytest.raises(ConfigError, match=why.replace("(", r"\(").replace(")", r"\)")):
            parse_mix(bad)
    with pytest.raises(ConfigError, match="sum < 1"):
        load_train_config(None, ['data.mix=["a:0.6", "b:0.5"]'])
    res = cli("train", "S", "--mix", "g:0.2", "--mix", "h:0.1", "--dry-run")
    assert "- g:0.2" in res.output and "- h:0.1" in res.output


# ------------------------------------------------------------------------------------------------------------
# anchor (L2-SP)


def test_anchor_gradient_is_the_gradient_of_its_penalty() -> None:
    g = torch.Generator().manual_seed(0)
    params = [
        torch.randn(3, 4, generator=g, requires_grad=True),
        torch.randn(5, generator=g, requires_grad=True),
    ]
    anchors = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g)]
    alpha = 0.7
    penalty = anchor_penalty(params, anchors, alpha)
    reference = alpha / 2 * sum(((p - a) ** 2).sum() for p, a in zip(params, anchors))
    assert float(penalty.detach()) == pytest.approx(float(reference.detach()))
    expected = torch.autograd.grad(penalty, params)
    base = [torch.randn(p.shape, generator=g) for p in params]  # a gradient already there from the loss
    for p, b in zip(params, base):
        p.grad = b.clone()
    value = add_anchor_grad(params, anchors, alpha, grad_scale=4.0)
    assert value == pytest.approx(float(reference.detach()), rel=1e-6)
    for p, b, e in zip(params, base, expected):
        torch.testing.assert_close(p.grad, b + 4.0 * e)


def test_anchor_keeps_the_weights_near_the_original(tmp_path, shards, vae_dir) -> None:
    from diffusers import AutoencoderKL

    original = {k: v for k, v in AutoencoderKL.from_pretrained(vae_dir).state_dict().items()
                if k.startswith("decoder.")}
    distance = {}
    for alpha in (0.0, 1e5):  # nll is summed over pixels (LDM), so alpha is large next to a mean loss
        run = tmp_path / f"a{alpha}"
        cli("train", shards, "--output", run, *FAST_TRAIN, "run.max_steps=3", f"loss.anchor_weight={alpha}",
            "--no-export")
        w = load_file(str(run / "checkpoints" / "step-00000003" / "decoder.safetensors"))
        distance[alpha] = sum(float(((w[k] - original[k]) ** 2).sum()) for k in original)
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert ("loss/anchor" in lines[-1]) == (alpha > 0)
    assert distance[1e5] < 0.5 * distance[0.0], distance


def test_a_mixed_set_too_small_for_val_shards_trains_whole_and_says_how_to_hold_out(tmp_path, shards,
                                                                                   general) -> None:
    n_general = len(json.loads((general / "manifest.json").read_text())["shards"])
    n_main = len(json.loads((shards / "manifest.json").read_text())["shards"])
    assert n_general < n_main  # data.shards can hold out what the mixed set cannot
    run = tmp_path / "run"
    cli(
        "train",
        shards,
        "--mix",
        f"{general}:0.4",
        "--output",
        run,
        *FAST_TRAIN,
        f"data.val_shards={n_general}",
        "run.max_steps=2",
        "run.val_every_steps=2",
        "--no-export",
    )
    log = (run / "log.txt").read_text()
    assert f"has {n_general} shard(s), not more than data.val_shards={n_general}" in log
    assert "smaller --shard-size-mb" in log
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == 2 and any("val/psnr" in x for x in lines)  # trained, data.shards validated
    # data.shards itself still refuses a hold-out that leaves it nothing, with the same advice.
    res = cli(
        "train",
        shards,
        "--output",
        tmp_path / "r2",
        *FAST_TRAIN,
        f"data.val_shards={n_main}",
        "run.max_steps=1",
        code=1,
    )
    assert "leaves no training shards" in res.output
