"""Bad data and numerical faults during training, and a full disk: damaged shards and samples are skipped,
counted and logged (and a resumed run skips them exactly as the uninterrupted one); non-finite steps leave
weights, Adam state and EMA bit-identical and stop the run after run.max_bad_steps in a row; ENOSPC while
encoding, checkpointing or exporting is a message, and what was complete before stays loadable."""

from __future__ import annotations

import errno
import io
import json
import math
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAST_TRAIN, assert_same_tensors, cli, make_images, same_nested, train_lines
from safetensors.torch import load_file

import vaedec.checkpoint as checkpoint_mod
import vaedec.shards as shards_mod
import vaedec.train as train_mod
from vaedec.checkpoint import list_checkpoints
from vaedec.errors import ShardError
from vaedec.transport import iter_samples

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

FAST = [*FAST_TRAIN, "data.val_shards=1"]  # the last shard (validation, grids) stays intact


def rewrite_tar(path: Path, edit) -> str:
    """Rewrite the tar at `path` with edit(members) applied to {name: bytes} (in order); returns the first
    key."""
    with tarfile.open(path) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    members = edit(members)
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return next(iter(members)).split(".", 1)[0]


def first_key(path: Path) -> str:
    with tarfile.open(path) as tar:
        return tar.getmembers()[0].name.split(".", 1)[0]


def damage(shards: Path, out: Path) -> dict[str, str]:
    """A copy of `shards` with one fault in each training shard; {shard name: what is wrong}."""
    shutil.copytree(shards, out)
    tars = sorted(out.glob("shard-*.tar"))
    assert len(tars) >= 6, "the fixture makes six shards; five get a fault, the last is validation"

    def nan_moments(m):
        k = first_key(tars[2])
        arr = np.load(io.BytesIO(m[f"{k}.moments.npy"]))
        arr[0, 0, 0] = np.nan
        buf = io.BytesIO()
        np.save(buf, arr)
        return {**m, f"{k}.moments.npy": buf.getvalue()}

    def drop_image(m):
        k = first_key(tars[3])
        return {n: v for n, v in m.items() if n != f"{k}.image.png"}

    def cut_png(m):
        k = first_key(tars[4])
        return {**m, f"{k}.image.png": m[f"{k}.image.png"][:60]}

    rewrite_tar(tars[1], lambda m: {n: (b"not an npy" if n.endswith("moments.npy") and i < 3 else v)
                                    for i, (n, v) in enumerate(m.items())})
    rewrite_tar(tars[2], nan_moments)
    rewrite_tar(tars[3], drop_image)
    rewrite_tar(tars[4], cut_png)
    with tarfile.open(tars[0]) as tar:  # cut inside the second sample: the first is read, the rest is lost
        second = [m for m in tar.getmembers()][3]
    tars[0].write_bytes(tars[0].read_bytes()[: second.offset_data + 10])
    return {tars[0].name: "damaged tar", tars[1].name: "cannot decode", tars[2].name: "non-finite moments",
            tars[3].name: "missing image.png", tars[4].name: "cannot decode"}


# ------------------------------------------------------------------------------------------------------------
# bad samples


