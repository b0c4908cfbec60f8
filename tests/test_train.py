"""`cli.py train`, `cli.py export` end to end on a tiny VAE: the run folder, resume after a real SIGKILL equal
to an uninterrupted run, gradient isolation in the real step, user errors, 2 CPU processes, bf16, lr_at."""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os

# Before diffusers / huggingface_hub are imported: nothing in this file may reach a hub.
os.environ["HF_HUB_OFFLINE"] = "1"

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    FAST_TRAIN,
    RANDOM_LPIPS,
    ROOT,
    assert_same_tensors,
    cli,
    free_port,
    frozen_part,
    make_images,
    metrics,
    save_tiny_vae,
    step_parts,
    train_lines,
    trained_part,
)
from diffusers import AutoencoderKL
from PIL import Image
from safetensors.torch import load_file

import vaedec.train as train_mod
import vaedec.vae as vae_mod
from vaedec.checkpoint import list_checkpoints
from vaedec.config import OptimConfig, load_train_config
from vaedec.latents import sample_latent
from vaedec.losses import LOG_KEYS
from vaedec.shards import read_manifest, read_samples, shard_paths
from vaedec.train import lr_at

RES = 32  # pixels; the tiny VAE downsamples by 2, so latents are (4, 16, 16)
BATCH = 2  # data.batch_size_per_device in FAST_TRAIN
PAD = 2  # save_grid's padding between tiles
FAST = FAST_TRAIN  # tests/conftest.py: tiny, GAN on from the first step, EMA 0.9
NOT_LOGGED_EXACTLY = {"step", "images_per_s", "peak_memory_mb"}  # wall-clock and process facts


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}


def checkpoint_tensors(ckpt: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.stem: load_file(str(p)) for p in sorted(ckpt.glob("*.safetensors"))}


def assert_same_nested(a, b, what: str) -> None:
    """Equal nested dicts/lists of tensors and numbers (optimizer state dicts), tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), what
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), what
        for k in a:
            assert_same_nested(a[k], b[k], f"{what}/{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_nested(x, y, f"{what}/{i}")
    else:
        assert a == b, f"{what}: {a!r} != {b!r}"


def grid_tiles(path: Path, rows: int, columns: int = 4) -> np.ndarray:
    """A saved grid -> (rows, columns, RES, RES, 3) uint8 tiles; checks the PNG's size first."""
    im = np.asarray(Image.open(path).convert("RGB"))
    assert im.shape == (rows * (RES + PAD) + PAD, columns * (RES + PAD) + PAD, 3), (path, im.shape)
    top, left = [PAD + i * (RES + PAD) for i in range(rows)], [PAD + j * (RES + PAD) for j in range(columns)]
    return np.stack([np.stack([im[y : y + RES, x : x + RES] for x in left]) for y in top])


