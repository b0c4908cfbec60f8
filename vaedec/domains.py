"""Offline, deterministic image domains for the demo, the quality experiment and the tests.

- `photos`: the photographs scikit-image ships, split by file name into train and held-out. The stand-in
  *source* domain: `vaedec.source_vae` trains a small AutoencoderKL (encoder and decoder) on the train split.
- `rendered_text`: document-like pages rendered with Pillow. The *target* domain: a decoder that only ever saw
  photographs reconstructs them badly, and fine-tuning only the decoder should fix much of that.

Nothing is downloaded: the photographs come inside the scikit-image wheel, the font inside Pillow.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Literal

from PIL import Image, ImageDraw, ImageFont

# Held out from the source VAE's training: varied on purpose (a cat, an indoor colour scene, grey metal
# objects, an outdoor scene with sky, a grey texture), so held-out PSNR is not one kind of picture.
HELDOUT_PHOTOS = ("brick.png", "chelsea.png", "coffee.png", "coins.png", "rocket.jpg")
MIN_PHOTO_SIDE = 128  # px; smaller files in skimage/data are icons, not photographs


def photo_paths() -> list[Path]:
    """scikit-image's bundled photographs (.png/.jpg, shorter side >= 128 px), sorted by file name."""
    import skimage

    data = Path(skimage.__file__).parent / "data"
    paths = []
    for p in sorted(data.iterdir()):
        if p.suffix.lower() not in (".png", ".jpg"):
            continue
        with Image.open(p) as im:
            if min(im.size) >= MIN_PHOTO_SIDE:
                paths.append(p)
    return paths


def photos(out: Path, split: Literal["train", "heldout"]) -> int:
    """Copy the train (all but `HELDOUT_PHOTOS`) or held-out photographs into `out`; returns how many."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', not {split!r}")
    chosen = [p for p in photo_paths() if (p.name in HELDOUT_PHOTOS) == (split == "heldout")]
    out.mkdir(parents=True, exist_ok=True)
    for p in chosen:
        shutil.copy(p, out / p.name)
    return len(chosen)


# A pronounceable-ish alphabet for fake words: real documents mix round and straight strokes, ascenders and
# descenders; letter frequencies roughly follow English so lines look like text, not noise.
_LETTERS = "eeeeeeetttttaaaaaoooooiiiiinnnnnssssshhhhrrrrddllcuumwfgypbvk"
_INKS = ((20, 20, 25), (35, 30, 60), (10, 25, 60), (45, 35, 30))  # near-black, blue-black, navy, sepia
_HEADING_INKS = ((160, 20, 30), (20, 70, 150), (20, 110, 60), (120, 40, 130))  # red, blue, green, purple
FONT_SIZES = (18, 22, 26, 30)  # body text px at size=128 (scaled with size); headings 4 px larger


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's built-in font at `size` px (FreeType, Pillow >= 10.1), else its fixed ~11 px bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def _word(rng: random.Random) -> str:
    if rng.random() < 0.15:  # numbers, dates, amounts: digits are the densest glyphs on a page
        return rng.choice(["{}", "{}.{:02d}", "{}/{}", "#{}"]).format(
            *(rng.randint(1, 999) for _ in range(2))
        )
    w = "".join(rng.choice(_LETTERS) for _ in range(rng.randint(1, 9)))
    return w.capitalize() if rng.random() < 0.2 else w


def _page(rng: random.Random, size: int, font_sizes: tuple[int, ...]) -> Image.Image:
    """One page: tinted paper, an optional coloured heading, then lines of words in one ink and size."""
    s = size / 128  # every length below is in px at size 128
    base = rng.randint(225, 250)
    paper = tuple(min(255, base + rng.randint(-12, 8)) for _ in range(3))  # off-white, cream, grey or bluish
    img = Image.new("RGB", (size, size), paper)
    draw = ImageDraw.Draw(img)
    ink = rng.choice(_INKS)
    text_size = rng.choice(font_sizes)
    margin = int(rng.randint(2, 10) * s)
    y = int(rng.randint(-4, 6) * s)  # pages may start mid-line: a crop of a longer document
    if rng.random() < 0.5:
        head = _font(round((text_size + 4) * s))
        draw.text((margin, y), " ".join(_word(rng) for _ in range(rng.randint(1, 3))).upper(),
                  fill=rng.choice(_HEADING_INKS), font=head)
        y += int((text_size + 4) * 1.4 * s)
    if rng.random() < 0.25:  # a rule under the heading, as forms and screenshots have
        draw.line((margin, y - 2, size - margin, y - 2), fill=ink, width=1)
    font = _font(round(text_size * s))
    line_h = max(1, int(text_size * rng.uniform(1.15, 1.5) * s))
    while y < size:
        line, x = [], margin + (int(rng.randint(0, 12) * s) if rng.random() < 0.2 else 0)  # indents
        while True:
            word = _word(rng)
            if draw.textlength(" ".join([*line, word]), font=font) > size - x - margin // 2:
                break
            line.append(word)
        draw.text((x, y), " ".join(line), fill=ink, font=font)
        y += line_h
    return img


def rendered_text(
    out: Path, n: int, seed: int, size: int = 128, font_sizes: tuple[int, ...] = FONT_SIZES
) -> int:
    """Render `n` document-like pages (size x size RGB PNGs) into `out`; the same seed gives the same bytes.

    Why this domain: documents, screenshots, UI and comic lettering are where SD-class VAEs are known to fail.
    Their fine, high-contrast glyph edges (1-2 px strokes, dark ink on light paper) are what a VAE trained on
    photographs spends the least capacity on, so its decoder blurs and smears them; a decoder fine-tuned on
    text can sharpen them without touching the encoder. Use different seeds for train and held-out sets.

    `font_sizes`: body text sizes in px at size=128, one drawn per page; with the default, a 64 px crop of a
    page holds 2 to 3 lines, glyphs 3 to 5 latent pixels tall at factor 4 (at 8-14 px, a VAE this small keeps
    too little of a glyph in its latent for any decoder to redraw it).
    """
    out.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        # One RNG per page, seeded from (seed, i): page i is the same whatever n is.
        rng = random.Random(f"rendered_text:{seed}:{i}")
        _page(rng, size, font_sizes).save(out / f"text-{seed}-{i:05d}.png", optimize=False)
    return n
