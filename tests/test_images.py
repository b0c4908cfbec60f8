"""vaedec/images.py: sample keys, crop geometry, the 8-bit RGB conversion rule, discovery, and the pixel
range."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import smooth_image
from PIL import Image

from vaedec.images import (
    RESAMPLE,
    InputError,
    SkipImage,
    crop_boxes,
    crop_resize,
    discover_inputs,
    image_seed_rng,
    load_rgb,
    make_key,
    to_model_range,
    to_rgb,
    to_uint8,
)

# ------------------------------------------------------------------------------------------------------------
# make_key


def test_make_key_is_dot_free_and_readable():
    for rel in [
        "a/b.png",
        "x.y.z/photo.final.JPG",
        ".png",
        "..png",
        "dir.with.dots/",
        "ünï cødé/ß.webp",
        "a b/c d.png",
    ]:
        key = make_key(rel)
        assert key and "." not in key and "/" not in key and " " not in key, (rel, key)
    assert make_key("cats/tabby_01.png").startswith("cats_tabby_01-")  # the stem stays readable


def test_make_key_unique_where_stems_collide():
    # All of these flatten to the same readable stem "a_b"; the hash of the full path keeps them apart.
    rels = ["a/b.png", "a_b.png", "a/b.jpg", "a b.png", "a.b.png", "a//b.png"]
    keys = [make_key(r) for r in rels]
    assert len(set(keys)) == len(rels), keys
    # A long path keeps only its tail readable, and still differs from a sibling with the same tail.
    long_a, long_b = "x" * 100 + "/same_tail.png", "y" * 100 + "/same_tail.png"
    assert len(make_key(long_a)) <= 60 + 11 and make_key(long_a) != make_key(long_b)


def test_make_key_is_stable_across_processes():
    # Keys are written into shards and compared on resume: a literal value, so a key that depended on Python's
    # per-process hash() (or on anything but the path) would fail here.
    golden = {"a/b.png": "a_b-7f9c894b6f", "data/0/img000.png": "data_0_img000-363f4fb143"}
    assert {rel: make_key(rel) for rel in golden} == golden


# ------------------------------------------------------------------------------------------------------------
# crop geometry


@pytest.mark.parametrize(
    "size, side, res",
    [((40, 36), 32, 32), ((36, 40), 32, 32), ((100, 30), 32, 32), ((33, 97), 48, 32), ((301, 127), 64, 48),
     ((64, 64), 32, 32), ((20, 10), 32, 32)],
)
def test_center_box_equals_resize_then_center_crop(size, side, res):
    """The box sampled directly gives the pixels of: shorter side -> side, then the central res x res."""
    w, h = size
    im = Image.fromarray(smooth_image(3, size))
    (box,) = crop_boxes(size, side, res, 0, None)
    s = side / min(w, h)
    rw, rh = max(res, round(w * s)), max(res, round(h * s))
    left, top = (rw - res) // 2, (rh - res) // 2
    reference = np.asarray(im.resize((rw, rh), RESAMPLE)).astype(int)[top : top + res, left : left + res]
    got = np.asarray(crop_resize(im, box, res)).astype(int)
    assert got.shape == (res, res, 3)
    # Pillow may run the two 1-D passes of a box resample in the other order: rounding differences only.
    diff = np.abs(got - reference)
    assert diff.max() <= 2 and diff.mean() < 0.1, (box, diff.max(), diff.mean())


def test_center_box_numbers():
    # 40x36 -> shorter side 32: 36x32 resized, central 32x32 at x=2, i.e. x 2..34 of 36 = 2.2222..37.7778 of
    # 40.
    assert crop_boxes((40, 36), 32, 32, 0, None) == [(2.2222, 0.0, 37.7778, 36.0)]
    # An image already resolution x resolution is used whole, and crop_resize then returns it unchanged.
    assert crop_boxes((32, 32), 32, 32, 0, None) == [(0.0, 0.0, 32.0, 32.0)]
    a = smooth_image(5, (32, 32))
    assert np.array_equal(np.asarray(crop_resize(Image.fromarray(a), (0.0, 0.0, 32.0, 32.0), 32)), a)


@pytest.mark.parametrize("size", [(40, 36), (36, 40), (300, 31), (17, 500)])
def test_random_boxes_inside_image_seeded_and_sized(size):
    w, h = size
    side, res = 48, 32
    boxes = crop_boxes(size, side, res, 50, image_seed_rng(7, "a/b.png"))
    assert len(boxes) == 50
    s = side / min(w, h)
    bw, bh = res * w / max(res, round(w * s)), res * h / max(res, round(h * s))
    for left, top, right, bottom in boxes:
        assert 0 <= left < right <= w + 1e-3 and 0 <= top < bottom <= h + 1e-3
        assert right - left == pytest.approx(bw, abs=2e-4) and bottom - top == pytest.approx(bh, abs=2e-4)
    assert len(set(boxes)) > 1  # positions really vary
    # Same (seed, path) -> same boxes, whatever was drawn before; another seed or path -> other boxes.
    assert crop_boxes(size, side, res, 50, image_seed_rng(7, "a/b.png")) == boxes
    assert crop_boxes(size, side, res, 50, image_seed_rng(8, "a/b.png")) != boxes
    assert crop_boxes(size, side, res, 50, image_seed_rng(7, "a/c.png")) != boxes


@pytest.mark.parametrize("size", [(2000, 8), (8, 2000), (1, 5000), (5000, 3)])
def test_extreme_aspect_ratio(size):
    w, h = size
    res = 32
    for boxes in (crop_boxes(size, res, res, 0, None), crop_boxes(size, res, res, 4, image_seed_rng(0, "x"))):
        for left, top, right, bottom in boxes:
            assert 0 <= left < right <= w and 0 <= top < bottom <= h
            # square in original pixels: the full short side, and as much of the long side
            assert right - left == pytest.approx(min(w, h), rel=1e-3)
            assert bottom - top == pytest.approx(min(w, h), rel=1e-3)
    (box,) = crop_boxes(size, res, res, 0, None)
    if size == (2000, 8):
        assert box == (996.0, 0.0, 1004.0, 8.0)
    im = Image.fromarray(smooth_image(1, size))
    assert np.asarray(crop_resize(im, box, res)).shape == (res, res, 3)


# ------------------------------------------------------------------------------------------------------------
# the conversion rule


def test_rgb_is_unchanged_and_grey_is_replicated():
    a = smooth_image(2, (8, 6))
    assert np.array_equal(np.asarray(to_rgb(Image.fromarray(a))), a)
    g = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    out = np.asarray(to_rgb(Image.fromarray(g, "L")))
    assert out.shape == (6, 8, 3) and all(np.array_equal(out[..., c], g) for c in range(3))
    bits = Image.fromarray(np.array([[0, 1], [1, 0]], dtype=bool))
    assert bits.mode == "1"
    assert np.asarray(to_rgb(bits))[..., 0].tolist() == [[0, 255], [255, 0]]


# Values around the rounding edges of v / 257: 385 -> 1.498 -> 1, 386 -> 1.502 -> 2, 65406 -> 254.498 -> 254.
V16 = np.array([[0, 128, 129, 256, 257, 385], [386, 32767, 32896, 65406, 65407, 65535]], dtype=np.uint16)
V8 = np.array([[0, 0, 1, 1, 1, 1], [2, 127, 128, 254, 255, 255]], dtype=np.uint8)


def test_16bit_grey_is_v_over_257(tmp_path):
    assert np.array_equal(np.round(V16 / 257.0), V8)  # the table itself
    im = Image.fromarray(V16)
    assert im.mode.startswith("I;16")
    assert np.array_equal(np.asarray(to_rgb(im)), np.repeat(V8[..., None], 3, axis=2))
    # A 16-bit PNG decoded by Pillow (mode I;16 or I depending on the version) follows the same rule.
    Image.fromarray(V16).save(tmp_path / "g16.png")
    assert np.array_equal(
        np.asarray(load_rgb(str(tmp_path / "g16.png"))), np.repeat(V8[..., None], 3, axis=2)
    )
    # 32-bit integer mode I: the same mapping, clipped to 0..255.
    i32 = Image.fromarray(np.array([[-5, 257, 70000, 65535 * 4]], dtype=np.int32))
    assert i32.mode == "I"
    assert np.asarray(to_rgb(i32))[0, :, 0].tolist() == [0, 1, 255, 255]


def test_float_mode_is_skipped():
    with pytest.raises(SkipImage, match="floating-point"):
        to_rgb(Image.fromarray(np.zeros((4, 4), np.float32)))


def _palette_image(transparent_index: int | None, tmp_path: Path) -> Image.Image:
    im = Image.new("P", (4, 2))
    im.putpalette([200, 10, 20, 30, 40, 250, 0, 128, 0] + [0] * (256 * 3 - 9))
    im.putdata([0, 1, 2, 0, 1, 1, 2, 2])
    path = tmp_path / f"p{transparent_index}.png"
    im.save(path, **({} if transparent_index is None else {"transparency": transparent_index}))
    reloaded = Image.open(path)
    assert reloaded.mode == "P" and ("transparency" in reloaded.info) == (transparent_index is not None)
    return reloaded


def test_palette_without_transparency_expands_to_its_colours(tmp_path):
    out = np.asarray(to_rgb(_palette_image(None, tmp_path)))
    colours = {0: [200, 10, 20], 1: [30, 40, 250], 2: [0, 128, 0]}
    assert out.reshape(-1, 3).tolist() == [colours[i] for i in [0, 1, 2, 0, 1, 1, 2, 2]]


def test_palette_with_transparency_is_composited_over_white(tmp_path):
    out = np.asarray(to_rgb(_palette_image(1, tmp_path)))
    colours = {0: [200, 10, 20], 1: [255, 255, 255], 2: [0, 128, 0]}  # index 1 is transparent
    assert out.reshape(-1, 3).tolist() == [colours[i] for i in [0, 1, 2, 0, 1, 1, 2, 2]]


def test_alpha_is_composited_over_white():
    rgba = np.array([[[255, 0, 0, 0], [0, 0, 0, 128], [10, 20, 30, 255]]], dtype=np.uint8)
    out = np.asarray(to_rgb(Image.fromarray(rgba, "RGBA"))).astype(int)
    assert out[0, 0].tolist() == [255, 255, 255]  # fully transparent red is white, not red
    assert np.all(np.abs(out[0, 1] - 127) <= 1)  # half-transparent black over white: mid grey
    assert out[0, 2].tolist() == [10, 20, 30]  # opaque: unchanged
    la = np.asarray(to_rgb(Image.fromarray(np.array([[[0, 0], [50, 255]]], np.uint8), "LA")))
    assert la.tolist() == [[[255, 255, 255], [50, 50, 50]]]


def test_cmyk_uses_pillows_conversion():
    cmyk = np.array([[[0, 0, 0, 0], [0, 0, 0, 255], [255, 0, 0, 0], [0, 255, 255, 0]]], dtype=np.uint8)
    out = np.asarray(to_rgb(Image.fromarray(cmyk, "CMYK")))
    assert out[0].tolist() == [[255, 255, 255], [0, 0, 0], [0, 255, 255], [255, 0, 0]]


def test_exif_orientation_is_applied(tmp_path):
    raw = np.zeros((32, 40, 3), np.uint8)  # 40 wide, 32 high, a gradient along each axis
    raw[..., 0] = np.arange(40)[None] * 6
    raw[..., 1] = np.arange(32)[:, None] * 8
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "rot.jpg"
    Image.fromarray(raw).save(path, quality=95, exif=exif.tobytes())
    decoded = np.asarray(Image.open(path).convert("RGB"))  # the stored JPEG pixels, orientation not applied
    out = np.asarray(load_rgb(str(path)))
    assert out.shape == (40, 32, 3)
    assert np.array_equal(out, np.rot90(decoded, k=-1))


@pytest.mark.parametrize(
    "name, data, reason",
    [("empty.png", b"", "empty file"), ("noise.png", bytes(range(256)) * 4, "cannot decode"),
     ("text.jpg", b"not an image at all\n" * 10, "cannot decode")],
)
def test_undecodable_files_raise_skip(tmp_path, name, data, reason):
    p = tmp_path / name
    p.write_bytes(data)
    with pytest.raises(SkipImage, match=reason):
        load_rgb(str(p))


def test_truncated_png_raises_skip(tmp_path):
    p = tmp_path / "t.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(p)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(SkipImage, match="cannot decode"):
        load_rgb(str(p))


# ------------------------------------------------------------------------------------------------------------
# discovery


def test_discover_folder_is_recursive_sorted_and_filtered(tmp_path):
    for rel in ["b/2.PNG", "a.jpg", "b/1.webp", "notes.txt", "c/d/e.tiff", "x.png.bak"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    items, skips = discover_inputs(tmp_path)
    assert [i.rel for i in items] == ["a.jpg", "b/1.webp", "b/2.PNG", "c/d/e.tiff"]
    assert [i.index for i in items] == [0, 1, 2, 3] and not skips
    assert items[2].path == str(tmp_path / "b/2.PNG")


def test_discover_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        discover_inputs(tmp_path / "missing")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("no images")
    with pytest.raises(InputError, match="no images found"):
        discover_inputs(tmp_path / "empty")


def test_discover_file_list(tmp_path):
    root = tmp_path / "data" / "train"
    (root / "data" / "0").mkdir(parents=True)
    for n in ["a.png", "b.png"]:
        (root / "data" / "0" / n).write_bytes(b"x")
    (tmp_path / "abs.png").write_bytes(b"x")
    lst = root / "file_list.txt"
    lst.write_text(
        "# comment\n\ndata/0/a.png\n  data/0/missing.png  \ndata/0/b.png\ndata/0/a.png\n"
        f"{tmp_path / 'abs.png'}\n"
    )
    items, skips = discover_inputs(lst)
    assert [(i.index, i.rel, i.path) for i in items] == [
        (0, "data/0/a.png", str(root / "data/0/a.png")),
        (1, "data/0/b.png", str(root / "data/0/b.png")),
        (2, (tmp_path / "abs.png").as_posix(), str(tmp_path / "abs.png")),
    ]
    assert [(s.index, s.rel) for s in skips] == [(-1, "data/0/missing.png"), (-1, "data/0/a.png")]
    assert "line 4" in skips[0].reason and "does not exist" in skips[0].reason
    assert "line 6" in skips[1].reason and "duplicate" in skips[1].reason
    lst.write_text("data/0/nothing.png\n")
    with pytest.raises(InputError, match="no existing image files"):
        discover_inputs(lst)


# ------------------------------------------------------------------------------------------------------------
# pixel range


def test_uint8_model_range_round_trip_is_exact():
    u = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16).expand(2, 3, 16, 16)
    x = to_model_range(u)
    assert x.dtype == torch.float32
    assert x.min() == -1.0 and x.max() == 1.0
    assert torch.allclose(x.flatten()[:256], torch.arange(256) / 127.5 - 1.0, atol=0, rtol=0)
    assert torch.equal(to_uint8(x), u)
    # Also through bf16 / fp16 model outputs: the nearest uint8 comes back.
    for dtype in (torch.float16, torch.bfloat16):
        assert (to_uint8(x.to(dtype)).int() - u.int()).abs().max() <= (0 if dtype == torch.float16 else 1)


def test_to_uint8_clamps_and_rounds():
    x = torch.tensor([-3.0, -1.0, -0.999, 0.0, 0.999, 1.0, 5.0, float("-inf"), float("inf")]).reshape(
        1, 1, 1, 9
    )
    assert to_uint8(x).flatten().tolist() == [0, 0, 0, 128, 255, 255, 255, 0, 255]
