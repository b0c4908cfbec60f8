"""The `vaedec` command line (also `python cli.py`): a click group over the library. No logic lives here."""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from vaedec.config import EncodeConfig, EvalConfig
from vaedec.errors import VaedecError
from vaedec.io import setup_logging  # lives in io.py; `from vaedec.cli import setup_logging` keeps working
from vaedec.redact import redact

# Exit codes, documented in the README and in `--help`.
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_SKIPPED = 0, 1, 2, 3

log = logging.getLogger("vaedec")


class UserError(click.ClickException):
    """A mistake the user can fix: printed as 'Error: ...' with exit code 1, never a traceback. Its message is
    `redact`ed: a signed URL's token is not printed."""

    def __init__(self, message: str):
        super().__init__(redact(message))


@contextmanager
def disk_full_is_a_message(doing: str, keep: str) -> Iterator[None]:
    """A full disk (ENOSPC, or a quota: EDQUOT) while `doing` becomes a UserError, not a traceback. Every
    writer goes through a temp name (vaedec/io.py), so what was complete before stays valid; `keep` says what
    that is."""
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f" ({e.filename})" if e.filename else ""
        raise UserError(
            f"the disk is full{where} while {doing}: {e.strerror}. Nothing was left half-written; "
            f"{keep}. Free space (or choose a folder on another disk) and rerun."
        ) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="vaedec")
def main() -> None:
    """Fine-tune only the decoder of a Stable Diffusion-family VAE from precomputed latents.

    \b
    1. vaedec encode IMAGES/ SHARDS/ --vae VAE     encode every image once (frozen encoder)
    2. vaedec train SHARDS/ --config configs/X.yaml train decoder + PatchGAN, encoder never loaded
    3. vaedec eval HELDOUT/ --vae VAE --vae RUN/    the original decoder against the fine-tuned one
    4. vaedec export RUN/ OUT/                      diffusers folder / LDM file with the new decoder

    Exit codes: 0 ok, 1 error, 2 bad usage, 3 finished but some inputs were skipped (see skipped.jsonl).
    """


# ------------------------------------------------------------------------------------------------------------
# encode


