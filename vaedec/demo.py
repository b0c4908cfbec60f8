"""`make demo`: a pretrained decoder fine-tuned on a new domain, the damage that does outside it, and the
recipe that avoids the damage; end to end, offline, in about 5 CPU minutes.

1. data: rendered text pages (the new domain; train + held-out), held-out photographs (the old one) and the
   source VAE's training photographs (for replay)
2. encode them with the shipped source VAE (assets/source-vae: encoder and decoder pretrained on photographs)
3. train its decoder twice with configs/demo.yaml (L1 + PatchGAN, EMA), the encoder never loaded: on the text
   alone (domain-only), and with 20 % of every batch replayed from the training photographs (`--mix`, the
   recommended recipe, as `make experiment`'s l1-replay variant); both at once, one process and thread each
4. eval: the original decoder against both fine-tuned ones (EMA) on held-out text and held-out photographs;
   each run's export gets a model card with that table. A small version of `make experiment`
   (vaedec/experiment.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click

from vaedec.experiment import ROOT, SOURCE_VAE, Sizes, prepare_data
from vaedec.io import setup_logging

DEMO = Sizes(text_train_pages=120, text_heldout_pages=16, crops_per_page=2)  # steps: configs/demo.yaml
REPLAY = 0.2  # share of each batch drawn from the training photographs (the README's recommended recipe)
# Eval labels: the baseline and the two runs (EMA weights, as exported).
ORIGINAL, DOMAIN_ONLY, WITH_REPLAY = "original-decoder", "domain-only", "replay"


def train_runs(runs: dict[str, list[str]], shards: dict[str, Path], out: Path, max_steps: int | None) -> None:
    """Fine-tune the decoder once per entry of `runs` (run folder name -> extra overrides) with
    configs/demo.yaml, all at once: one `vaedec train` process and one torch thread each. On a small CPU that
    is the fastest use of the cores: these ops are too small for a second OpenMP thread to pay, and on busy
    cores it costs several times the CPU (README, "CPU threads"). A rerun resumes each run, or finds it
    finished."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TQDM_DISABLE": "1",
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
    }
    procs = {}
    for name, extra in runs.items():
        cmd = [
            sys.executable,
            str(ROOT / "cli.py"),
            "train",
            str(shards["text-train"]),
            "--config",
            str(ROOT / "configs" / "demo.yaml"),
            "--output",
            str(out / name),
            "--no-export",
            *extra,
        ]
        cmd += [f"run.max_steps={max_steps}"] if max_steps else []
        output = (out / f"{name}.train.txt").open("wb")  # the run's own log is OUT/NAME/log.txt
        procs[name] = (subprocess.Popen(cmd, env=env, stdout=output, stderr=subprocess.STDOUT), output)
    last = time.monotonic()
    while any(p.poll() is None for p, _ in procs.values()):
        time.sleep(1)
        if time.monotonic() - last >= 30:
            last = time.monotonic()
            click.echo("      " + ", ".join(f"{name}: step {_logged_step(out / name)}" for name in procs))
    for name, (p, output) in procs.items():
        output.close()
        if p.returncode != 0:
            tail = (out / f"{name}.train.txt").read_text(errors="replace").strip().splitlines()[-15:]
            raise click.ClickException(
                f"training {name} failed (exit code {p.returncode}):\n" + "\n".join(tail)
            )


def _logged_step(run: Path) -> int:
    """The last step a run has logged to metrics.jsonl (0 before the first)."""
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return json.loads(lines[-1])["step"] if lines else 0


def side_by_side(result: dict[str, Any]) -> str:
    """The two recipes against the original decoder on both held-out sets: PSNR and its paired delta."""
    sets = {s["name"]: s for s in result["sets"]}
    text, photos = sets["text-heldout"], sets["photos-heldout"]

    def cell(s: dict[str, Any], label: str) -> str:
        psnr = s["models"][label]["psnr"]
        if label == ORIGINAL:
            return f"{psnr:.2f} dB"
        d = s["deltas"][label]["psnr"]
        return f"{psnr:.2f} dB ({d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}])"

    rows = [
        ("original decoder", ORIGINAL),
        ("fine-tuned on text only", DOMAIN_ONLY),
        (f"fine-tuned on text + {REPLAY:.0%} photographs replayed", WITH_REPLAY),
    ]
    lines = ["| decoder (EMA weights) | held-out text | held-out photographs |", "|---|---|---|"]
    lines += [f"| {name} | {cell(text, label)} | {cell(photos, label)} |" for name, label in rows]
    return "\n".join(lines)


