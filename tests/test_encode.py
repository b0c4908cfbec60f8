"""`cli.py encode` / `inspect`: shards read back with tarfile + numpy + PIL only and checked against
diffusers.

Every sample is judged independently of vaedec's reader: its moments against a fresh
`vae.encode(x).latent_dist` of its stored pixels, its pixels against Pillow resampling the recorded crop box
of the source file.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result
from conftest import ROOT, assert_moments_match, cli, make_images, save_tiny_vae, smooth_image, tar_samples
from PIL import Image

from vaedec.cli import main

RES = 32  # encoded side, pixels; the tiny VAE downsamples by 2, so moments are (8, 16, 16)
LANCZOS = Image.Resampling.LANCZOS


# ------------------------------------------------------------------------------------------------------------
# helpers: run the CLI, read OUT without vaedec, encode with diffusers


def run_cli(*args: object) -> Result:
    """Invoke the click group in-process; a traceback fails the test; any exit code."""
    return cli(*args, code=None)


def encode(src: Path, out: Path, vae: Path, *extra: object, workers: int = 0, batch: int = 4) -> Result:
    return run_cli(
        "encode",
        src,
        out,
        "--vae",
        vae,
        "--resolution",
        RES,
        "--num-workers",
        workers,
        "--batch-size",
        batch,
        *extra,
    )


@dataclass
class Sample:
    key: str
    shard: str
    moments: np.ndarray  # as stored: float16 (2C, h, w)
    pixels: np.ndarray  # uint8 (H, W, 3)
    record: dict


@dataclass
class Out:
    manifest: dict
    samples: list[Sample]  # in file order, duplicates kept
    skipped: list[dict]

    @property
    def by_key(self) -> dict[str, Sample]:
        return {s.key: s for s in self.samples}

    def by_source(self, source: str) -> list[Sample]:
        return [s for s in self.samples if s.record["source"] == source]


def read_out(out: Path) -> Out:
    """OUT read with plain tarfile / numpy / PIL: every shard file on disk, in name order."""
    manifest = json.loads((out / "manifest.json").read_text())
    samples = []
    for shard, key, files in tar_samples(out):
        assert set(files) == {"moments.npy", "image.png", "json"}, (key, sorted(files))
        with Image.open(io.BytesIO(files["image.png"])) as im:
            assert im.mode == "RGB"
            pixels = np.asarray(im).copy()
        moments = np.load(io.BytesIO(files["moments.npy"]), allow_pickle=False)
        samples.append(Sample(key, shard, moments, pixels, json.loads(files["json"])))
    skipped_path = out / "skipped.jsonl"
    skipped = (
        [json.loads(x) for x in skipped_path.read_text().splitlines() if x.strip()]
        if skipped_path.exists()
        else []
    )
    return Out(manifest, samples, skipped)


@pytest.fixture(scope="module")
def model(vae_dir):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(vae_dir).eval()


@torch.no_grad()
def diffusers_moments(model, pixels: np.ndarray) -> np.ndarray:
    """diffusers' own posterior of uint8 (H, W, 3) pixels: mean ‖ clamped logvar, fp32 (2C, h, w)."""
    x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)[None].float() / 127.5 - 1.0
    dist = model.encode(x).latent_dist
    return torch.cat([dist.mean, dist.logvar], dim=1)[0].numpy()


