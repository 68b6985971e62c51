"""realign(pipe, lam) on tiny random SD/SDXL pipelines: endpoints bitwise, 0.5 against an explicit loop,
schedules, two-model mode, errors, undo, warnings, guidance_rescale."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler

import deradiff
from deradiff.errors import DeradiffError
from deradiff.realignment.schedulers import ApproximateSamplerWarning


PROMPT = "a red circle"
STEPS = 3


def sample(pipe, seed: int = 0, **kwargs) -> torch.Tensor:
    kwargs.setdefault("num_inference_steps", STEPS)
    kwargs.setdefault("output_type", "latent")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ApproximateSamplerWarning)
        return pipe(PROMPT, generator=torch.Generator().manual_seed(seed), **kwargs).images


def stock(pipe, adapters: bool, **kwargs) -> torch.Tensor:
    """The unmodified pipeline with the LoRA on or off."""
    if not adapters:
        pipe.unet.disable_adapters()
    try:
        return sample(pipe, **kwargs)
    finally:
        pipe.unet.enable_adapters()


def explicit_mixture(pipe, lam: float, eta: float, guidance: float = 7.5) -> torch.Tensor:
    """The DeRaDiff rule written out: per step, guide each model's prediction, mix, then the scheduler step."""
    unet, scheduler = pipe.unet, pipe.scheduler
    gen = torch.Generator().manual_seed(0)
    cond, uncond = pipe.encode_prompt(PROMPT, "cpu", 1, True)
    embeds = torch.cat([uncond, cond])
    scheduler.set_timesteps(STEPS)
    latents = torch.randn((1, 4, 8, 8), generator=gen) * scheduler.init_noise_sigma
    step_kwargs = {"eta": eta} if isinstance(scheduler, DDIMScheduler) else {}
    for t in scheduler.timesteps:
        x = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        guided = []
        for enabled in (False, True):
            unet.enable_adapters() if enabled else unet.disable_adapters()
            u, c = unet(x, t, encoder_hidden_states=embeds).sample.chunk(2)
            guided.append(u + guidance * (c - u))
        unet.enable_adapters()
        pred = (1 - lam) * guided[0] + lam * guided[1]
        latents = scheduler.step(pred, t, latents, generator=gen, **step_kwargs).prev_sample
    return latents


def use_scheduler(pipe, cls):
    pipe.scheduler = cls.from_config(pipe.scheduler.config)


@pytest.mark.parametrize("scheduler", [DDIMScheduler, EulerAncestralDiscreteScheduler])
def test_endpoints_reproduce_stock_pipeline_bitwise(lora_sd_pipe, scheduler):
    pipe = lora_sd_pipe
    use_scheduler(pipe, scheduler)
    base, aligned = stock(pipe, adapters=False), stock(pipe, adapters=True)
    assert not torch.equal(base, aligned)  # the LoRA matters
    handle = deradiff.realign(pipe, lam=0.0)
    assert torch.equal(sample(pipe), base)
    handle.lam = 1.0
    assert torch.equal(sample(pipe), aligned)