@main.command()
@click.argument("src", type=click.Path(path_type=str))
@click.argument("out", type=click.Path(file_okay=False, path_type=str))
@click.option(
    "--vae",
    required=True,
    help=(
        "diffusers VAE folder, hub id, pipeline folder or single .safetensors/.ckpt file; its class "
        "(AutoencoderKL, AutoencoderKLFlux2, AutoencoderKLQwenImage, AutoencoderKLWan, AutoencoderDC, "
        "AutoencoderKLHunyuanImage, AutoencoderTiny) is read from its config.json."
    ),
)
@click.option(
    "--subfolder", default=None, help="Subfolder of a pipeline repo or folder that holds the VAE, e.g. 'vae'."
)
@click.option(
    "--resolution",
    type=click.IntRange(8),
    default=256,
    help="Side of the encoded square, pixels (a multiple of the VAE's downsampling factor: 8 for SD VAEs).",
)
@click.option(
    "--resize",
    type=click.IntRange(8),
    default=None,
    help="Resize the shorter side to this before cropping [default: resolution].",
)
@click.option(
    "--crops-per-image",
    type=click.IntRange(0),
    default=0,
    help="0 = one center crop; N = N seeded random crops per image.",
)
@click.option("--flip/--no-flip", default=False, help="Also encode each mirrored crop as its own sample.")
@click.option("--seed", type=int, default=0, help="Seed of the random crops.")
@click.option("--batch-size", type=click.IntRange(1), default=16, help="Images per encoder forward.")
@click.option(
    "--num-workers", type=click.IntRange(0), default=2, help="Image-decoding processes (0 = main process)."
)
@click.option(
    "--dtype",
    type=click.Choice(["fp32", "bf16", "fp16"]),
    default="fp32",
    help="Encoder compute dtype; moments are stored as float16.",
)
@click.option(
    "--device",
    default=None,
    help="torch device [default: cuda if available, else cpu; under accelerate launch: each process's own].",
)
@click.option(
    "--shard-size-mb",
    type=click.FloatRange(0.001),
    default=256.0,
    help="Close a shard once it holds this many MiB.",
)
@click.option(
    "--depth-dir",
    type=click.Path(path_type=str),
    default=None,
    help="RGB+depth VAEs: folder of 16-bit depth PNGs matched by file stem.",
)
@click.option(
    "--scaling-factor",
    type=float,
    default=None,
    help="The VAE's latent scaling_factor, recorded in the manifest and exports [default: the VAE's "
    "config; for a single LDM file, which does not store it, 0.18215 (SDXL: pass 0.13025)].",
)
@click.option(
    "--shift-factor",
    type=float,
    default=None,
    help="The VAE's latent shift_factor, recorded like --scaling-factor [default: the VAE's config; a "
    "single LDM file does not store it: for BFL's FLUX.1 ae.safetensors pass 0.1159].",
)
@click.option(
    "--vae-config",
    default=None,
    help="A single file of another VAE class than AutoencoderKL (Wan, DC-AE): the diffusers folder or "
    "hub id whose config.json gives its class and architecture.",
)
@click.option("--overwrite", is_flag=True, help="Replace OUT's shards instead of resuming or refusing.")
def encode(**kwargs: object) -> None:
    """Encode SRC (a folder, searched recursively, or a text file list) into WebDataset shards in OUT.

    Each sample stores the encoder's posterior moments (mean ‖ logvar, float16, before scaling_factor; for
    deterministic encoders such as DC-AE's and TAESD's, the latent) and the exact pixels that were encoded.
    Rerunning the same command after a kill resumes; with other settings it is refused unless --overwrite.
    Unreadable inputs are skipped and listed in OUT/skipped.jsonl (exit code 3).

    Many GPUs or machines: `accelerate launch --multi_gpu --num_processes N cli.py encode SRC OUT ...` (the
    same command on every machine, OUT on a shared filesystem): each process encodes its own block of the
    inputs and resumes it after a kill; one manifest covers all. Exit code 0 even with skips (launchers report
    any other code as a failure); the summary and skipped.jsonl list them.
    """
    from vaedec.encode import encode as run_encode

    setup_logging()
    cfg = EncodeConfig(**kwargs)  # type: ignore[arg-type]
    try:
        with disk_full_is_a_message(
            f"encoding into {cfg.out}",
            "every shard listed in its manifest.json is "
            "complete, and rerunning the same command resumes after the last one",
        ):
            result = run_encode(cfg)
    except VaedecError as e:
        raise UserError(str(e)) from None
    if not result.main_process:
        return  # the main process reports the whole encode
    skipped = result.skipped_inputs + result.skipped_samples + result.skipped_list_entries
    done = "already complete: " if result.already_complete else ""
    click.echo(
        f"{done}{result.samples} samples in {result.shards} "
        f"shards -> {result.out}; skipped {result.skipped_inputs} inputs, {result.skipped_samples} samples, "
        f"{result.skipped_list_entries} missing/duplicate paths"
    )
    for s in result.skips[:20]:
        click.echo(
            f"  skipped {s['source']}{' [' + s['key'] + ']' if s['key'] else ''}: {s['reason']}", err=True
        )
    if len(result.skips) > 20:
        click.echo(f"  ... {len(result.skips) - 20} more in {result.out}/skipped.jsonl", err=True)
    # torchrun reports a nonzero exit as a failed worker, with a traceback
    if skipped and result.processes == 1:
        sys.exit(EXIT_SKIPPED)


@main.command()
@click.argument("shards", type=click.Path(path_type=str))
@click.option("--verify", is_flag=True, help="Read every sample and check shapes, dtypes, keys and counts.")
def inspect(shards: str, verify: bool) -> None:
    """Print the manifest summary of SHARDS (and optionally verify every sample).

    \b
    SHARDS: a shard folder (`vaedec encode` OUT), file:///abs/folder/, http(s)://host/folder/
    (manifest.json and the shards under it), or pipe:CMD with {name} where the file name goes, e.g.
    'pipe:aws s3 cp s3://bucket/shards/{name} -' or 'pipe:gsutil cat gs://bucket/shards/{name}'.
    """
    from vaedec.shards import summarize
    from vaedec.shards import verify as verify_shards

    try:
        click.echo(summarize(shards))
        if verify:
            problems = verify_shards(shards)
            for p in problems:
                click.echo(f"  problem: {p}", err=True)
            if problems:
                raise UserError(f"{len(problems)} problems found in {shards}")
            click.echo("verify         every sample read back: shapes, dtypes, keys and counts match")
    except VaedecError as e:
        raise UserError(str(e)) from None


# ------------------------------------------------------------------------------------------------------------
# train / export


