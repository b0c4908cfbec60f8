"""`make demo` at smoke size: both recipes trained (domain-only and replay), evaluated side by side on
held-out text and photographs, labelled grids, and each export's model card carrying the eval table."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from huggingface_hub import ModelCard
from PIL import Image

from vaedec.demo import DOMAIN_ONLY, ORIGINAL, WITH_REPLAY, main
from vaedec.evaluate import GRID_MIN_TILE
from vaedec.experiment import QUICK

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("fresh_accelerate_state")]


def test_demo_ends_on_domain_only_and_replay_side_by_side(tmp_path, monkeypatch) -> None:
    import vaedec.demo

    monkeypatch.setattr(vaedec.demo, "DEMO", QUICK)  # tiny data; 3 steps below
    out = tmp_path / "demo"
    r = CliRunner().invoke(main, ["--out", str(out), "--max-steps", "3"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    result = json.loads((out / "eval" / "eval.json").read_text())
    assert [m["label"] for m in result["models"]] == [ORIGINAL, DOMAIN_ONLY, WITH_REPLAY]
    assert all(m["ema"] for m in result["models"][1:])
    # The replay run really mixed the training photographs in.
    assert "loss/pixel/photos-train" in (out / "run-replay" / "metrics.jsonl").read_text()
    assert "loss/pixel/photos-train" not in (out / "run" / "metrics.jsonl").read_text()

    # The output ends on the two recipes side by side, with eval.json's figures.
    tail = r.output[r.output.index("The problem and the fix") :]
    sets = {s["name"]: s for s in result["sets"]}
    for label, row in ((DOMAIN_ONLY, "fine-tuned on text only"), (WITH_REPLAY, "20% photographs replayed")):
        line = next(ln for ln in tail.splitlines() if row in ln)
        for s in ("text-heldout", "photos-heldout"):
            d = sets[s]["deltas"][label]["psnr"]
            assert f"{sets[s]['models'][label]['psnr']:.2f} dB ({d['mean']:+.2f} [" in line
    assert tail.rstrip().splitlines()[-1].startswith(("Replay kept", "This run did not show"))

    # Grids: labelled columns (input | the three decoders), 64 px crops scaled up to be read.
    grid = np.asarray(Image.open(out / "eval" / "grids" / "photos-heldout-sample.png").convert("RGB"))
    tile = 64 * -(-GRID_MIN_TILE // 64)
    assert (
        grid.shape[1] == 4 * (tile + 2) + 2 and (grid.shape[0] - 2) % (tile + 2) > 10
    )  # a label band on top

    # Each export's model card carries the eval, naming its own row.
    for run, label in (("run", DOMAIN_ONLY), ("run-replay", WITH_REPLAY)):
        card = ModelCard.load(out / run / "export" / "README.md")
        assert f"the row **{label}** is this export." in card.text
        assert f"{sets['text-heldout']['models'][label]['psnr']:.2f}" in card.text