@pytest.mark.parametrize("scheduler,eta", [(DDIMScheduler, 0.0), (DDIMScheduler, 1.0), (EulerAncestralDiscreteScheduler, 0.0)])
def test_half_equals_explicit_two_prediction_loop(lora_sd_pipe, scheduler, eta):
    pipe = lora_sd_pipe
    use_scheduler(pipe, scheduler)
    deradiff.realign(pipe, lam=0.5)
    realigned = sample(pipe, eta=eta)
    deradiff.unrealign(pipe)
    expected = explicit_mixture(pipe, 0.5, eta)
    # One stacked forward may round differently from two calls (~1e-7 relative per matmul), so the
    # tolerance scales with the latents; a wrong mixture is off by orders of magnitude more.
    torch.testing.assert_close(realigned, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    assert not torch.allclose(realigned, stock(pipe, adapters=True, eta=eta))


def test_images_end_to_end_with_vae(lora_sd_pipe):
    deradiff.realign(lora_sd_pipe, lam=2.0)
    images = sample(lora_sd_pipe, output_type="np")
    assert images.shape == (1, 16, 16, 3) and torch.isfinite(torch.from_numpy(images)).all()


def test_list_and_callable_schedules_reset_every_call(lora_sd_pipe):
    pipe = lora_sd_pipe
    base = stock(pipe, adapters=False)  # before realigning: peft's adapter switches are refused while realigned
    handle = deradiff.realign(pipe, lam=[0.5] * STEPS)
    assert torch.equal(sample(pipe), (handle.__setattr__("lam", 0.5), sample(pipe))[1])
    handle.lam = [0.0] * STEPS
    first, second = sample(pipe), sample(pipe)  # a second call starts again at step 0
    assert torch.equal(first, second) and torch.equal(first, base)
    seen = []
    handle.lam = lambda step, t: seen.append((step, t)) or [0.0, 0.5, 1.0][step]
    by_callable = sample(pipe)
    sample(pipe)
    timesteps = [float(t) for t in pipe.scheduler.timesteps]
    assert seen == [(i, t) for i, t in enumerate(timesteps)] * 2
    handle.lam = [0.0, 0.5, 1.0]
    assert torch.equal(sample(pipe), by_callable)


def test_steps_are_counted_from_the_timesteps_the_pipeline_passes(lora_sd_pipe):
    """A run interrupted mid-way does not shift the next run's schedule; no scheduler method is patched for it."""
    pipe = lora_sd_pipe
    handle = deradiff.realign(pipe, lam=[0.0, 0.5, 1.0])
    expected = sample(pipe)
    assert "set_timesteps" not in pipe.scheduler.__dict__

    def stop_after_first_step(pipe, step, t, kwargs):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sample(pipe, callback_on_step_end=stop_after_first_step)
    assert torch.equal(sample(pipe), expected)
    handle.undo()


def test_branches_mode_is_checked(lora_sd_pipe):
    with pytest.raises(DeradiffError, match="branches must be one of auto, stacked, two-call, got 'fast'"):
        deradiff.realign(lora_sd_pipe, lam=0.5, branches="fast")


def test_schedule_after_scheduler_swap(lora_sd_pipe):
    pipe = lora_sd_pipe
    handle = deradiff.realign(pipe, lam=[0.0] * STEPS)
    use_scheduler(pipe, DDPMScheduler)
    assert torch.equal(sample(pipe), sample(pipe))
    handle.undo()
    assert "step" not in pipe.scheduler.__dict__ and "set_timesteps" not in pipe.scheduler.__dict__


def test_sdxl_endpoints_and_mixture(lora_sdxl_pipe):
    pipe = lora_sdxl_pipe
    base, aligned = stock(pipe, adapters=False), stock(pipe, adapters=True)
    handle = deradiff.realign(pipe, lam=0.0)
    assert torch.equal(sample(pipe), base)
    handle.lam = 1.0
    assert torch.equal(sample(pipe), aligned)
    handle.lam = 0.5
    mixed = sample(pipe)
    assert torch.isfinite(mixed).all() and not torch.equal(mixed, base) and not torch.equal(mixed, aligned)


def test_two_model_mode():
    from deradiff.testing import tiny_sd_pipeline

    pipe = tiny_sd_pipeline()
    base_unet = pipe.unet
    aligned_unet = copy.deepcopy(base_unet)
    with torch.no_grad():
        for p in aligned_unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    base = sample(pipe)
    pipe.unet = aligned_unet
    aligned = sample(pipe)
    pipe.unet = base_unet
    with pytest.raises(DeradiffError, match="no enabled LoRA adapter"):
        deradiff.realign(pipe, lam=0.5)  # no adapter and no aligned_unet
    handle = deradiff.realign(pipe, lam=1.0, aligned_unet=aligned_unet)
    assert torch.equal(sample(pipe), aligned)
    handle.lam = 0.0
    assert torch.equal(sample(pipe), base)
    handle.lam = 0.5
    assert not torch.equal(sample(pipe), base)


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf, [], [0.5, -0.1]])
def test_bad_lambda_values_are_refused(lora_sd_pipe, bad):
    with pytest.raises(DeradiffError):
        deradiff.realign(lora_sd_pipe, lam=bad)
    assert not hasattr(lora_sd_pipe.unet, "schedule")  # nothing was installed
    handle = deradiff.realign(lora_sd_pipe, lam=0.5)
    with pytest.raises(DeradiffError):
        handle.lam = bad
    assert handle.lam == 0.5  # the old value stays