def test_bad_samples_are_skipped_counted_logged_and_resumed_exactly(tmp_path, shards) -> None:
    bad = tmp_path / "shards"
    faults = damage(shards, bad)
    args = [*FAST, "data.num_workers=1", "--no-export"]
    # A: 8 steps (more than an epoch of the ~10 good samples) in one go.
    run_a = tmp_path / "a"
    cli("train", bad, "--output", run_a, *args, "run.max_steps=8")
    log = (run_a / "log.txt").read_text()
    for shard, reason in faults.items():
        assert any(
            shard in line and reason in line for line in log.splitlines() if "bad sample skipped" in line
        ), (shard, reason, log)
    lines = train_lines(run_a)
    assert lines[-1]["data/bad_samples"] >= len(faults)
    # Each bad sample is logged once per run, though every epoch meets it again and counts it again.
    logged = [line.split("bad sample skipped: ")[1].split(":")[0] for line in log.splitlines()
              if "bad sample skipped" in line]
    assert len(logged) == len(set(logged)) and lines[-1]["data/bad_samples"] > len(logged), (
        logged,
        lines[-1],
    )
    assert [m["step"] for m in lines] == list(range(1, 9))  # training went on
    assert all(math.isfinite(m["loss/total"]) for m in lines) and lines[-1]["train/bad_steps"] == 0

    # B: the same run stopped at step 3 (after bad samples were dropped) and resumed: the same batches follow.
    run_b = tmp_path / "b"
    cli("train", bad, "--output", run_b, *args, "run.max_steps=3")
    state = json.loads((list_checkpoints(run_b)[-1] / "state.json").read_text())
    assert state["faults"]["bad_samples"] > 0 and state["data"]["positions"]["rank0"], state
    cli("train", bad, "--output", run_b, *args, "run.max_steps=8")
    a, b = (load_file(str(list_checkpoints(r)[-1] / "decoder.safetensors")) for r in (run_a, run_b))
    assert_same_tensors(a, b, "decoder after resuming past bad samples")
    drop = {"images_per_s", "peak_memory_mb"}
    assert [{k: v for k, v in m.items() if k not in drop} for m in train_lines(run_b)] == [
        {k: v for k, v in m.items() if k not in drop} for m in lines
    ]


def test_on_bad_sample_error_stops_with_the_shard_and_key(tmp_path, shards) -> None:
    bad = tmp_path / "shards"
    shutil.copytree(shards, bad)
    tar = min(bad.glob("shard-*.tar"))
    key = rewrite_tar(
        tar, lambda m: {n: (b"not an npy" if n.endswith("moments.npy") else v) for n, v in m.items()}
    )
    r = cli(
        "train",
        bad,
        "--output",
        tmp_path / "run",
        *FAST,
        "data.on_bad_sample=error",
        "data.shuffle_buffer=0",
        "run.max_steps=2",
        code=1,
    )
    assert f"{tar}: sample {key}: cannot decode" in r.output and "data.on_bad_sample=skip" in r.output, (
        r.output
    )


def test_shards_with_nothing_readable_are_a_message_not_a_hang(tmp_path, shards) -> None:
    bad = tmp_path / "shards"
    shutil.copytree(shards, bad)
    for tar in sorted(bad.glob("shard-*.tar"))[:-1]:
        tar.write_bytes(tar.read_bytes()[:700])
    r = cli("train", bad, "--output", tmp_path / "run", *FAST, "run.max_steps=2", code=1)
    assert "gave a readable sample" in r.output and "cannot be read" in r.output, r.output


def test_checked_sample_reasons(shards) -> None:
    raw = next(iter_samples(str(min(shards.glob("shard-*.tar")))))
    expect = {"moments": (8, 16, 16), "pixels": (3, 32, 32)}
    assert shards_mod.checked_sample(raw, expect=expect)["key"] == raw["__key__"]
    for edit, reason in (
        ({"image.png": None}, "missing image.png"),
        ({"moments.npy": b"\x93NUMPY garbage"}, "cannot decode"),
        ({"image.png": raw["image.png"][:50]}, "cannot decode"),
    ):
        sample = {k: v for k, v in {**raw, **edit}.items() if v is not None}
        with pytest.raises(shards_mod.BadSample, match=reason):
            shards_mod.checked_sample(sample, expect=expect)
    with pytest.raises(shards_mod.BadSample, match=r"moments shape \(8, 16, 16\), expected \(8, 8, 8\)"):
        shards_mod.checked_sample(raw, expect={"moments": (8, 8, 8)})


