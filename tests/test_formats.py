"""Model formats and RGB+depth, end to end through the CLI on tiny VAEs.

1. a 4-channel (LDM3D-style RGB+depth) VAE: encode with --depth-dir -> shards read with plain tarfile -> train
   with LPIPS and the GAN -> export -> diffusers loads a 4-in/4-out VAE with the source encoder; grids show
   depth
2. depth problems are reported per input (skipped.jsonl, exit 3) or refused up front (exit 1), never guessed
3. `--vae` as one LDM .safetensors file: same fingerprint and moments as the diffusers folder; trains
4. export --format ldm judged by diffusers' from_single_file; export --into a full SD checkpoint
5. the classic LDM autoencoder YAML import (--dry-run)
6. `convert` errors are messages, not tracebacks
"""

from __future__ import annotations

import io
import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before diffusers / huggingface_hub are imported: no hub in these tests

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import (
    FAST_TRAIN,
    RANDOM_LPIPS,
    ROOT,
    assert_moments_match,
    assert_same_tensors,
    cli,
    frozen_part,
    make_images,
    save_tiny_vae,
    sd_checkpoint_parts,
    tar_samples,
    trained_part,
)
from diffusers import AutoencoderKL
from PIL import Image
from safetensors.torch import load_file, save_file

from vaedec.convert import diffusers_to_ldm

RES = 32  # pixels; the tiny VAE downsamples by 2 -> latents (4, 16, 16); a 3-layer PatchGAN needs >= 32
SIZE = (40, 36)  # source images (w, h): the center crop is a real crop (x) and a real resize (both axes)
PAD = 2  # save_grid's padding between tiles
LDM_YAML = ROOT / "configs" / "ldm_autoencoder_kl_f8.yaml"
FAST = FAST_TRAIN  # tests/conftest.py: tiny, GAN on from the first step, EMA 0.9


# ------------------------------------------------------------------------------------------------------------
# helpers


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def read_tar_samples(shards: Path) -> list[dict]:
    """Every sample of every shard, read with plain tarfile / numpy / PIL (not vaedec's reader), in file
    order."""
    samples = []
    for _, key, files in tar_samples(shards):
        sample = {"key": key, "files": sorted(files), "record": json.loads(files["json"])}
        sample["moments"] = np.load(io.BytesIO(files["moments.npy"]), allow_pickle=False)
        with Image.open(io.BytesIO(files["image.png"])) as im:
            sample["pixels"] = np.asarray(im.convert("RGB")).copy()
        if "depth.png" in files:
            with Image.open(io.BytesIO(files["depth.png"])) as im:
                sample["depth_mode"] = im.mode
                sample["depth"] = np.asarray(im).copy()
        samples.append(sample)
    return samples


def skipped_lines(shards: Path) -> list[dict]:
    return [json.loads(x) for x in (shards / "skipped.jsonl").read_text().splitlines() if x.strip()]


def save_depth(path: Path, depth: np.ndarray) -> None:
    """A 16-bit grey PNG (Pillow mode I;16)."""
    assert depth.dtype == np.uint16
    im = Image.fromarray(depth)
    assert im.mode == "I;16"
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


