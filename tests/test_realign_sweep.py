"""Lambda sweeps as one batch of trajectories: each (lambda, prompt, seed) equals the single-lambda run with
the same seed; minimal rows per step; chunking; the pipeline is left as found."""

from __future__ import annotations

import pytest
import torch

import deradiff
from deradiff.errors import DeradiffError
from deradiff.realignment.api import realignment
from deradiff.realignment.sweep import sweep

PROMPTS = ["a red circle", "a blue square"]
SEEDS = [3, 4]
LAMBDAS = [0.0, 0.5, 1.0, 2.0]
KW = {"num_inference_steps": 3, "eta": 1.0, "output_type": "latent"}  # DDIM eta=1: per-step noise matters


def single(pipe, lam: float, **kwargs) -> torch.Tensor:
    """The single-lambda run: one batch of prompts x seeds with per-image generators."""
    handle = deradiff.realign(pipe, lam=lam)
    gens = [torch.Generator().manual_seed(s) for _ in PROMPTS for s in SEEDS]
    out = pipe(PROMPTS, num_images_per_prompt=len(SEEDS), generator=gens, **{**KW, **kwargs}).images
    handle.undo()
    return out


def stacked(result, k: int) -> torch.Tensor:
    return torch.stack([result.images[k][p][s] for p in range(len(PROMPTS)) for s in range(len(SEEDS))])


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    # batched and single runs take different float32 kernels; lambda = 2 extrapolation doubles their rounding
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


@pytest.mark.parametrize("branches", ["stacked", "two-call"])
def test_sweep_equals_single_lambda_runs(lora_sd_pipe, branches):
    pipe = lora_sd_pipe
    rows = []
    hook = pipe.unet.register_forward_pre_hook(
        lambda m, a, kw: rows.append((a[0] if a else kw["sample"]).shape[0]), with_kwargs=True)
    result = sweep(pipe, PROMPTS, SEEDS, LAMBDAS, branches=branches, **KW)
    hook.remove()
    for k, lam in enumerate(LAMBDAS):
        close(stacked(result, k), single(pipe, lam))
    groups, cfg = len(PROMPTS) * len(SEEDS), 2
    # step 0: all lambdas share x_T -> ref + aligned once per (prompt, seed); later 1 + 2 + 1 + 2 rows
    expected = [2 * groups * cfg] + [6 * groups * cfg] * 2
    if branches == "stacked":
        assert rows == expected  # ONE forward per step for all 4 lambdas
    else:
        assert sum(rows) == sum(expected) and len(rows) == 2 * 3  # one call per branch per step
    assert realignment(pipe) is None and not hasattr(pipe.unet, "trajectories")  # left as found


def test_sweep_sdxl_and_chunking(lora_sdxl_pipe):
    pipe = lora_sdxl_pipe
    whole = sweep(pipe, PROMPTS[:1], SEEDS, [0.5, 2.0], branches="stacked", **KW)
    chunked = sweep(pipe, PROMPTS[:1], SEEDS, [0.5, 2.0], branches="stacked", max_batch=2, **KW)
    handle = deradiff.realign(pipe, lam=2.0, branches="stacked")
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    expected = pipe(PROMPTS[0], num_images_per_prompt=2, generator=gens, **KW).images
    handle.undo()
    for result in (whole, chunked):
        close(torch.stack(result.images[1][0]), expected)


def test_sweep_keeps_an_existing_realignment_and_schedules(lora_sd_pipe):
    pipe = lora_sd_pipe
    handle = deradiff.realign(pipe, lam=0.7)
    result = sweep(pipe, PROMPTS[:1], SEEDS[:1], [[0.0, 0.5, 1.0], 0.5], **KW)
    assert handle.active and handle.lam == 0.7 and handle.denoiser.trajectories is None
    handle.lam = [0.0, 0.5, 1.0]
    gen = [torch.Generator().manual_seed(SEEDS[0])]
    expected = pipe(PROMPTS[0], generator=gen, **KW).images
    close(result.images[0][0][0][None], expected)
    with pytest.raises(DeradiffError, match="2 values but the sampler runs 3 steps"):
        sweep(pipe, PROMPTS[:1], SEEDS[:1], [[0.5, 0.5]], **KW)


def test_sweep_refuses_bad_input(lora_sd_pipe):
    with pytest.raises(DeradiffError, match="lambdas\\[1\\]"):
        sweep(lora_sd_pipe, PROMPTS, SEEDS, [0.5, -1.0])
    with pytest.raises(DeradiffError, match="generator"):
        sweep(lora_sd_pipe, PROMPTS, SEEDS, [0.5], generator=torch.Generator())
    with pytest.raises(DeradiffError, match="at least one"):
        sweep(lora_sd_pipe, PROMPTS, [], [0.5])


@pytest.mark.parametrize("lambdas, path", [([0.0, 1.0], "batched"), ([0.5, 2.0], "two-call")])
def test_auto_stacks_a_sweep_only_when_it_adds_few_rows(lora_sd_pipe, lambdas, path):
    """One seed, CFG: 4 rows per call. Lambdas 0 and 1 need 2 reference + 2 aligned rows (stacking adds none);
    0.5 and 2 need 4 + 4 (stacking would add 4 > AUTO_STACK_ROWS)."""
    handle = deradiff.realign(lora_sd_pipe, lam=0.5)
    sweep(lora_sd_pipe, PROMPTS[:1], SEEDS[:1], lambdas, **KW)
    assert handle.denoiser.branches.last_path == path
    handle.undo()


def test_branches_not_given_keeps_the_setting(lora_sd_pipe):
    handle = deradiff.realign(lora_sd_pipe, lam=0.5)
    assert handle.denoiser.branches.mode == "auto"  # a new realignment starts at auto
    deradiff.realign(lora_sd_pipe, lam=0.5, branches="two-call")
    deradiff.realign(lora_sd_pipe, lam=2.0)  # not given: kept
    assert handle.denoiser.branches.mode == "two-call"
    sweep(lora_sd_pipe, PROMPTS[:1], SEEDS[:1], [0.5], branches="stacked", **KW)
    assert handle.denoiser.branches.mode == "two-call"  # a sweep's override lasts for the sweep only
    deradiff.realign(lora_sd_pipe, lam=2.0, branches="auto")
    assert handle.denoiser.branches.mode == "auto"
    handle.undo()
