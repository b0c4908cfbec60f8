"""The demo's image domains: deterministic bytes, counts, sizes, and a train/held-out split that never
overlaps."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image

from vaedec.domains import HELDOUT_PHOTOS, photo_paths, photos, rendered_text


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_rendered_text_same_seed_same_bytes(tmp_path):
    assert rendered_text(tmp_path / "a", 6, seed=3) == 6
    rendered_text(tmp_path / "b", 6, seed=3)
    a, b = digests(tmp_path / "a"), digests(tmp_path / "b")
    assert len(a) == 6 and a == b


def test_rendered_text_page_does_not_depend_on_n_and_seeds_differ(tmp_path):
    rendered_text(tmp_path / "few", 2, seed=3)
    rendered_text(tmp_path / "many", 5, seed=3)
    rendered_text(tmp_path / "other", 2, seed=4)
    few, many = digests(tmp_path / "few"), digests(tmp_path / "many")
    assert all(many[k] == v for k, v in few.items())
    assert set(digests(tmp_path / "other").values()).isdisjoint(few.values())


def test_rendered_text_looks_like_a_page(tmp_path):
    rendered_text(tmp_path, 8, seed=0, size=96)
    for p in sorted(tmp_path.iterdir()):
        with Image.open(p) as im:
            assert im.mode == "RGB" and im.size == (96, 96)
            a = np.asarray(im).mean(axis=2)
        # Light paper with dark ink on it: mostly bright pixels, and a real share of dark ones (text was
        # drawn).
        assert np.median(a) > 200, p.name
        assert (a < 120).mean() > 0.02, p.name


def test_photos_split_is_disjoint_and_complete(tmp_path):
    n_train, n_held = photos(tmp_path / "train", "train"), photos(tmp_path / "heldout", "heldout")
    train = {p.name for p in (tmp_path / "train").iterdir()}
    held = {p.name for p in (tmp_path / "heldout").iterdir()}
    assert (n_train, n_held) == (len(train), len(held))
    assert held == set(HELDOUT_PHOTOS)  # every held-out name exists in this scikit-image
    assert train.isdisjoint(held)
    assert train | held == {p.name for p in photo_paths()}
    assert n_train >= 3 * n_held
    for p in (tmp_path / "heldout").iterdir():
        with Image.open(p) as im:
            assert min(im.size) >= 128