def test_bad_validation_samples_are_left_out_with_a_warning(tmp_path, shards) -> None:
    bad = tmp_path / "shards"
    shutil.copytree(shards, bad)
    last = sorted(bad.glob("shard-*.tar"))[-2]  # data.val_shards=2: grids and validation read it
    key = rewrite_tar(
        last,
        lambda m: {
            n: (b"not an npy" if n.endswith("moments.npy") and i < 3 else v)
            for i, (n, v) in enumerate(m.items())
        },
    )
    with pytest.raises(ShardError, match=f"sample {key}: cannot decode"):
        list(shards_mod.read_samples([str(last)]))
    run = tmp_path / "run"
    cli("train", bad, "--output", run, *FAST, "data.val_shards=2", "run.max_steps=1", "--no-export")
    assert f"bad sample skipped: shard {last.name}, key {key}: cannot decode" in (run / "log.txt").read_text()


# ------------------------------------------------------------------------------------------------------------
# non-finite steps


def snapshot(state) -> dict:
    """Bit-exact copies of what a skipped step must not touch."""
    acc = state.accelerator
    return {
        "decoder": {k: v.clone() for k, v in acc.unwrap_model(state.decoder).state_dict().items()},
        "disc": {k: v.clone() for k, v in acc.unwrap_model(state.disc).state_dict().items()},
        "opt_g": torch.utils._pytree.tree_map(
            lambda x: x.clone() if torch.is_tensor(x) else x, state.opt_g.state_dict()
        ),
        "opt_d": torch.utils._pytree.tree_map(
            lambda x: x.clone() if torch.is_tensor(x) else x, state.opt_d.state_dict()
        ),
        "ema": [p.clone() for p in state.ema.shadow_params],
        "ema_step": state.ema.optimization_step,
    }


def spy_steps(monkeypatch) -> list[tuple[dict, dict]]:
    """(before, after) snapshots around every train_step."""
    seen, real = [], train_mod.train_step

    def spy(state, *a, **k):
        before = snapshot(state)
        logs = real(state, *a, **k)
        seen.append((before, snapshot(state)))
        return logs

    monkeypatch.setattr(train_mod, "train_step", spy)
    return seen


@pytest.mark.parametrize("where", ["latents", "discriminator"])
def test_a_non_finite_step_is_skipped_and_training_goes_on(tmp_path, shards, monkeypatch, where) -> None:
    seen = spy_steps(monkeypatch)
    calls = {"n": 0}
    if where == "latents":  # NaN z in the second step: every loss and gradient of both phases is NaN
        real = train_mod.sample_latent

        def nan_z(*a, **k):
            calls["n"] += 1
            z = real(*a, **k)
            return torch.full_like(z, float("nan")) if calls["n"] == 2 else z

        monkeypatch.setattr(train_mod, "sample_latent", nan_z)
    else:  # only the discriminator's loss is NaN in the second step
        real_d = train_mod.discriminator_loss

        def nan_d(*a, **k):
            calls["n"] += 1
            loss, logs = real_d(*a, **k)
            return (loss * float("nan"), logs) if calls["n"] == 2 else (loss, logs)

        monkeypatch.setattr(train_mod, "discriminator_loss", nan_d)
    run = tmp_path / "run"
    cli("train", shards, "--output", run, *FAST, "run.max_steps=3", "--no-export")

    (b1, a1), (b2, a2), (b3, a3) = seen
    # step 1 trained
    assert not same_nested(b1["decoder"], a1["decoder"]) and not same_nested(b1["opt_d"], a1["opt_d"])
    if where == "latents":
        for part in ("decoder", "disc", "opt_g", "opt_d", "ema", "ema_step"):
            assert same_nested(b2[part], a2[part]), f"{part} changed in the skipped step"
    else:
        for part in ("disc", "opt_d"):
            assert same_nested(b2[part], a2[part]), f"{part} changed in the skipped discriminator step"
        # the generator stepped
        assert not same_nested(b2["decoder"], a2["decoder"]) and not same_nested(b2["ema"], a2["ema"])
    # and training goes on
    assert not same_nested(b3["decoder"], a3["decoder"]) and not same_nested(b3["disc"], a3["disc"])
    assert all(torch.isfinite(v).all() for v in a3["decoder"].values())
    lines = train_lines(run)
    assert [m["train/bad_steps"] for m in lines] == [0, 1, 1]
    assert [m["train/bad_steps_in_a_row"] for m in lines] == [0, 1, 0]
    assert "step 2: non-finite loss or gradient, optimizer step skipped" in (run / "log.txt").read_text()