@main.command(context_settings={"ignore_unknown_options": False})
@click.argument("shards", type=click.Path(path_type=str))
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
@click.option(
    "--config",
    "config_paths",
    type=click.Path(dir_okay=False, path_type=str),
    multiple=True,
    help="YAML file of config sections (data, model, loss, optim, run); see configs/. Repeatable: a later "
    "file overrides an earlier one field by field (a shipped recipe + your schedule).",
)
@click.option("--output", default=None, help="Run folder [default: runs/<config name>].")
@click.option(
    "--vae", default=None, help="VAE to load instead of the one named in the shard manifest (same encoder)."
)
@click.option(
    "--mix",
    multiple=True,
    metavar="SHARDS:P",
    help="Mix another shard set into every batch: each sample comes from SHARDS (a folder, URL or pipe: "
    "spec) with probability P (e.g. general photos at 0.2 against forgetting outside the domain). "
    "Repeatable; data.mix.",
)
@click.option(
    "--resume",
    default="latest",
    show_default=True,
    help="'latest' (continue the run folder's newest checkpoint), 'none', or a checkpoint/run folder.",
)
@click.option("--dry-run", is_flag=True, help="Print the resolved config and exit.")
@click.option("--no-export", is_flag=True, help="Skip the export at the end of the run.")
def train(
    shards: str,
    overrides: tuple[str, ...],
    config_paths: tuple[str, ...],
    output: str | None,
    vae: str | None,
    mix: tuple[str, ...],
    resume: str,
    dry_run: bool,
    no_export: bool,
) -> None:
    """Train the decoder (and a PatchGAN) on SHARDS written by `encode`; the encoder is never loaded.

    SHARDS (and each --mix set) is a shard folder, file:///abs/folder/, an http(s):// URL of one
    (manifest.json and the shards under it), or pipe:CMD with {name} where the file name goes, e.g.
    'pipe:aws s3 cp s3://bucket/shards/{name} -'; the shards are streamed, never copied.

    KEY=VALUE pairs override single config fields, e.g. `optim.lr=1e-5 run.max_steps=2000` (a bare key works
    when unique: `max_steps=2000`). Rerunning the same command resumes from the newest checkpoint. For several
    GPUs or processes: `accelerate launch cli.py train ...`.
    """
    from vaedec.checkpoint import RUN_IMAGES, RUN_METRICS
    from vaedec.config import default_run_dir, dump_config, load_train_config

    setup_logging()  # the LDM-YAML import logs its key mapping while loading
    # Precedence: config file < KEY=VALUE overrides < the explicit arguments and options. These are handed
    # over as values, not as text: read as YAML, ": " or " #" in a path or pipe: command would change its
    # meaning. An option not given leaves the config's value.
    given = {"data.shards": shards, "run.output": output, "model.vae": vae, "data.mix": list(mix)}
    given = {k: v for k, v in given.items() if k == "data.shards" or v}
    try:
        cfg = load_train_config(config_paths, list(overrides), given)
        if cfg.run.output is None:  # replace, not reload: an LDM YAML would print its key mapping twice
            cfg = dataclasses.replace(
                cfg, run=dataclasses.replace(cfg.run, output=default_run_dir(config_paths))
            )
    except VaedecError as e:
        raise UserError(str(e)) from None
    if dry_run:
        click.echo(dump_config(cfg), nl=False)
        return
    from vaedec.train import train as run_train

    try:
        with disk_full_is_a_message(
            f"training into {cfg.run.output}",
            "its checkpoints/step-* folders are "
            "complete, and rerunning the same command resumes from the newest",
        ):
            info = run_train(cfg, resume=resume, export=not no_export)
    except VaedecError as e:
        raise UserError(str(e)) from None
    if info.stopped_by:  # SIGTERM / SIGUSR1: checkpointed; the shell convention for "killed by signal N"
        if info.main_process:
            click.echo(
                f"stopped at step {info.step} by {signal.Signals(info.stopped_by).name}, after a checkpoint "
                f"in {info.run_dir}: rerun the same command to resume",
                err=True,
            )
        sys.exit(128 + info.stopped_by)
    if not info.main_process:
        return  # one summary, from rank 0
    click.echo(f"run folder  {info.run_dir}  (step {info.step})")
    click.echo(f"  grids     {info.run_dir / RUN_IMAGES}")
    click.echo(
        f"  metrics   {info.run_dir / RUN_METRICS}  (TensorBoard: tensorboard --logdir {info.run_dir})"
    )
    if info.export_dir:
        click.echo(f"  export    {info.export_dir}  ({_loaded_by(info.export_dir)})")


