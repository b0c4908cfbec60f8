"""Decoder losses as LDM `LPIPSWithDiscriminator` defines them (ldm/modules/losses/contperceptual.py).

x: target image, x̂ = decoder(z): reconstruction, both (B, C, H, W) in [-1, 1]; s: scalar log-variance;
D: PatchGAN; W = decoder.conv_out.weight (LDM's `last_layer`); t: optimizer step.

    rec = |x - x̂|  (pixel_loss=l1; (x - x̂)^2 for l2)  + perceptual_weight * LPIPS(x, x̂)
          # (B, C, H, W); LPIPS is (B, 1, 1, 1) and broadcasts, so it counts once per element as in LDM
    nll = Σ(rec / exp(s) + s) / B                        # sum over C, H, W, mean over the batch
    g   = -mean(D(x̂))
    λ   = clamp(‖∇_W nll‖ / (‖∇_W g‖ + 1e-4), 0, 1e4) * disc_weight      # detached
    f_t = disc_factor if t >= disc_start_step else 0                      # adopt_weight
          (in L_G from disc_start_step + disc_warmup_steps on: generator_gan_factor)
    L_G = nll + λ f_t g
    L_D = f_t * hinge(D(x), D(x̂.detach()))      (disc_loss=hinge, or vanilla)
          (+ disc_lecam_weight * LeCAM, + lazily γ/2 * R1 on real images: `lecam_reg`, `r1_penalty`)
          hinge   = 0.5 (mean relu(1 - D(x)) + mean relu(1 + D(x̂)))
          vanilla = 0.5 (mean softplus(-D(x)) + mean softplus(D(x̂)))

New decoders (vaedec/decoders.py) add, outside nll, so λ still balances the GAN against the image alone:
    T   = teacher_weight * Σ(|x̂ - x_t| + perceptual_weight * LPIPS(x_t, x̂)) / B      (`teacher_loss`)
          x_t: the original decoder's output on the same z, frozen (a constant here)
    E   = mean((E_tiny(x) - ẑ)^2)   a preview model's tiny encoder against the stored latent ẑ in the
          diffusion model's units (`latent_regression_loss`); it shares no parameter with the decoder
    L_G = nll + λ f_t g + T   (+ E for the tiny encoder)

LDM's L_G also has kl_weight * KL(q(z|x)); the encoder is frozen here, so the KL term is a constant whose
gradient with respect to the decoder is zero, and it is dropped.

Two ways to get the decoder gradients of L_G:
- `ldm_generator_loss`: LDM's way, λ from autograd.grad(nll, W) and autograd.grad(g, W) on the graph, then the
  caller backprops L_G (LPIPS and D are backpropagated twice).
- `generator_grads`: the fast way. Cut the graph at x̂, take ∇_x̂ nll and ∇_x̂ g once each, get ∇_W of both
  from conv_out's input h (W enters only through x̂ = conv_out(h)), and hand back ∇_x̂ L_G for one backward
  through the decoder. Both give the same gradients (tests/test_losses.py).
"""

from __future__ import annotations

import os
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import lpips
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vaedec.config import LossConfig
from vaedec.errors import VaedecError

VGG16_FILE = (
    "vgg16-397923af.pth"  # torchvision's ImageNet VGG16 (IMAGENET1K_V1), the backbone LPIPS was fit on
)

# lpips's vgg16 keeps torchvision's `features` layers under their original index, split into five slices
# (lpips/pretrained_networks.py): features.N.* -> net.sliceK.N.*
VGG_SLICES: dict[int, range] = {
    1: range(4),
    2: range(4, 9),
    3: range(9, 16),
    4: range(16, 23),
    5: range(23, 30),
}

LOG_KEYS = (
    "loss/total",
    "loss/nll",
    "loss/rec",
    "loss/pixel",
    "loss/perceptual",
    "loss/g",
    "loss/logvar",
    "loss/d_weight",
    "loss/disc_factor",
)


# ------------------------------------------------------------------------------------------------------------
# the terms, each a small pure function (LDM contperceptual.py)


