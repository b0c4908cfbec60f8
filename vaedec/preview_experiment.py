"""`make preview`: a TAESD-style preview model for the shipped source VAE's latent space, trained in a few CPU
minutes against its original decoder, and judged next to it: decoder parameters, decode images/s, PSNR/SSIM on
held-out photographs (and rendered text). Offline, rerunnable (each step resumes or finds its output
complete), about 5 minutes on one thread of 2 shared CPU cores; writes its section of docs/quality.md.

1. data (vaedec/experiment.py's `prepare_data`): the source domain's training photographs, rendered text
   pages and the held-out photographs, encoded once with assets/source-vae (64 px crops, f4, 4 latent
   channels)
2. train configs/preview.yaml (AutoencoderTiny decoder + tiny encoder from scratch, L1 to the image and to the
   original decoder's output) on the photographs with 30 % text mixed in, on a short schedule; the source VAE
   is itself tiny (a 1.05 M-parameter decoder), so the preview model is TAESD's layout at 24 channels, not 64
3. `eval`: the original decoder against the preview model (its export: EMA weights) on the same latents
4. the export loads as AutoencoderTiny and its config names the source VAE's encoder fingerprint
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import time
from pathlib import Path

import click
import torch
from diffusers import AutoencoderTiny

from vaedec.config import EvalConfig, load_train_config
from vaedec.decoders import LATENT_SPACE_KEY
from vaedec.evaluate import evaluate
from vaedec.experiment import (
    PREVIEW_END,
    PREVIEW_START,
    ROOT,
    SOURCE_VAE,
    Sizes,
    _git_commit,
    lpips_available,
    prepare_data,
    reset_accelerate,
    run_minutes,
)
from vaedec.families import Normalisation, load, normalise
from vaedec.images import batch_to_model
from vaedec.io import atomic_write_bytes, setup_logging
from vaedec.latents import batch_latent
from vaedec.metrics import reconstruction_metrics
from vaedec.shards import collate, read_manifest, read_samples, shard_paths
from vaedec.train import train

SIZES = Sizes(text_train_pages=64, text_heldout_pages=16, crops_per_page=2, photo_crops=8, max_steps=300)
# f4 (three levels), 24 channels, TAESD's block counts: a decoder an eighth of the source's (1.05 M
# parameters).
SMALL = {"encoder_block_out_channels": [24, 24, 24], "decoder_block_out_channels": [24, 24, 24]}
SCHEDULE = (
    "data.batch_size_per_device=8",
    "data.num_workers=1",
    "data.shuffle_buffer=256",
    "optim.lr=2e-3",
    "optim.warmup_steps=20",
    "optim.ema_decay=0.99",
    "run.checkpoint_every_steps=100",
    "run.keep_checkpoints=1",
    "run.log_every_steps=20",
    "run.image_every_steps=250",
    "run.grid_samples=6",
)


def train_preview(shards: dict[str, Path], out: Path, max_steps: int, lpips_ok: bool) -> Path:
    """The preview run (resumed when a checkpoint is there); returns its run folder."""
    values: dict[str, object] = {
        "data.shards": str(shards["photos-train"]),
        "run.output": str(out / "run"),
        "data.mix": [f"{shards['text-train']}:0.3"],
        "run.max_steps": max_steps,
        "model.decoder_config": SMALL,
    }
    if not lpips_ok:
        values["loss.perceptual_weight"] = 0.0  # no VGG16 weights here: L1 to the image and to the teacher
    cfg = load_train_config(ROOT / "configs" / "preview.yaml", list(SCHEDULE), values)
    reset_accelerate()
    return train(cfg).run_dir


def compact_table(result: dict) -> str:
    """Per data set: model | decoder params | decode images/s | PSNR | SSIM, the preview's ratios to the
    original."""
    lines = [
        "| data | model | decoder parameters | decode images/s | PSNR dB | SSIM |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for s in result["sets"]:
        base = s["models"]["original"]
        for label, m in s["models"].items():
            params, speed = m["decoder_parameters"], m["decode_images_per_s"]
            ratio = label != "original"
            lines.append(
                f"| {s['name']} ({s['samples']}) | {label} | {params:,}"
                + (f" (×{params / base['decoder_parameters']:.2f})" if ratio else "")
                + f" | {speed:,.0f}"
                + (f" (×{speed / base['decode_images_per_s']:.2f})" if ratio else "")
                + f" | {m['psnr']:.2f}"
                + (f" ({m['psnr'] - base['psnr']:+.2f})" if ratio else "")
                + f" | {m['ssim']:.4f}"
                + (f" ({m['ssim'] - base['ssim']:+.4f})" if ratio else "")
                + " |"
            )
    return "\n".join(lines)


def check_export(export: Path) -> str:
    """The export is an AutoencoderTiny whose config names the source VAE's latent space."""
    preview = AutoencoderTiny.from_pretrained(export)
    family, source = load(str(SOURCE_VAE))
    record = preview.config[LATENT_SPACE_KEY]
    if record["encoder_sha256"] != family.fingerprint(source):
        raise RuntimeError(f"{export} names another latent space than {SOURCE_VAE}'s: a bug, please report")
    return (
        f"`AutoencoderTiny.from_pretrained({export.name})` loads it; its config's `{LATENT_SPACE_KEY}` names "
        f"the source VAE's encoder (sha256 {record['encoder_sha256'][:12]}…) and normalisation "
        f"{record['normalisation']}, scaling_factor {preview.config.scaling_factor}."
    )