def source_crop(path: Path, box: list[float]) -> np.ndarray:
    """The pixels Pillow resamples from the recorded crop box of an RGB source file."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB").resize((RES, RES), LANCZOS, box=tuple(box)))


def mtimes(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(out.iterdir())}


# ------------------------------------------------------------------------------------------------------------
# 1. what the shards hold


def test_shards_hold_diffusers_moments_of_the_stored_pixels(tmp_path, vae_dir, model):
    from vaedec.vae import encoder_fingerprint

    src = tmp_path / "imgs"
    make_images(src, 6, size=(40, 36))
    make_images(src / "tall", 2, size=(30, 50))
    make_images(src / "big", 2, size=(96, 64), suffix=".jpg")
    (src / "broken.png").write_bytes(np.random.default_rng(0).bytes(300))
    n_inputs = 11
    out = tmp_path / "out"

    result = encode(src, out, vae_dir, "--shard-size-mb", 0.02, batch=3)
    assert result.exit_code == 3, result.output  # the broken file was skipped
    o = read_out(out)

    # keys: unique, dot-free; one sample per readable input
    keys = [s.key for s in o.samples]
    assert len(keys) == len(set(keys)) == n_inputs - 1
    assert all("." not in k for k in keys)
    assert [r["source"] for r in o.skipped] == ["broken.png"]

    # records, pixels and moments of every sample
    for s in o.samples:
        r = s.record
        assert set(r) >= {"source", "orig_size", "crop_box", "flip"} and r["flip"] is False
        with Image.open(src / r["source"]) as im:
            assert r["orig_size"] == list(im.size)
        left, top, right, bottom = r["crop_box"]
        assert 0 <= left < right <= r["orig_size"][0] and 0 <= top < bottom <= r["orig_size"][1]
        assert s.pixels.shape == (RES, RES, 3)
        np.testing.assert_array_equal(s.pixels, source_crop(src / r["source"], r["crop_box"]))
        assert s.moments.shape == (8, RES // 2, RES // 2)
        assert_moments_match(s.moments, diffusers_moments(model, s.pixels))
    assert {s.record["source"] for s in o.samples} == {
        p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file() and p.name != "broken.png"
    }

    # the manifest agrees with the tars
    m = o.manifest
    on_disk = sorted(p.name for p in out.glob("shard-*.tar"))
    assert [e["name"] for e in m["shards"]] == on_disk and len(on_disk) >= 3
    for e in m["shards"]:
        assert e["samples"] == sum(1 for s in o.samples if s.shard == e["name"])
        assert e["bytes"] == (out / e["name"]).stat().st_size
    assert m["complete"] is True
    assert m["totals"]["samples"] == len(o.samples)
    assert m["totals"]["inputs_skipped"] == 1 and m["totals"]["samples_skipped"] == 0
    assert m["settings"]["source"]["inputs"] == n_inputs
    assert m["settings"]["vae"]["encoder_sha256"] == encoder_fingerprint(model)
    assert not list(out.glob("*.partial")) and not list(out.glob(".*.tmp"))


# ------------------------------------------------------------------------------------------------------------
# 2. kill and resume


def _cmd(src: Path, out: Path, vae: Path) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "cli.py"),
        "encode",
        str(src),
        str(out),
        "--vae",
        str(vae),
        "--resolution",
        str(RES),
        "--num-workers",
        "0",
        "--batch-size",
        "1",
        "--shard-size-mb",
        "0.03",
    ]


def _assert_same_output(a: Path, b: Path, n_inputs: int) -> None:
    names_a, names_b = (
        sorted(p.name for p in a.glob("shard-*.tar")),
        sorted(p.name for p in b.glob("shard-*.tar")),
    )
    assert names_a == names_b
    for name in names_a:
        assert (a / name).read_bytes() == (b / name).read_bytes(), f"{name} differs"
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    assert ma["shards"] == mb["shards"] and ma["totals"] == mb["totals"] and ma["settings"] == mb["settings"]
    assert ma["complete"] and mb["complete"]
    keys = [s.key for s in read_out(a).samples]
    assert len(keys) == len(set(keys)) == n_inputs  # every input exactly once
    assert not list(a.glob("*.partial")) and not list(a.glob(".*.partial"))


@pytest.mark.slow
def test_sigkill_midway_then_rerun_equals_uninterrupted_run(tmp_path, vae_dir):
    n = 40  # a few seconds of encoding at batch size 1 on 2 cores, ~3 samples a shard
    src = tmp_path / "imgs"
    make_images(src, n, size=(48, 40))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    reference = tmp_path / "uninterrupted"  # in-process: the same code, one interpreter start fewer
    assert run_cli(*_cmd(src, reference, vae_dir)[2:]).exit_code == 0

    out = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(src, out, vae_dir), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    manifest = None
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                manifest = json.loads((out / "manifest.json").read_text())  # replaced atomically: never half
            except FileNotFoundError:
                manifest = None
            if manifest and manifest["shards"]:
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "encode finished before the kill: give it more images"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["shards"] and not manifest["complete"] and manifest["next_input"] < n

    rerun = subprocess.run(
        _cmd(src, out, vae_dir), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert rerun.returncode == 0, rerun.stderr
    _assert_same_output(out, reference, n)


class _Crash(Exception):
    pass


@pytest.mark.parametrize("crash_at_commit", [1, 2])
def test_crash_between_shard_rename_and_manifest_update_resumes(
    tmp_path, vae_dir, monkeypatch, crash_at_commit
):
    """The worst moment to die: a shard has its final name but the manifest does not list it yet."""
    import vaedec.encode

    src = tmp_path / "imgs"
    make_images(src, 6, size=(40, 36))
    args = ("--shard-size-mb", 0.02)  # ~2 samples a shard
    reference = tmp_path / "reference"
    assert encode(src, reference, vae_dir, *args, batch=1).exit_code == 0

    real_write_state, calls = vaedec.encode._write_state, []

    def dying_write_state(*a, **k):
        calls.append(1)
        if len(calls) == crash_at_commit:
            raise _Crash
        real_write_state(*a, **k)

    out = tmp_path / "out"
    monkeypatch.setattr(vaedec.encode, "_write_state", dying_write_state)
    result = CliRunner().invoke(
        main,
        [
            str(a)
            for a in (
                "encode",
                src,
                out,
                "--vae",
                vae_dir,
                "--resolution",
                RES,
                "--num-workers",
                0,
                "--batch-size",
                1,
                *args,
            )
        ],
    )
    assert isinstance(result.exception, _Crash)
    assert (out / f"shard-{crash_at_commit - 1:06d}.tar").exists()  # renamed, not yet in the manifest
    monkeypatch.setattr(vaedec.encode, "_write_state", real_write_state)

    result = encode(src, out, vae_dir, *args, batch=1)
    assert result.exit_code == 0, result.output
    _assert_same_output(out, reference, 6)


# ------------------------------------------------------------------------------------------------------------
# 3. reruns: refused with other settings, replaced with --overwrite, a no-op when complete


def test_rerun_with_other_settings_is_refused_overwrite_replaces(tmp_path, vae_dir):
    src, out = tmp_path / "imgs", tmp_path / "out"
    make_images(src, 4, size=(72, 64))
    assert encode(src, out, vae_dir, "--shard-size-mb", 0.02).exit_code == 0
    before = mtimes(out)
    time.sleep(0.01)

    # the same command again: nothing is rewritten
    again = encode(src, out, vae_dir, "--shard-size-mb", 0.02)
    assert again.exit_code == 0 and "already complete" in again.output
    assert mtimes(out) == before

    # other settings: refused, naming what changed and how to proceed; nothing touched
    refused = run_cli("encode", src, out, "--vae", vae_dir, "--resolution", 64, "--num-workers", 0,
                      "--shard-size-mb", 0.02)
    assert refused.exit_code == 1
    assert "Error:" in refused.output and "preprocessing.resolution: 32 -> 64" in refused.output
    assert "--overwrite" in refused.output
    assert encode(src, out, vae_dir, "--shard-size-mb", 0.02, "--flip").exit_code == 1
    other_vae = save_tiny_vae(tmp_path / "other-vae", seed=1)
    refused_vae = encode(src, out, other_vae, "--shard-size-mb", 0.02)
    assert refused_vae.exit_code == 1 and "encoder_sha256" in refused_vae.output
    assert mtimes(out) == before

    # --overwrite: replaced by the new settings, no shard of the old run left behind
    replaced = run_cli("encode", src, out, "--vae", vae_dir, "--resolution", 64, "--num-workers", 0,
                       "--shard-size-mb", 0.5, "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    o = read_out(out)
    assert o.manifest["settings"]["preprocessing"]["resolution"] == 64
    assert [e["name"] for e in o.manifest["shards"]] == sorted(p.name for p in out.glob("shard-*.tar"))
    assert len(o.samples) == 4 and all(s.moments.shape == (8, 32, 32) for s in o.samples)


def test_bad_settings_are_usage_or_clear_errors(tmp_path, vae_dir):
    src = tmp_path / "imgs"
    make_images(src, 1)
    r = encode(src, tmp_path / "o1", vae_dir, "--resolution", 33)  # the later --resolution wins
    assert r.exit_code == 1 and "multiple of the VAE's downsampling factor 2" in r.output
    r = encode(src, tmp_path / "o2", vae_dir, "--resize", 16)
    assert r.exit_code == 1 and "--resize 16 must be >= --resolution 32" in r.output
    r = encode(src, tmp_path / "o3", vae_dir, "--resolution", 0)
    assert r.exit_code == 2  # click's range check: usage error
    r = encode(src, tmp_path / "o4", tmp_path / "no-such-vae")
    assert r.exit_code == 1 and "could not load an AutoencoderKL" in r.output


def test_resolution_needs_only_the_vaes_own_downsampling_factor(tmp_path, vae_dir, model):
    """36 px is no multiple of 8, but the tiny VAE downsamples by 2: it encodes, to (8, 18, 18) moments."""
    src = tmp_path / "imgs"
    make_images(src, 2, size=(40, 36))
    r = encode(src, tmp_path / "out", vae_dir, "--resolution", 36)
    assert r.exit_code == 0, r.output
    o = read_out(tmp_path / "out")
    assert len(o.samples) == 2
    assert all(s.pixels.shape == (36, 36, 3) and s.moments.shape == (8, 18, 18) for s in o.samples)
    for s in o.samples:
        assert_moments_match(s.moments, diffusers_moments(model, s.pixels))


# ------------------------------------------------------------------------------------------------------------
# 4. file lists


def test_file_list_relative_to_its_folder_missing_entries_reported(tmp_path, vae_dir, model):
    root = tmp_path / "data" / "train"
    make_images(root / "data" / "0", 3, size=(40, 36))
    lst = root / "file_list.txt"
    lst.write_text(
        "data/0/img000.png\ndata/0/gone.png\n\n# a comment\ndata/0/img002.png\ndata/0/img001.png\n"
    )
    out = tmp_path / "out"

    result = encode(lst, out, vae_dir)
    assert result.exit_code == 3, result.output
    assert "gone.png" in result.output
    o = read_out(out)
    assert sorted(s.record["source"] for s in o.samples) == ["data/0/img000.png", "data/0/img001.png",
                                                             "data/0/img002.png"]
    for s in o.samples:
        np.testing.assert_array_equal(s.pixels, source_crop(root / s.record["source"], s.record["crop_box"]))
    assert len(o.skipped) == 1
    assert o.skipped[0]["source"] == "data/0/gone.png" and "does not exist" in o.skipped[0]["reason"]
    assert o.manifest["totals"]["list_entries_skipped"] == 1 and o.manifest["totals"]["inputs_skipped"] == 0
    assert o.manifest["settings"]["source"]["inputs"] == 3

    # a complete rerun still reports the missing entry (exit 3) and rewrites nothing
    before = mtimes(out)
    again = encode(lst, out, vae_dir)
    assert again.exit_code == 3 and "already complete" in again.output and mtimes(out) == before


# ------------------------------------------------------------------------------------------------------------
# 5. bad and unusual inputs: one folder of them, encoded once


# 16-bit grey values around the rounding edges of v / 257, and the 8-bit values the rule gives
V16 = np.array([0, 128, 129, 385, 386, 32767, 32896, 65406, 65407, 65535], dtype=np.uint16)
V8 = np.array([0, 0, 1, 1, 2, 127, 128, 254, 255, 255], dtype=np.uint8)
BAD = {"corrupt.png": "cannot decode", "empty.png": "empty file", "text.jpg": "cannot decode",
       "truncated.png": "cannot decode", "float.tif": "floating-point"}


def _make_zoo(src: Path) -> dict[str, np.ndarray]:
    """Writes the unusual inputs; returns the expected stored pixels of those with an exact expectation."""
    src.mkdir(parents=True)
    expected = {}
    make_images(src / "good", 2, size=(40, 36))
    (src / "notes.txt").write_text("not an image suffix: ignored, not skipped")
    # undecodable
    (src / "corrupt.png").write_bytes(np.random.default_rng(1).bytes(2000))
    (src / "empty.png").write_bytes(b"")
    (src / "text.jpg").write_text("this is a text file with an image suffix\n" * 20)
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
        src / "t.png"
    )
    data = (src / "t.png").read_bytes()
    (src / "truncated.png").write_bytes(data[: len(data) // 2])
    (src / "t.png").unlink()
    Image.fromarray(np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)).save(src / "float.tif")
    # geometry
    Image.fromarray(smooth_image(3, (10, 12))).save(src / "small.png")
    Image.fromarray(smooth_image(4, (2000, 8))).save(src / "wide.png")
    # conversion rule; 32x32 inputs are encoded without resampling, so the stored pixels are exact
    g = np.resize(V16, (32, 32))
    Image.fromarray(g).save(src / "grey16.png")
    expected["grey16.png"] = np.repeat(np.resize(V8, (32, 32))[..., None], 3, axis=2)
    idx = (np.arange(32 * 32).reshape(32, 32) // 7 % 3).astype(np.uint8)
    pal = [200, 10, 20, 30, 40, 250, 0, 128, 0]
    for name, transparent in (("palette.png", None), ("palette_t.png", 1)):
        im = Image.fromarray(idx, "P")
        im.putpalette(pal + [0] * (768 - len(pal)))
        im.save(src / name, **({} if transparent is None else {"transparency": transparent}))
        colours = np.array(pal, np.uint8).reshape(3, 3)
        if transparent is not None:
            colours[transparent] = 255
        expected[name] = colours[idx]
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 0] = 255  # red everywhere ...
    rgba[:, 16:, 3] = 255  # ... opaque on the right half only
    Image.fromarray(rgba, "RGBA").save(src / "rgba.png")
    left = np.arange(32)[None, :, None] < 16
    expected["rgba.png"] = np.broadcast_to(np.where(left, [255, 255, 255], [255, 0, 0]), (32, 32, 3)).astype(
        np.uint8
    )
    cmyk = np.zeros((32, 32, 4), np.uint8)
    cmyk[:, 16:, 3] = 255  # left half no ink (white), right half full black
    Image.fromarray(cmyk, "CMYK").save(src / "cmyk.jpg", quality=95)
    raw = np.zeros((32, 40, 3), np.uint8)  # 40 wide, 32 high; EXIF says: rotate 90 degrees clockwise
    raw[..., 0] = np.arange(40)[None] * 6
    raw[..., 1] = np.arange(32)[:, None] * 8
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(raw).save(src / "exif.jpg", quality=95, exif=exif.tobytes())
    with Image.open(src / "exif.jpg") as im:
        decoded = np.asarray(im.convert("RGB"))  # stored orientation
    expected["exif.jpg"] = np.rot90(decoded, k=-1)[4:36]  # displayed 32 wide x 40 high, central 32 rows
    return expected


@pytest.fixture(scope="module")
def zoo(tmp_path_factory, vae_dir):
    src = tmp_path_factory.mktemp("zoo") / "src"
    expected = _make_zoo(src)
    out = src.parent / "out"
    result = encode(src, out, vae_dir)
    return result, read_out(out), expected, src


def test_mixed_folder_exits_3_and_lists_exactly_the_bad_files(zoo):
    result, o, _, _ = zoo
    assert result.exit_code == 3, result.output
    assert "Traceback" not in result.output
    assert {r["source"]: r["reason"] for r in o.skipped}.keys() == BAD.keys()
    for r in o.skipped:
        assert BAD[r["source"]] in r["reason"], r
        assert r["source"] in result.output  # also reported on the terminal
    assert o.manifest["totals"]["inputs_skipped"] == len(BAD)
    sources = {s.record["source"] for s in o.samples}
    assert not sources & BAD.keys() and "notes.txt" not in sources
    assert len(o.samples) == o.manifest["settings"]["source"]["inputs"] - len(BAD) == 10


@pytest.mark.parametrize("name", ["grey16.png", "palette.png", "palette_t.png", "rgba.png", "exif.jpg"])
def test_conversion_rule_gives_exact_pixels(zoo, name):
    _, o, expected, _ = zoo
    (s,) = o.by_source(name)
    np.testing.assert_array_equal(s.pixels, expected[name])


def test_exif_rotation_is_recorded_in_orig_size(zoo):
    _, o, _, _ = zoo
    (s,) = o.by_source("exif.jpg")
    assert s.record["orig_size"] == [32, 40] and s.record["crop_box"] == [0.0, 4.0, 32.0, 36.0]


def test_cmyk_jpeg_is_converted_by_pillow(zoo):
    _, o, _, src = zoo
    (s,) = o.by_source("cmyk.jpg")
    with Image.open(src / "cmyk.jpg") as im:
        assert im.mode == "CMYK"
        np.testing.assert_array_equal(s.pixels, np.asarray(im.convert("RGB")))
    assert s.pixels[:, :12].min() >= 250 and s.pixels[:, 20:].max() <= 5  # white paper, black ink


def test_small_image_is_upscaled_and_says_so(zoo):
    _, o, _, src = zoo
    (s,) = o.by_source("small.png")
    assert s.record["upscaled"] is True and s.record["orig_size"] == [10, 12]
    np.testing.assert_array_equal(s.pixels, source_crop(src / "small.png", s.record["crop_box"]))
    assert not any(x.record["upscaled"] for x in o.by_source("good/img000.png"))


def test_extreme_aspect_ratio_is_a_square_from_its_middle(zoo):
    _, o, _, src = zoo
    (s,) = o.by_source("wide.png")
    assert s.record["orig_size"] == [2000, 8] and s.record["crop_box"] == [996.0, 0.0, 1004.0, 8.0]
    assert s.record["upscaled"] is True
    np.testing.assert_array_equal(s.pixels, source_crop(src / "wide.png", s.record["crop_box"]))


def test_empty_folder_and_missing_src_are_clear_errors(tmp_path, vae_dir):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    r = encode(tmp_path / "empty", tmp_path / "out", vae_dir)
    assert r.exit_code == 1 and "Error: no images found" in r.output
    r = encode(tmp_path / "does-not-exist", tmp_path / "out2", vae_dir)
    assert r.exit_code == 1 and "Error:" in r.output and "does not exist" in r.output
    assert not (tmp_path / "out2").exists()


def test_folder_of_only_bad_files_reports_every_one(tmp_path, vae_dir):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.png").write_bytes(b"")
    (src / "b.jpg").write_text("text")
    r = encode(src, tmp_path / "out", vae_dir)
    assert r.exit_code == 3
    o = read_out(tmp_path / "out")
    assert not o.samples and o.manifest["complete"] and o.manifest["totals"]["inputs_skipped"] == 2
    assert sorted(x["source"] for x in o.skipped) == ["a.png", "b.jpg"]


def test_a_broken_link_in_a_folder_is_reported_not_passed_over(tmp_path, vae_dir):
    src = tmp_path / "src"
    make_images(src, 2)
    (src / "gone.png").symlink_to(tmp_path / "deleted.png")
    r = encode(src, tmp_path / "out", vae_dir)
    assert r.exit_code == 3, r.output
    o = read_out(tmp_path / "out")
    assert len(o.samples) == 2 and o.manifest["totals"]["list_entries_skipped"] == 1
    assert [(x["source"], "broken symbolic link" in x["reason"]) for x in o.skipped] == [("gone.png", True)]


def _vae_with_quant_bias(path: Path, channels: slice, value: float) -> Path:
    """The tiny VAE with quant_conv's bias set on some moment channels: drives mean or logvar out of range."""
    from conftest import tiny_vae

    vae = tiny_vae()
    with torch.no_grad():
        vae.quant_conv.bias[channels] = value
    vae.save_pretrained(path)
    return path