def pixel_loss(x: Tensor, x_rec: Tensor, kind: Literal["l1", "l2"]) -> Tensor:
    """Per-element pixel loss, (B, C, H, W): |x - x̂| (LDM) or (x - x̂)^2."""
    diff = x.to(x_rec.dtype) - x_rec
    if kind == "l1":
        return diff.abs()
    if kind == "l2":
        return diff.square()
    raise ValueError(f"pixel_loss must be 'l1' or 'l2', got {kind!r}")


def nll_loss(rec: Tensor, logvar: Tensor) -> Tensor:
    """Gaussian-style NLL of LDM: Σ(rec / exp(s) + s) / B, a scalar."""
    # (B, C, H, W) summed over everything, divided by B only: LDM's scale, which sets the size of λ as well.
    return torch.sum(rec / torch.exp(logvar) + logvar) / rec.shape[0]


def generator_adv_loss(logits_fake: Tensor) -> Tensor:
    """Generator GAN loss g = -mean(D(x̂)) (LDM contperceptual.py)."""
    return -torch.mean(logits_fake)


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Hinge discriminator loss 0.5 (mean relu(1 - real) + mean relu(1 + fake)) (taming/LDM)."""
    return 0.5 * (torch.mean(F.relu(1.0 - logits_real)) + torch.mean(F.relu(1.0 + logits_fake)))


def vanilla_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Non-saturating discriminator loss 0.5 (mean softplus(-real) + mean softplus(fake)) (taming/LDM)."""
    return 0.5 * (torch.mean(F.softplus(-logits_real)) + torch.mean(F.softplus(logits_fake)))


def adopt_weight(weight: float, step: int, threshold: int) -> float:
    """`weight` from optimizer step `threshold` on, 0 before it (LDM adopt_weight)."""
    return weight if step >= threshold else 0.0


def generator_gan_factor(cfg: LossConfig, step: int) -> float:
    """f_t of the decoder's GAN term: disc_factor from disc_start_step + disc_warmup_steps on (D alone trains
    for the warm-up steps before it, so the decoder first meets a discriminator that already tells real from
    fake)."""
    return adopt_weight(cfg.disc_factor, step, cfg.disc_start_step + cfg.disc_warmup_steps)


def adaptive_weight(nll_grad: Tensor, g_grad: Tensor, disc_weight: float) -> Tensor:
    """λ = clamp(‖∇nll‖ / (‖∇g‖ + 1e-4), 0, 1e4) * disc_weight, detached (LDM calculate_adaptive_weight)."""
    ratio = torch.linalg.vector_norm(nll_grad) / (torch.linalg.vector_norm(g_grad) + 1e-4)
    return torch.clamp(ratio, 0.0, 1e4).detach() * disc_weight


def conv_weight_grad(h: Tensor, grad_out: Tensor, conv: nn.Conv2d) -> Tensor:
    """dL/dW of `conv` from its input h and dL/d(output), in fp32 (fp64 stays fp64)."""
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        # 'same'/'valid' and non-zero padding modes pad outside the convolution call; not needed for conv_out.
        raise ValueError(
            "conv_weight_grad needs numeric zero padding, "
            f"got padding={conv.padding!r}, mode={conv.padding_mode!r}"
        )
    # fp32 at least: under fp16 autocast h and grad_out are fp16, and the sum over B*H*W would lose bits.
    dtype = torch.promote_types(torch.promote_types(h.dtype, grad_out.dtype), torch.float32)
    with torch.no_grad():
        return torch.nn.grad.conv2d_weight(
            h.detach().to(dtype),  # (B, C_in, H, W)
            conv.weight.shape,  # (C_out, C_in / groups, kH, kW)
            grad_out.detach().to(dtype),  # (B, C_out, H', W')
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
        )


# ------------------------------------------------------------------------------------------------------------
# LPIPS


class LPIPSWeightsError(VaedecError):
    """The VGG16 weights file for LPIPS is missing or is not torchvision's VGG16; the message says what to
    do."""


class LPIPSWeightsMissing(LPIPSWeightsError):
    """The ImageNet VGG16 weights LPIPS needs are not on this machine; the message says how to get them."""


