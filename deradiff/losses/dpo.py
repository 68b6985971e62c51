"""Diffusion-DPO loss (Wallace et al. 2023, "Diffusion Model Alignment Using Direct Preference
Optimization", arXiv 2311.12908, eq. 14).

With winner/loser latents noised by the SAME noise at the SAME timestep and per-sample errors
``mse = ||target - prediction||^2`` averaged over all non-batch dims::

    loss = -logsigmoid( -beta/2 * ((mse_w - mse_l) - (mse_w_ref - mse_l_ref)) )

Beta convention: `beta` is the paper's beta (its SD1.5/SDXL runs use 5000), with the 1/2 written out as
above, as in the paper's reference code (`scale_term = -0.5 * beta_dpo`). diffusers' research example
`train_diffusion_dpo.py` instead computes ``logsigmoid(beta_dpo * (ref_diff - model_diff))``, i.e. folds
the 1/2 into its beta: its default `--beta_dpo 2500` is beta = 5000 here. Pass the paper's beta.

The implicit reward of a sample is ``r = -beta/2 * (mse - mse_ref)``; the margin ``r_w - r_l`` is the
logit inside the sigmoid, and implicit accuracy is the fraction of pairs with a positive margin.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F


LossType = Literal["sigmoid", "hinge"]


def per_sample_mse(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Mean squared error over every non-batch dim, computed in `dtype`: FloatTensor[B]. Same-seed realigned
    vs retrained images should nearly coincide, so the eval sums in fp64 (tiny differences survive); the DPO
    loss passes fp32, its training precision."""
    if a.shape != b.shape:
        raise ValueError(f"batches differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    return (a.to(dtype) - b.to(dtype)).pow(2).flatten(1).mean(1).float()


@dataclass
class DPOLossOutput:
    """The scalar loss plus the diagnostics a trainer logs (all detached except `loss`)."""

    loss: torch.Tensor
    model_diff: torch.Tensor  # mse_w - mse_l under the policy, [B]
    ref_diff: torch.Tensor  # mse_w_ref - mse_l_ref under the reference, [B]
    margin: torch.Tensor  # implicit reward margin r_w - r_l, [B]
    implicit_acc: torch.Tensor  # fraction of pairs with margin > 0 (ties count 1/2), scalar

    def metrics(self) -> dict[str, float]:
        return {
            "implicit_acc": float(self.implicit_acc),
            "model_diff": float(self.model_diff.mean()),
            "ref_diff": float(self.ref_diff.mean()),
            "reward_margin": float(self.margin.mean()),
        }


def diffusion_dpo_loss(
    model_pred: torch.Tensor,
    ref_pred: torch.Tensor,
    target: torch.Tensor,
    beta: float,
    loss_type: LossType = "sigmoid",
) -> DPOLossOutput:
    """Diffusion-DPO on a concatenated batch: rows [0, B) are winners, rows [B, 2B) the paired losers.

    `model_pred`/`ref_pred`/`target`: [2B, ...]; `ref_pred` comes from the reference (adapter disabled,
    no grad). `loss_type`: sigmoid (DPO) or hinge (SLiC-style ``relu(1 - margin)``).
    """
    if model_pred.shape[0] % 2:
        raise ValueError(f"batch of {model_pred.shape[0]} rows cannot be split into winner/loser halves")
    mse = per_sample_mse(model_pred, target, torch.float32)  # fp32: the training step's precision, with gradients
    ref_mse = per_sample_mse(ref_pred, target, torch.float32).detach()
    mse_w, mse_l = mse.chunk(2)
    ref_w, ref_l = ref_mse.chunk(2)
    model_diff = mse_w - mse_l
    ref_diff = ref_w - ref_l
    margin = -0.5 * beta * (model_diff - ref_diff)
    if loss_type == "sigmoid":
        loss = -F.logsigmoid(margin).mean()
    elif loss_type == "hinge":
        loss = F.relu(1 - margin).mean()
    else:
        raise ValueError(f"unsupported DPO loss type {loss_type!r}")
    m = margin.detach()
    acc = ((m > 0).float() + 0.5 * (m == 0).float()).mean()
    return DPOLossOutput(loss, model_diff.detach(), ref_diff.detach(), m, acc)
