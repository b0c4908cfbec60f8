"""run.mixed_precision=fp16 on the CPU: fp16 autocast, accelerate's grad scaler and the skip of a non-finite
step.

accelerate runs fp16 as plain fp32 on a CPU (no autocast, no scaler: `Accelerator.scaler is None` there), so
on its own the fp16 path of train.py (the scaler's scale handed to `generator_grads`, `accelerator.backward`
scaling the surrogate loss, unscale before clipping, a skipped step counted, `grad_scale` logged, the scaler
in checkpoints) would only ever run on a GPU. torch (>= 2.3) has fp16 autocast and
`torch.amp.GradScaler("cpu")` on the CPU; the fixture below gives the Accelerator those two, as accelerate
does on CUDA, and the run below is then vaedec's own fp16 path end to end. What this cannot show is listed in
the README ("fp16").
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import FAST_TRAIN, cli
from safetensors.torch import load_file

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

INJECT_AT = 12  # the optimizer step (0-based state.step) whose decoder gradients are made inf
STEPS = 15


@pytest.fixture
def fp16_on_cpu(monkeypatch):
    """Accelerator(mixed_precision="fp16") on the CPU gets fp16 autocast and a CPU GradScaler, as on CUDA."""
    from accelerate import Accelerator

    if not hasattr(torch.amp, "GradScaler"):
        pytest.skip("this torch has no device-generic torch.amp.GradScaler")
    with torch.autocast("cpu", dtype=torch.float16):
        if (torch.ones(2, 2) @ torch.ones(2, 2)).dtype != torch.float16:
            pytest.skip("this torch has no fp16 autocast on the CPU")
    original = Accelerator.__init__

    def init(self, *args, **kwargs) -> None:
        original(self, *args, **kwargs)
        if self.state.mixed_precision == "fp16" and self.device.type == "cpu" and self.scaler is None:
            self.native_amp = True
            self.scaler = torch.amp.GradScaler("cpu")  # accelerate's defaults: scale 65536, halved on inf/nan

    monkeypatch.setattr(Accelerator, "__init__", init)


@pytest.mark.slow
def test_fp16_trains_skips_an_injected_inf_step_and_lowers_the_scale(
    tmp_path, shards, fp16_on_cpu, monkeypatch
):
    import vaedec.train

    real = vaedec.train.generator_grads
    autocast, conv_dtypes = set(), set()

    def grads_with_an_inf_step(x, x_rec, h, conv_out, lpips_model, disc, logvar, cfg, step, **kwargs):
        # x_rec itself is fp32: accelerate casts a prepared model's outputs back to fp32, on CUDA as here.
        autocast.add((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        g = real(x, x_rec, h, conv_out, lpips_model, disc, logvar, cfg, step, **kwargs)
        if step == INJECT_AT:  # dL/dx̂ = inf: every decoder gradient of this step overflows
            g.grad_output = torch.full_like(g.grad_output, math.inf)
        return g

    def conv_dtype(module: torch.nn.Module, args: tuple, out: object) -> None:
        if isinstance(module, torch.nn.Conv2d) and module.training:  # training convs: decoder and PatchGAN
            conv_dtypes.add(out.dtype)

    monkeypatch.setattr(vaedec.train, "generator_grads", grads_with_an_inf_step)
    hook = torch.nn.modules.module.register_module_forward_hook(conv_dtype)
    run = tmp_path / "run"
    try:
        cli(
            "train",
            shards,
            "--output",
            run,
            *FAST_TRAIN,
            f"run.max_steps={STEPS}",
            "run.mixed_precision=fp16",
            "run.checkpoint_every_steps=1",
            "run.keep_checkpoints=0",
        )
    finally:
        hook.remove()

    assert autocast == {(True, torch.float16)}  # the generator phase ran under fp16 autocast on the CPU
    assert conv_dtypes == {torch.float16}  # and every training convolution computed in fp16
    lines = {
        m["step"]: m
        for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        if "loss/total" in m
    }
    assert sorted(lines) == list(range(1, STEPS + 1))  # the line of step s is logged after s optimizer steps
    skipped = [s for s, m in lines.items() if m["train/skipped_generator"]]
    # First the scaler finds its scale: LDM's nll is summed over pixels, so at accelerate's initial 65536 the
    # fp16 backward overflows, and each overflowing step is skipped and halves the scale (9 steps at 32 px
    # here).
    finding = [s for s in skipped if s <= INJECT_AT]
    assert finding == list(range(1, len(finding) + 1)) and len(finding) < INJECT_AT - 1, skipped
    for s in finding:
        assert lines[s]["grad_scale"] == 65536 / 2**s
    settled = lines[len(finding) + 1]["grad_scale"]
    assert all(lines[s]["grad_scale"] == settled for s in range(len(finding) + 1, INJECT_AT + 1))
    # Then the injected inf step, and only it, is skipped, and the scaler backs off once more.
    assert skipped == finding + [INJECT_AT + 1]
    assert lines[INJECT_AT + 1]["grad_scale"] == settled / 2
    # The scale search is not a fault (it would stop a high-resolution run at max_bad_steps); the inf step is.
    assert [lines[s]["train/bad_steps"] for s in finding] == [0] * len(finding)
    assert lines[STEPS]["train/scale_search_steps"] == len(finding) and lines[STEPS]["train/bad_steps"] == 1
    assert lines[STEPS]["train/bad_steps_in_a_row"] == 0
    assert all(m["train/skipped_discriminator"] == 0 for m in lines.values())  # D's step had finite gradients

    def weights(step: int, stem: str) -> dict[str, torch.Tensor]:
        return load_file(str(run / "checkpoints" / f"step-{step:08d}" / f"{stem}.safetensors"))

    # The skipped step left decoder and EMA as they were (no optimizer step, no EMA update); the others moved
    # them.
    for stem in ("decoder", "ema"):
        before, after = weights(INJECT_AT, stem), weights(INJECT_AT + 1, stem)
        assert all(torch.equal(before[k], after[k]) for k in before), f"{stem} changed on the skipped step"
        later = weights(STEPS, stem)
        assert any(not torch.equal(after[k], later[k]) for k in after), f"{stem} did not train after the skip"
    for step in range(1, STEPS + 1):
        for stem in ("decoder", "ema", "disc"):
            assert all(torch.isfinite(t).all() for t in weights(step, stem).values() if t.is_floating_point())

    # The scaler's state is in the checkpoint (a resume continues with the backed-off scale).
    optim = torch.load(Path(run / "checkpoints" / f"step-{STEPS:08d}" / "optim.pt"), weights_only=True)
    assert optim["scaler"]["scale"] == lines[STEPS]["grad_scale"]