def gradient_depth(size: tuple[int, int], offset: int = 0) -> np.ndarray:
    """d(x, y) = 500 + offset + 100 x + 1000 y at pixel (x, y): uint16, values far beyond 8 bits."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    return (500 + offset + 100 * x + 1000 * y).astype(np.uint16)


def bilinear_weights(in0: float, in1: float, in_size: int, out_size: int) -> np.ndarray:
    """(out, in) weights of Pillow's antialiased BILINEAR resize of the span [in0, in1) of one axis.

    Written out from Pillow's Resample.c (precompute_coeffs): a triangle of half-width max(1, scale) around
    each output centre, taps at source pixel centres inside the rounded window, clipped to the image,
    normalised.
    """
    scale = (in1 - in0) / out_size
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale  # bilinear's support is 1
    w = np.zeros((out_size, in_size))
    for xx in range(out_size):
        center = in0 + (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        x = np.arange(xmin, xmax)
        k = np.clip(1.0 - np.abs((x - center + 0.5) / filterscale), 0.0, None)
        w[xx, xmin:xmax] = k / k.sum()
    return w


def bilinear_crop(depth: np.ndarray, box: list[float], res: int) -> np.ndarray:
    """The crop `box` of a 16-bit depth map, bilinearly resampled to res x res, in float64 (the reference)."""
    h, w = depth.shape
    wy = bilinear_weights(box[1], box[3], h, res)
    wx = bilinear_weights(box[0], box[2], w, res)
    return wy @ depth.astype(np.float64) @ wx.T


@torch.no_grad()
def fresh_moments(model: AutoencoderKL, pixels: np.ndarray, depth: np.ndarray | None) -> np.ndarray:
    """diffusers' own posterior of stored uint8 RGB (+ uint16 depth), by the LDM3D convention; fp32 (2C, h,
    w)."""
    x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)[None].float() / 127.5 - 1.0
    if depth is not None:
        d = torch.from_numpy(depth.astype(np.float32))[None, None] / 65535.0 * 2.0 - 1.0
        x = torch.cat([x, d], dim=1)
    dist = model.encode(x).latent_dist
    return torch.cat([dist.mean, dist.logvar], dim=1)[0].numpy()


def assert_decoder_changed(sd: dict[str, torch.Tensor], source: dict[str, torch.Tensor], what: str) -> None:
    """The trained weights differ from the source's somewhere: 'equal to the fine-tuned ones' has teeth."""
    assert any(not torch.equal(v, source[k]) for k, v in trained_part(sd).items()), (
        f"{what}: decoder unchanged"
    )


def encode_args(src: Path, out: Path, vae: Path, *extra: object) -> list[object]:
    return [
        "encode",
        src,
        out,
        "--vae",
        vae,
        "--resolution",
        RES,
        "--num-workers",
        0,
        "--batch-size",
        4,
        *extra,
    ]


# ------------------------------------------------------------------------------------------------------------
# shared data: a 4-channel VAE with RGB+depth inputs, and an RGB VAE's shards and run


@pytest.fixture(scope="module")
def vae4_dir(tmp_path_factory) -> Path:
    return save_tiny_vae(tmp_path_factory.mktemp("vae4") / "tiny-vae-rgbd", in_channels=4, seed=3)


@pytest.fixture(scope="module")
def rgb_shards(tmp_path_factory, vae_dir) -> Path:
    """4 RGB images encoded with conftest's 3-channel VAE folder."""
    root = tmp_path_factory.mktemp("rgb")
    make_images(root / "images", 4, size=SIZE)
    cli(*encode_args(root / "images", root / "shards", vae_dir))
    return root / "shards"


@pytest.fixture(scope="module")
def rgb_run(tmp_path_factory, rgb_shards) -> Path:
    """2 training steps on the RGB shards (no export: the tests export in each format)."""
    run = tmp_path_factory.mktemp("rgb-run") / "run"
    cli("train", rgb_shards, "--output", run, *FAST, "run.max_steps=2", "--no-export")
    return run