def test_logvar_is_stored_clamped_like_diffusers(tmp_path):
    from diffusers import AutoencoderKL

    vae = _vae_with_quant_bias(tmp_path / "vae", slice(4, 8), -100.0)  # logvar channels far below -30
    src = tmp_path / "imgs"
    make_images(src, 2)
    assert encode(src, tmp_path / "out", vae).exit_code == 0
    low = AutoencoderKL.from_pretrained(vae).eval()
    for s in read_out(tmp_path / "out").samples:
        assert np.all(s.moments[4:] == -30.0)
        assert_moments_match(s.moments, diffusers_moments(low, s.pixels))


def test_moments_beyond_fp16_are_skipped_per_sample_not_stored_as_inf(tmp_path):
    vae = _vae_with_quant_bias(tmp_path / "vae", slice(0, 1), 1e5)  # mean channel 0 > fp16 max (65504)
    src = tmp_path / "imgs"
    make_images(src, 2)
    result = encode(src, tmp_path / "out", vae, "--flip")
    assert result.exit_code == 3, result.output
    o = read_out(tmp_path / "out")
    assert not o.samples
    assert len(o.skipped) == 4 and all("non-finite" in r["reason"] and r["key"] for r in o.skipped)
    assert sorted(r["key"].endswith("-flip") for r in o.skipped) == [False, False, True, True]
    assert o.manifest["totals"]["samples_skipped"] == 4 and o.manifest["totals"]["inputs_skipped"] == 0


