"""`make experiment`: does fine-tuning only the decoder make a pretrained VAE better on a new domain, what
does it cost outside that domain, and which shipped loss recipe does it best? Offline, rerunnable (every step
resumes or finds its output complete), about 15 minutes on 2 CPU cores; writes docs/quality.md.

1. data (vaedec/domains.py): rendered text pages, the target (train + held-out, other seeds), and the held-out
   photographs of the source domain, which the source VAE never saw
2. encode all three once with the source VAE (assets/source-vae: encoder and decoder pretrained on
   photographs)
3. one run per variant: the loss terms of a shipped config (configs/ldm_kl_f8.yaml, configs/ft_mse.yaml) on
   one shared schedule (configs/experiment.yaml), so the variants differ only in their loss
4. `eval`: the original decoder against each run's current and EMA decoders, on held-out text and photos
5. the encoder of every export is checked bit-identical to the source VAE's; docs/quality.md gets the table,
   the grids, the settings and the wall times
6. a second family: the same data encoded with a Qwen-Image-shaped source VAE (assets/source-vae-qwenimage,
   diffusers' AutoencoderKLQwenImage, causal 3-D convolutions), its decoder fine-tuned domain-only and with
   the recommended replay recipe, scored the same way; its section of docs/quality.md is kept when the first
   part is rewritten, and the other way round
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import click
import torch
from accelerate.state import AcceleratorState, GradientState

from vaedec.config import EncodeConfig, EvalConfig, load_train_config
from vaedec.domains import photos, rendered_text
from vaedec.encode import encode
from vaedec.evaluate import EvalResult, evaluate
from vaedec.families import load as load_vae_of_any_family
from vaedec.io import atomic_write_bytes, setup_logging
from vaedec.losses import LPIPSWeightsMissing, load_lpips
from vaedec.train import train

ROOT = Path(__file__).resolve().parent.parent
SOURCE_VAE = ROOT / "assets" / "source-vae"
QWENIMAGE_VAE = (
    ROOT / "assets" / "source-vae-qwenimage"
)  # the second family's stand-in (AutoencoderKLQwenImage)


@dataclass(frozen=True)
class Variant:
    """One training recipe of the experiment: a shipped config's loss on the shared schedule."""

    name: str  # run folder name and table label
    config: str  # shipped config whose loss terms are used, relative to the repo
    overrides: tuple[str, ...]  # on top of it and of configs/experiment.yaml's schedule
    what: str  # one line for the docs
    replay: float = 0.0  # probability that a sample comes from the source domain's photographs (data.mix)


VARIANTS = (
    Variant(
        "ldm",
        "configs/ldm_kl_f8.yaml",
        ("loss.disc_start_step=200",),
        "LDM kl-f8: L1 + LPIPS + PatchGAN (adaptive weight x 0.5), the GAN from step 200",
    ),
    Variant("ft-mse", "configs/ft_mse.yaml", (), "the sd-vae-ft-mse recipe: MSE + 0.1 LPIPS, no GAN"),
    Variant(
        "l1",
        "configs/ldm_kl_f8.yaml",
        ("loss.disc_factor=0.0", "loss.perceptual_weight=0.0"),
        "L1 alone: no LPIPS, no GAN",
    ),
    Variant(
        "l1-replay",
        "configs/ldm_kl_f8.yaml",
        ("loss.disc_factor=0.0", "loss.perceptual_weight=0.0"),
        "L1 alone, 20 % of each batch replayed from the source domain's training photographs (`--mix`)",
        replay=0.2,
    ),
    Variant(
        "l1-anchor-300",
        "configs/ldm_kl_f8.yaml",
        ("loss.disc_factor=0.0", "loss.perceptual_weight=0.0", "loss.anchor_weight=300"),
        "L1 alone, anchored to the original decoder (L2-SP, `loss.anchor_weight=300`)",
    ),
    Variant(
        "l1-anchor-3000",
        "configs/ldm_kl_f8.yaml",
        ("loss.disc_factor=0.0", "loss.perceptual_weight=0.0", "loss.anchor_weight=3000"),
        "L1 alone, anchored harder (`loss.anchor_weight=3000`)",
    ),
)


