"""Real Diffusion-DPO on the embedded tiny world: DPO raises held-out reward over the base model, and a
smaller beta (weaker KL) raises it more and drifts further from the base. Needs the trained tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deradiff.config import load_config

world = pytest.importorskip("deradiff.world")
pytestmark = [
    pytest.mark.slow,  # 5-6 min on 2 cores (two DPO trainings + preference data): CI runs it with the study claims
    pytest.mark.skipif(not (Path(world.TINY_MODEL_DIR) / "model_index.json").is_file(),
                       reason="tiny world model not built (deradiff tiny pretrain)"),
]
REPO = Path(__file__).resolve().parents[1]


def _sample(lora_dir, prompts, seed=123):
    from deradiff.models.pipelines import load_lora, load_pipeline

    pipe = load_pipeline(world.TINY_MODEL_DIR)
    pipe.set_progress_bar_config(disable=True)
    if lora_dir is not None:
        load_lora(pipe, lora_dir)
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    return pipe(prompts, num_inference_steps=20, guidance_scale=3.0, generator=gens, output_type="pt").images


def test_dpo_raises_reward_and_smaller_beta_moves_further(tmp_path):
    from deradiff.rewards import get_reward
    from deradiff.training.config import DPOConfig
    from deradiff.training.dpo import run_dpo
    from deradiff.training.tracking import RecordingTracker

    prefs = tmp_path / "prefs.parquet"
    loras = {}
    for beta in (2000.0, 200.0):
        cfg = load_config(DPOConfig, REPO / "configs" / "tiny" / "dpo.yaml", [
            f"output_dir={tmp_path / f'b{int(beta)}'}", f"data.source={prefs}", f"dpo.beta={beta}",
            "tracker.backend=none", "train.checkpoint_every=0",
        ])
        run_dpo(cfg, tracker=RecordingTracker())
        loras[beta] = tmp_path / f"b{int(beta)}" / "lora"
    prompts = world.load_prompts("eval")[:32]
    reward = get_reward("vividness")
    base = _sample(None, prompts)
    hi, lo = _sample(loras[2000.0], prompts), _sample(loras[200.0], prompts)
    r = {name: reward(x, prompts).mean().item() for name, x in (("base", base), ("hi", hi), ("lo", lo))}
    drift_hi, drift_lo = (hi - base).abs().mean().item(), (lo - base).abs().mean().item()
    assert r["hi"] > r["base"], r
    assert r["lo"] > r["hi"], r
    assert drift_lo > drift_hi, (drift_lo, drift_hi)