def default_vgg_weights_path() -> str:
    """Where torchvision caches VGG16: $TORCH_HOME/hub/checkpoints (default ~/.cache/torch/hub/...)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", VGG16_FILE)


def _missing_weights_message(path: str) -> str:
    return (
        f"LPIPS needs torchvision's ImageNet VGG16 weights ({VGG16_FILE}) and found none at {path}.\n"
        "Get the file on a machine with internet:\n"
        "    python -c \"import torchvision; torchvision.models.vgg16(weights='IMAGENET1K_V1')\"\n"
        f"which caches it as ~/.cache/torch/hub/checkpoints/{VGG16_FILE}. Then copy it here and either\n"
        f"  - set loss.lpips_vgg_weights=/path/{VGG16_FILE}, or\n"
        f"  - put it in $TORCH_HOME/hub/checkpoints/ (now: {os.path.dirname(path)}),\n"
        "or train without LPIPS: loss.perceptual_weight=0."
    )


def vgg_slice_state(
    features: dict[str, Tensor], slice_state: dict[str, Tensor], path: str
) -> dict[str, Tensor]:
    """Map torchvision `features.N.*` onto lpips's `sliceK.N.*` keys; every key filled, shapes checked."""
    mapped, problems = {}, []
    for key, target in slice_state.items():
        slice_name, index, suffix = key.split(".", 2)  # "slice3", "12", "weight"
        if int(index) not in VGG_SLICES[int(slice_name.removeprefix("slice"))]:  # lpips changed, not the user
            raise RuntimeError(f"lpips's VGG layout changed: {key} is not where VGG_SLICES says")
        source = f"features.{index}.{suffix}"
        if source not in features:
            problems.append(f"missing {source}")
        elif features[source].shape != target.shape:
            problems.append(
                f"{source} has shape {tuple(features[source].shape)}, expected {tuple(target.shape)}"
            )
        else:
            mapped[key] = features[source]
    if problems:
        shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
        raise LPIPSWeightsError(
            f"{path} is not torchvision's VGG16 state dict ({VGG16_FILE}): {shown}. "
            "Point loss.lpips_vgg_weights at the right file."
        )
    return mapped


def _read_state_dict(path: str) -> dict[str, Tensor]:
    # mmap: only the ~60 MB of conv weights are read, not VGG's ~470 MB classifier; the 2017 torchvision files
    # use the legacy (non-zip) format, which cannot be memory-mapped.
    mmap = zipfile.is_zipfile(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # a truncated download, a pickled model object, not a torch file at all
        first_line = (str(e).splitlines() or [""])[0]  # weights_only errors run to a page of advice
        raise LPIPSWeightsError(
            f"{path} could not be read as a torch state dict ({type(e).__name__}: {first_line})"
        ) from e
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise LPIPSWeightsError(
            f"{path} does not hold a state dict of tensors; expected torchvision's {VGG16_FILE}"
        )
    if not any(k.startswith("features.") for k in state):
        # Fail before building LPIPS (seconds); vgg_slice_state checks every key and shape afterwards.
        first = ", ".join(list(state)[:3])
        raise LPIPSWeightsError(
            f"{path} is not torchvision's VGG16 state dict ({VGG16_FILE}): no features.* keys "
            f"(it starts {first}). Point loss.lpips_vgg_weights at the right file."
        )
    return state


def load_lpips(vgg_weights: str | None, random_backbone: bool = False) -> lpips.LPIPS:
    """LPIPS(vgg): shipped linear layers, VGG16 from a local file; frozen, eval mode; never downloads."""
    path = vgg_weights if vgg_weights is not None else default_vgg_weights_path()
    if not random_backbone and not os.path.isfile(path):
        raise LPIPSWeightsMissing(_missing_weights_message(path))
    state = None if random_backbone else _read_state_dict(path)
    # fork_rng: building LPIPS initialises a VGG16 from the global RNG; without the fork, whether LPIPS is
    # built (e.g. for validation only, when weights happen to be on this machine) would change the
    # discriminator's init.
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        # lpips calls torchvision's deprecated `pretrained=` API; the warnings are about lpips, not the user.
        warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
        # pnet_rand=True: lpips must not download the backbone; the linear layers ship inside the package.
        model = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)
    if state is None:
        warnings.warn(
            "LPIPS is using a RANDOM VGG16 backbone (random_backbone=True / loss.lpips_random_backbone): "
            "its values are MEANINGLESS. Use this only in tests.",
            UserWarning,
            stacklevel=2,
        )
    else:
        model.net.load_state_dict(vgg_slice_state(state, model.net.state_dict(), path), strict=True)
    # eval() also turns off the Dropout inside lpips's linear layers.
    return model.eval().requires_grad_(False)