def run_demo(out: Path, sizes: Sizes = DEMO, max_steps: int | None = None) -> dict[str, Any]:
    """The whole demo into OUT (images/, shards/, run/, run-replay/, eval/); returns the eval's result."""
    from vaedec.checkpoint import RUN_EXPORT, export_run
    from vaedec.config import EvalConfig
    from vaedec.evaluate import evaluate

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    shards = prepare_data(out, sizes)
    click.echo(f"[1/3] rendered text pages and photographs encoded with {SOURCE_VAE} -> {out / 'shards'}")
    runs = {"run": [], "run-replay": ["--mix", f"{shards['photos-train']}:{REPLAY}"]}
    click.echo(
        f"[2/3] training the decoder twice at once, one process and thread each: on text only -> "
        f"{out / 'run'}, and with {REPLAY:.0%} of every batch from the training photographs (--mix) -> "
        f"{out / 'run-replay'}"
    )
    started = time.monotonic()
    train_runs(runs, shards, out, max_steps)
    domain_only, replay = (out / "run", out / "run-replay")
    click.echo(
        f"      both trained to step {_logged_step(domain_only)} in {(time.monotonic() - started) / 60:.1f} "
        "min"
    )
    result = evaluate(
        EvalConfig(
            data=(str(shards["text-heldout"]), str(shards["photos-heldout"])),
            vaes=(
                f"{ORIGINAL}={SOURCE_VAE}",
                f"{DOMAIN_ONLY}={domain_only}:ema",
                f"{WITH_REPLAY}={replay}:ema",
            ),
            out=str(out / "eval"),
            batch_size=32,
            grid_samples=6,
        )
    )
    for run in (domain_only, replay):  # the exports' model cards get this eval's table
        export_run(run, run / RUN_EXPORT, eval_dir=out / "eval")
    click.echo("[3/3] held-out evaluation (vaedec eval):\n")
    click.echo(result.report)
    grids = out / "eval" / "grids"
    click.echo(f"  grids    {grids / 'photos-heldout-sample.png'}, {grids / 'text-heldout-sample.png'}")
    click.echo(
        f"           (input | {ORIGINAL} | {DOMAIN_ONLY} | {WITH_REPLAY}); *-improved-*, *-worsened-*"
    )
    click.echo(f"  tables   {out / 'eval' / 'report.md'}, eval.json, per_image.csv")
    click.echo(f"  runs     {domain_only}, {replay}  (tensorboard --logdir {out})")
    click.echo(f"  exports  {domain_only / RUN_EXPORT}, {replay / RUN_EXPORT}  (README.md: model card)")
    click.echo(
        "\nThe problem and the fix: a decoder fine-tuned on one domain alone loses quality on everything "
        "else,"
    )
    click.echo(
        "and the same VAE decodes every image a diffusion model makes. Replaying general images in every "
        "batch"
    )
    click.echo(
        f"(`vaedec train ... --mix GENERAL:{REPLAY}`) is the recipe against it. PSNR, Δ against the original "
        "decoder [95% CI]:\n"
    )
    click.echo(side_by_side(result.result))
    click.echo("\n" + verdict(result.result))
    return result.result


def verdict(result: dict[str, Any]) -> str:
    """One sentence read off the figures: how much of the text gain replay kept and of the photo loss it
    removed."""
    sets = {s["name"]: s for s in result["sets"]}
    gain = {k: sets["text-heldout"]["deltas"][k]["psnr"]["mean"] for k in (DOMAIN_ONLY, WITH_REPLAY)}
    loss = {k: sets["photos-heldout"]["deltas"][k]["psnr"]["mean"] for k in (DOMAIN_ONLY, WITH_REPLAY)}
    if gain[DOMAIN_ONLY] <= 0 or loss[DOMAIN_ONLY] >= 0:
        return (
            "This run did not show the usual pattern (gain on text, loss on photographs): see the tables "
            "above."
        )
    kept, removed = gain[WITH_REPLAY] / gain[DOMAIN_ONLY], 1 - loss[WITH_REPLAY] / loss[DOMAIN_ONLY]
    return (
        f"Replay kept {kept:.0%} of the gain on held-out text ({gain[WITH_REPLAY]:+.2f} of "
        f"{gain[DOMAIN_ONLY]:+.2f} dB) and removed {removed:.0%} of the loss on held-out photographs "
        f"({loss[WITH_REPLAY]:+.2f} instead of {loss[DOMAIN_ONLY]:+.2f} dB)."
    )


@click.command()
@click.option("--out", default="demo", show_default=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--max-steps", default=None, type=int, help="Override configs/demo.yaml's run.max_steps.")
def main(out: Path, max_steps: int | None) -> None:
    """Run the demo end to end into OUT (images/, shards/, run/, run-replay/, eval/)."""
    setup_logging()
    run_demo(out, DEMO, max_steps)


if __name__ == "__main__":
    main()
