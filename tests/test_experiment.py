"""`make experiment` and `make demo` end to end at smoke size: the shipped source VAE, the rendered-text and
photo domains, every variant trained, evaluated on both held-out sets, encoders bit-identical, docs
written."""

from __future__ import annotations

import json

import pytest

from vaedec.experiment import QUICK, VARIANTS, run_experiment

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("fresh_accelerate_state")]


def test_quick_experiment_writes_tables_grids_and_checks(tmp_path) -> None:
    out, docs = tmp_path / "experiment", tmp_path / "docs"
    report = run_experiment(out, docs, QUICK)
    result = json.loads((out / "eval" / "eval.json").read_text())
    assert [s["name"] for s in result["sets"]] == ["text-heldout", "photos-heldout"]
    labels = ["original"] + [f"{v.name}:{kind}" for v in VARIANTS for kind in ("raw", "ema")]
    assert [m["label"] for m in result["models"]] == labels
    for s in result["sets"]:
        assert list(s["models"]) == labels and set(s["deltas"]) == set(labels[1:])
    quality = (docs / "quality.md").read_text()
    assert report in quality and quality.count("bit-identical") == len(VARIANTS)
    assert (docs / "quality-text-heldout.png").stat().st_size > 0
    # The replay variant really mixed the photographs in: its run logged each set's pixel loss.
    replay = next(v for v in VARIANTS if v.replay)
    lines = (out / "runs" / replay.name / "metrics.jsonl").read_text()
    assert "loss/pixel/photos-train" in lines and "loss/pixel/text-train" in lines
    # A rerun finds everything done: same table, nothing retrained.
    assert run_experiment(out, None, QUICK) == report


def test_quick_second_family_writes_its_section_and_keeps_the_first(tmp_path) -> None:
    from vaedec.experiment import FAMILY_BEGIN, FAMILY_VARIANTS, QWENIMAGE_VAE, run_family_experiment

    out, docs = tmp_path / "experiment", tmp_path / "docs"
    docs.mkdir()
    (docs / "quality.md").write_text("# Quality\n\nthe first family's tables\n")
    report = run_family_experiment(out, docs, QUICK)
    result = json.loads((out / "eval-qwenimage" / "eval.json").read_text())
    labels = ["original"] + [f"{v.name}:{kind}" for v in FAMILY_VARIANTS for kind in ("raw", "ema")]
    assert [m["label"] for m in result["models"]] == labels
    assert json.loads((out / "runs-qwenimage" / "qwenimage-l1" / "export" / "config.json").read_text())[
        "_class_name"] == json.loads((QWENIMAGE_VAE / "config.json").read_text())["_class_name"]
    quality = (docs / "quality.md").read_text()
    assert quality.startswith("# Quality\n\nthe first family's tables\n") and report in quality
    assert quality.count(FAMILY_BEGIN) == 1 and quality.count("encoder tensors bit-identical") == len(
        FAMILY_VARIANTS
    )
    # Rerun: the section is replaced, not appended again.
    run_family_experiment(out, docs, QUICK)
    assert (docs / "quality.md").read_text().count(FAMILY_BEGIN) == 1
