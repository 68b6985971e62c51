"""LoRAs in the layouts people publish load through `deradiff.models.load_lora` (and so the realign CLI, the eval
and tune) with the same weights: kohya/A1111 keys, and peft's own `save_pretrained` layout with its alpha."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from diffusers.utils import convert_state_dict_to_kohya
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from deradiff.models.pipelines import load_lora
from deradiff.testing import tiny_sd_pipeline


def _lora_pipe(alpha: int):
    pipe = tiny_sd_pipeline()
    torch.manual_seed(1)
    pipe.unet.add_adapter(peft.LoraConfig(r=4, lora_alpha=alpha, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                          init_lora_weights=False))
    return pipe


def _unet_output(pipe) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    x, e = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 16, 32, generator=gen)
    with torch.no_grad():
        return pipe.unet(x, torch.tensor(500), encoder_hidden_states=e).sample


@pytest.mark.parametrize("layout", ["kohya", "peft_prefixed", "peft_bare"])
def test_published_layouts_load_with_the_same_weights(layout, tmp_path):
    source = _lora_pipe(alpha=8)  # alpha != r: a layout that drops alpha would halve the adapter
    expected = _unet_output(source)
    state = {k: v.contiguous() for k, v in get_peft_model_state_dict(source.unet).items()}
    folder = tmp_path / layout
    folder.mkdir()
    if layout == "kohya":
        keys = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in state.items()})
        keys.update({k: torch.tensor(8.0) for k in keys if k.endswith(".alpha")})
        save_file({k: v.contiguous() for k, v in keys.items()}, folder / "my_style.safetensors")
    else:
        prefix = "base_model.model." if layout == "peft_prefixed" else ""
        save_file({prefix + k: v for k, v in state.items()}, folder / "adapter_model.safetensors")
        (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "peft_type": "LORA"}))
    target = tiny_sd_pipeline()
    assert not torch.allclose(_unet_output(target), expected)
    load_lora(target, folder)
    torch.testing.assert_close(_unet_output(target), expected, rtol=1e-5, atol=1e-6)