def _loaded_by(export_dir: Path) -> str:
    """How diffusers loads an export: its config.json's class (AutoencoderKL, AutoencoderKLFlux2, a preview
    AutoencoderTiny, ...), or the single-file route of an LDM-only export."""
    try:
        return json.loads((Path(export_dir) / "config.json").read_text())["_class_name"] + ".from_pretrained"
    except (OSError, ValueError, KeyError):
        return "AutoencoderKL.from_single_file(vae.safetensors)"


@main.command()
@click.argument("run", type=click.Path(exists=True, file_okay=False, path_type=str))
@click.argument("out", type=click.Path(path_type=str))
@click.option("--ema/--no-ema", default=None, help="EMA or raw weights [default: EMA when the run kept one].")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["diffusers", "ldm", "both"]),
    default="diffusers",
    help="diffusers folder, single LDM .safetensors, or both.",
)
@click.option(
    "--checkpoint",
    type=click.Path(exists=True, file_okay=False, path_type=str),
    default=None,
    help="A checkpoint folder of RUN [default: the newest].",
)
@click.option(
    "--into",
    "into",
    type=click.Path(exists=True, dir_okay=False, path_type=str),
    default=None,
    help="A full SD checkpoint (.safetensors/.ckpt): also write a copy of it with this VAE inside.",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace OUT even when it holds other files [default: only an empty folder or an earlier export].",
)
@click.option(
    "--eval",
    "eval_dir",
    type=click.Path(exists=True, file_okay=False, path_type=str),
    default=None,
    help="The --out folder of a `vaedec eval` that scored RUN: its table goes into the model card.",
)
def export(
    run: str,
    out: str,
    ema: bool | None,
    fmt: str,
    checkpoint: str | None,
    into: str | None,
    overwrite: bool,
    eval_dir: str | None,
) -> None:
    """Write RUN's fine-tuned VAE (original encoder + trained decoder) to OUT.

    \b
    OUT/config.json + diffusion_pytorch_model.safetensors   diffusers (<its class>.from_pretrained)
    OUT/vae.safetensors                                     LDM layout, plain keys (UIs' VAE files)
    OUT/decoder.safetensors                                 only the trained weights
    OUT/<SD_CHECKPOINT name>                                with --into: the full checkpoint, VAE replaced
    OUT/README.md                                           the model card (hub format; --eval adds its table)
    """
    from vaedec.checkpoint import default_use_ema, export_run, run_checkpoint

    try:
        if ema is None:
            ema = default_use_ema(checkpoint or run_checkpoint(run))
        with disk_full_is_a_message(
            f"exporting into {out}", f"{out} holds what it held before (an earlier export stays whole)"
        ):
            path = export_run(
                run,
                out,
                use_ema=ema,
                fmt=fmt,
                ckpt=checkpoint,
                into=into,
                overwrite=overwrite,
                eval_dir=eval_dir,
            )
    except VaedecError as e:
        raise UserError(str(e)) from None
    click.echo(f"exported {'EMA' if ema else 'raw'} weights of {run} -> {path}  ({_loaded_by(path)})")
    for f in sorted(path.iterdir()):
        click.echo(f"  {f.name}")


