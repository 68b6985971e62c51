"""CUDA checks, deselected by default (`-m gpu` runs them; benchmarks/gpu_check.sh does on a GPU machine).

The CPU suite proves the math; these prove the same code paths hold on a GPU in half precision: the stacked
realigned forward agrees with the two-call one, and a DPO run in bf16 trains and saves a LoRA that the
stock pipeline loads.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import deradiff
from deradiff.config import load_config
from deradiff.models.pipelines import load_lora, load_pipeline
from deradiff.testing import save_tiny_base, write_pairs
from deradiff.training.config import DPOConfig
from deradiff.training.dpo import run_dpo
from deradiff.training.tracking import RecordingTracker

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_stacked_realign_matches_two_calls_on_cuda(lora_sd_pipe, dtype):
    pipe = lora_sd_pipe.to("cuda", dtype)
    outputs = {}
    for batch in (True, False):
        handle = deradiff.realign(pipe, lam=0.5, branches="stacked" if batch else "two-call")
        out = pipe("a red circle", generator=torch.Generator("cuda").manual_seed(0), num_inference_steps=4,
                   eta=1.0, output_type="latent").images
        assert handle.denoiser.branches.last_path == ("batched" if batch else "two-call")
        handle.undo()
        outputs[batch] = out.float()
    scale = float(outputs[False].abs().max())
    torch.testing.assert_close(outputs[True], outputs[False], rtol=2e-2, atol=2e-2 * scale)


def test_dpo_trains_in_bf16_on_cuda(tmp_path):
    base = save_tiny_base(tmp_path / "base")
    data = write_pairs(tmp_path / "pairs.parquet", 8)
    cfg = load_config(DPOConfig, None, [
        f"output_dir={tmp_path / 'run'}", f"data.source={data}", f"model.pretrained={base}", "tracker.backend=none",
        "train.max_steps=3", "train.micro_batch_size=4", "train.mixed_precision=bf16", "optim.lr=1e-2",
    ])
    tracker = RecordingTracker()
    summary = run_dpo(cfg, tracker=tracker)
    assert summary["steps_run"] == 3
    assert all(torch.isfinite(torch.tensor(loss)) for loss in tracker.series("loss"))
    # trained: LoRA B starts at zero (gaussian init), so a non-zero B means the updates reached the file
    weights = load_file(str(tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors"))
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in weights.items())
    # loadable: the stock pipeline takes it and its UNet output changes
    pipe = load_pipeline(base, device="cuda")
    x, text = torch.randn(1, 4, 8, 8, device="cuda"), torch.randn(1, 16, pipe.unet.config.cross_attention_dim, device="cuda")
    before = pipe.unet(x, 500, text).sample
    load_lora(pipe, str(tmp_path / "run" / "lora"))
    assert not torch.allclose(pipe.unet(x, 500, text).sample, before)