# ------------------------------------------------------------------------------------------------------------
# 1. RGB+depth: encode -> shards -> train -> export -> diffusers


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:LPIPS is using a RANDOM")
def test_rgbd_encode_train_export_end_to_end(tmp_path, vae4_dir) -> None:
    from vaedec.metrics import colourise_depth

    images, depths = tmp_path / "images", tmp_path / "depth"  # separate folders, paired by file stem
    rgb_paths = make_images(images, 3, size=SIZE)
    sources = {p.name: gradient_depth(SIZE, offset=300 * i) for i, p in enumerate(rgb_paths[:2])}
    step = np.full(SIZE[::-1], 2000, np.uint16)
    # a hard edge: bilinear stays inside [2000, 60000], Lanczos would ring past it
    step[:, SIZE[0] // 2 :] = 60000
    sources[rgb_paths[2].name] = step
    for name, depth in sources.items():
        save_depth(depths / f"{Path(name).stem}.png", depth)

    shards = tmp_path / "shards"
    cli(*encode_args(images, shards, vae4_dir, "--depth-dir", depths, "--flip"))
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["settings"]["preprocessing"]["depth"] is True
    assert manifest["settings"]["vae"]["in_channels"] == 4 and manifest["totals"]["samples"] == 6
    r = cli("inspect", shards, "--verify")
    assert "+ 16-bit depth" in r.output and "in 4, out 4" in r.output and "verify" in r.output

    # --- the tar, read with plain tarfile: 16-bit depth cropped like the image, moments of cat(rgb, depth)
    model = AutoencoderKL.from_pretrained(vae4_dir).eval()
    samples = read_tar_samples(shards)
    assert len(samples) == 6
    by_source: dict[str, dict[bool, dict]] = {}
    for s in samples:
        assert s["files"] == ["depth.png", "image.png", "json", "moments.npy"], s["files"]
        assert s["depth_mode"] == "I;16" and s["depth"].dtype == np.uint16 and s["depth"].shape == (RES, RES)
        assert s["pixels"].shape == (RES, RES, 3)
        assert_moments_match(s["moments"], fresh_moments(model, s["pixels"], s["depth"]))
        by_source.setdefault(s["record"]["source"], {})[s["record"]["flip"]] = s
    assert sorted(by_source) == sorted(p.name for p in rgb_paths)

    for name, depth in sources.items():
        s = by_source[name][False]
        box = s["record"]["crop_box"]  # the RGB crop's box (test_encode checks it against the RGB pixels)
        assert box[3] - box[1] == pytest.approx(SIZE[1]) and box[2] - box[0] < SIZE[0]  # the center crop
        assert (box[0] + box[2]) / 2 == pytest.approx(SIZE[0] / 2, abs=0.01)
        # The same box, bilinear: equal to the reference up to uint16 rounding and float32 passes.
        np.testing.assert_allclose(s["depth"].astype(np.float64), bilinear_crop(depth, box, RES), atol=1.0)
        # The mirrored sample mirrors the pixels and the depth together.
        f = by_source[name][True]
        assert np.array_equal(f["depth"], s["depth"][:, ::-1]) and np.array_equal(
            f["pixels"], s["pixels"][:, ::-1]
        )
    assert by_source[rgb_paths[1].name][False]["depth"].max() > 30000  # really 16-bit, not 8-bit scaled
    edge = by_source[rgb_paths[2].name][False]["depth"]
    assert edge.min() >= 2000 and edge.max() <= 60000, "depth resampling rings past the measured range"
    assert edge.min() == 2000 and edge.max() == 60000 and len(np.unique(edge)) > 2  # both sides and a blend

    # --- train: LPIPS (random VGG, see RANDOM_LPIPS) and the GAN, both on 4 channels, from the first step
    run = tmp_path / "run"
    cli("train", shards, "--output", run, *FAST, *RANDOM_LPIPS, "run.max_steps=2", "--no-export")
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert [m["step"] for m in lines] == [1, 2]
    for m in lines:
        assert np.isfinite(m["loss/total"]) and np.isfinite(m["disc/loss"]), m
        assert m["loss/perceptual"] > 0 and m["loss/d_weight"] > 0, m
    ckpt = run / "checkpoints" / "step-00000002"
    disc = load_file(str(ckpt / "disc.safetensors"))
    first = disc["main.0.weight"]  # the PatchGAN's first conv, (ndf, C_in, 4, 4)
    assert first.shape[1] == 4, (
        f"the discriminator's first conv sees {first.shape[1]} channels, not RGB+depth"
    )

    # --- grid: rows = 2 samples; columns original | original decoder | decoder | EMA, each RGB tile + depth
    # tile
    grids = sorted((run / "images").glob("*.png"))
    assert [g.name for g in grids] == ["step-00000002.png"]
    grid = np.asarray(Image.open(grids[0]).convert("RGB"))
    tile_w = 2 * RES  # RGB + colourised depth
    assert grid.shape == (2 * (RES + PAD) + PAD, 4 * (tile_w + PAD) + PAD, 3), grid.shape
    for i in range(2):
        y0, x0 = PAD + i * (RES + PAD), PAD
        # Which samples the grid shows is train.py's choice: find this row's by its RGB tile (the stored
        # pixels).
        (s,) = [s for s in samples if np.array_equal(grid[y0 : y0 + RES, x0 : x0 + RES], s["pixels"])]
        d = torch.from_numpy(s["depth"].astype(np.float32))[None, None] / 65535 * 2 - 1
        want = colourise_depth(d)[0].permute(1, 2, 0).numpy()
        assert np.array_equal(grid[y0 : y0 + RES, x0 + RES : x0 + tile_w], want)

    # --- export: a 4-in / 4-out AutoencoderKL, the source encoder bit for bit, the trained (EMA / raw)
    # decoder
    source = model.state_dict()
    for name, flag, weights in (("ema", "--ema", "ema"), ("raw", "--no-ema", "decoder")):
        cli("export", run, tmp_path / name, flag)
        exported = AutoencoderKL.from_pretrained(tmp_path / name)
        assert exported.config.in_channels == 4 and exported.config.out_channels == 4
        sd = exported.state_dict()
        assert_same_tensors(frozen_part(sd), frozen_part(source), f"{name} export: encoder")
        assert_same_tensors(
            trained_part(sd), load_file(str(ckpt / f"{weights}.safetensors")), f"{name} export"
        )
        assert_decoder_changed(sd, source, f"{name} export")
        with torch.no_grad():
            assert exported(torch.zeros(1, 4, RES, RES)).sample.shape == (1, 4, RES, RES)


# ------------------------------------------------------------------------------------------------------------
# 2. depth problems are reported, not guessed


def test_depth_problems_are_skipped_with_reasons(tmp_path, vae4_dir) -> None:
    images, depths = tmp_path / "images", tmp_path / "depth"
    paths = make_images(images, 5, size=SIZE)
    good, missing, wrong_size, eight_bit = paths[:2], paths[2], paths[3], paths[4]
    for p in good:
        save_depth(depths / f"{p.stem}.png", gradient_depth(SIZE))
    save_depth(depths / f"{wrong_size.stem}.png", gradient_depth((SIZE[0] // 2, SIZE[1] // 2)))
    Image.fromarray(np.full(SIZE[::-1], 128, np.uint8)).save(depths / f"{eight_bit.stem}.png")  # mode L
    assert not (depths / f"{missing.stem}.png").exists()

    shards = tmp_path / "shards"
    result = cli(*encode_args(images, shards, vae4_dir, "--depth-dir", depths), code=3)
    skips = {s["source"]: s["reason"] for s in skipped_lines(shards)}
    assert sorted(skips) == sorted([missing.name, wrong_size.name, eight_bit.name]), skips
    assert f"no depth map named {missing.stem}.png" in skips[missing.name]
    assert (
        f"{SIZE[0] // 2}x{SIZE[1] // 2}" in skips[wrong_size.name]
        and f"{SIZE[0]}x{SIZE[1]}" in skips[wrong_size.name]
    )
    assert "16-bit" in skips[eight_bit.name] and " L," in skips[eight_bit.name]
    for name in skips:
        assert name in result.output  # also told on the terminal
    samples = read_tar_samples(shards)
    assert sorted(s["record"]["source"] for s in samples) == sorted(p.name for p in good)
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["totals"]["inputs_skipped"] == 3 and manifest["complete"]


def test_depth_dir_and_vae_channels_must_agree(tmp_path, vae_dir, vae4_dir) -> None:
    images, depths = tmp_path / "images", tmp_path / "depth"
    (image,) = make_images(images, 1, size=SIZE)
    save_depth(depths / f"{image.stem}.png", gradient_depth(SIZE))

    r = cli(*encode_args(images, tmp_path / "a", vae_dir, "--depth-dir", depths), code=1)
    assert "3 input channels" in r.output and "drop --depth-dir" in r.output, r.output
    r = cli(*encode_args(images, tmp_path / "b", vae4_dir), code=1)
    assert "4 input channels" in r.output and "give --depth-dir" in r.output, r.output
    for out in ("a", "b"):
        assert not list((tmp_path / out).glob("shard-*.tar"))

    r = cli(*encode_args(images, tmp_path / "c", vae4_dir, "--depth-dir", tmp_path / "nope"), code=1)
    assert "is not a folder" in r.output
    save_depth(depths / "sub" / f"{image.stem}.png", gradient_depth(SIZE))  # a second map for the same stem
    r = cli(*encode_args(images, tmp_path / "d", vae4_dir, "--depth-dir", depths), code=1)
    assert "share the stem" in r.output


# ------------------------------------------------------------------------------------------------------------
# 3. --vae as a single LDM file


def test_single_file_vae_encodes_and_trains_like_the_folder(tmp_path, vae_dir, rgb_shards) -> None:
    single = tmp_path / "vae.safetensors"
    r = cli("convert", vae_dir, single)
    assert single.is_file() and "LDM layout" in r.output
    assert any(k.startswith("encoder.down.0.") for k in load_file(str(single)))  # LDM names, not diffusers'

    shards = tmp_path / "shards"
    cli(*encode_args(rgb_shards.parent / "images", shards, single))
    from_file = json.loads((shards / "manifest.json").read_text())["settings"]["vae"]
    from_folder = json.loads((rgb_shards / "manifest.json").read_text())["settings"]["vae"]
    assert from_file["source"] == str(single) and from_folder["source"] == str(vae_dir)
    assert from_file["encoder_sha256"] == from_folder["encoder_sha256"]
    for key in ("in_channels", "out_channels", "latent_channels", "downsample_factor", "scaling_factor"):
        assert from_file[key] == from_folder[key], key
    a, b = read_tar_samples(shards), read_tar_samples(rgb_shards)
    assert [s["key"] for s in a] == [s["key"] for s in b]
    for x, y in zip(a, b):
        assert np.array_equal(x["moments"], y["moments"]) and np.array_equal(x["pixels"], y["pixels"])

    run = tmp_path / "run"
    r = cli("train", shards, "--output", run, *FAST, "run.max_steps=2")
    assert "(step 2)" in r.output
    assert json.loads((run / "shards_manifest.json").read_text())["settings"]["vae"]["source"] == str(single)
    exported = AutoencoderKL.from_pretrained(run / "export").state_dict()
    source = AutoencoderKL.from_pretrained(vae_dir).state_dict()
    assert_same_tensors(frozen_part(exported), frozen_part(source), "encoder of a single-file run")
    assert_decoder_changed(exported, source, "single-file run")


# ------------------------------------------------------------------------------------------------------------
# 4. export as an LDM file, and into a full SD checkpoint


def test_export_ldm_file_loads_in_diffusers_from_single_file(tmp_path, vae_dir, rgb_run) -> None:
    cli("export", rgb_run, tmp_path / "diffusers")
    cli("export", rgb_run, tmp_path / "ldm", "--format", "ldm")
    assert sorted(p.name for p in (tmp_path / "ldm").iterdir()) == [
        "README.md",
        "decoder.safetensors",
        "vae.safetensors",
        "vaedec_export.json",  # README.md: the model card
    ]
    reference = AutoencoderKL.from_pretrained(tmp_path / "diffusers").state_dict()
    source = AutoencoderKL.from_pretrained(vae_dir).state_dict()
    assert_decoder_changed(reference, source, "diffusers export")

    # `config`: a local diffusers folder of the same architecture, so diffusers neither guesses nor downloads.
    judged = AutoencoderKL.from_single_file(
        str(tmp_path / "ldm" / "vae.safetensors"), config=str(vae_dir), local_files_only=True
    )
    # from_single_file leaves missing keys uninitialised and only warns: compare every tensor.
    assert_same_tensors(judged.state_dict(), reference, "from_single_file(export --format ldm)")
    assert_same_tensors(
        trained_part(load_file(str(tmp_path / "ldm" / "decoder.safetensors"))),
        trained_part(reference),
        "decoder.safetensors",
    )

    cli("export", rgb_run, tmp_path / "both", "--format", "both")
    assert_same_tensors(
        AutoencoderKL.from_pretrained(tmp_path / "both").state_dict(), reference, "--format both"
    )
    assert (
        load_file(str(tmp_path / "both" / "vae.safetensors")).keys()
        == load_file(str(tmp_path / "ldm" / "vae.safetensors")).keys()
    )


def test_export_into_full_sd_checkpoint(tmp_path, vae_dir, rgb_run) -> None:
    source = AutoencoderKL.from_pretrained(vae_dir)
    vae_part, others = sd_checkpoint_parts(source, seed=11)
    sd_path = tmp_path / "sd-model.safetensors"
    save_file({**vae_part, **others}, str(sd_path), metadata={"format": "pt", "origin": "test"})
    before = sd_path.read_bytes()

    cli("export", rgb_run, tmp_path / "diffusers")
    out = tmp_path / "into"
    r = cli("export", rgb_run, out, "--format", "ldm", "--into", sd_path)
    assert "sd-model.safetensors" in r.output
    assert sd_path.read_bytes() == before, "the source SD checkpoint was modified"

    written = load_file(str(out / "sd-model.safetensors"))
    assert sorted(written) == sorted({**vae_part, **others})
    for k, v in others.items():
        assert torch.equal(written[k], v), f"{k}: a non-VAE tensor changed"
    finetuned = AutoencoderKL.from_pretrained(tmp_path / "diffusers").state_dict()
    want = diffusers_to_ldm(finetuned)
    for k, v in written.items():
        if k.startswith("first_stage_model."):
            assert torch.equal(v, want[k.removeprefix("first_stage_model.")]), k
    changed = [k for k in vae_part if not torch.equal(written[k], vae_part[k])]
    assert changed and all(
        k.startswith(("first_stage_model.decoder.", "first_stage_model.post_quant_conv.")) for k in changed
    ), changed
    # diffusers itself reads the VAE back out of the full checkpoint as the fine-tuned one.
    judged = AutoencoderKL.from_single_file(
        str(out / "sd-model.safetensors"), config=str(vae_dir), local_files_only=True
    )
    assert_same_tensors(judged.state_dict(), finetuned, "from_single_file(--into copy)")


# ------------------------------------------------------------------------------------------------------------
# 5. classic LDM autoencoder YAML


def test_shipped_ldm_yaml_dry_run_maps_and_warns(tmp_path) -> None:
    r = cli("train", tmp_path / "shards", "--config", LDM_YAML, "--dry-run")
    log = r.stderr
    assert "is an LDM autoencoder config" in log
    for line in (
        "model.params.lossconfig.params.disc_start -> loss.disc_start_step = 50001",
        "model.params.lossconfig.params.disc_weight -> loss.disc_weight = 0.5",
        "data.params.batch_size -> data.batch_size_per_device = 12",
        "lightning.trainer.accumulate_grad_batches -> optim.grad_accum_steps = 2",
        "model.base_learning_rate -> optim.lr",
        "-> optim.scale_lr = True",
        "-> optim.ema_decay = 0.0",
    ):
        assert line in log, f"{line!r} not in:\n{log}"
    for ignored in (
        "model.params.lossconfig.params.kl_weight",
        "model.params.ddconfig.ch_mult",
        "model.params.ddconfig.in_channels",
        "model.params.embed_dim",
    ):
        assert f"LDM key {ignored} ignored:" in log, f"no warning for {ignored}:\n{log}"
    assert "KL term" in log  # says why kl_weight does not matter
    assert not (tmp_path / "shards").exists()  # a dry run reads no shards (none exist) and writes nothing

    cfg = yaml.safe_load(r.stdout)  # stdout holds only the resolved config
    assert cfg["loss"]["disc_start_step"] == 50001
    assert cfg["loss"]["disc_weight"] == 0.5
    assert cfg["data"]["batch_size_per_device"] == 12
    assert cfg["optim"]["grad_accum_steps"] == 2
    assert cfg["optim"]["scale_lr"] is True
    assert cfg["optim"]["ema_decay"] == 0.0
    assert cfg["optim"]["lr"] == pytest.approx(4.5e-6)
    assert cfg["data"]["shards"] == str(tmp_path / "shards")
    assert cfg["run"]["output"] == "runs/ldm_autoencoder_kl_f8"


def test_ldm_yaml_loss_params_map_and_unknown_ones_warn(tmp_path) -> None:
    path = tmp_path / "my_ldm.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model": {
                    "base_learning_rate": 1.0e-5,
                    "params": {
                        "lossconfig": {
                            "target": "ldm.modules.losses.LPIPSWithDiscriminator",
                            "params": {
                                "disc_start": 7,
                                "disc_weight": 0.25,
                                "perceptual_weight": 0.0,
                                "disc_loss": "vanilla",
                                "disc_factor": 0.5,
                                "disc_num_layers": 2,
                                "logvar_init": 0.1,
                                "disc_in_channels": 4,
                                "my_new_knob": 3,
                            },
                        },
                    },
                },
            }
        )
    )
    r = cli("train", tmp_path / "shards", "--config", path, "--dry-run", "optim.lr=2e-5")
    cfg = yaml.safe_load(r.stdout)["loss"]
    assert (cfg["disc_start_step"], cfg["disc_weight"], cfg["perceptual_weight"], cfg["disc_loss"]) == (
        7,
        0.25,
        0.0,
        "vanilla",
    )
    assert (cfg["disc_factor"], cfg["disc_num_layers"], cfg["logvar_init"]) == (0.5, 2, 0.1)
    assert yaml.safe_load(r.stdout)["optim"]["lr"] == 2e-5  # a KEY=VALUE override wins over the file
    log = r.stderr
    for name in (
        "disc_weight -> loss.disc_weight",
        "perceptual_weight -> loss.perceptual_weight",
        "disc_loss -> loss.disc_loss = 'vanilla'",
    ):
        assert name in log, f"{name!r} not in:\n{log}"
    assert "LDM key model.params.lossconfig.params.my_new_knob ignored: no vaedec equivalent" in log
    assert "LDM key model.params.lossconfig.params.disc_in_channels ignored: taken from the VAE" in log

    # A mapped key with a value of the wrong type is still an error that names our key.
    bad = tmp_path / "bad.yaml"
    bad.write_text(path.read_text().replace("disc_loss: vanilla", "disc_loss: wasserstein"))
    r = cli("train", tmp_path / "shards", "--config", bad, "--dry-run", code=1)
    assert "loss.disc_loss" in r.output and "wasserstein" in r.output


# ------------------------------------------------------------------------------------------------------------
# 6. convert errors


def test_convert_errors_are_messages(tmp_path, vae_dir) -> None:
    existing = tmp_path / "existing.safetensors"
    existing.write_bytes(b"keep me")
    r = cli("convert", vae_dir, existing, code=1)
    assert "already exists" in r.output and existing.read_bytes() == b"keep me"

    empty = tmp_path / "not-a-vae"
    empty.mkdir()
    r = cli("convert", empty, tmp_path / "out.safetensors", code=1)
    assert "config.json" in r.output and not (tmp_path / "out.safetensors").exists()

    r = cli("convert", vae_dir, tmp_path / "vae.bin", code=1)
    assert ".safetensors or *.ckpt" in r.output

    text = b"this is not a checkpoint\n" * 8
    noise = np.random.default_rng(0).bytes(256)
    junk = {
        "junk.safetensors": (noise, "not a readable safetensors file"),
        "junk.ckpt": (text, "not a readable PyTorch checkpoint"),
        # whichever of the two torch.load failures it trips: a message all the same
        "noise.ckpt": (noise, ""),
        "junk.txt": (text, "unknown checkpoint type"),
    }
    for name, (data, message) in junk.items():
        (tmp_path / name).write_bytes(data)
        dst = tmp_path / f"{name}-out"
        r = cli("convert", tmp_path / name, dst, code=1)
        assert r.output.startswith("Error: ") and message in r.output and name in r.output, r.output
        assert (
            not dst.exists() and not list(tmp_path.glob(f".{dst.name}*")) and not Path(f"{dst}.tmp").exists()
        )

    no_vae = tmp_path / "other.safetensors"
    save_file({"model.diffusion_model.out.2.bias": torch.zeros(4)}, str(no_vae))
    r = cli("convert", no_vae, tmp_path / "other-out", code=1)
    assert "no VAE weights found" in r.output