@main.command("eval")
@click.argument("data", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option(
    "--vae",
    "vaes",
    multiple=True,
    required=True,
    metavar="[LABEL=]SPEC",
    help="A model to compare; repeat it. The first is the baseline. SPEC: diffusers folder, hub id, "
    "single .safetensors/.ckpt, export folder, run folder (newest checkpoint; RUN:ema or RUN:raw, "
    "default EMA when kept) or a checkpoints/step-* folder. LABEL= names it in the tables.",
)
@click.option("--out", default="eval", help="Output folder: report.md, eval.json, per_image.csv, grids/.")
@click.option(
    "--max-samples",
    type=click.IntRange(1),
    default=None,
    help="Samples per data set (the first in shard order) [default: all].",
)
@click.option(
    "--val-shards",
    type=click.IntRange(0),
    default=0,
    help="Only the last N shards of each shard folder, as train's data.val_shards (0 = all).",
)
@click.option(
    "--sample",
    "latent_sample",
    flag_value="sample",
    default="mode",
    help="Decode z = mean + std*eps (eps seeded per sample, the same for every model) instead of z = mean.",
)
@click.option("--seed", type=int, default=0, help="Seed of --sample's noise and of the bootstrap intervals.")
@click.option("--batch-size", type=click.IntRange(1), default=16, help="Samples per decoder forward.")
@click.option("--device", default=None, help="torch device [default: cuda if available, else cpu].")
@click.option(
    "--resolution",
    type=click.IntRange(8),
    default=256,
    help="Image folders only: side of the encoded center crop.",
)
@click.option(
    "--fid-weights",
    type=click.Path(dir_okay=False, path_type=str),
    default=None,
    help="torch-fidelity's InceptionV3 weights (weights-inception-2015-12-05-6726825d.pth) for rFID "
    "[default: no rFID].",
)
@click.option(
    "--fid-features",
    type=click.Choice(["2048", "768", "192", "64"]),
    default="2048",
    callback=lambda c, p, v: int(v),
    help="Inception features for rFID: 2048 is the standard FID; fewer are cheaper on a CPU but not "
    "comparable.",
)
@click.option(
    "--lpips-vgg-weights",
    type=click.Path(dir_okay=False, path_type=str),
    default=None,
    help="torchvision's vgg16-397923af.pth for LPIPS [default: the torch hub cache; without it LPIPS is "
    "skipped, and said so].",
)
@click.option(
    "--lpips-random-backbone", is_flag=True, hidden=True, help="Tests only: LPIPS on a random VGG16."
)
@click.option("--grid-samples", type=click.IntRange(1), default=8, help="Rows in each PNG grid.")
@click.option(
    "--confidence",
    type=click.FloatRange(0.5, 0.999),
    default=0.95,
    help="Level of the paired bootstrap intervals.",
)
@click.option(
    "--speed-rounds",
    type=click.IntRange(0),
    default=5,
    help="Timed decodes per model for decode images/s (after a warm-up, models interleaved); 0 = no timing.",
)
def eval_(data: tuple[str, ...], vaes: tuple[str, ...], **kwargs: object) -> None:
    """Compare decoders on held-out DATA: PSNR, SSIM, LPIPS, rFID and colour shift, with paired intervals;
    each model's decoder parameters and decode images/s, measured side by side.

    \b
    DATA: shard folders (`vaedec encode` output; the same encoder as every --vae) or their http(s):// URL or
    pipe:CMD spec with {name} (see `vaedec train --help`), or image folders / file lists, encoded into
    OUT/encoded/ with the first model's encoder. Each data set gets its own table.
    Every model decodes the same z; deltas against the first model come with a bootstrap interval over images,
    so "better" means better. Writes OUT/report.md (also printed), eval.json, per_image.csv and grids/*.png
    (a fixed sample, the most improved and the most worsened images). Exit code 3: inputs were skipped.
    """
    from vaedec.evaluate import evaluate

    setup_logging()
    cfg = EvalConfig(data=data, vaes=vaes, **kwargs)  # type: ignore[arg-type]
    try:
        result = evaluate(cfg)
    except VaedecError as e:
        raise UserError(str(e)) from None
    click.echo(result.report)
    click.echo(
        f"written to {result.out}: report.md, eval.json, per_image.csv, grids/ ({len(result.grids)} PNGs)"
    )
    if any(s["skipped_inputs"] for s in result.result["sets"]):
        sys.exit(EXIT_SKIPPED)


@main.command()
@click.argument("src", type=click.Path(exists=True, path_type=str))
@click.argument("dst", type=click.Path(path_type=str))
@click.option(
    "--prefix",
    type=click.Choice(["none", "first_stage_model"]),
    default="none",
    help="Key prefix of a written LDM file: none (stand-alone VAE, as UIs load) or "
    "first_stage_model (the layout inside full SD checkpoints).",
)
@click.option(
    "--scaling-factor",
    type=float,
    default=None,
    help="File -> diffusers only: the VAE's scaling_factor (not stored in LDM files) [default: 0.18215].",
)
def convert(src: str, dst: str, prefix: str, scaling_factor: float | None) -> None:
    """Convert a VAE between a diffusers folder and one LDM-layout file (.safetensors or .ckpt).

    \b
    folder -> file:  SRC is a diffusers VAE (or pipeline) folder, DST ends in .safetensors or .ckpt
    file -> folder:  SRC is a stand-alone VAE file or a full SD checkpoint (its VAE is extracted);
                     the architecture is inferred from the tensor shapes, nothing is downloaded
    file -> file:    DST ends in .safetensors or .ckpt: re-written in LDM layout with --prefix
                     (e.g. a .ckpt to .safetensors, or the VAE out of a full SD checkpoint)
    Checkpoints are read without unpickling code (weights_only); every key must map, or nothing is written.
    """
    from vaedec.convert import convert_path

    try:
        summary = convert_path(
            src, dst, prefix="" if prefix == "none" else "first_stage_model.", scaling_factor=scaling_factor
        )
    except VaedecError as e:
        raise UserError(str(e)) from None
    click.echo(summary)