# ------------------------------------------------------------------------------------------------------------
# 1. encode -> train -> resume -> export -> diffusers


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:LPIPS is using a RANDOM")
def test_encode_train_resume_export_end_to_end(tmp_path, vae_dir) -> None:
    make_images(tmp_path / "images", 10)
    cli("encode", tmp_path / "images", tmp_path / "shards", "--vae", vae_dir, "--resolution", RES,
        "--shard-size-mb", 0.02, "--num-workers", 0)
    shards, run = tmp_path / "shards", tmp_path / "run"
    args = ["train", shards, "--output", run, *FAST, *RANDOM_LPIPS, "data.val_shards=1",
            "run.image_every_steps=2", "run.checkpoint_every_steps=2"]

    first = cli(*args, "run.max_steps=2", "--no-export")
    assert "(step 2)" in first.output
    assert [c.name for c in list_checkpoints(run)] == ["step-00000002"]
    second = cli(*args, "run.max_steps=3")
    assert re.search(r"resumed from \S+step-00000002 at step 2", second.output), second.output
    assert json.loads((run / "checkpoints/step-00000003/state.json").read_text())["step"] == 3

    # --- the run folder
    log_txt = (run / "log.txt").read_text()
    assert "trainable" in log_txt and "encoder not loaded" in log_txt and "resumed from" in log_txt
    saved = load_train_config(run / "config.yaml")
    assert saved.run.max_steps == 3 and saved.data.shards == str(shards) and saved.loss.lpips_random_backbone
    lines = train_lines(run)
    assert [m["step"] for m in lines] == [1, 2, 3]  # each step once, across the resume
    for m in lines:
        for key in (*LOG_KEYS, "disc/loss", "lr", "images_per_s", "peak_memory_mb"):
            assert key in m and math.isfinite(m[key]), (key, m)
        assert m["loss/perceptual"] > 0 and m["loss/d_weight"] > 0 and m["images_per_s"] > 0
        assert m["peak_memory_mb"] > 0 and m["lr"] == pytest.approx(1e-3)
    val = [m for m in metrics(run) if "val/psnr" in m]
    assert [m["step"] for m in val] == [2, 3]
    assert all("val/lpips_ema" in m and "val/psnr_orig" in m for m in val)
    assert list((run / "tensorboard").rglob("events.out.tfevents.*")), "no TensorBoard event files"

    # --- grids: original | original decoder | decoder | EMA; rows are held-out samples (the last shard)
    val_shard = shard_paths(shards, read_manifest(shards))[-1:]
    held_out = [s["pixels"].permute(1, 2, 0).numpy() for s in read_samples(val_shard)]
    rows = min(2, len(held_out))  # run.grid_samples=2
    grids = sorted(p.name for p in (run / "images").glob("*.png"))
    assert grids == ["step-00000002.png", "step-00000003.png"]
    g2 = grid_tiles(run / "images/step-00000002.png", rows=rows)
    g3 = grid_tiles(run / "images/step-00000003.png", rows=rows)
    for tile in g3[:, 0]:  # column 1: stored pixels of held-out samples, exactly
        assert any(np.array_equal(tile, pixels) for pixels in held_out)
    assert np.array_equal(g2[:, 1], g3[:, 1])  # the original decoder's column survives the resume unchanged
    assert not np.array_equal(g3[:, 2], g3[:, 1])  # the trained decoder reconstructs differently
    assert not np.array_equal(g3[:, 3], g3[:, 2])  # EMA (decay 0.9) is not the raw weights

    # --- export: original encoder bit for bit, the checkpoint's EMA (or raw) decoder
    ckpt = checkpoint_tensors(run / "checkpoints/step-00000003")
    source = AutoencoderKL.from_pretrained(vae_dir).state_dict()
    cli("export", run, tmp_path / "ema")
    cli("export", run, tmp_path / "raw", "--no-ema")
    for folder, expected in (
        (run / "export", ckpt["ema"]),
        (tmp_path / "ema", ckpt["ema"]),
        (tmp_path / "raw", ckpt["decoder"]),
    ):
        exported = AutoencoderKL.from_pretrained(folder).state_dict()
        assert_same_tensors(frozen_part(exported), frozen_part(source), f"{folder} encoder")
        assert_same_tensors(trained_part(exported), expected, f"{folder} decoder")
        assert any(not torch.equal(exported[k], source[k]) for k in trained_part(source)), "decoder unchanged"
    assert not torch.equal(ckpt["ema"]["decoder.conv_out.weight"], ckpt["decoder"]["decoder.conv_out.weight"])


# ------------------------------------------------------------------------------------------------------------
# 2. a resumed run equals an uninterrupted one (torchtune-style)

RESUME_ARGS = [*FAST, "loss.disc_start_step=1", "data.num_workers=1", "run.checkpoint_every_steps=3",
               "run.keep_checkpoints=0", "--no-export"]
STATE_6 = Path("checkpoints/step-00000006/state.json")


