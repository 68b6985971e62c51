"""One stacked forward per realigned step (peft per-row adapters) against the two-call path, SD and SDXL with
CFG; the fallbacks; no weight copies, no leftover hooks.

Why allclose and not equal at batch 1: MKL's sgemm takes another kernel below 4 rows, and the per-sample
time-embedding Linears see 2 rows (CFG, one image) in a two-call step but 4 when stacked: ~1e-7 relative
rounding, amplified by the random tiny UNet over the steps. From 2 images on (4 rows per branch) both paths
hit the same kernels and agree bitwise on this machine; the tests still only demand a tight allclose there.
"""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler

import deradiff
from deradiff.models.lora import lora_layers
from deradiff.realignment.branches import Branches
from deradiff.realignment.denoiser import RealignedDenoiser
from deradiff.realignment.schedulers import ApproximateSamplerWarning

STEPS = 3


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Tight fp32 agreement, relative to the tensor's scale (random tiny UNets make latents of size ~10-70)."""
    scale = float(expected.abs().max())
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=2e-6 * scale)


def run(pipe, batch: bool, images: int = 1, prompt: str = "a red circle", **kwargs) -> tuple[torch.Tensor, list[int]]:
    """Realigned sample at lam 0.5; also returns the batch size of every UNet forward."""
    handle = deradiff.realign(pipe, lam=kwargs.pop("lam", 0.5), branches="stacked" if batch else "two-call")
    rows: list[int] = []
    hook = handle.original.register_forward_pre_hook(lambda m, a, kw: rows.append((a[0] if a else kw["sample"]).shape[0]),
                                                     with_kwargs=True)
    gens = [torch.Generator().manual_seed(i) for i in range(images)]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ApproximateSamplerWarning)
            out = pipe(prompt, num_images_per_prompt=images, generator=gens, num_inference_steps=STEPS,
                       output_type="latent", **kwargs).images
    finally:
        hook.remove()
    assert handle.denoiser.branches.last_path == ("batched" if batch else "two-call")
    handle.undo()
    return out, rows


@pytest.mark.parametrize("scheduler,eta", [(DDIMScheduler, 1.0), (EulerAncestralDiscreteScheduler, 0.0)])
@pytest.mark.parametrize("images", [1, 2])
def test_sd_batched_equals_two_calls_with_cfg(lora_sd_pipe, scheduler, eta, images):
    pipe = lora_sd_pipe
    pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
    stacked, stacked_rows = run(pipe, True, images, eta=eta)
    two, two_rows = run(pipe, False, images, eta=eta)
    close(stacked, two)
    assert stacked_rows == [4 * images] * STEPS  # ONE forward per step: [uncond; cond] x [off; on]
    assert two_rows == [2 * images] * (2 * STEPS)


@pytest.mark.parametrize("images, path, rows", [(1, "batched", [4]), (2, "two-call", [4, 4])])
def test_default_stacks_one_image_and_runs_two_calls_for_more(lora_sd_pipe, images, path, rows):
    """branches="auto": one image with CFG (2 rows) is stacked; larger calls run two (memory budget)."""
    handle = deradiff.realign(lora_sd_pipe, lam=0.5)
    seen: list[int] = []
    hook = handle.original.register_forward_pre_hook(
        lambda m, a, kw: seen.append((a[0] if a else kw["sample"]).shape[0]), with_kwargs=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ApproximateSamplerWarning)
        default = lora_sd_pipe("a red circle", num_images_per_prompt=images, num_inference_steps=STEPS,
                               generator=[torch.Generator().manual_seed(i) for i in range(images)],
                               output_type="latent").images
    hook.remove()
    assert handle.denoiser.branches.last_path == path and seen == rows * STEPS
    handle.undo()
    forced, _ = run(lora_sd_pipe, path == "batched", images)
    close(default, forced)


def test_sdxl_batched_equals_two_calls_with_cfg(lora_sdxl_pipe):
    """SDXL: added_cond_kwargs (text_embeds, time_ids) are stacked with the latents."""
    stacked, rows = run(lora_sdxl_pipe, True, images=2, eta=1.0)
    two, _ = run(lora_sdxl_pipe, False, images=2, eta=1.0)
    close(stacked, two)
    assert rows == [8] * STEPS


def test_branch_outputs_match_adapter_off_and_on(lora_sd_pipe):
    unet = lora_sd_pipe.unet
    denoiser = Branches(unet, mode="stacked")
    x, emb, t = torch.randn(4, 4, 8, 8), torch.randn(4, 16, 32), torch.tensor(500)
    with torch.no_grad():
        ref, aligned = denoiser.both(x, t, encoder_hidden_states=emb)
        unet.disable_adapters()
        off = unet(x, t, encoder_hidden_states=emb).sample
        unet.enable_adapters()
        on = unet(x, t, encoder_hidden_states=emb).sample
    assert denoiser.last_path == "batched"
    close(ref.sample, off)
    close(aligned.sample, on)
    assert not torch.allclose(off, on)
    assert all(not layer._forward_pre_hooks for layer in lora_layers(unet))  # the per-row hooks are gone