@torch.no_grad()
def encoder_check(export: Path, shards: Path) -> str:
    """How well the tiny encoder regresses the stored latents of held-out images, in the diffusion model's
    units, and what decoding its latents costs against decoding the stored ones."""
    preview = AutoencoderTiny.from_pretrained(export).eval()
    norm = Normalisation.from_dict(preview.config[LATENT_SPACE_KEY]["normalisation"])
    batch = collate(list(read_samples(shard_paths(shards, read_manifest(shards)), 10_000)))
    x = batch_to_model(batch, torch.device("cpu"))
    stored = normalise(batch_latent(batch, "mode"), norm)  # (B, C, h, w)
    tiny = preview.encode(x).latents
    psnr = {
        k: float(reconstruction_metrics(x, preview.decode(z).sample, None)["psnr"])
        for k, z in (("stored", stored), ("tiny", tiny))
    }
    return (
        f"Its tiny encoder on the same held-out photographs ({x.shape[0]} crops): mean squared error "
        f"{float((tiny - stored).square().mean()):.3f} against the stored latents (their variance "
        f"{float(stored.var()):.3f}, diffusion-model units); the preview decoder scores {psnr['tiny']:.2f} "
        "dB on "
        f"the tiny encoder's latents and {psnr['stored']:.2f} dB on the stored ones."
    )


def section(table: str, report: str, facts: dict[str, str]) -> str:
    """docs/quality.md's preview section (between PREVIEW_START and PREVIEW_END)."""
    return f"""{PREVIEW_START}
## A preview model for the source VAE's latents

`make preview` ({facts["wall"]} on {facts["machine"]}; {facts["date"]}; commit {facts["commit"]})
trains a TAESD-style preview model (`AutoencoderTiny`, configs/preview.yaml with 24 channels: the source VAE
is itself tiny) for the source VAE's latent space from the same shards: its decoder on the latents as a
diffusion model sees them (z · {facts["scale"]}), against the images and the original decoder's output on
the same z
(`loss.teacher_weight=1`), and its tiny encoder regressing the stored latents; the big encoder never runs.
Data: the source domain's training photographs (64 px crops) with 30 % rendered text mixed in;
{facts["schedule"]}. {facts["lpips"]} The machine was shared with other jobs (load average {facts["load"]}):
the minutes and the images/s are inflated, the ratios were measured side by side
(interleaved decodes of the same latents, warm-up
excluded, batch 32, CPU).

{table}

{facts["check"]} {facts["encoder"]}

![held-out photographs: original | original decoder | preview decoder](quality-preview-photos.png)

Full `eval` report (paired intervals against the original decoder):

{report}
Rerun: `make preview` (`python -m vaedec.preview_experiment --out preview --docs docs`).
{PREVIEW_END}
"""