# ------------------------------------------------------------------------------------------------------------
# 6. flips and random crops


def test_flip_is_the_encoding_of_the_mirrored_image(tmp_path, vae_dir, model):
    src, out = tmp_path / "imgs", tmp_path / "out"
    make_images(src, 3, size=(48, 40))
    assert encode(src, out, vae_dir, "--flip").exit_code == 0
    o = read_out(out)
    assert len(o.samples) == 6
    by_key = o.by_key
    for key, s in by_key.items():
        if s.record["flip"]:
            continue
        f = by_key[f"{key}-flip"]
        assert f.record == {**s.record, "flip": True}
        np.testing.assert_array_equal(f.pixels, s.pixels[:, ::-1])
        fresh = diffusers_moments(model, s.pixels[:, ::-1])
        assert_moments_match(f.moments, fresh)
        # ... which is not the mirrored latent: the test would see a latent-space flip
        mirrored_latent = s.moments[..., ::-1].astype(np.float32)
        assert np.abs(mirrored_latent - fresh).max() > 20 * 1e-3


def test_random_crops_are_seeded_and_independent_of_workers(tmp_path, vae_dir, model):
    src = tmp_path / "imgs"
    make_images(src, 3, size=(80, 56))
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    runs = {}
    for name, workers, seed in (("w0", 0, 5), ("w2", 2, 5), ("seed6", 0, 6)):
        r = encode(src, tmp_path / name, vae_dir, "--crops-per-image", 3, "--resize", 48, "--seed", seed,
                   workers=workers, batch=5)
        assert r.exit_code == 3, r.output  # broken.png, also when decoded in a worker process
        runs[name] = read_out(tmp_path / name)

    o = runs["w0"]
    assert len(o.samples) == 3 * 3 and [x["source"] for x in o.skipped] == ["broken.png"]
    for i in range(3):
        crops = o.by_source(f"img{i:03d}.png")
        assert sorted(s.record["crop_index"] for s in crops) == [0, 1, 2]
        assert all(s.key.endswith(f"-c{s.record['crop_index']}") for s in crops)
        assert len({tuple(s.record["crop_box"]) for s in crops}) == 3  # distinct positions
        for s in crops:
            np.testing.assert_array_equal(
                s.pixels, source_crop(src / s.record["source"], s.record["crop_box"])
            )
            assert_moments_match(s.moments, diffusers_moments(model, s.pixels))

    def boxes(out: Out) -> dict[str, list[float]]:
        return {s.key: s.record["crop_box"] for s in out.samples}

    assert boxes(runs["w2"]) == boxes(o)  # same seed, 2 decoding workers: the same boxes ...
    for a, b in zip(o.samples, runs["w2"].samples):  # ... and the same samples in the same order
        assert a.key == b.key and np.array_equal(a.pixels, b.pixels) and np.array_equal(a.moments, b.moments)
    assert boxes(runs["seed6"]).keys() == boxes(o).keys() and boxes(runs["seed6"]) != boxes(o)