def _lpips_views(t: Tensor) -> Tensor:
    """(B, C, H, W) -> (k*B, 3, H, W): the RGB part, then each further channel repeated to 3 channels."""
    c = t.shape[1]
    rgb = [t[:, :3]] if c >= 3 else []
    extra = range(3, c) if c >= 3 else range(c)
    return torch.cat(rgb + [t[:, i : i + 1].expand(-1, 3, -1, -1) for i in extra], dim=0)


def perceptual_distance(lpips_model: nn.Module, x: Tensor, x_rec: Tensor) -> Tensor:
    """LPIPS per sample, (B, 1, 1, 1), for [-1, 1] images of any channel count.

    C == 3: LPIPS on RGB. C == 1 or 2: the sum of LPIPS over the channels, each repeated to 3 (grey images).
    C > 3 (e.g. RGB + depth): LPIPS(RGB) + the sum over each extra channel, repeated to 3, of its LPIPS.
    """
    # One LPIPS call on the stacked views, (k*B, 3, H, W): LPIPS is per sample, so it equals k calls.
    d = lpips_model(_lpips_views(x.to(x_rec.dtype)), _lpips_views(x_rec))  # (k*B, 1, 1, 1)
    return d.view(-1, x.shape[0], 1, 1, 1).sum(dim=0)


def pixel_loss_by_set(
    stored: list[tuple[Tensor, Tensor]],
    sources: list[Tensor | None],
    names: list[str],
    kind: Literal["l1", "l2"],
) -> dict[str, float]:
    """loss/pixel/NAME: the mean pixel loss of this step's samples from each mixed shard set (a set with no
    sample in the step is left out). `stored`: (x, x̂) per micro-batch; `sources`: (B,) set index per
    sample."""
    per_sample = torch.cat([pixel_loss(x, x_rec, kind).float().mean(dim=(1, 2, 3)) for x, x_rec in stored])
    source = torch.cat([s.to(per_sample.device) for s in sources])
    return {f"loss/pixel/{name}": float(per_sample[source == i].mean())
            for i, name in enumerate(names) if bool((source == i).any())}


def anchor_penalty(params: list[Tensor], anchors: list[Tensor], weight: float) -> Tensor:
    """L2-SP (Li et al. 2018, "Explicit inductive bias for transfer learning"): alpha/2 * sum ||theta -
    theta_0||^2 over the trained weights theta and the original decoder's theta_0."""
    return weight / 2 * sum(((p.float() - a.float()) ** 2).sum() for p, a in zip(params, anchors))


@torch.no_grad()
def add_anchor_grad(
    params: list[Tensor], anchors: list[Tensor], weight: float, grad_scale: float = 1.0
) -> float:
    """Add the gradient of `anchor_penalty`, alpha * (theta - theta_0), to each .grad in place (times the fp16
    grad scaler's scale, since .grad is still scaled here); returns the penalty's value. The same as adding
    the penalty to the loss, without putting every weight into the backward graph."""
    diffs = torch._foreach_sub(params, anchors)  # theta - theta_0, one fused pass
    for p, d in zip(params, diffs):
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        p.grad.add_(d, alpha=weight * grad_scale)
    return float(weight / 2 * sum(float(d.float().square().sum()) for d in diffs))


