"""`vaedec eval`: every kind of --vae in one call, metrics checked against a plain recomputation, the encoder
mismatch refusal, LPIPS present/absent, rFID with random Inception weights, --sample, image folders, the
bootstrap intervals against their definition."""

from __future__ import annotations

import csv
import json
import os
import pickle
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from conftest import FAST_TRAIN, cli, make_images, save_tiny_vae
from diffusers import AutoencoderKL
from PIL import Image

from vaedec.config import EncodeConfig
from vaedec.encode import encode
from vaedec.evaluate import GRID_MIN_TILE
from vaedec.metrics import paired_ci, per_image_metrics, save_grid
from vaedec.shards import read_manifest, read_samples, shard_paths

RES = 32
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def data(tmp_path_factory, vae_dir) -> dict[str, Path]:
    """Train shards (12 images) and held-out shards (6 other images) of the tiny VAE, a short run, its
    export."""
    root = tmp_path_factory.mktemp("eval-data")
    make_images(root / "train-images", 12)
    heldout = make_images(root / "heldout-images", 6, size=(44, 40))
    for p in heldout:  # other content than the training images: shift the colour fields
        Image.fromarray(255 - np.asarray(Image.open(p))).save(p)
    for name in ("train", "heldout"):
        encode(EncodeConfig(src=str(root / f"{name}-images"), out=str(root / name), vae=str(vae_dir),
                            resolution=RES, shard_size_mb=0.01, num_workers=0, batch_size=8))
    run = root / "run"
    cli("train", root / "train", "--output", run, *FAST_TRAIN, "run.max_steps=6", "--no-export")
    cli("export", run, root / "export", "--format", "both")
    return {"root": root, "train": root / "train", "heldout": root / "heldout", "run": run,
            "export": root / "export", "vae": vae_dir}


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def by_model(rows: list[dict[str, str]], column: str) -> dict[str, np.ndarray]:
    out: dict[str, list[float]] = {}
    for r in rows:
        out.setdefault(r["model"], []).append(float(r[column]))
    return {k: np.array(v) for k, v in out.items()}


