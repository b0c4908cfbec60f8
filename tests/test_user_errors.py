"""A user mistake ends in a message that says what to fix (exit 1, never a traceback) and never destroys data.

Each case here was found by trying the CLI as a user would: exports aimed at the wrong folder, resumes that do
not fit, wrong weight files, damaged shards, bad devices, hand-edited manifests.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import FAST_TRAIN, cli, make_images
from diffusers import AutoencoderKL
from safetensors.torch import load_file

RES = 32
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture
def run(tmp_path, shards) -> Path:
    """A finished 2-step run with a checkpoint and its export."""
    cli("train", shards, "--output", tmp_path / "run", *FAST_TRAIN, "run.max_steps=2")
    return tmp_path / "run"


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------------------
# export


def test_export_never_deletes_what_it_did_not_write(tmp_path, run, shards, monkeypatch) -> None:
    before, shards_before = tree(run), tree(shards)
    # the run itself, a folder above it, its checkpoints
    for target in (run, run.parent, run / "checkpoints"):
        r = cli("export", run, target, "--overwrite", code=1)
        assert "would delete" in r.output, r.output
    r = cli("export", run, shards, code=1)  # a folder of other files
    assert "not a vaedec export" in r.output and "--overwrite" in r.output, r.output
    (tmp_path / "notes.txt").write_text("mine")
    r = cli("export", run, tmp_path / "notes.txt", code=1)
    assert "is a file" in r.output, r.output
    r = cli("export", run, tmp_path / "vae-out", "--checkpoint", shards, code=1)
    assert "not a vaedec checkpoint" in r.output, r.output
    assert tree(run) == before and tree(shards) == shards_before
    assert (tmp_path / "notes.txt").read_text() == "mine" and not (tmp_path / "vae-out").exists()

    # Allowed: a new folder, an earlier export (replaced), and a foreign folder with --overwrite.
    cli("export", run, tmp_path / "vae-out")
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    cli("export", run, ".")  # the current (empty) folder
    AutoencoderKL.from_pretrained(tmp_path / "here")
    cli("export", run, tmp_path / "vae-out", "--format", "ldm")
    assert (
        not (tmp_path / "vae-out" / "config.json").exists()
        and (tmp_path / "vae-out" / "vae.safetensors").exists()
    )
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "old.txt").write_text("x")
    cli("export", run, foreign, "--overwrite")
    assert not (foreign / "old.txt").exists()
    AutoencoderKL.from_pretrained(foreign)


# ------------------------------------------------------------------------------------------------------------
# resume


def test_a_resume_that_does_not_fit_is_refused_and_leaves_the_run_as_it_was(run, shards) -> None:
    before = tree(run)
    r = cli(
        "train", shards, "--output", run, *FAST_TRAIN, "run.max_steps=4", "loss.disc_num_layers=2", code=1
    )
    assert "cannot resume" in r.output and "loss.disc_num_layers was 3, now 2" in r.output, r.output
    r = cli("train", shards, "--output", run, *FAST_TRAIN, "run.max_steps=4", "optim.ema_decay=0", code=1)
    assert "optim.ema_decay" in r.output, r.output
    r = cli(
        "train", shards, "--output", run, *FAST_TRAIN, "run.max_steps=4", "loss.learn_logvar=true", code=1
    )
    assert "loss.learn_logvar was False, now True" in r.output, r.output
    r = cli("train", shards, "--output", run, *FAST_TRAIN, "run.max_steps=4", "--resume", "none", code=1)
    assert "--resume none" in r.output and "another --output" in r.output, r.output
    other = run.parent / "other"
    cli("train", shards, "--output", other, *FAST_TRAIN, "run.max_steps=1", "--no-export")
    r = cli("train", shards, "--output", run, *FAST_TRAIN, "run.max_steps=4", "--resume", other, code=1)
    assert "holds checkpoints of its own" in r.output and "rerun without --resume" in r.output, r.output
    after = tree(run)
    after.pop("log.txt"), before.pop("log.txt")  # the refusals are logged, nothing else changes
    assert after == before


def test_resume_conflicts_lists_each_reason() -> None:
    from vaedec.checkpoint import resume_conflicts
    from vaedec.config import TrainConfig, config_to_dict

    cfg = config_to_dict(TrainConfig())
    assert resume_conflicts(cfg, cfg, "a", "a", 1, 1) == []
    assert resume_conflicts(cfg, {**cfg, "optim": {**cfg["optim"], "lr": 1.0}}, None, "a", 2, 2) == []
    problems = resume_conflicts(cfg, cfg, "a", "b", 1, 2)
    assert len(problems) == 2 and "another encoder" in problems[1]
    assert "written by 1 process(es), this run has 2" in problems[0] and "--num_processes 1" in problems[0]


def test_a_fresh_start_drops_metrics_of_a_try_killed_before_its_first_checkpoint(tmp_path, shards) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss/rec": 9.0}) + "\n" + '{"step": 2, "lo')
    cli("train", shards, "--output", run, *FAST_TRAIN, "run.max_steps=2", "--no-export")
    steps = [
        json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines() if "loss/rec" in x
    ]
    assert steps == [1, 2]


# ------------------------------------------------------------------------------------------------------------
# files that are not what they should be


def test_a_wrong_lpips_weights_file_is_a_message(tmp_path, shards) -> None:
    bad = tmp_path / "vgg16-397923af.pth"
    bad.write_bytes(b"<html>a proxy's error page</html>")
    r = cli("train", shards, "--output", tmp_path / "run", *FAST_TRAIN, "loss.perceptual_weight=1",
            f"loss.lpips_vgg_weights={bad}", code=1)
    assert "could not be read as a torch state dict" in r.output and str(bad) in r.output, r.output


def test_a_damaged_shard_is_named_during_training(tmp_path, shards) -> None:
    damaged = tmp_path / "shards"
    shutil.copytree(shards, damaged)
    first = min(damaged.glob("shard-*.tar"))  # a training shard: grids and validation read the last one
    first.write_bytes(first.read_bytes()[:700])  # cut inside the first member's data
    for workers in (0, 1):  # read in this process, and in a DataLoader worker
        r = cli("train", damaged, "--output", tmp_path / f"run{workers}", *FAST_TRAIN,
                f"data.num_workers={workers}", "data.shuffle_buffer=0", "data.val_shards=1",
                "data.on_bad_sample=error", code=1)  # the default, skip, trains on (tests/test_faults.py)
        assert f"{first} cannot be read" in r.output and "--verify" in r.output, r.output
        assert "Traceback" not in r.output, r.output


def test_a_manifest_without_its_fields_is_a_message(tmp_path, shards, vae_dir) -> None:
    edited = tmp_path / "shards"
    shutil.copytree(shards, edited)
    manifest = json.loads((edited / "manifest.json").read_text())
    del manifest["settings"]["vae"]["encoder_sha256"], manifest["totals"]
    (edited / "manifest.json").write_text(json.dumps(manifest))
    for args in (
        ("inspect", edited),
        ("train", edited, "--output", tmp_path / "run", *FAST_TRAIN),
        (
            "encode",
            shards.parent / "images",
            edited,
            "--vae",
            vae_dir,
            "--resolution",
            RES,
            "--shard-size-mb",
            0.02,
        ),
    ):
        r = cli(*args, code=1)
        assert "lacks totals.samples, settings.vae.encoder_sha256" in r.output, r.output


def test_settings_that_quietly_do_less_than_asked_are_warned_about(tmp_path, shards) -> None:
    unfinished = tmp_path / "shards"
    shutil.copytree(shards, unfinished)
    manifest = json.loads((unfinished / "manifest.json").read_text())
    manifest["complete"] = False
    (unfinished / "manifest.json").write_text(json.dumps(manifest))
    r = cli(
        "train",
        unfinished,
        "--output",
        tmp_path / "run",
        *FAST_TRAIN,
        "run.max_steps=1",
        "run.mixed_precision=fp16",
        "--no-export",
    )
    assert "unfinished encode" in r.output and "rerun the encode command" in r.output, r.output
    assert "fp16 has no effect on CPU" in r.output, r.output


def test_a_bad_device_is_a_message_and_leaves_no_output_folder(tmp_path, vae_dir) -> None:
    make_images(tmp_path / "images", 2)
    for device, message in (("gpu0", "not a torch device"), ("cuda:7", "CUDA")):
        out = tmp_path / f"out-{device.replace(':', '')}"
        r = cli(
            "encode",
            tmp_path / "images",
            out,
            "--vae",
            vae_dir,
            "--resolution",
            RES,
            "--device",
            device,
            code=1,
        )
        assert f"--device {device}" in r.output and message in r.output, r.output
        assert not out.exists()


# ------------------------------------------------------------------------------------------------------------
# single files and conversion


def test_a_single_file_vae_keeps_the_scaling_factor_it_is_given(tmp_path, vae_dir) -> None:
    """LDM files do not store scaling_factor: the encode says which one it assumed, records it, and train's
    export carries the manifest's value (an SDXL user's 0.13025 must not turn into SD's 0.18215)."""
    single = tmp_path / "vae.safetensors"
    cli("convert", vae_dir, single)
    make_images(tmp_path / "images", 4)
    r = cli("encode", tmp_path / "images", tmp_path / "assumed", "--vae", single, "--resolution", RES,
            "--num-workers", 0)
    assert "do not store the latent scaling_factor; assuming 0.18215" in r.output, r.output
    cli(
        "encode",
        tmp_path / "images",
        tmp_path / "xl",
        "--vae",
        single,
        "--resolution",
        RES,
        "--num-workers",
        0,
        "--scaling-factor",
        0.13025,
    )
    manifest = json.loads((tmp_path / "xl" / "manifest.json").read_text())
    assert manifest["settings"]["vae"]["scaling_factor"] == 0.13025
    cli("train", tmp_path / "xl", "--output", tmp_path / "run", *FAST_TRAIN, "run.max_steps=1")
    assert json.loads((tmp_path / "run" / "export" / "config.json").read_text())["scaling_factor"] == 0.13025
    r = cli("encode", tmp_path / "images", tmp_path / "sub", "--vae", single, "--subfolder", "vae", code=1)
    assert "single file" in r.output and "--subfolder" in r.output, r.output


def test_convert_file_to_file_changes_layout_only(tmp_path, vae_dir) -> None:
    full = tmp_path / "full.ckpt"
    cli("convert", vae_dir, full, "--prefix", "first_stage_model")
    cli("convert", full, tmp_path / "plain.safetensors")
    cli("convert", vae_dir, tmp_path / "direct.safetensors")
    plain, direct = (
        load_file(str(tmp_path / "plain.safetensors")),
        load_file(str(tmp_path / "direct.safetensors")),
    )
    assert plain.keys() == direct.keys() and all(plain[k].equal(direct[k]) for k in plain)
    r = cli("convert", full, tmp_path / "vae.pt", code=1)
    assert "*.safetensors or *.ckpt" in r.output and not (tmp_path / "vae.pt").exists(), r.output


def test_an_ldm_yaml_mapping_is_printed_once(tmp_path) -> None:
    from conftest import ROOT

    r = cli("train", tmp_path, "--config", ROOT / "configs" / "ldm_autoencoder_kl_f8.yaml", "--dry-run")
    mapped = [line for line in r.stderr.splitlines() if "base_learning_rate" in line]
    assert len(mapped) == 1, r.stderr