# The second family (step 6): the AutoencoderKL table's l1 recipe, domain-only and with the recommended
# replay.
FAMILY_VARIANTS = (
    Variant(
        "qwenimage-l1",
        "configs/ldm_kl_f8.yaml",
        ("loss.disc_factor=0.0", "loss.perceptual_weight=0.0"),
        "L1 alone, on the Qwen-Image-shaped source VAE's latents",
    ),
    Variant(
        "qwenimage-l1-replay",
        "configs/ldm_kl_f8.yaml",
        ("loss.disc_factor=0.0", "loss.perceptual_weight=0.0"),
        (
            "L1 alone, 20 % of each batch replayed from the training photographs (`--mix`), the recommended "
            "recipe"
        ),
        replay=0.2,
    ),
)
# docs/quality.md holds the second family's section between these lines; each part rewrites only its own text.
FAMILY_BEGIN = "<!-- second family: written by `python -m vaedec.experiment --part qwenimage` -->"
FAMILY_END = "<!-- end of the second family -->"


@dataclass(frozen=True)
class Sizes:
    """How much data and training: the full experiment, or a quick smoke run (tests)."""

    text_train_pages: int = 400
    text_heldout_pages: int = 48
    crops_per_page: int = 4
    photo_crops: int = 8  # 64 px crops per photograph (5 held-out photographs: 40 samples)
    max_steps: int = 400
    replay_set: bool = True  # also encode the source domain's training photographs (for the replay variant)


QUICK = Sizes(text_train_pages=16, text_heldout_pages=4, crops_per_page=1, photo_crops=1, max_steps=4)


def prepare_data(
    out: Path, sizes: Sizes, vae: Path = SOURCE_VAE, shards_dir: str = "shards"
) -> dict[str, Path]:
    """Images of the sets into out/images/*, then shards encoded with `vae` into out/<shards_dir>/*; both
    steps are idempotent."""
    images = out / "images"
    if not (images / ".complete").exists():  # the marker is written last: a killed run renders again
        shutil.rmtree(images, ignore_errors=True)
        rendered_text(images / "text-train", sizes.text_train_pages, seed=1)
        rendered_text(images / "text-heldout", sizes.text_heldout_pages, seed=2)
        photos(images / "photos-heldout", "heldout")
        photos(images / "photos-train", "train")
        (images / ".complete").touch()
    # 64 px crops at the pages' full 128 px resolution (text stays as small as on a page); held-out sets take
    # seeded crops too, several per held-out photograph so that 5 photographs give a usable sample.
    settings = {
        "text-train": {"resize": 128, "crops_per_image": sizes.crops_per_page, "flip": False},
        "text-heldout": {"resize": 128, "crops_per_image": 2, "seed": 1},
        "photos-heldout": {"resize": 128, "crops_per_image": sizes.photo_crops, "seed": 1},
        "photos-train": {"resize": 128, "crops_per_image": sizes.photo_crops, "flip": True},  # the replay set
    }
    if not sizes.replay_set:
        del settings["photos-train"]
    shards = {}
    for name, extra in settings.items():
        shards[name] = out / shards_dir / name
        encode(
            EncodeConfig(
                src=str(images / name),
                out=str(shards[name]),
                vae=str(vae),
                resolution=64,
                batch_size=32,
                num_workers=1,
                shard_size_mb=4,
                **extra,
            )
        )
    return shards


def train_variant(
    variant: Variant, shards: dict[str, Path], out: Path, sizes: Sizes, lpips_ok: bool, runs_dir: str = "runs"
) -> Path:
    """One run (resumed when a checkpoint is there; a finished run returns at once); returns the run
    folder."""
    values: dict[str, object] = {
        "run.max_steps": sizes.max_steps,
        "data.shards": str(shards["text-train"]),
        "run.output": str(out / runs_dir / variant.name),
    }
    if variant.replay:
        values["data.mix"] = [f"{shards['photos-train']}:{variant.replay}"]
    if not lpips_ok:
        values["loss.perceptual_weight"] = 0.0  # after the variant's: LPIPS cannot run here
    # The variant's shipped config for its loss terms, then the shared schedule over it.
    cfg = load_train_config(
        [ROOT / variant.config, ROOT / "configs" / "experiment.yaml"], list(variant.overrides), values
    )
    reset_accelerate()
    return train(cfg).run_dir