def write_section(path: Path, text: str) -> None:
    """Replace the preview section of docs/quality.md (or append it), leaving the rest as `make experiment`
    wrote it."""
    old = path.read_text() if path.is_file() else ""
    pattern = re.compile(re.escape(PREVIEW_START) + ".*?" + re.escape(PREVIEW_END) + "\n?", re.DOTALL)
    new = pattern.sub(lambda _: text, old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text
    atomic_write_bytes(path, new.encode())


def run_preview(out: Path, docs: Path | None, max_steps: int = SIZES.max_steps) -> str:
    """Data, the preview run, eval and the check; returns the compact table (markdown)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0, load_avg, lpips_ok = time.perf_counter(), os.getloadavg()[0], lpips_available()
    shards = prepare_data(out, SIZES)
    run = train_preview(shards, out, max_steps, lpips_ok)
    result = evaluate(
        EvalConfig(
            data=(str(shards["photos-heldout"]), str(shards["text-heldout"])),
            vaes=(f"original={SOURCE_VAE}", f"preview={run / 'export'}"),
            out=str(out / "eval"),
            batch_size=32,
            grid_samples=6,
            speed_rounds=10,
        )
    )
    table, check = compact_table(result.result), check_export(run / "export")
    encoder = encoder_check(run / "export", shards["photos-heldout"])
    if docs is not None:
        vae_config = json.loads((SOURCE_VAE / "config.json").read_text())
        shutil.copyfile(
            out / "eval" / "grids" / "photos-heldout-sample.png", docs / "quality-preview-photos.png"
        )
        threads = torch.get_num_threads()
        facts = {
            "wall": (
                f"{run_minutes(run, max_steps):.1f} minutes of training, "
                f"{(time.perf_counter() - t0) / 60:.1f} for the whole command"
            ),
            "date": time.strftime("%Y-%m-%d"),
            "encoder": encoder,
            "machine": (
                f"{os.cpu_count()} CPU cores ({platform.machine()}), {threads} torch "
                f"thread{'s' if threads > 1 else ''}"
            ),
            "commit": _git_commit(),
            "scale": str(vae_config["scaling_factor"]),
            "check": check,
            "schedule": f"{max_steps} steps of batch 8, lr 2e-3 (cosine), EMA 0.99",
            "load": f"{load_avg:.1f} at the start, {os.getloadavg()[0]:.1f} at the end",
            "lpips": (
                "LPIPS ran with VGG16 weights found on this machine."
                if lpips_ok
                else "LPIPS could not run here (no VGG16 weights offline), so the losses are L1 alone."
            ),
        }
        write_section(docs / "quality.md", section(table, result.report, facts))
    return table


@click.command()
@click.option(
    "--out",
    default="preview",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Work folder: images/, shards/, run/, eval/.",
)
@click.option(
    "--docs",
    default="docs",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Where quality.md's preview section is written.",
)
@click.option(
    "--max-steps",
    default=SIZES.max_steps,
    show_default=True,
    type=click.IntRange(1),
    help="Training steps of the preview model.",
)
@click.option(
    "--threads",
    default=1,
    show_default=True,
    type=click.IntRange(1),
    help="torch threads: on a shared 2-core machine two spin-waiting OpenMP threads cost more than one "
    "(vaedec/source_vae.py measured it).",
)
def main(out: Path, docs: Path, max_steps: int, threads: int) -> None:
    """Train a preview model for the source VAE's latents and judge it next to the original decoder."""
    torch.set_num_threads(threads)
    setup_logging()
    click.echo(run_preview(out, docs, max_steps))
    click.echo(f"written: {docs / 'quality.md'} (its preview section); details in {out / 'eval'}")


if __name__ == "__main__":
    main()