def test_every_kind_of_model_in_one_call(tmp_path, data) -> None:
    """Original folder, run (EMA by default), run:raw, export folder and the export's single LDM file: the
    same weights must score identically, and the numbers must equal a plain recomputation with diffusers."""
    out = tmp_path / "eval"
    res = cli(
        "eval",
        data["heldout"],
        "--out",
        out,
        "--vae",
        f"original={data['vae']}",
        "--vae",
        data["run"],
        "--vae",
        f"{data['run']}:raw",
        "--vae",
        data["export"],
        "--vae",
        data["export"] / "vae.safetensors",
        "--vae",
        data["run"] / "checkpoints" / "step-00000006",
        "--grid-samples",
        3,
    )
    result = json.loads((out / "eval.json").read_text())
    labels = [m["label"] for m in result["models"]]
    assert labels == ["original", "run:ema", "run:raw", "export", "vae", "run:ema#2"]
    rows = read_csv(out / "per_image.csv")
    n = read_manifest(data["heldout"])["totals"]["samples"]
    assert len(rows) == 6 * n
    psnr = by_model(rows, "psnr")
    # The export was made from the run's EMA weights; its LDM file is a lossless conversion of the same
    # weights; the newest checkpoint folder is the run.
    np.testing.assert_array_equal(psnr["run:ema"], psnr["export"])
    np.testing.assert_array_equal(psnr["export"], psnr["vae"])
    np.testing.assert_array_equal(psnr["run:ema"], psnr["run:ema#2"])
    assert not np.array_equal(psnr["run:ema"], psnr["run:raw"])
    assert not np.array_equal(psnr["original"], psnr["run:raw"])

    # A plain recomputation: diffusers decodes z = mean, PSNR by its formula on [0, 1] pixels.
    vae = AutoencoderKL.from_pretrained(data["export"]).eval()
    samples = list(read_samples(shard_paths(data["heldout"], read_manifest(data["heldout"]))))
    keys = [r["key"] for r in rows if r["model"] == "export"]
    assert keys == [s["key"] for s in samples]
    with torch.no_grad():
        z = torch.stack([s["moments"] for s in samples]).float()[:, :4]
        rec = ((vae.decode(z).sample.clamp(-1, 1) + 1) / 2).numpy().astype(np.float64)
    x = torch.stack([s["pixels"] for s in samples]).numpy().astype(np.float64) / 255.0
    mse = ((rec - x) ** 2).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(psnr["export"], 10 * np.log10(1.0 / mse), atol=2e-3)
    shift_r = by_model(rows, "shift_r")["export"]
    np.testing.assert_allclose(shift_r, (rec[:, 0] - x[:, 0]).mean(axis=(1, 2)) * 255, atol=2e-3)

    # Summaries and deltas agree with the CSV; the table is printed and saved.
    s = result["sets"][0]
    assert s["samples"] == n and s["name"] == "heldout"
    assert s["models"]["export"]["psnr"] == pytest.approx(psnr["export"].mean(), abs=1e-3)
    d = s["deltas"]["run:raw"]["psnr"]
    assert d["mean"] == pytest.approx((psnr["run:raw"] - psnr["original"]).mean(), abs=1e-3)
    assert d["low"] <= d["mean"] <= d["high"]
    assert s["deltas"]["vae"]["psnr"]["mean"] == pytest.approx(s["deltas"]["export"]["psnr"]["mean"])
    report = (out / "report.md").read_text()
    assert report in res.output and "| original (baseline) |" in report and "| run:raw |" in report
    # Grids: a fixed sample (original + 6 models) and per model the most improved / worsened (3 columns).
    grids = sorted(p.name for p in (out / "grids").glob("*.png"))
    assert "heldout-sample.png" in grids and "heldout-improved-run_raw.png" in grids
    assert len(grids) == 1 + 2 * 5
    w_sample = Image.open(out / "grids" / "heldout-sample.png").size[0]
    w_pair = Image.open(out / "grids" / "heldout-worsened-export.png").size[0]
    tile = RES * -(-GRID_MIN_TILE // RES)  # small tiles are shown scaled up by a whole factor
    assert w_sample == 7 * (tile + 2) + 2 and w_pair == 3 * (tile + 2) + 2


def test_grid_scales_small_tiles_up_nearest_and_labels_its_columns(tmp_path) -> None:
    g = torch.Generator().manual_seed(0)
    columns = [torch.rand(2, 3, 16, 16, generator=g) * 2 - 1 for _ in range(3)]  # (B, C, H, W) in [-1, 1]
    save_grid(columns, tmp_path / "plain.png")
    save_grid(columns, tmp_path / "grid.png", labels=["original", "original decoder", "a-long-model-label"],
              min_tile=40)
    plain = np.asarray(Image.open(tmp_path / "plain.png").convert("RGB"))
    grid = np.asarray(Image.open(tmp_path / "grid.png").convert("RGB"))
    tile, pad = 48, 2  # 16 px x 3: the smallest whole factor reaching 40 px
    top = grid.shape[0] - (2 * (tile + pad) + pad)  # the label band
    assert grid.shape[1] == 3 * (tile + pad) + pad and top > 10
    for i in range(2):
        for j in range(3):
            small = plain[pad + i * 18 : pad + i * 18 + 16, pad + j * 18 : pad + j * 18 + 16]
            y0, x0 = top + pad + i * (tile + pad), pad + j * (tile + pad)
            big = grid[y0 : y0 + tile, x0 : x0 + tile]
            # nearest: each pixel a 3x3 block
            assert np.array_equal(big, small.repeat(3, axis=0).repeat(3, axis=1))
    for j in range(3):  # every column has ink in the band above it, and only within its own width
        band = grid[:top, pad + j * (tile + pad) : pad + j * (tile + pad) + tile]
        assert (band < 128).any()
    assert (grid[:top, :pad] == 255).all()


def test_improved_and_worsened_grids_pick_by_psnr_gain() -> None:
    from vaedec.evaluate import ModelScores, ModelSpec, grid_keys

    keys = [f"k{i}" for i in range(6)]
    base, other = ModelScores(keys=keys), ModelScores(keys=keys)
    base.values = {"psnr": [np.array([20.0, 20, 20, 30, 30, 30])]}
    other.values = {"psnr": [np.array([21.0, 25, 19, 30, 36, 20])]}  # gains +1 +5 -1 0 +6 -10
    picks = grid_keys({"a": base, "b": other}, [ModelSpec("a", "a"), ModelSpec("b", "b")], 2)
    assert picks["improved-b"] == ["k4", "k1"] and picks["worsened-b"] == ["k5", "k2"]
    assert picks["sample"] == ["k0", "k5"]  # spread over the set


def test_other_encoder_is_refused(tmp_path, data) -> None:
    other = save_tiny_vae(tmp_path / "other-vae", seed=1)
    res = cli("eval", data["heldout"], "--out", tmp_path / "e", "--vae", data["vae"], "--vae", other, code=1)
    assert "another encoder" in res.output and "other-vae" in res.output
    assert not (tmp_path / "e" / "eval.json").exists()


def test_bad_model_specs_are_messages(tmp_path, data) -> None:
    res = cli("eval", data["heldout"], "--vae", f"{data['vae']}:ema", "--out", tmp_path / "e", code=1)
    assert "run folders only" in res.output
    res = cli("eval", data["heldout"], "--vae", tmp_path / "nothing-here", "--out", tmp_path / "e", code=1)
    assert "could not load" in res.output
    res = cli("eval", tmp_path / "no-data", "--vae", data["vae"], "--out", tmp_path / "e", code=1)
    assert "does not exist" in res.output
    res = cli(
        "eval", data["heldout"], "--vae", data["vae"], "--val-shards", 99, "--out", tmp_path / "e", code=1
    )
    assert "has only" in res.output


def test_lpips_absent_is_said_and_present_is_scored(tmp_path, data, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))  # no VGG16 weights here
    res = cli("eval", data["heldout"], "--vae", data["vae"], "--vae", data["run"], "--out", tmp_path / "a")
    assert "LPIPS not computed: no VGG16 weights" in res.output
    result = json.loads((tmp_path / "a" / "eval.json").read_text())
    assert result["sets"][0]["models"]["run:ema"]["lpips"] is None
    assert "lpips" not in result["sets"][0]["deltas"]["run:ema"]
    assert all(r["lpips"] == "" for r in read_csv(tmp_path / "a" / "per_image.csv"))

    with pytest.warns(UserWarning, match="RANDOM VGG16"):
        res = cli(
            "eval",
            data["heldout"],
            "--vae",
            data["vae"],
            "--vae",
            data["run"],
            "--out",
            tmp_path / "b",
            "--lpips-random-backbone",
        )
    assert "RANDOM VGG16" in res.output
    lp = by_model(read_csv(tmp_path / "b" / "per_image.csv"), "lpips")
    assert np.isfinite(lp["run:ema"]).all() and (lp["run:ema"] >= 0).all()
    assert not np.array_equal(lp["run:ema"], lp["tiny-vae"])


