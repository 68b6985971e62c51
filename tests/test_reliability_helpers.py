"""Helpers (no tests) shared by the reliability, bad-input, safe-loading and determinism tests.

Everything runs the real `deradiff` CLI entry (`deradiff.cli.main`) on a tiny random SD model saved to disk
and a tiny Pick-a-Pic parquet, so the checks cover config loading, data cleaning, training and sampling as
a user runs them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from safetensors.torch import load_file

from deradiff import cli
from deradiff.testing import save_tiny_base, write_pairs

LORA_FILE = "pytorch_lora_weights.safetensors"


def tiny_assets(root: Path) -> dict[str, Path]:
    """A saved tiny random SD base, 8 clean preference pairs and a DPO config that trains in ~1 s."""
    root.mkdir(parents=True, exist_ok=True)
    base = Path(save_tiny_base(root / "base"))
    data = Path(write_pairs(root / "pairs.parquet", 8))
    config = root / "dpo.yaml"
    config.write_text(yaml.safe_dump(dpo_config(base, data, root / "cache")))
    return {"root": root, "base": base, "data": data, "config": config}


def dpo_config(base: Path, data: Path, cache: Path, max_steps: int = 8) -> dict[str, Any]:
    """A complete DPO config except output_dir: checkpoints every step, accumulation 2, fixed seed."""
    return {
        "data": {"source": str(data), "cache_dir": str(cache)},
        "model": {"pretrained": str(base)},
        "tracker": {"backend": "none"},
        "lora": {"rank": 2},
        "optim": {"lr": 1e-2, "warmup_steps": 2},
        "train": {"max_steps": max_steps, "micro_batch_size": 2, "gradient_accumulation_steps": 2,
                  "checkpoint_every": 1, "keep_checkpoints": 2, "seed": 5, "log_every": 1},
        "dpo": {"beta": 5000.0},
    }


def train_args(config: Path, out: Path, *overrides: str) -> list[str]:
    return ["train", "dpo", "--config", str(config), f"output_dir={out}", *overrides]


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of one in-process `deradiff` call."""
    capsys.readouterr()
    code = cli.main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def lora_tensors(run_dir: Path) -> dict:
    return load_file(str(run_dir / "lora" / LORA_FILE))


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def files_under(folder: Path) -> list[str]:
    """Every file below `folder` (relative paths), empty if the folder does not exist."""
    if not folder.exists():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def write_lora(folder: Path, pipe: Any, metadata: dict | None) -> Path:
    """Save `pipe.unet`'s peft adapter with stock diffusers (+ optional deradiff metadata)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from peft.utils import get_peft_model_state_dict

    cls = StableDiffusionXLPipeline if getattr(pipe, "text_encoder_2", None) is not None else StableDiffusionPipeline
    cls.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(pipe.unet))
    if metadata is not None:
        (folder / "deradiff_metadata.json").write_text(json.dumps(metadata))
    return folder