def reset_accelerate() -> None:
    """accelerate keeps one process-wide state; each run of this process starts from none."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def lpips_available() -> bool:
    """Whether VGG16 weights are on this machine (then the recipes run with their LPIPS term, as shipped)."""
    try:
        load_lpips(None)
    except LPIPSWeightsMissing:
        return False
    return True


def check_encoders(runs: list[Path], vae: Path = SOURCE_VAE) -> list[str]:
    """Each run's exported encoder (and quant_conv) against the source VAE's, tensor by tensor, bit for bit;
    the export is loaded with its own class (the source's)."""
    source = load_vae_of_any_family(str(vae))[1].state_dict()
    lines = []
    for run in runs:
        exported = load_vae_of_any_family(str(run / "export"))[1].state_dict()
        frozen = [k for k in source if k.startswith(("encoder.", "quant_conv."))]
        same = all(torch.equal(source[k], exported[k]) for k in frozen)
        lines.append(f"{run.name}: {len(frozen)} encoder tensors {'bit-identical' if same else 'CHANGED'}")
        if not same:
            raise RuntimeError(f"the encoder of {run / 'export'} differs from {vae}: a bug, please report")
    return lines


def run_minutes(run: Path, max_steps: int) -> float:
    """Wall time of a run's training from its log.txt: the first line to the first save of its last step (a
    rerun of the finished run appends lines that are not training)."""
    lines = [ln for ln in (run / "log.txt").read_text().splitlines() if ln[:4].isdigit()]
    last = next(ln for ln in lines if f"step-{max_steps:08d}" in ln)
    first, last = (datetime.strptime(ln[:19], "%Y-%m-%d %H:%M:%S") for ln in (lines[0], last))
    return (last - first).total_seconds() / 60


# The section of docs/quality.md that `make preview` (vaedec/preview_experiment.py) writes; kept when this
# rewrites the rest.
PREVIEW_START, PREVIEW_END = "<!-- preview:start -->", "<!-- preview:end -->"


def kept_preview_section(path: Path) -> str:
    """The preview section of an existing docs/quality.md, or ''."""
    found = re.search(
        re.escape(PREVIEW_START) + ".*?" + re.escape(PREVIEW_END) + "\n?",
        path.read_text() if path.is_file() else "",
        re.DOTALL,
    )
    return "\n" + found.group(0) if found else ""


def write_quality_doc(
    path: Path, report: str, grids: dict[str, str], facts: dict[str, str], minutes: dict[str, float]
) -> None:
    """docs/quality.md: what was run, the eval tables, the grids, how to rerun (and `make preview`'s
    section)."""
    variants = "\n".join(
        f"- **{v.name}** ({v.config}, {minutes[v.name]:.1f} min): {v.what}" for v in VARIANTS
    )
    images = "\n\n".join(
        f"**{title}** — input | original decoder | "
        + " | ".join(f"{v.name} current | {v.name} EMA" for v in VARIANTS)
        + f"\n\n![{title}]({name})"
        for title, name in grids.items()
    )
    text = f"""# Quality: a pretrained decoder fine-tuned on a new domain

`make experiment` ({facts["wall"]} of training on {facts["machine"]}; {facts["date"]}; written at commit
{facts["commit"]}) fine-tunes only the decoder of the source VAE
([assets/source-vae](../assets/source-vae/README.md), encoder and decoder pretrained on photographs) on
rendered text pages, then scores the original decoder against each fine-tuned one (current weights and EMA) on
**held-out text** (the target domain) and on **held-out photographs** (the source domain: what the fine-tune
costs outside its domain). Every model decodes the same latents, z = mean of the stored posterior.

Variants (each uses a shipped config's loss terms on one shared schedule, `configs/experiment.yaml`:
{facts["schedule"]}):

{variants}

{facts["lpips"]}

## Results

{report}
## Grids

{images}

## Checks

{facts["encoders"]}

## Rerun

```bash
make experiment            # python -m vaedec.experiment --out experiment --docs docs
```
Every step resumes or finds its output complete; `experiment/eval/` holds eval.json, per_image.csv and all
grids.
"""
    atomic_write_bytes(path, (text + family_section(path) + kept_preview_section(path)).encode())


def family_section(path: Path) -> str:
    """The second family's section of the doc at `path`, markers included ("" when there is none)."""
    text = path.read_text() if path.is_file() else ""
    begin, end = text.find(FAMILY_BEGIN), text.find(FAMILY_END)
    return "\n" + text[begin : end + len(FAMILY_END)] + "\n" if 0 <= begin < end else ""


def write_family_section(path: Path, section: str) -> None:
    """Put `section` (without markers) in place of the doc's second-family section, or after the doc."""
    text = path.read_text() if path.is_file() else ""
    old = family_section(path)
    new = f"\n{FAMILY_BEGIN}\n{section}{FAMILY_END}\n"
    atomic_write_bytes(path, (text.replace(old, new) if old else text + new).encode())


def _git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


HELDOUT = (("held-out text", "text-heldout"), ("held-out photographs", "photos-heldout"))


def train_and_score(
    out: Path, sizes: Sizes, variants: list[Variant], vae: Path, tag: str = ""
) -> tuple[list[Path], EvalResult, list[str], bool]:
    """Encode the data with `vae`, train every variant on it and score them all next to the original decoder
    on the held-out sets. `tag` names the folders (shards{tag}, runs{tag}, eval{tag}) so that several source
    VAEs share one work folder. Returns (runs, eval result, encoder checks, whether LPIPS ran)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    lpips_ok = lpips_available()
    shards = prepare_data(out, sizes, vae, f"shards{tag}")
    runs = [train_variant(v, shards, out, sizes, lpips_ok, f"runs{tag}") for v in variants]
    vaes = [f"original={vae}"] + [f"{r.name}:{k}={r}:{k}" for r in runs for k in ("raw", "ema")]
    # speed_rounds=0: every variant has the source's architecture, so decode speed says nothing (and a rerun's
    # table stays the same)
    result = evaluate(
        EvalConfig(
            data=tuple(str(shards[set_name]) for _, set_name in HELDOUT),
            vaes=tuple(vaes),
            out=str(out / f"eval{tag}"),
            batch_size=32,
            grid_samples=6,
            speed_rounds=0,
        )
    )
    return runs, result, check_encoders(runs, vae), lpips_ok


def copy_grids(eval_dir: Path, docs: Path, prefix: str) -> dict[str, str]:
    """The held-out sets' sample grids copied next to the doc: {title: file name}."""
    docs.mkdir(parents=True, exist_ok=True)
    grids = {}
    for title, set_name in HELDOUT:
        name = f"{prefix}{set_name}.png"
        shutil.copyfile(eval_dir / "grids" / f"{set_name}-sample.png", docs / name)
        grids[title] = name
    return grids


def run_experiment(out: Path, docs: Path | None, sizes: Sizes = Sizes()) -> str:
    """The whole experiment; returns the eval report (markdown)."""
    runs, result, encoders, lpips_ok = train_and_score(out, sizes, VARIANTS, SOURCE_VAE)
    if docs is not None:
        minutes = {r.name: run_minutes(r, sizes.max_steps) for r in runs}
        grids = copy_grids(out / "eval", docs, "quality-")
        cores, load = os.cpu_count(), os.getloadavg()[1]
        facts = {
            "wall": f"{sum(minutes.values()):.0f} minutes",
            "machine": (
                f"{cores} CPU cores ({platform.processor() or platform.machine()}), "
                f"{torch.get_num_threads()} "
                f"torch thread(s), torch {torch.__version__}, load average {load:.1f} at the end"
                + (
                    " (above the core count: other jobs shared the cores, the minutes are inflated)"
                    if load > (cores or 1)
                    else ""
                )
            ),
            "date": time.strftime("%Y-%m-%d"),
            "commit": _git_commit(),
            "schedule": f"{sizes.max_steps} steps, batch 8, 64 px crops of {sizes.text_train_pages} pages",
            "lpips": (
                "LPIPS ran with VGG16 weights found on this machine."
                if lpips_ok
                else "**LPIPS could not run here** (no VGG16 weights offline): every variant ran with its "
                "LPIPS term at 0, so ldm = L1 + GAN and ft-mse = MSE. With the weights in place (README, "
                "'LPIPS offline') the recipes run as shipped and the table gains an LPIPS column."
            ),
            "encoders": "\n".join(f"- {line}" for line in encoders),
        }
        write_quality_doc(docs / "quality.md", result.report, grids, facts, minutes)
    return result.report


def run_family_experiment(out: Path, docs: Path | None, sizes: Sizes = Sizes()) -> str:
    """Step 6: the second family (AutoencoderKLQwenImage) on the same data and schedule; returns its
    report."""
    runs, result, encoders, _ = train_and_score(out, sizes, FAMILY_VARIANTS, QWENIMAGE_VAE, "-qwenimage")
    if docs is not None:
        minutes = {r.name: run_minutes(r, sizes.max_steps) for r in runs}
        grids = [
            f"**{title}**\n\n![{title}]({name})"
            for title, name in copy_grids(out / "eval-qwenimage", docs, "quality-qwenimage-").items()
        ]
        variants = "\n".join(f"- **{v.name}** ({minutes[v.name]:.1f} min): {v.what}" for v in FAMILY_VARIANTS)
        checks = "\n".join(f"- {line}" for line in encoders)
        section = f"""
## A second family: a Qwen-Image-shaped VAE (`AutoencoderKLQwenImage`)

The same data and schedule ({sizes.max_steps} steps, batch 8, 64 px) on the latents of
[assets/source-vae-qwenimage](../assets/source-vae-qwenimage/README.md): diffusers' `AutoencoderKLQwenImage`
(Qwen-Image's and Wan 2.1's causal 3-D layout, 16 latent channels, images as one-frame videos), pretrained on
the photographs like the `AutoencoderKL` stand-in. Only its decoder is fine-tuned, on the unclamped output;
the temporal kernel slices a one-frame image never reaches stay bit-identical. {time.strftime("%Y-%m-%d")},
commit {_git_commit()}, torch {torch.__version__}, {torch.get_num_threads()} torch thread(s).

{variants}

{result.report}
{(chr(10) * 2).join(grids)}

{checks}
"""
        write_family_section(docs / "quality.md", section)
    return result.report


@click.command()
@click.option(
    "--out",
    default="experiment",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Work folder: images/, shards/, runs/, eval/.",
)
@click.option(
    "--docs",
    default="docs",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Where quality.md and its grids are written.",
)
@click.option(
    "--quick", is_flag=True, help="A smoke run of a minute (tiny data, 4 steps); its numbers mean nothing."
)
@click.option(
    "--part",
    type=click.Choice(["all", "kl", "qwenimage"]),
    default="all",
    show_default=True,
    help="kl: the AutoencoderKL source VAE with every recipe; qwenimage: the second family (step 6).",
)
def main(out: Path, docs: Path, quick: bool, part: str) -> None:
    """Fine-tune the source VAEs' decoders on rendered text with the shipped recipes and evaluate them."""
    setup_logging()
    sizes = QUICK if quick else Sizes()
    if part in ("all", "kl"):
        click.echo(run_experiment(out, docs, sizes))
    if part in ("all", "qwenimage"):
        click.echo(run_family_experiment(out, docs, sizes))
    click.echo(f"written: {docs / 'quality.md'}; details in {out / 'eval'}")


if __name__ == "__main__":
    main()