def teacher_loss(
    x_rec: Tensor, x_teacher: Tensor, lpips_model: nn.Module | None, perceptual_weight: float
) -> Tensor:
    """Σ(|x̂ - x_t| + perceptual_weight·LPIPS(x_t, x̂)) / B towards the original decoder's output x_t (a
    constant: detached), in the units of nll's rec, a scalar; the caller multiplies by loss.teacher_weight."""
    x_t = x_teacher.detach().to(x_rec.dtype)
    rec = (x_rec - x_t).abs()  # (B, C, H, W)
    if perceptual_weight > 0 and lpips_model is not None:
        rec = rec + perceptual_weight * perceptual_distance(
            lpips_model, x_t, x_rec
        )  # (B, 1, 1, 1) broadcasts
    return rec.sum() / x_rec.shape[0]


def latent_regression_loss(pred: Tensor, target: Tensor) -> Tensor:
    """mean((ẑ_pred - ẑ)^2) of a tiny encoder's latent against the stored one, both in the diffusion model's
    units (B, C, h, w); TAESD's encoder is trained to regress the big encoder's latents this way."""
    return torch.mean((pred.float() - target.detach().float()) ** 2)


# ------------------------------------------------------------------------------------------------------------
# generator (decoder) side


def _rec_terms(
    x: Tensor, x_rec: Tensor, lpips_model: nn.Module | None, cfg: LossConfig
) -> tuple[Tensor, Tensor, Tensor]:
    """rec (B, C, H, W), pixel (B, C, H, W) and LPIPS (B, 1, 1, 1) (zeros when perceptual_weight is 0)."""
    pix = pixel_loss(x, x_rec, cfg.pixel_loss)
    if cfg.perceptual_weight > 0:
        if lpips_model is None:
            raise ValueError("loss.perceptual_weight > 0 needs an LPIPS model (see load_lpips)")
        p = perceptual_distance(lpips_model, x, x_rec)
        return pix + cfg.perceptual_weight * p, pix, p
    return pix, pix, pix.new_zeros(pix.shape[0], 1, 1, 1)


def _gan_on(cfg: LossConfig, f: float) -> bool:
    """Whether λ f_t g can be non-zero; when not, D need not run at all."""
    return f > 0 and cfg.disc_weight > 0


def _logs(
    total: Tensor,
    nll: Tensor,
    rec: Tensor,
    pix: Tensor,
    p: Tensor,
    g: Tensor,
    logvar: Tensor,
    lam: Tensor,
    f: float,
) -> dict[str, float]:
    """Python floats for the logger, read back with one device sync."""
    values = torch.stack(
        [t.detach().to(torch.float64).mean() for t in (total, nll, rec, pix, p, g, logvar, lam)]
        + [torch.tensor(f, dtype=torch.float64, device=total.device)]
    )
    return dict(zip(LOG_KEYS, values.tolist()))


@dataclass
class GeneratorGrads:
    """∇_x̂ L_G for one backward through the decoder, ∇_s L_G, and the scalars to log."""

    grad_output: Tensor  # dL_G/dx̂, shape of x̂, fp32 (fp64 stays fp64)
    logvar_grad: Tensor | None  # dL_G/ds when logvar requires grad, else None
    logs: dict[str, float]


