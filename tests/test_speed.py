"""Training at 512-1024 px: gradient checkpointing, channels-last and torch.compile give the plain step's
gradients."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import FAST_TRAIN, ROOT, step_parts

import vaedec.train as train_mod
from vaedec.config import load_train_config
from vaedec.families import trainable_decoder
from vaedec.images import batch_to_model
from vaedec.latents import sample_latent
from vaedec.shards import collate, read_manifest

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def step_grads(
    shards, overrides: list[str], backend: str | None = None
) -> tuple[dict[str, torch.Tensor], dict]:
    """The decoder's gradients of one real generator step (GAN term on), taken when its optimizer steps."""
    from accelerate import Accelerator

    parts = step_parts(shards, overrides, 2)
    cfg, decoder, disc, logvar, opt_g = parts.cfg, parts.decoder, parts.disc, parts.logvar, parts.opt_g
    if backend:  # in place: the optimizer holds the same parameters
        train_mod.compile_decoder(decoder, backend)
    grads: dict[str, torch.Tensor] = {}
    real_step = opt_g.step

    def spy_step(*a, **k):
        grads.update({n: p.grad.clone() for n, p in decoder.named_parameters() if p.grad is not None})
        return real_step(*a, **k)

    opt_g.step = spy_step
    batch = collate(parts.samples)
    z = sample_latent(batch["moments"], "mode")
    if cfg.model.channels_last:
        z = z.contiguous(memory_format=torch.channels_last)
    micro = [(batch_to_model(batch, torch.device("cpu")), z)]
    _, logs = train_mod.generator_step(Accelerator(), decoder, disc, opt_g, logvar, None, micro, cfg, 0)
    return grads, logs


@pytest.fixture(scope="module")
def plain(shards):
    return step_grads(shards, [])


@pytest.mark.parametrize(
    ("overrides", "backend", "tol"),
    [
        (["model.gradient_checkpointing=true"], None, 0.0),  # the same ops recomputed: bit for bit on CPU
        (["model.gradient_checkpointing=true", "model.trainable=[decoder.up_blocks.1.*]"], None, 0.0),
        (["model.channels_last=true"], None, 1e-5),  # other conv kernels: other summation order
        ([], "aot_eager", 1e-5),  # dynamo + AOTAutograd; inductor's codegen is the same graph, see README
    ],
    ids=["checkpointing", "checkpointing-partial", "channels-last", "compile"],
)
def test_memory_and_speed_options_give_the_plain_gradients(shards, plain, overrides, backend, tol) -> None:
    ref, ref_logs = plain
    grads, logs = step_grads(shards, overrides, backend)
    assert logs["loss/d_weight"] == pytest.approx(ref_logs["loss/d_weight"], rel=max(tol * 10, 1e-6))
    expected = {k: v for k, v in ref.items() if k in grads}
    assert grads.keys() == expected.keys() and len(grads) > 2
    # Relative to the largest gradient of the model: a conv bias in front of a GroupNorm has an exact gradient
    # of 0, so its float noise cannot be judged relative to itself.
    scale = max(v.abs().max().item() for v in expected.values())
    for k, g in grads.items():
        torch.testing.assert_close(g, expected[k], rtol=tol, atol=tol * scale, msg=k)


def test_gradient_checkpointing_is_really_on(shards) -> None:
    cfg = load_train_config(None, [*FAST_TRAIN, f"data.shards={shards}", "model.gradient_checkpointing=true"])
    decoder = trainable_decoder(cfg, read_manifest(shards))
    assert decoder.decoder.gradient_checkpointing
    calls = []
    real = torch.utils.checkpoint.checkpoint

    def spy(*a, **k):
        calls.append(k.get("use_reentrant"))
        return real(*a, **k)

    torch.utils.checkpoint.checkpoint = spy
    try:
        decoder(torch.randn(1, 4, 8, 8))[0].sum().backward()
    finally:
        torch.utils.checkpoint.checkpoint = real
    assert calls and set(calls) == {False}  # non-reentrant: frozen blocks before it do not cut the gradient



HEAP_PROBE = """
import resource, torch
from vaedec.device import keep_freed_heap
assert keep_freed_heap()
torch.empty(4 << 20).fill_(1)  # 16 MiB, freed
faults = []
for _ in range(3):  # three "steps", each filling and freeing 32 x 8 MiB of activations
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    held = [torch.empty(2 << 20).fill_(1) for _ in range(32)]
    del held
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(faults[0], faults[-1])
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_a_cpu_step_reuses_the_heap_the_last_one_freed() -> None:
    """With keep_freed_heap (what train sets on the CPU) the memory a step frees serves the next one: the
    first step faults its 65,536 pages of 4 KiB in, the third none. Without it glibc gives a free heap top
    back to the system and faults it in again, every step or not, by where its other allocations happen to
    lie."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", HEAP_PROBE], env=env, capture_output=True, text=True, check=True
    )
    first, last = map(int, out.stdout.split())
    pages = 256 * 2**20 // 4096
    assert first > pages // 2 and last < pages // 20, (first, last)