def test_wrong_length_schedule_is_refused_at_sampling(lora_sd_pipe):
    deradiff.realign(lora_sd_pipe, lam=[0.5] * (STEPS + 1))
    with pytest.raises(DeradiffError, match=f"{STEPS + 1} values but the sampler runs {STEPS} steps"):
        sample(lora_sd_pipe)


def test_undo_restores_the_original_pipeline(lora_sd_pipe):
    pipe = lora_sd_pipe
    unet, config, scheduler = pipe.unet, dict(pipe.config), pipe.scheduler
    grads = [p.requires_grad for p in unet.parameters()]
    before = sample(pipe)
    handle = deradiff.realign(pipe, lam=0.5)
    assert pipe.unet is not unet and pipe.unet.config is unet.config and pipe.unet.dtype == unet.dtype
    assert dict(pipe.config) == config  # swapping the denoiser never touches the pipeline's config
    sample(pipe)
    assert [p.requires_grad for p in unet.parameters()] == grads  # adapter toggling left no trace
    handle.undo()
    assert pipe.unet is unet and dict(pipe.config) == config and pipe.scheduler is scheduler
    assert not {"step", "set_timesteps"} & set(scheduler.__dict__)
    assert torch.equal(sample(pipe), before)
    assert deradiff.unrealign(pipe) is False
    with pytest.raises(DeradiffError, match="undone"):
        handle.lam = 1.0


def test_lam_changes_between_calls_without_reloading(lora_sd_pipe):
    pipe = lora_sd_pipe
    handle = deradiff.realign(pipe, lam=0.5, beta=0.1)
    half = sample(pipe)
    assert handle.effective_beta == pytest.approx(0.2)
    assert deradiff.realign(pipe, lam=2.0) is handle
    assert handle.effective_beta == pytest.approx(0.05)
    assert not torch.equal(sample(pipe), half)
    handle.lam = 0.5
    assert torch.equal(sample(pipe), half)
    assert deradiff.unrealign(pipe) is True


@pytest.mark.parametrize("scheduler,eta,warns", [
    (DDIMScheduler, 0.0, True), (DDIMScheduler, 1.0, False), (DDPMScheduler, 0.0, False),
    (EulerAncestralDiscreteScheduler, 0.0, False), (EulerDiscreteScheduler, 0.0, True),
])
def test_warns_once_for_approximate_samplers(lora_sd_pipe, scheduler, eta, warns):
    pipe = lora_sd_pipe
    use_scheduler(pipe, scheduler)
    deradiff.realign(pipe, lam=0.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            pipe(PROMPT, num_inference_steps=2, eta=eta, output_type="latent")
    found = [w for w in caught if issubclass(w.category, ApproximateSamplerWarning)]
    assert len(found) == (1 if warns else 0)
    if warns:
        assert "approximation" in str(found[0].message)


def test_no_warning_at_endpoints(lora_sd_pipe):
    deradiff.realign(lora_sd_pipe, lam=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ApproximateSamplerWarning)
        lora_sd_pipe(PROMPT, num_inference_steps=2, output_type="latent")


def test_guidance_rescale_is_refused_while_mixing(lora_sd_pipe):
    pipe = lora_sd_pipe
    handle = deradiff.realign(pipe, lam=0.5)
    with pytest.raises(DeradiffError, match="guidance_rescale=0.7"):
        sample(pipe, guidance_rescale=0.7)
    handle.lam = 1.0  # no mixing: exactly the aligned pipeline, rescale included
    assert torch.equal(sample(pipe, guidance_rescale=0.7), stock_after_undo(pipe, guidance_rescale=0.7))


def stock_after_undo(pipe, **kwargs) -> torch.Tensor:
    deradiff.unrealign(pipe)
    return stock(pipe, adapters=True, **kwargs)