def generator_grads(
    x: Tensor,
    x_rec: Tensor,
    h: Tensor,
    conv_out: nn.Conv2d,
    lpips_model: nn.Module | None,
    disc: nn.Module | None,
    logvar: Tensor,
    cfg: LossConfig,
    step: int,
    loss_scale: float = 1.0,
    weight_grad: Callable[[Tensor, Tensor], Tensor] | None = None,
    x_teacher: Tensor | None = None,
) -> GeneratorGrads:
    """∇_x̂ of L_G = nll + λ f_t g (+ T with `x_teacher`, the original decoder's output) with no double
    backward; x_rec must be conv_out(h), or `weight_grad(h, ∇_x̂)` gives ∇ of conv_out's weight for decoders
    that do more after it (vaedec/families.py FamilyDecoder)."""
    f = generator_gan_factor(cfg, step)
    # A leaf copy of x̂ cuts the graph at the decoder output: nothing here backprops into the decoder, which
    # is traversed once, by the caller's backward of grad_output. fp32 at least, so the losses are not fp16.
    dtype = torch.promote_types(x_rec.dtype, torch.float32)
    with torch.enable_grad():
        x_hat = x_rec.detach().to(dtype).requires_grad_(True)  # (B, C, H, W)
        rec, pix, p = _rec_terms(x, x_hat, lpips_model, cfg)
        nll = nll_loss(rec, logvar)
        wrt = [x_hat] + ([logvar] if logvar.requires_grad else [])
        # loss_scale: the fp16 GradScaler's scale, so the fp16 backward through LPIPS and D cannot underflow;
        # undone right after. An overflow puts inf/nan in grad_output and the scaler skips the step, as in
        # LDM.
        grads = torch.autograd.grad(nll * loss_scale, wrt)
        nll_grad = grads[0] / loss_scale  # (B, C, H, W)
        logvar_grad = grads[1] / loss_scale if len(grads) > 1 else None
        if _gan_on(cfg, f):
            if disc is None:
                raise ValueError(f"the GAN term is on at step {step} (loss.disc_start_step) but disc is None")
            g = generator_adv_loss(disc(x_hat))  # D's own parameters get no .grad: only x_hat is asked for
            (g_grad,) = torch.autograd.grad(g * loss_scale, [x_hat])
            g_grad = g_grad / loss_scale  # (B, C, H, W)
            # W enters L_G only through x̂ = conv_out(h): ∇_W = conv2d_weight(h, ∇_x̂) (LDM: autograd on W).
            if weight_grad is None:
                lam = adaptive_weight(
                    conv_weight_grad(h, nll_grad, conv_out),
                    conv_weight_grad(h, g_grad, conv_out),
                    cfg.disc_weight,
                )
            else:
                lam = adaptive_weight(weight_grad(h, nll_grad), weight_grad(h, g_grad), cfg.disc_weight)
            grad_output = nll_grad + (lam * f) * g_grad
        else:
            g = lam = nll.new_zeros(())
            grad_output = nll_grad
        teacher = nll.new_zeros(())
        if x_teacher is not None and cfg.teacher_weight > 0:  # outside nll: λ is left as it was
            teacher = cfg.teacher_weight * teacher_loss(x_hat, x_teacher, lpips_model, cfg.perceptual_weight)
            (t_grad,) = torch.autograd.grad(teacher * loss_scale, [x_hat])
            grad_output = grad_output + t_grad / loss_scale
    total = nll.detach() + lam * f * g.detach() + teacher.detach()
    logs = _logs(total, nll, rec, pix, p, g, logvar, lam, f)
    if x_teacher is not None:
        logs["loss/teacher"] = float(teacher.detach())
    return GeneratorGrads(grad_output=grad_output, logvar_grad=logvar_grad, logs=logs)


def surrogate_loss(x_rec: Tensor, grads: GeneratorGrads, logvar: Tensor) -> Tensor:
    """A scalar whose gradients at x_rec and logvar are grads.grad_output and .logvar_grad; not a loss."""
    # accelerator.backward(surrogate) then applies the GradScaler scale (in fp32, before the cast back to
    # x_rec's fp16/bf16, so nothing underflows) and the grad-accumulation division, as to a real loss.
    out = (x_rec.to(grads.grad_output.dtype) * grads.grad_output.detach()).sum()
    if grads.logvar_grad is not None:
        out = out + (logvar * grads.logvar_grad.detach()).sum()
    return out


def ldm_generator_loss(
    x: Tensor,
    x_rec: Tensor,
    decoder_last_weight: Tensor,
    lpips_model: nn.Module | None,
    disc: nn.Module | None,
    logvar: Tensor,
    cfg: LossConfig,
    step: int,
) -> tuple[Tensor, dict[str, float]]:
    """LDM's L_G with λ from autograd on W (the naive double backward); the caller backprops the loss."""
    f = generator_gan_factor(cfg, step)
    rec, pix, p = _rec_terms(x, x_rec, lpips_model, cfg)
    nll = nll_loss(rec, logvar)
    if _gan_on(cfg, f):
        if disc is None:
            raise ValueError(f"the GAN term is on at step {step} (loss.disc_start_step) but disc is None")
        g = generator_adv_loss(disc(x_rec))
        # LDM calculate_adaptive_weight; unlike LDM, λ is not computed (and logged as 0) while f_t = 0.
        (nll_w,) = torch.autograd.grad(nll, decoder_last_weight, retain_graph=True)
        (g_w,) = torch.autograd.grad(g, decoder_last_weight, retain_graph=True)
        lam = adaptive_weight(nll_w, g_w, cfg.disc_weight)
        loss = nll + lam * f * g
    else:
        g = lam = nll.new_zeros(())
        loss = nll
    return loss, _logs(loss, nll, rec, pix, p, g, logvar, lam, f)


