"""`make demo`: a pretrained decoder gets better on a new domain, end to end, offline, in about 3 CPU minutes.

1. data: rendered text pages (the new domain; train + held-out) and held-out photographs (the old one)
2. encode them with the shipped source VAE (assets/source-vae: encoder and decoder pretrained on photographs)
3. train its decoder on the text with configs/demo.yaml (L1 + PatchGAN, EMA); the encoder is never loaded
4. eval: the original decoder against the fine-tuned one (current and EMA) on held-out text and photographs;
   the run exports the fine-tuned VAE. A small version of `make experiment` (vaedec/experiment.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import click

from vaedec.config import EvalConfig, load_train_config
from vaedec.evaluate import evaluate
from vaedec.experiment import ROOT, SOURCE_VAE, Sizes, prepare_data, reset_accelerate
from vaedec.io import setup_logging
from vaedec.train import train

# steps: demo.yaml
DEMO = Sizes(text_train_pages=120, text_heldout_pages=16, crops_per_page=2, replay_set=False)


@click.command()
@click.option("--out", default="demo", show_default=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--max-steps", default=None, type=int, help="Override configs/demo.yaml's run.max_steps.")
def main(out: Path, max_steps: int | None) -> None:
    """Run the demo end to end into OUT (images/, shards/, run/, eval/)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    setup_logging()
    shards = prepare_data(out, DEMO)
    click.echo(
        f"[1/3] rendered text pages and held-out photographs encoded with {SOURCE_VAE} -> {out / 'shards'}"
    )
    values = {"data.shards": str(shards["text-train"]), "run.output": str(out / "run")}
    if max_steps:
        values["run.max_steps"] = max_steps
    reset_accelerate()
    info = train(load_train_config(ROOT / "configs" / "demo.yaml", values=values))
    click.echo(f"[2/3] trained the decoder {info.step} steps on text -> {info.run_dir}")
    result = evaluate(EvalConfig(
        data=(str(shards["text-heldout"]), str(shards["photos-heldout"])),
        vaes=(f"original={SOURCE_VAE}", f"finetuned={info.run_dir}:raw", f"finetuned-ema={info.run_dir}:ema"),
        out=str(out / "eval"), batch_size=32, grid_samples=6,
    ))
    click.echo("[3/3] held-out evaluation (vaedec eval):\n")
    click.echo(result.report)
    click.echo(f"  grids    {out / 'eval' / 'grids' / 'text-heldout-sample.png'}  "
               "(original | original decoder | fine-tuned | EMA)")
    click.echo(f"           {out / 'eval' / 'grids'}/*-improved-*.png, *-worsened-*.png")
    click.echo(f"  tables   {out / 'eval' / 'report.md'}, eval.json, per_image.csv")
    click.echo(f"  run      {info.run_dir}  (tensorboard --logdir {info.run_dir})")
    click.echo(f"  export   {info.export_dir}  (AutoencoderKL.from_pretrained)")
    click.echo(
        "\n  Better on text, worse on photographs: a domain-only fine-tune forgets. Mixing general data in"
    )
    click.echo(
        "  (`vaedec train ... --mix GENERAL:0.2`) keeps most of the gain and little of the loss: "
        "docs/quality.md."
    )


if __name__ == "__main__":
    main()