def test_adapter_weight_and_requires_grad_are_respected(lora_sd_pipe):
    unet = lora_sd_pipe.unet
    unet.set_adapters(["default"], weights=[0.3])  # diffusers' per-adapter strength (scales the LoRA)
    grads = [p.requires_grad for p in unet.parameters()]
    stacked, _ = run(lora_sd_pipe, True, images=2)
    two, _ = run(lora_sd_pipe, False, images=2)
    close(stacked, two)
    assert [p.requires_grad for p in unet.parameters()] == grads


def test_endpoints_stay_one_plain_forward(lora_sd_pipe):
    for lam, adapters in ((0.0, False), (1.0, True)):
        handle = deradiff.realign(lora_sd_pipe, lam=lam, branches="stacked")
        got = lora_sd_pipe("a red circle", generator=torch.Generator().manual_seed(0), num_inference_steps=STEPS,
                           output_type="latent").images
        assert handle.denoiser.branches.last_path == "single"
        handle.undo()
        lora_sd_pipe.unet.enable_adapters() if adapters else lora_sd_pipe.unet.disable_adapters()
        stock = lora_sd_pipe("a red circle", generator=torch.Generator().manual_seed(0), num_inference_steps=STEPS,
                             output_type="latent").images
        lora_sd_pipe.unet.enable_adapters()
        assert torch.equal(got, stock)


def test_no_weight_copy(lora_sd_pipe):
    unet = lora_sd_pipe.unet
    before = {id(p) for p in unet.parameters()}
    handle = deradiff.realign(lora_sd_pipe, lam=0.5, branches="stacked")
    assert {id(p) for p in handle.denoiser.parameters()} == before


def test_fallback_reasons(lora_sd_pipe, add_lora):
    unet = lora_sd_pipe.unet
    assert Branches(unet).fallback_reason() is None  # default: one stacked forward
    denoiser = Branches(unet, mode="stacked")
    assert denoiser.fallback_reason() is None
    assert "two-call" in Branches(unet, mode="two-call").fallback_reason()
    assert "two-model" in Branches(unet, aligned_model=copy.deepcopy(unet)).fallback_reason()

    unet.add_adapter(peft.LoraConfig(r=2, target_modules=["to_q"], init_lora_weights=False), adapter_name="b")
    unet.set_adapters(["default", "b"])
    denoiser = Branches(unet, mode="stacked")
    assert "several adapters" in denoiser.fallback_reason()
    unet.set_adapters(["default"])
    assert denoiser.fallback_reason() is None

    layer = lora_layers(unet)[0]
    layer.lora_dropout["default"] = torch.nn.Dropout(0.1)
    denoiser = Branches(unet, mode="stacked")
    unet.train()
    assert "dropout" in denoiser.fallback_reason()
    unet.eval()
    assert denoiser.fallback_reason() is None

    layer.merge()
    assert "merged" in denoiser.fallback_reason()


def test_fallbacks_still_mix_correctly(lora_sd_pipe):
    """Several active adapters: two calls, same result as forcing two calls."""
    unet = lora_sd_pipe.unet
    unet.add_adapter(peft.LoraConfig(r=2, target_modules=["to_q"], init_lora_weights=False), adapter_name="b")
    unet.set_adapters(["default", "b"])
    handle = deradiff.realign(lora_sd_pipe, lam=0.5, branches="stacked")
    a = lora_sd_pipe("x", generator=torch.Generator().manual_seed(0), num_inference_steps=2, output_type="latent").images
    assert handle.denoiser.branches.last_path == "two-call"
    handle.denoiser.branches.mode = "two-call"
    b = lora_sd_pipe("x", generator=torch.Generator().manual_seed(0), num_inference_steps=2, output_type="latent").images
    assert torch.equal(a, b)


def test_unknown_tensor_argument_falls_back(lora_sd_pipe):
    """A tensor in an argument we do not know how to stack by rows runs two calls rather than guessing."""
    denoiser = RealignedDenoiser(lora_sd_pipe.unet, 0.5, branches="stacked")
    x, emb, t = torch.randn(2, 4, 8, 8), torch.randn(2, 16, 32), torch.tensor(500)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # diffusers warns that the attention processor ignores the tensor
        denoiser(x, t, encoder_hidden_states=emb, cross_attention_kwargs={"scale": 1.0})
        assert denoiser.branches.last_path == "batched"
        denoiser(x, t, encoder_hidden_states=emb, cross_attention_kwargs={"unknown": torch.ones(2)})
        assert denoiser.branches.last_path == "two-call"