# ------------------------------------------------------------------------------------------------------------
# discriminator side


def r1_penalty(disc: nn.Module, x: Tensor) -> Tensor:
    """E_b ‖∇_x D(x)‖² on real images (Mescheder et al. 2018; StyleGAN2's lazy form scales it by the
    interval), with D(x) a sample's patch logits summed, as StyleGAN2 sums its logits; the caller multiplies
    by γ/2. In fp32: the gradient of a gradient underflows in fp16."""
    with torch.autocast(x.device.type, enabled=False), torch.enable_grad():
        x = x.detach().float().requires_grad_(True)
        logits = disc(x)  # (B, 1, H', W')
        # create_graph: the penalty trains D
        (grad,) = torch.autograd.grad(logits.sum(), [x], create_graph=True)
    return grad.square().sum(dim=(1, 2, 3)).mean()


def lecam_reg(logits_real: Tensor, logits_fake: Tensor, anchor_real: Tensor, anchor_fake: Tensor) -> Tensor:
    """LeCAM (Tseng et al. 2021, "Regularizing GANs under limited data", eq. 3 as in their code):
    E[relu(D(x) − α_fake)²] + E[relu(α_real − D(x̂))²], α the EMAs of D's mean logits on real and fake images;
    it keeps real and fake logits from drifting apart, which is how a discriminator overfits."""
    real_term = torch.mean(F.relu(logits_real - anchor_fake).square())
    fake_term = torch.mean(F.relu(anchor_real - logits_fake).square())
    return real_term + fake_term


def r1_due(cfg: LossConfig, step: int) -> bool:
    """Whether this optimizer step's discriminator phase adds the lazy R1 penalty."""
    return cfg.disc_r1_weight > 0 and step % cfg.disc_r1_every == 0


def discriminator_loss(
    disc: nn.Module, x: Tensor, x_rec: Tensor, cfg: LossConfig, step: int, lecam: nn.Module | None = None
) -> tuple[Tensor, dict[str, float]]:
    """L_D = f_t * (d_loss(D(x), D(x̂)) + disc_lecam_weight * LeCAM) with x̂ detached, so no gradient reaches
    the decoder. `lecam`: the discriminator's LeCAMAnchors (updated here from this batch, then used), or
    None."""
    f = adopt_weight(cfg.disc_factor, step, cfg.disc_start_step)
    # Two calls, as LDM: with BatchNorm, real and fake batches are normalised by their own statistics.
    logits_real = disc(x.detach())  # (B, 1, H', W')
    logits_fake = disc(x_rec.detach())
    if cfg.disc_loss == "hinge":
        d = hinge_d_loss(logits_real, logits_fake)
    elif cfg.disc_loss == "vanilla":
        d = vanilla_d_loss(logits_real, logits_fake)
    else:
        raise ValueError(f"disc_loss must be 'hinge' or 'vanilla', got {cfg.disc_loss!r}")
    extra = {}
    if lecam is not None and cfg.disc_lecam_weight > 0:
        lecam.update(logits_real, logits_fake)
        reg = lecam_reg(logits_real.float(), logits_fake.float(), lecam.real, lecam.fake)
        d = d + cfg.disc_lecam_weight * reg
        extra = {
            "disc/lecam": float(reg.detach()),
            "disc/lecam_anchor_real": float(lecam.real),
            "disc/lecam_anchor_fake": float(lecam.fake),
        }
    loss = f * d
    values = torch.stack(
        [t.detach().to(torch.float64).mean() for t in (loss, logits_real, logits_fake)]
    ).tolist()
    return loss, dict(zip(("disc/loss", "disc/logits_real", "disc/logits_fake"), values)) | extra