def random_inception_net():
    """torch-fidelity's InceptionV3 with RANDOM weights (the real ones cannot be downloaded here): the FID
    code path runs for real, the values mean nothing. He-normal convolutions keep the activations from
    vanishing."""
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    torch.manual_seed(0)
    with (
        mock.patch.object(fe, "load_state_dict_from_url", return_value=None),
        mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", return_value=None),
    ):
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    return net.eval()


def frechet_distance(f1: np.ndarray, f2: np.ndarray) -> float:
    """FID (Heusel et al. 2017), plainly in float64: ‖μ1 − μ2‖² + tr Σ1 + tr Σ2 − 2 tr (Σ1 Σ2)^½, the last
    term as the sum of the square roots of the eigenvalues of Σ1 Σ2 (real and >= 0: it is similar to a PSD
    matrix)."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    root = np.sqrt(np.clip(np.linalg.eigvals(s1 @ s2).real, 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * root)


def test_rfid_with_random_inception_weights(tmp_path, data) -> None:
    """64 Inception features keep the 2048-d eigen-decomposition out of a CPU test; the code path is the
    same."""
    weights = tmp_path / "inception.pth"
    torch.save(random_inception_net().state_dict(), weights)
    out = tmp_path / "e"
    res = cli(
        "eval",
        data["heldout"],
        "--vae",
        f"a={data['vae']}",
        "--vae",
        f"b={data['vae']}",
        "--vae",
        data["run"],
        "--fid-weights",
        weights,
        "--fid-features",
        64,
        "--out",
        out,
    )
    models = json.loads((out / "eval.json").read_text())["sets"][0]["models"]
    fids = {k: v["fid"] for k, v in models.items()}
    assert "rFID: torchmetrics FID on torch-fidelity's InceptionV3 (64 features)" in res.output

    # The reference: the same network's features of the originals and of the run's reconstructions.
    from vaedec.evaluate import decode
    from vaedec.metrics import fid_images, load_fid

    samples = list(read_samples(shard_paths(data["heldout"], read_manifest(data["heldout"]))))
    x = torch.stack([s["pixels"] for s in samples])
    z = torch.stack([s["moments"] for s in samples]).float()[:, :4]
    vae = AutoencoderKL.from_pretrained(data["export"]).eval()
    net = load_fid(str(weights), features=64).inception
    with torch.no_grad():
        real = net(x).double().numpy()
        fake = net(fid_images(decode(vae, z, torch.device("cpu")))).double().numpy()
    assert fids["run:ema"] == pytest.approx(frechet_distance(real, fake), rel=1e-3, abs=1e-4)
    assert fids["a"] == pytest.approx(fids["b"], rel=1e-9)  # the same decoder, the reals kept across models
    assert fids["a"] != pytest.approx(fids["run:ema"], rel=1e-3)


def test_fid_weights_that_are_not_weights_are_refused(tmp_path, data) -> None:
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    res = cli(
        "eval", data["heldout"], "--vae", data["vae"], "--fid-weights", junk, "--out", tmp_path / "e", code=1
    )
    assert "cannot be read as tensors" in res.output

    class Evil:  # unpickling this would run code; weights_only must refuse it
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"x": Evil()}))
    res = cli(
        "eval", data["heldout"], "--vae", data["vae"], "--fid-weights", evil, "--out", tmp_path / "e", code=1
    )
    assert "cannot be read as tensors" in res.output and not (tmp_path / "pwned").exists()

    wrong = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(3, 3)}, wrong)
    res = cli(
        "eval", data["heldout"], "--vae", data["vae"], "--fid-weights", wrong, "--out", tmp_path / "e", code=1
    )
    assert "not torch-fidelity's InceptionV3 weights" in res.output


def test_sample_uses_the_same_seeded_z_for_every_model_and_batch_size(tmp_path, data) -> None:
    runs = {}
    for bs in (1, 4):
        out = tmp_path / f"bs{bs}"
        cli(
            "eval",
            data["heldout"],
            "--vae",
            f"a={data['vae']}",
            "--vae",
            f"b={data['vae']}",
            "--sample",
            "--batch-size",
            bs,
            "--out",
            out,
        )
        runs[bs] = by_model(read_csv(out / "per_image.csv"), "psnr")
    np.testing.assert_array_equal(runs[1]["a"], runs[1]["b"])  # same z for every model
    np.testing.assert_allclose(runs[1]["a"], runs[4]["a"], atol=1e-3)  # z does not depend on batching
    cli("eval", data["heldout"], "--vae", f"a={data['vae']}", "--out", tmp_path / "mode")
    mode = by_model(read_csv(tmp_path / "mode" / "per_image.csv"), "psnr")
    assert not np.allclose(mode["a"], runs[1]["a"])  # the tiny VAE's posterior std is not negligible


def test_several_data_sets_and_val_shards(tmp_path, data) -> None:
    out = tmp_path / "e"
    cli(
        "eval",
        data["heldout"],
        data["train"],
        "--vae",
        data["vae"],
        "--vae",
        data["run"],
        "--val-shards",
        1,
        "--max-samples",
        2,
        "--out",
        out,
    )
    sets = json.loads((out / "eval.json").read_text())["sets"]
    assert [s["name"] for s in sets] == ["heldout", "train"]
    rows = read_csv(out / "per_image.csv")
    last = shard_paths(data["train"], read_manifest(data["train"]))[-1]
    want = [s["key"] for s in read_samples([last], 2)]
    assert [r["key"] for r in rows if r["set"] == "train" and r["model"] == "run:ema"] == want


def test_image_folder_is_encoded_with_the_first_models_encoder(tmp_path, data) -> None:
    images = tmp_path / "imgs"
    make_images(images, 5, size=(40, 40))
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "e"
    res = cli(
        "eval",
        images,
        "--vae",
        data["run"],
        "--vae",
        data["export"],
        "--resolution",
        RES,
        "--out",
        out,
        code=3,
    )  # finished, but an input was skipped
    assert "1 inputs skipped" in res.output
    s = json.loads((out / "eval.json").read_text())["sets"][0]
    assert s["samples"] == 5 and s["encoded_here"]
    manifest = read_manifest(out / "encoded" / "imgs")
    assert (
        manifest["settings"]["vae"]["encoder_sha256"]
        == read_manifest(data["train"])["settings"]["vae"]["encoder_sha256"]
    )
    assert s["deltas"]["export"]["psnr"]["mean"] == 0.0  # run:ema and its export are the same decoder


# ------------------------------------------------------------------------------------------------------------
# the math


def test_per_image_metrics_match_their_formulas() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 16, 16, generator=g) * 2 - 1
    y = (x + 0.1 * torch.randn(3, 3, 16, 16, generator=g)).clamp(-1, 1)
    m = per_image_metrics(x, y, None)
    a, b = (x.double() + 1) / 2, (y.double() + 1) / 2
    psnr = 10 * torch.log10(1 / ((a - b) ** 2).mean(dim=(1, 2, 3)))
    torch.testing.assert_close(m["psnr"].double(), psnr, atol=1e-4, rtol=0)
    torch.testing.assert_close(m["colour_shift"].double(), (b - a).mean(dim=(2, 3)) * 255, atol=1e-3, rtol=0)
    assert m["ssim"].shape == (3,) and (m["ssim"] < 1).all() and "lpips" not in m


def test_paired_ci_against_the_normal_approximation() -> None:
    rng = np.random.default_rng(0)
    d = rng.normal(1.5, 2.0, size=400)
    mean, lo, hi = paired_ci(d, seed=0)
    half = 1.96 * d.std(ddof=1) / np.sqrt(d.size)
    assert mean == pytest.approx(d.mean())
    assert lo == pytest.approx(mean - half, abs=0.05) and hi == pytest.approx(mean + half, abs=0.05)
    assert paired_ci(np.full(10, 0.5)) == (0.5, 0.5, 0.5)  # no spread, no interval width
    m1, lo1, hi1 = paired_ci(np.array([2.0]))
    assert m1 == 2.0 and np.isnan(lo1) and np.isnan(hi1)
    assert paired_ci(d, seed=3) == paired_ci(d, seed=3)  # seeded