def test_too_many_bad_steps_in_a_row_stop_the_run_with_the_likely_causes(
    tmp_path, shards, monkeypatch
) -> None:
    real = train_mod.sample_latent
    monkeypatch.setattr(train_mod, "sample_latent", lambda *a, **k: real(*a, **k) * float("nan"))
    r = cli(
        "train",
        shards,
        "--output",
        tmp_path / "run",
        *FAST,
        "run.max_bad_steps=3",
        "run.max_steps=10",
        code=1,
    )
    assert "3 optimizer steps in a row had a non-finite loss or gradient" in r.output, r.output
    assert "fp16 overflow" in r.output and "bf16" in r.output and "optim.lr" in r.output, r.output


# ------------------------------------------------------------------------------------------------------------
# a full disk


def enospc(*_a, **_k):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_while_encoding_keeps_every_complete_shard(tmp_path, vae_dir, monkeypatch) -> None:
    make_images(tmp_path / "images", 8)
    out = tmp_path / "shards"
    args = [
        "encode",
        tmp_path / "images",
        out,
        "--vae",
        vae_dir,
        "--resolution",
        32,
        "--shard-size-mb",
        0.02,
        "--num-workers",
        0,
        "--batch-size",
        2,
    ]
    real, written = shards_mod.ShardWriter.write, {"n": 0}

    def write_then_full(self, members):
        written["n"] += 1
        if written["n"] > 4:
            enospc()
        real(self, members)

    monkeypatch.setattr(shards_mod.ShardWriter, "write", write_then_full)
    r = cli(*args, code=1)
    assert "the disk is full" in r.output and "rerunning the same command resumes" in r.output, r.output
    assert not list(out.glob(".*")), "a temp file was left behind"
    assert json.loads((out / "manifest.json").read_text())["shards"], (
        "no shard was complete before the disk filled"
    )
    cli("inspect", out, "--verify")  # the complete shards are valid
    monkeypatch.setattr(shards_mod.ShardWriter, "write", real)
    cli(*args)  # space freed: the same command resumes and finishes
    assert json.loads((out / "manifest.json").read_text())["totals"]["samples"] == 8


def test_a_full_disk_while_checkpointing_and_exporting_keeps_what_was_complete(
    tmp_path, shards, monkeypatch
) -> None:
    from diffusers import AutoencoderKL

    run = tmp_path / "run"
    args = [*FAST, "run.checkpoint_every_steps=2", "run.keep_checkpoints=1"]
    cli("train", shards, "--output", run, *args, "run.max_steps=2")
    export = run / "export"
    before = AutoencoderKL.from_pretrained(export).state_dict()

    # The step-4 checkpoint cannot be written: a message, step 2 stays (not pruned), no temp folder is left.
    monkeypatch.setattr(checkpoint_mod, "save_file", enospc)
    r = cli("train", shards, "--output", run, *args, "run.max_steps=4", code=1)
    assert "the disk is full" in r.output and "resumes from the newest" in r.output, r.output
    assert [p.name for p in list_checkpoints(run)] == ["step-00000002"]
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]

    # The export cannot be written either: the earlier one is untouched and still loads.
    r = cli("export", run, export, code=1)
    assert "the disk is full" in r.output and "an earlier export stays whole" in r.output, r.output
    assert_same_tensors(AutoencoderKL.from_pretrained(export).state_dict(), before, "the earlier export")
    assert not [p for p in run.iterdir() if p.name.startswith(".export")]

    # Space freed: the same command resumes from step 2.
    monkeypatch.undo()
    cli("train", shards, "--output", run, *args, "run.max_steps=4")
    assert [p.name for p in list_checkpoints(run)] == ["step-00000004"]
    assert [m["step"] for m in train_lines(run)] == [1, 2, 3, 4]
