"""LoRA on a diffusers UNet: attach, switch off for the reference model, save with provenance metadata.

Why one UNet: the KL reference of Diffusion-DPO / DDPO is the frozen base model, which is exactly the
adapted UNet with its adapter disabled. Disabling the adapter (peft) instead of keeping a second copy
halves memory and guarantees the reference and the policy share every base weight bit for bit.

The saved file is diffusers' own format (`pytorch_lora_weights.safetensors` written by
`save_lora_weights`, with the peft rank/alpha stored in the safetensors metadata), so a stock
`pipe.load_lora_weights(out_dir)` loads it; `deradiff_metadata.json` next to it records how it was made.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from deradiff.errors import DeradiffError
from deradiff.fileio import match_umask, replace_dir
from deradiff.models.card import CARD_NAME, model_card
from deradiff.models.pipelines import LORA_METADATA, LORA_WEIGHTS

DEFAULT_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare module under DDP / DeepSpeed / torch.compile wrappers (they all expose `.module` or `_orig_mod`)."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def attach_lora(
    unet: torch.nn.Module,
    rank: int = 4,
    alpha: float | None = None,
    target_modules: Sequence[str] = DEFAULT_TARGET_MODULES,
    init: str | bool = "gaussian",
) -> list[torch.nn.Parameter]:
    """Freeze `unet`, add a peft LoRA adapter ("default") and return its trainable parameters.

    `alpha` defaults to `rank` (scale 1), the convention of diffusers' LoRA training scripts.
    Gaussian init (peft: A ~ N(0, 1/r), B = 0) starts the adapted model exactly at the base model.
    """
    from diffusers.training_utils import cast_training_params

    unet.requires_grad_(False)
    config = LoraConfig(
        r=rank,
        lora_alpha=float(alpha if alpha is not None else rank),
        init_lora_weights=init,
        target_modules=list(target_modules),
    )
    names = [name for name, _ in unet.named_modules()]
    if not any(n == t or n.endswith(f".{t}") for n in names for t in target_modules):  # peft's suffix rule
        raise DeradiffError(f"config key 'lora.target_modules' {list(target_modules)} matches no layer of the UNet")
    unet.add_adapter(config)
    # LoRA weights train in fp32 even when the frozen base is bf16/fp16
    cast_training_params(unet, dtype=torch.float32)
    return [p for p in unet.parameters() if p.requires_grad]


def lora_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The peft tuner layers in `model` (empty when it carries no adapter)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def adapter_disabled(unet: torch.nn.Module, layers: list[torch.nn.Module] | None = None) -> Iterator[torch.nn.Module]:
    """Run the frozen base model: the same UNet with every LoRA adapter switched off, restored on exit.

    Yields the unwrapped UNet: call it for the reference pass, not the DDP/DeepSpeed wrapper, so no gradient-sync
    hooks fire for a forward that has no backward. On exit each layer's on/off state *and* the adapter weights'
    requires_grad flags are restored: peft's `enable_adapters` flips requires_grad as a side effect, and a
    training loop or a realigned pipeline sharing the model must not see that. `layers`: the model's
    `lora_layers` when the caller has them already.
    """
    model = unwrap(unet)
    layers = lora_layers(model) if layers is None else layers
    states = [(layer, layer.disable_adapters) for layer in layers]
    grads = [(p, p.requires_grad) for layer in layers for name in layer.adapter_layer_names
             for p in getattr(layer, name).parameters()]
    try:
        for layer, _ in states:
            layer.enable_adapters(False)
        yield model
    finally:
        for layer, was_disabled in states:
            layer.enable_adapters(not was_disabled)
        for param, flag in grads:
            param.requires_grad_(flag)


def lora_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights in peft key format (what `save_lora_weights` converts for diffusers)."""
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in get_peft_model_state_dict(unwrap(unet)).items()}


def _pipeline_class(unet: torch.nn.Module) -> type:
    """The pipeline class a LoRA of this UNet saves with: SDXL or SD."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from deradiff.models.family import is_sdxl

    return StableDiffusionXLPipeline if is_sdxl(unet) else StableDiffusionPipeline


def _stable(value: Any) -> Any:
    """`value` with every set turned into a sorted list. Why: peft keeps target_modules as a set, whose order
    follows string hashing and so changes between processes; diffusers writes it into the safetensors header
    as listed, which made LoRA files of identical runs differ byte for byte."""
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


def _sort_header_metadata(path: Path) -> None:
    """Rewrite a safetensors file with the keys of its header's `__metadata__` sorted. Why: safetensors keeps
    that map in a Rust HashMap and writes it in an order that changes from call to call, so two saves of one
    adapter differed byte for byte. Tensor entries and data are kept as written."""
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads the header with spaces to an 8-byte boundary
    path.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + size :])


def save_lora(
    unet: torch.nn.Module,
    out_dir: str | os.PathLike,
    metadata: dict[str, Any],
    pipeline_cls: type | None = None,
) -> Path:
    """Write `out_dir/pytorch_lora_weights.safetensors` + `deradiff_metadata.json` + a model card atomically.

    Written into a sibling temp dir, then renamed over `out_dir`: a crash mid-save never leaves a
    half-written LoRA where a loader (or a resumed run) would pick it up. `metadata` should carry
    base_model, method, beta, loss_type, steps, seed, data_fingerprint; rank/alpha/targets are added here.
    """
    model = unwrap(unet)
    pipeline_cls = pipeline_cls or _pipeline_class(model)
    peft_config = model.peft_config["default"]
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()  # not mkdtemp: its 0700 would make the finished LoRA folder private to its writer
    try:
        pipeline_cls.save_lora_weights(
            str(tmp),
            unet_lora_layers=lora_state_dict(model),
            safe_serialization=True,
            unet_lora_adapter_metadata=_stable(peft_config.to_dict()),
        )
        _sort_header_metadata(tmp / LORA_WEIGHTS)  # before the folder is published
        full = {
            **metadata,
            "lora_rank": peft_config.r,
            "lora_alpha": peft_config.lora_alpha,
            "lora_target_modules": sorted(peft_config.target_modules),
            "pipeline_class": pipeline_cls.__name__,
        }
        (tmp / LORA_METADATA).write_text(json.dumps(full, indent=2, sort_keys=True, default=str))
        (tmp / CARD_NAME).write_text(model_card(full))
        match_umask(tmp)
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