# ------------------------------------------------------------------------------------------------------------
# 7. inspect --verify


def test_inspect_verify_passes_then_catches_damage(tmp_path, vae_dir):
    src, out = tmp_path / "imgs", tmp_path / "out"
    make_images(src, 6, size=(40, 36))
    assert encode(src, out, vae_dir, "--shard-size-mb", 0.01).exit_code == 0
    assert len(list(out.glob("shard-*.tar"))) >= 3

    ok = run_cli("inspect", out, "--verify")
    assert ok.exit_code == 0, ok.output
    assert (
        "complete" in ok.output
        and "samples        6 in" in ok.output
        and "every sample read back" in ok.output
    )

    shard1 = out / "shard-000001.tar"
    shard1.write_bytes(shard1.read_bytes()[: shard1.stat().st_size // 2])
    bad = run_cli("inspect", out, "--verify")
    assert bad.exit_code == 1 and "shard-000001.tar" in bad.output and "problems found" in bad.output
    assert run_cli("inspect", out).exit_code == 0  # without --verify only the manifest is read

    (out / "shard-000000.tar").unlink()
    gone = run_cli("inspect", out, "--verify")
    assert gone.exit_code == 1 and "shard-000000.tar" in gone.output and "missing" in gone.output

    # not a shard folder: an error, not a traceback
    assert run_cli("inspect", tmp_path / "imgs").exit_code == 1


# ------------------------------------------------------------------------------------------------------------
# 8. bf16


def test_bf16_encoder_is_close_to_fp32(tmp_path, vae_dir):
    src = tmp_path / "imgs"
    make_images(src, 3, size=(40, 36))
    assert encode(src, tmp_path / "fp32", vae_dir).exit_code == 0
    assert encode(src, tmp_path / "bf16", vae_dir, "--dtype", "bf16").exit_code == 0
    a, b = read_out(tmp_path / "fp32"), read_out(tmp_path / "bf16")
    assert b.manifest["settings"]["preprocessing"]["dtype"] == "bf16"
    assert [s.key for s in a.samples] == [s.key for s in b.samples]
    for x, y in zip(a.samples, b.samples):
        assert y.moments.dtype == np.float16
        np.testing.assert_array_equal(x.pixels, y.pixels)
        diff = np.abs(x.moments.astype(np.float32) - y.moments.astype(np.float32))
        assert diff.max() < 0.05 * max(1.0, np.abs(x.moments).max())  # bf16 keeps ~3 significant digits
    assert any(not np.array_equal(x.moments, y.moments) for x, y in zip(a.samples, b.samples))  # really bf16
