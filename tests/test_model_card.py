"""The export's model card (vaedec/model_card.py): a hub card huggingface_hub reads back, with the base VAE,
what was trained on what, the eval table of `export --eval`, and how to load the export; written
atomically."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import FAST_TRAIN, cli, make_images, save_tiny_vae
from huggingface_hub import ModelCard

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

REPO = "acme/tiny-vae"


@pytest.fixture(scope="module")
def card_run(tmp_path_factory) -> dict[str, Path]:
    """A tiny VAE as the Hugging Face cache holds a hub repo (with the repo's card: apache-2.0), two shard
    sets, a 3-step run on one with the other mixed in, and a `vaedec eval` of that run."""
    from accelerate.state import AcceleratorState, GradientState

    root = tmp_path_factory.mktemp("card")
    vae = save_tiny_vae(root / "hub" / f"models--{REPO.replace('/', '--')}" / "snapshots" / "0123abcd")
    (vae / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny-vae\n")
    for name, n, size in (("text", 8, (40, 36)), ("photos", 6, (50, 40))):
        make_images(root / "images" / name, n, size)
        cli(
            "encode",
            root / "images" / name,
            root / name,
            "--vae",
            vae,
            "--resolution",
            32,
            "--shard-size-mb",
            0.02,
            "--num-workers",
            0,
        )
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    cli(
        "train",
        root / "text",
        "--output",
        root / "run",
        "--mix",
        f"{root / 'photos'}:0.3",
        *FAST_TRAIN,
        "run.max_steps=3",
        "data.val_shards=1",
    )
    cli(
        "eval",
        root / "text",
        root / "photos",
        "--vae",
        f"original={vae}",
        "--vae",
        root / "run",
        "--out",
        root / "eval",
        "--grid-samples",
        1,
    )
    return {"root": root, "vae": vae, "run": root / "run", "eval": root / "eval"}


def test_export_card_is_a_hub_card_with_base_training_data_and_the_eval_table(card_run) -> None:
    out = card_run["root"] / "export-both"
    cli("export", card_run["run"], out, "--format", "both", "--eval", card_run["eval"])
    card = ModelCard.load(out / "README.md")
    meta = card.data.to_dict()
    assert meta["library_name"] == "diffusers"
    assert meta["base_model"] == REPO  # the hub id behind the cache snapshot the VAE was loaded from
    assert meta["license"] == "apache-2.0"  # read from the base VAE's own card
    assert "vaedec" in meta["tags"]

    text = card.text
    manifest = json.loads((card_run["run"] / "shards_manifest.json").read_text())
    assert manifest["settings"]["vae"]["encoder_sha256"] in text
    assert "3 optimizer steps" in text and "2 samples per step" in text
    assert "EMA weights" in text and "decay 0.9" in text
    # Data: the target set minus its held-out shard, and the mixed set with its probability.
    text_counts = [e["samples"] for e in manifest["shards"]]
    assert (
        f"| `text` | target domain | 0.70 | {sum(text_counts) - text_counts[-1]} | {text_counts[-1]} |"
        in text
    )
    assert "| `photos` | mixed in (replay) | 0.30 |" in text
    # The eval table's figures: every model's mean PSNR and SSIM on every set, and the deltas with their
    # intervals.
    result = json.loads((card_run["eval"] / "eval.json").read_text())
    for s in result["sets"]:
        for label, m in s["models"].items():
            assert f"| {label}" in text and f"{m['psnr']:.2f}" in text and f"{m['ssim']:.4f}" in text
        for d in s["deltas"].values():
            assert f"{d['psnr']['mean']:+.2f} [{d['psnr']['low']:+.2f}, {d['psnr']['high']:+.2f}]" in text
    run_label = next(m["label"] for m in result["models"] if m["run"])
    assert f"the row **{run_label}** is this export." in text  # the same step and EMA choice: no caveat
    # How to load it: diffusers, and the LDM file this export has for ComfyUI and A1111.
    assert "AutoencoderKL.from_pretrained" in text and "ComfyUI/models/vae/" in text and "models/VAE/" in text
    # A card is written to be published: no local path reaches it.
    assert str(card_run["root"]) not in card.content and "/tmp" not in card.content


def test_card_of_a_run_without_eval_says_how_to_add_one(card_run) -> None:
    card = ModelCard.load(card_run["run"] / "export" / "README.md")  # train's own export writes one too
    assert card.data.library_name == "diffusers"
    assert "No evaluation was attached" in card.text and "--eval eval/" in card.text
    assert "vaedec convert OUT vae.safetensors" in card.text  # a diffusers-only export has no LDM file


def test_card_of_a_local_vae_has_no_base_model_and_the_base_licence_in_words(tmp_path, shards) -> None:
    cli(
        "train",
        shards,
        "--output",
        tmp_path / "run",
        *FAST_TRAIN,
        "run.max_steps=1",
        "loss.disc_factor=0",
        "model.trainable=decoder.conv_out.*",
        "optim.ema_decay=0",
        "--no-export",
    )
    cli("export", tmp_path / "run", tmp_path / "out")
    card = ModelCard.load(tmp_path / "out" / "README.md")
    meta = card.data.to_dict()
    assert "base_model" not in meta  # a local folder is no hub id; the hub would reject a path here
    assert meta["license"] == "other" and meta["license_name"] == "same-as-base-vae"
    assert "the same as the base VAE's" in card.text
    assert "`decoder.conv_out.*`" in card.text and "GAN: off in this run" in card.text
    assert "| EMA | no |" in card.text


def test_export_refuses_an_eval_of_another_run_and_keeps_the_earlier_export(card_run, tmp_path) -> None:
    out = tmp_path / "out"
    cli("export", card_run["run"], out)
    before = (out / "README.md").read_bytes()
    other = tmp_path / "eval-original-only"
    cli(
        "eval",
        card_run["root"] / "text",
        "--vae",
        f"original={card_run['vae']}",
        "--out",
        other,
        "--grid-samples",
        1,
    )
    r = cli("export", card_run["run"], out, "--eval", other, code=1)
    assert "did not score this run" in r.output and "original" in r.output
    assert (out / "README.md").read_bytes() == before
    r = cli("export", card_run["run"], out, "--eval", tmp_path, code=1)  # a folder with no eval.json
    assert "no eval.json" in r.output


def test_card_write_is_atomic(tmp_path, monkeypatch) -> None:
    from vaedec import io
    from vaedec.model_card import write_model_card

    path = tmp_path / "README.md"
    write_model_card(path, ModelCard("---\nlibrary_name: diffusers\n---\n# old\n"))

    def killed(*args: object) -> None:  # as a kill between the write and the rename
        raise OSError("killed")

    monkeypatch.setattr(io.os, "replace", killed)
    with pytest.raises(OSError):
        write_model_card(path, ModelCard("---\nlibrary_name: diffusers\n---\n# new\n"))
    assert "# old" in path.read_text() and sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]


def test_hub_id_of_a_vae_source(tmp_path, monkeypatch) -> None:
    from vaedec.model_card import hub_id

    assert hub_id("stabilityai/sd-vae-ft-ema") == "stabilityai/sd-vae-ft-ema"
    assert (
        hub_id("/root/.cache/huggingface/hub/models--stabilityai--sdxl-vae/snapshots/abc123/vae")
        == "stabilityai/sdxl-vae"
    )
    local = tmp_path / "org" / "vae"
    local.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert hub_id("org/vae") is None and hub_id(str(local)) is None  # a local folder that looks like an id
    assert hub_id("vae.safetensors") is None