def start(cmd: list[str], out, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`cmd` in the repository root, in its own process group (so its DataLoader workers or ranks die with
    it)."""
    env = env or subprocess_env()
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )


def kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def kill_after_checkpoint(cmd: list[str], ckpt: Path, log: Path, timeout_s: float = 300.0) -> None:
    """Start `cmd`; SIGKILL it as soon as `ckpt` is complete (checkpoint folders appear whole, by rename)."""
    with open(log, "w") as out:
        proc = start(cmd, out)
        deadline = time.monotonic() + timeout_s
        try:
            while not (ckpt / "state.json").is_file():
                assert proc.poll() is None, f"ended (rc {proc.returncode}) before {ckpt}:\n{log.read_text()}"
                assert time.monotonic() < deadline, f"no {ckpt} after {timeout_s} s"
                time.sleep(0.01)
        finally:
            kill_group(proc)
    assert proc.returncode == -signal.SIGKILL, f"run finished before the kill; log:\n{log.read_text()}"


@pytest.mark.slow
def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path, shards) -> None:
    # A: 6 steps uninterrupted (checkpoints at 3 and 6). GAN from the second step, so the checkpoint at 3
    # holds both optimizers mid-flight, the PatchGAN's BatchNorm buffers, the EMA, the latent-noise generator
    # and a DataLoader worker's position in the shard stream.
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    cli("train", shards, "--output", a, *RESUME_ARGS, "run.max_steps=6")

    # B: the same command in a real process, SIGKILLed right after its step-3 checkpoint, then run again.
    cmd = [sys.executable, "cli.py", "train", str(shards), "--output", str(b), *RESUME_ARGS]
    cmd.append("run.max_steps=6")
    kill_after_checkpoint(cmd, b / "checkpoints/step-00000003", tmp_path / "killed.log")
    assert not (b / "checkpoints/step-00000006").exists()
    resumed = cli(*cmd[2:])
    assert "resumed from" in resumed.output and "at step 3" in resumed.output

    # C: stopped cleanly at max_steps=3, then continued to 6 (same constant LR schedule, so the same run).
    cli("train", shards, "--output", c, *RESUME_ARGS, "run.max_steps=3")
    cli("train", shards, "--output", c, *RESUME_ARGS, "run.max_steps=6")

    # On CPU the whole run is deterministic, so the comparison is exact: every logged loss of every step (λ,
    # the discriminator's loss and logits included), and every tensor of the final checkpoint.
    ref = train_lines(a)
    assert [m["step"] for m in ref] == [1, 2, 3, 4, 5, 6]
    assert ref[0]["loss/d_weight"] == 0 and ref[1]["loss/d_weight"] > 0 and "disc/loss" in ref[1]
    final_a = checkpoint_tensors(a / "checkpoints/step-00000006")
    for other in (b, c):
        got = train_lines(other)
        assert [m["step"] for m in got] == [m["step"] for m in ref], other
        for m, r in zip(got, ref):
            assert {k: v for k, v in m.items() if k not in NOT_LOGGED_EXACTLY} == {
                k: v for k, v in r.items() if k not in NOT_LOGGED_EXACTLY
            }, f"{other}: step {m['step']} differs"
        final = checkpoint_tensors(other / "checkpoints/step-00000006")
        assert final.keys() == final_a.keys() == {"decoder", "ema", "disc", "extra"}
        for stem in final_a:
            assert_same_tensors(final[stem], final_a[stem], f"{other.name}/{stem}")
        state, state_a = (json.loads((r / STATE_6).read_text()) for r in (other, a))
        optim, optim_a = (torch.load(r / STATE_6.parent / "optim.pt", weights_only=True) for r in (other, a))
        assert_same_nested(optim, optim_a, f"{other.name}/optim.pt")  # Adam moments and step counts
        assert state == state_a | {"config": state["config"]}  # step, data position, EMA step
        assert not list((other / "checkpoints").glob(".step-*"))  # no half-written checkpoint left behind


# ------------------------------------------------------------------------------------------------------------
# 3. gradient isolation inside the real training step


def test_training_step_isolates_encoder_decoder_and_discriminator(
    tmp_path, shards, vae_dir, monkeypatch
) -> None:
    seen: dict = {}
    real_load_vae, real_trainable = vae_mod.load_vae, vae_mod.TrainableDecoder

    def load_vae_without_encoder_forward(*args, **kwargs):
        vae = real_load_vae(*args, **kwargs)

        def never(*_a, **_k):
            raise AssertionError("the encoder ran during training")

        vae.encoder.forward = never
        return vae

    def spy_decoder(vae):
        seen["decoder"] = real_trainable(vae)
        return seen["decoder"]

    monkeypatch.setattr(vae_mod, "load_vae", load_vae_without_encoder_forward)
    monkeypatch.setattr(vae_mod, "TrainableDecoder", spy_decoder)
    run = tmp_path / "run"
    args = [*FAST, "model.train_post_quant_conv=false", "run.max_steps=2", "--no-export"]
    cli("train", shards, "--output", run, *args)

    # The decoder that trains holds post_quant_conv + decoder only; the encoder never ran.
    assert {k.split(".")[0] for k in seen["decoder"].state_dict()} == {"post_quant_conv", "decoder"}
    source = AutoencoderKL.from_pretrained(vae_dir)
    n_decoder = sum(p.numel() for p in source.decoder.parameters())
    n_pqc = sum(p.numel() for p in source.post_quant_conv.parameters())
    assert f"decoder: {n_decoder:,} trainable / {n_pqc:,} frozen parameters" in (run / "log.txt").read_text()

    # model.train_post_quant_conv=false: the checkpoint holds only what trains, and post_quant_conv comes out
    # of the export bit-identical to the original while the decoder does not.
    ckpt = checkpoint_tensors(list_checkpoints(run)[-1])
    src = source.state_dict()
    for stem in ("decoder", "ema"):
        assert not any(k.startswith("post_quant_conv.") for k in ckpt[stem]), stem
    assert not torch.equal(ckpt["decoder"]["decoder.conv_out.weight"], src["decoder.conv_out.weight"])
    cli("export", run, tmp_path / "export")
    exported = AutoencoderKL.from_pretrained(tmp_path / "export").state_dict()
    pqc = {k: v for k, v in exported.items() if k.startswith("post_quant_conv.")}
    assert pqc and all(torch.equal(v, src[k]) for k, v in pqc.items())


def test_generator_and_discriminator_steps_give_gradients_only_to_their_own_model(shards) -> None:
    """At each optimizer step of train's own phases: that optimizer's parameters have gradients, the other's
    none."""
    from accelerate import Accelerator

    from vaedec.images import batch_to_model
    from vaedec.shards import collate

    parts = step_parts(shards, ["model.train_post_quant_conv=false"], 8)  # as train() builds them
    cfg, decoder, disc, logvar, opt_g, opt_d = (
        parts.cfg,
        parts.decoder,
        parts.disc,
        parts.logvar,
        parts.opt_g,
        parts.opt_d,
    )
    params = {
        name: [p for g in opt.param_groups for p in g["params"]] for name, opt in (("g", opt_g), ("d", opt_d))
    }
    # The decoder's optimizer holds the decoder only: no post_quant_conv (frozen), no logvar (not learned).
    assert {id(p) for p in params["g"]} == {id(p) for p in decoder.decoder.parameters()}
    assert {id(p) for p in params["d"]} == {id(p) for p in disc.parameters()}

    checks = []
    for name, opt, other in (("g", opt_g, "d"), ("d", opt_d, "g")):

        def spy_step(*a, _name=name, _other=other, _real=opt.step, **k):
            has_grads = all(p.grad is not None for p in params[_name])
            other_has_none = all(p.grad is None for p in params[_other])
            checks.append((_name, has_grads, other_has_none))
            return _real(*a, **k)

        opt.step = spy_step  # this instance only; torch.optim.Adam itself is untouched

    accelerator, noise, samples = Accelerator(), torch.Generator().manual_seed(0), parts.samples
    for step in range(2):
        # 2 micro-batches
        batches = [collate(samples[4 * step + 2 * i : 4 * step + 2 * i + 2]) for i in range(2)]
        micro = [
            (batch_to_model(b, accelerator.device), sample_latent(b["moments"], "sample", noise))
            for b in batches
        ]
        stored, logs = train_mod.generator_step(
            accelerator, decoder, disc, opt_g, logvar, None, micro, cfg, step
        )
        assert logs["loss/d_weight"] > 0  # the GAN term was in the decoder's gradient
        d_logs = train_mod.discriminator_step(accelerator, disc, opt_d, stored, cfg, step)
        assert d_logs  # the discriminator stepped
    # Two steps, each: generator step with only decoder grads, discriminator step with only PatchGAN grads.
    assert checks == [("g", True, True), ("d", True, True)] * 2


def test_loss_phases_leave_the_other_model_without_gradients(vae_dir) -> None:
    """The generator phase gives the PatchGAN no .grad; the discriminator phase gives the decoder none."""
    from vaedec.config import LossConfig
    from vaedec.discriminator import build_discriminator
    from vaedec.losses import discriminator_loss, generator_grads, surrogate_loss
    from vaedec.vae import TrainableDecoder

    torch.manual_seed(0)
    cfg = LossConfig(perceptual_weight=0.0, disc_start_step=0, disc_ndf=8)
    decoder = TrainableDecoder(AutoencoderKL.from_pretrained(vae_dir))
    disc = build_discriminator(cfg, 3)
    logvar = torch.nn.Parameter(torch.zeros(()), requires_grad=False)
    x, z = torch.rand(2, 3, RES, RES) * 2 - 1, torch.randn(2, 4, RES // 2, RES // 2)

    x_rec, h = decoder(z)
    grads = generator_grads(x, x_rec, h, decoder.conv_out, None, disc, logvar, cfg, step=0)
    assert grads.logs["loss/d_weight"] > 0  # the GAN term is in this gradient
    surrogate_loss(x_rec, grads, logvar).backward()
    assert all(p.grad is not None for p in decoder.parameters())
    assert all(p.grad is None for p in disc.parameters())

    decoder.zero_grad(set_to_none=True)
    d_loss, _ = discriminator_loss(disc, x, x_rec, cfg, step=0)  # x_rec still attached to the decoder's graph
    d_loss.backward()
    assert all(p.grad is not None for p in disc.parameters())
    assert all(p.grad is None for p in decoder.parameters())


# ------------------------------------------------------------------------------------------------------------
# 4-5. user errors: one line, exit code 1, no traceback


def test_vae_with_another_encoder_is_refused(tmp_path, shards) -> None:
    other = save_tiny_vae(tmp_path / "other-vae", seed=1)
    run = tmp_path / "run"
    result = cli("train", shards, "--output", run, *FAST, "run.max_steps=1", "--vae", other, code=1)
    assert "Error:" in result.output and "encoder" in result.output and "sha256" in result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    assert not list_checkpoints(run)


def test_vae_with_the_same_encoder_is_accepted(tmp_path, shards, vae_dir) -> None:
    """--vae may name a VAE whose decoder differs (a previous fine-tune): same encoder, same latent space."""
    vae = AutoencoderKL.from_pretrained(vae_dir)
    torch.manual_seed(5)
    for p in vae.decoder.parameters():
        p.data.add_(0.01 * torch.randn_like(p))
    vae.save_pretrained(tmp_path / "retuned")
    run = tmp_path / "run"
    cli("train", shards, "--output", run, *FAST, "run.max_steps=1", "--vae", tmp_path / "retuned")
    exported = AutoencoderKL.from_pretrained(run / "export").state_dict()
    assert_same_tensors(frozen_part(exported), frozen_part(vae.state_dict()), "encoder")


def test_grids_and_validation_follow_their_own_cadence(tmp_path, shards) -> None:
    """image_every_steps writes grids, val_every_steps runs validation; the end of the run does both once."""
    run = tmp_path / "run"
    args = ["train", shards, "--output", run, *FAST, "data.val_shards=1", "run.image_every_steps=2",
            "run.val_every_steps=3", "--no-export"]
    cli(*args, "run.max_steps=5")  # 5 is due for neither: the end of the run does both
    assert sorted(p.name for p in (run / "images").glob("*.png")) == [
        "step-00000002.png", "step-00000004.png", "step-00000005.png"]
    assert [m["step"] for m in metrics(run) if "val/psnr" in m] == [3, 5]
    cli(*args, "run.max_steps=6")  # resumed; 6 is due for both, and the end of the run adds nothing
    assert [m["step"] for m in metrics(run) if "val/psnr" in m] == [3, 5, 6]
    assert len(list((run / "images").glob("*.png"))) == 4
    finished = (run / "metrics.jsonl").read_text()
    cli(*args, "run.max_steps=6")  # a finished run, rerun: nothing to do, nothing logged twice
    assert (run / "metrics.jsonl").read_text() == finished


def test_validation_uses_lpips_when_weights_are_here_even_if_the_loss_does_not(
    tmp_path, shards, monkeypatch
) -> None:
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # no weights in the default place
    # perceptual_weight=0
    args = ["train", shards, *FAST, "data.val_shards=1", "run.max_steps=1", "--no-export"]
    r = cli(*args, "--output", tmp_path / "without")
    assert "validation without LPIPS: no VGG16 weights" in r.output, r.output
    assert all("val/lpips" not in m for m in metrics(tmp_path / "without"))

    torch.manual_seed(0)
    features = torchvision.models.vgg16(weights=None).features  # the only part LPIPS reads; random values
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, tmp_path / "vgg16.pth")
    cli(*args, "--output", tmp_path / "with", f"loss.lpips_vgg_weights={tmp_path / 'vgg16.pth'}")
    val = [m for m in metrics(tmp_path / "with") if "val/psnr" in m]
    assert val and all(m["val/lpips"] > 0 and m["val/lpips_orig"] > 0 for m in val)
    assert all(
        "loss/perceptual" not in m or m["loss/perceptual"] == 0 for m in train_lines(tmp_path / "with")
    )


def test_bf16_autocast_trains_with_fp32_master_weights(tmp_path, shards) -> None:
    args = ["train", shards, *FAST, "run.max_steps=2", "run.checkpoint_every_steps=2", "--no-export"]
    cli(*args, "--output", tmp_path / "fp32")
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # one process, two precisions: as two CLI runs
    cli(*args, "--output", tmp_path / "bf16", "run.mixed_precision=bf16")
    fp32 = checkpoint_tensors(tmp_path / "fp32/checkpoints/step-00000002")
    bf16 = checkpoint_tensors(tmp_path / "bf16/checkpoints/step-00000002")
    for part in ("decoder", "disc", "ema"):
        floats = [t for t in bf16[part].values() if t.is_floating_point()]  # (BatchNorm also counts batches)
        assert floats and all(t.dtype == torch.float32 for t in floats), part  # master weights stay fp32
    # autocast really ran in bf16: same seed and data, slightly different weights, every loss finite
    conv = "decoder.conv_out.weight"
    assert not torch.equal(bf16["decoder"][conv], fp32["decoder"][conv])
    torch.testing.assert_close(bf16["decoder"][conv], fp32["decoder"][conv], rtol=0.05, atol=0.05)
    for m in train_lines(tmp_path / "bf16"):
        assert all(math.isfinite(m[k]) for k in LOG_KEYS), m


def test_shards_where_every_input_was_skipped_are_a_clear_error(tmp_path, vae_dir) -> None:
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.png").write_bytes(b"not a png")
    (tmp_path / "bad" / "b.jpg").write_bytes(b"")
    cli("encode", tmp_path / "bad", tmp_path / "shards", "--vae", vae_dir, "--num-workers", 0, code=3)
    result = cli("train", tmp_path / "shards", "--output", tmp_path / "run", *FAST, code=1)
    assert "holds no samples" in result.output and "skipped.jsonl" in result.output, result.output


def test_missing_lpips_weights_file_is_a_clear_error(tmp_path, shards) -> None:
    missing = tmp_path / "nowhere" / "vgg16-397923af.pth"
    args = [*FAST, "run.max_steps=1", "loss.perceptual_weight=1.0", f"loss.lpips_vgg_weights={missing}"]
    result = cli("train", shards, "--output", tmp_path / "run", *args, code=1)
    assert str(missing) in result.output and "lpips_vgg_weights" in result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)


def test_processes_that_accelerate_did_not_connect_are_refused(tmp_path, shards, monkeypatch) -> None:
    """`accelerate launch --multi_gpu` without GPUs and without ACCELERATE_USE_CPU starts N lone rank-0s."""
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets in each process it starts
    result = cli("train", shards, "--output", tmp_path / "run", *FAST, "run.max_steps=1", code=1)
    assert "ACCELERATE_USE_CPU" in result.output and "Traceback" not in result.output


# ------------------------------------------------------------------------------------------------------------
# 6. two CPU processes with real accelerate (gloo)


@pytest.mark.slow
def test_two_cpu_processes_with_accelerate_launch(tmp_path, shards) -> None:
    # `accelerate launch --cpu --num_processes 2` starts ONE process unless mpirun is used (accelerate's CPU
    # launcher is its simple launcher); two gloo processes need the torchrun launcher (--multi_gpu) and
    # ACCELERATE_USE_CPU=true, without which each process would run alone as rank 0 of 1.
    run, steps = tmp_path / "run", 3
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()),
        "cli.py", "train", str(shards), "--output", str(run), *FAST, f"run.max_steps={steps}",
        "run.checkpoint_every_steps=2", "--no-export",
    ]
    env = {**subprocess_env(), "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    log = tmp_path / "launch.log"
    with open(log, "w") as f:
        proc = start(cmd, f, env)
        try:
            proc.wait(timeout=300)  # a collective that only some ranks reach hangs forever
        finally:
            if proc.returncode is None:
                # torchrun starts each rank in a session of its own; on SIGTERM it stops them itself.
                os.killpg(proc.pid, signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=60)
                kill_group(proc)
    out = log.read_text()
    assert proc.returncode == 0, out
    # One summary and one log line per checkpoint, from the main process (that rank 1 also reached the last
    # step shows in the checkpoint below: it holds rank 1's noise state after `steps` draws).
    assert re.findall(r"run folder\s+\S+\s+\(step (\d+)\)", out) == [str(steps)], out
    assert out.count("checkpoints/step-00000002") == 1 and out.count("checkpoints/step-00000003") == 1, out
    assert [c.name for c in list_checkpoints(run)] == ["step-00000002", "step-00000003"]
    assert [m["step"] for m in train_lines(run)] == [1, 2, 3]
    # Each rank drew its own latent noise exactly `steps` times (seed * 1000 + rank, as the trainer seeds it):
    # the checkpoint holds both ranks' generator states, gathered to the main process.
    extra = load_file(str(run / "checkpoints/step-00000003/extra.safetensors"))
    moments = next(iter(read_samples(shard_paths(shards, read_manifest(shards))[:1], 1)))["moments"]
    shape = (BATCH, *moments.shape)
    for rank in (0, 1):
        g = torch.Generator().manual_seed(rank)  # run.seed = 0
        for _ in range(steps):
            sample_latent(torch.zeros(shape), "sample", g)
        assert torch.equal(extra[f"noise_rank{rank}"], g.get_state()), rank
    assert not torch.equal(extra["noise_rank0"], extra["noise_rank1"])
    # Both ranks' data positions, gathered the same way (each resumes its own stream from it).
    positions = json.loads((run / "checkpoints/step-00000003/state.json").read_text())["data"]["positions"]
    assert sorted(positions) == ["rank0", "rank1"] and all(p["0"]["sets"] for p in positions.values()), (
        positions
    )


# ------------------------------------------------------------------------------------------------------------
# 7. bf16 autocast on CPU


@pytest.mark.filterwarnings("ignore:LPIPS is using a RANDOM")
def test_bf16_autocast_run_has_finite_losses(tmp_path, shards, monkeypatch) -> None:
    dtypes = []
    real = vae_mod.TrainableDecoder

    def spy(vae):  # records the dtype conv_out computes in (accelerate returns the outputs as fp32)
        decoder = real(vae)
        decoder.conv_out.register_forward_hook(lambda _m, _a, out: dtypes.append(out.dtype))
        return decoder

    monkeypatch.setattr(vae_mod, "TrainableDecoder", spy)
    run = tmp_path / "run"
    args = [*FAST, *RANDOM_LPIPS, "run.mixed_precision=bf16", "run.max_steps=2", "--no-export"]
    cli("train", shards, "--output", run, *args)
    assert torch.bfloat16 in dtypes  # the decoder really ran under bf16 autocast
    lines = train_lines(run)
    assert [m["step"] for m in lines] == [1, 2]
    for m in lines:
        assert all(math.isfinite(v) for v in m.values()), m
        assert m["loss/d_weight"] > 0 and m["loss/perceptual"] > 0
    weights = load_file(str(list_checkpoints(run)[-1] / "decoder.safetensors"))
    assert {v.dtype for v in weights.values()} == {torch.float32}  # master weights stay fp32


# ------------------------------------------------------------------------------------------------------------
# 8. the LR schedule


def test_lr_at_warmup_constant_and_cosine() -> None:
    warm = OptimConfig(warmup_steps=4)
    assert [lr_at(s, warm, 100) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_at(99, warm, 100) == 1.0 and lr_at(0, OptimConfig(), 100) == 1.0

    cos = OptimConfig(schedule="cosine", warmup_steps=4, min_lr_ratio=0.1)
    assert lr_at(3, cos, 14) == 1.0 and lr_at(4, cos, 14) == 1.0  # warmup ends at the cosine's start
    assert lr_at(9, cos, 14) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway
    assert lr_at(14, cos, 14) == pytest.approx(0.1)  # the end
    assert lr_at(50, cos, 14) == pytest.approx(0.1)  # and after it
    values = [lr_at(s, cos, 14) for s in range(4, 15)]
    assert all(a >= b for a, b in itertools.pairwise(values))
    plain_cosine = OptimConfig(schedule="cosine")  # no warmup, down to 0
    assert lr_at(0, plain_cosine, 10) == 1.0 and lr_at(10, plain_cosine, 10) == 0.0
