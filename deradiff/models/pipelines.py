"""Loading base pipelines and trained LoRAs, with errors that say what is wrong and what to do.

Everything goes through stock diffusers (`DiffusionPipeline.from_pretrained`, `pipe.load_lora_weights`);
this module only checks inputs first and turns failures into one-line `DeradiffError`s. Weights are read
from safetensors only (`.bin` files are pickles that can run code when loaded).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from deradiff.errors import DeradiffError

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
LORA_METADATA = "deradiff_metadata.json"  # written by deradiff.models.lora.save_lora
LORA_METADATA_ATTR = "_deradiff_lora_metadata"  # what load_lora read; the default beta of realign and tune
# Key prefixes of text-encoder LoRA layers: diffusers' format, then kohya's (lora_te_, lora_te1_, lora_te2_).
TEXT_ENCODER_PREFIXES = ("text_encoder.", "text_encoder_2.", "lora_te_", "lora_te1_", "lora_te2_")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def load_pipeline(base: str | Path, *, torch_dtype: Any = None, device: Any = None, **kwargs: Any) -> Any:
    """A diffusers pipeline (SD, SDXL, ...) from a local diffusers folder or a Hugging Face Hub id.

    The class comes from the folder's model_index.json (DiffusionPipeline dispatch). Safety checkers are
    kept when the model ships one; extra `kwargs` go to `from_pretrained`.
    """
    from diffusers import DiffusionPipeline

    source = _pipeline_source(str(base))
    kwargs.setdefault("use_safetensors", True)
    try:
        pipe = DiffusionPipeline.from_pretrained(source, torch_dtype=torch_dtype, **kwargs)
    except (OSError, ValueError, EnvironmentError) as exc:
        raise DeradiffError(f"could not load a diffusers pipeline from '{base}': {_first_line(exc)}") from exc
    if device is not None:
        pipe.to(device)
    return pipe


def resolve_base_model(pretrained: str) -> str:
    """'tiny' → the embedded tiny world model folder; anything else as given."""
    if pretrained != "tiny":
        return pretrained
    from deradiff.world import TINY_MODEL_DIR

    if not (Path(TINY_MODEL_DIR) / "model_index.json").is_file():
        raise DeradiffError(f"the embedded tiny model is not built at {TINY_MODEL_DIR}; run `deradiff tiny pretrain` first")
    return str(TINY_MODEL_DIR)


def _pipeline_source(base: str) -> str:
    """Validate a local folder (must hold model_index.json) or accept an 'org/name' hub id."""
    path = Path(base).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "model_index.json").is_file():
            raise DeradiffError(
                f"'{base}' is not a diffusers model folder (no model_index.json); save one with "
                "pipe.save_pretrained(folder) or give a hub id like 'stabilityai/stable-diffusion-xl-base-1.0'"
            )
        _refuse_pickle_only_components(path, base)
        return str(path)
    if _HUB_ID.match(base) and not base.startswith((".", "/", "~")):
        return base
    raise DeradiffError(f"base model '{base}' does not exist (expected a diffusers folder or a hub id 'org/name')")


def _refuse_pickle_only_components(path: Path, base: str) -> None:
    """Name the components whose weights exist only as pickles (.bin), instead of diffusers' 'file not found'."""
    pickled = sorted(
        f"{sub.name}/{next(iter(sorted(p.name for p in sub.glob('*.bin'))))}"
        for sub in path.iterdir()
        if sub.is_dir() and any(sub.glob("*.bin")) and not any(sub.glob("*.safetensors"))
    )
    if pickled:
        raise DeradiffError(
            f"base model '{base}' has only pickle weights for {', '.join(pickled)}; deradiff loads safetensors only "
            "because pickles can run code when loaded. Re-save it with pipe.save_pretrained(folder) "
            "(safe_serialization=True, the default)"
        )


def read_lora_metadata(lora_dir: str | Path) -> dict[str, Any] | None:
    """The trainer's deradiff_metadata.json next to the LoRA (base_model, method, beta, ...), or None."""
    path = Path(lora_dir) / LORA_METADATA
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DeradiffError(f"LoRA metadata '{path}' is not valid JSON: {_first_line(exc)}") from None
    if not isinstance(data, dict):
        raise DeradiffError(f"LoRA metadata '{path}' must hold a JSON object, got {type(data).__name__}")
    beta = data.get("beta")
    if beta is not None and (isinstance(beta, bool) or not isinstance(beta, (int, float)) or beta <= 0):
        raise DeradiffError(f"LoRA metadata '{path}': beta must be a positive number, got {beta!r}")
    return data


def load_lora(pipe: Any, lora_dir: str | Path, adapter_name: str | None = None) -> dict[str, Any] | None:
    """Attach the LoRA in `lora_dir` to `pipe` (stock `load_lora_weights`); returns its deradiff metadata.

    The metadata is also remembered on the pipeline so `deradiff.realign(pipe)` knows beta.
    """
    folder = Path(lora_dir).expanduser()
    weight_name = _lora_weight_file(folder)
    check_lora_file(folder / weight_name)
    metadata = read_lora_metadata(folder)
    before = _adapter_names(pipe)
    peft_layout = _from_peft_layout(folder, weight_name, pipe)
    try:
        if peft_layout is not None:
            pipe.load_lora_weights(peft_layout, adapter_name=adapter_name)
        else:  # diffusers' own layout, or kohya/A1111 keys (diffusers converts them)
            pipe.load_lora_weights(str(folder), weight_name=weight_name, adapter_name=adapter_name)
    except (RuntimeError, ValueError, KeyError) as exc:
        if _is_shape_error(exc):
            raise DeradiffError(
                f"LoRA at {folder} was trained for a different architecture than this "
                f"{type(pipe).__name__} ({_first_line(exc, prefer='size mismatch')})"
            ) from exc
        raise DeradiffError(f"could not load the LoRA at {folder}: {_first_line(exc)}") from exc
    if _adapter_names(pipe) == before:
        raise DeradiffError(
            f"LoRA at {folder} was trained for a different architecture: none of its weights match this "
            f"{type(pipe).__name__}"
        )
    pipe.__dict__[LORA_METADATA_ATTR] = metadata
    return metadata


PEFT_CONFIG = "adapter_config.json"  # written beside the weights by peft's save_pretrained


def _from_peft_layout(folder: Path, weight_name: str, pipe: Any) -> dict[str, Any] | None:
    """The state dict of a LoRA saved by peft itself (keys `base_model.model.<module>.lora_A.weight`, or bare
    `<module>.lora_A.weight`, with lora_alpha in adapter_config.json), in the keys diffusers loads; None for any
    other layout. diffusers reads alpha only from its own layouts, so alpha / r is folded into lora_B (the
    adapter's output is B A x * alpha / r either way)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(folder / weight_name), framework="pt") as f:  # keys only: other layouts load elsewhere
        keys = list(f.keys())
    known = ("unet.", "transformer.", "text_encoder", "lora_unet_", "lora_te")
    if any(k.startswith(known) for k in keys) or not any(".lora_A." in k for k in keys):
        return None
    weights = load_file(str(folder / weight_name))
    config = folder / PEFT_CONFIG
    peft = json.loads(config.read_text()) if config.is_file() else {}
    scale = float(peft.get("lora_alpha", 1.0)) / float(peft.get("r", 1.0)) if "lora_alpha" in peft else 1.0
    prefix = "unet." if getattr(pipe, "unet", None) is not None else "transformer."
    return {prefix + k.removeprefix("base_model.model."): (v * scale if ".lora_B." in k else v)
            for k, v in weights.items()}


def loaded_lora_beta(pipe: Any) -> float | None:
    """The beta in the metadata of the LoRA `load_lora` put on `pipe` (None: no LoRA loaded, or no beta)."""
    beta = (pipe.__dict__.get(LORA_METADATA_ATTR) or {}).get("beta")
    return float(beta) if isinstance(beta, (int, float)) and not isinstance(beta, bool) else None


def _lora_weight_file(folder: Path) -> str:
    """The safetensors file to load; refuses missing folders and pickle-only (.bin/.pt) LoRAs."""
    if not folder.is_dir():
        raise DeradiffError(f"LoRA folder '{folder}' does not exist (expected a folder with {LORA_WEIGHTS})")
    if (folder / LORA_WEIGHTS).is_file():
        return LORA_WEIGHTS
    candidates = sorted(p.name for p in folder.glob("*.safetensors"))
    if len(candidates) == 1:
        return candidates[0]
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickles:
        raise DeradiffError(
            f"LoRA at {folder} has only pickle weights ({', '.join(pickles)}); deradiff loads safetensors only "
            "because pickles can run code when loaded. Convert once with safetensors.torch.save_file"
        )
    if candidates:
        raise DeradiffError(f"LoRA folder '{folder}' has several .safetensors files ({', '.join(candidates)}); "
                            f"name the LoRA {LORA_WEIGHTS}")
    raise DeradiffError(f"LoRA folder '{folder}' has no {LORA_WEIGHTS}")


def _adapter_names(pipe: Any) -> set[str]:
    names: set[str] = set()
    for component in ("unet", "transformer", "text_encoder", "text_encoder_2"):
        config = getattr(getattr(pipe, component, None), "peft_config", None)
        if isinstance(config, dict):
            names |= {f"{component}:{name}" for name in config}
    return names


def _is_shape_error(exc: BaseException) -> bool:
    text = str(exc).lower()
    return any(s in text for s in ("size mismatch", "shape", "target modules", "not found in the base model"))


def _first_line(exc: BaseException, prefer: str = "") -> str:
    """One line of an exception message for a one-line error (the first containing `prefer` if any)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    preferred = [line for line in lines if prefer and prefer in line]
    return (preferred or lines or [type(exc).__name__])[0]


def check_lora_dir(lora_dir: str | os.PathLike, key: str = "lora_dir") -> None:
    """Refuse, before anything loads, a LoRA folder deradiff cannot sample correctly: missing, not a folder,
    without exactly one safetensors LoRA, with damaged metadata, or with weights that adapt a text encoder or
    hold non-finite values (see `check_lora_file`). `key`: the config key that named the folder."""
    folder = Path(lora_dir).expanduser()
    if not folder.exists():
        raise DeradiffError(f"config key '{key}': LoRA folder '{folder}' does not exist (expected a folder with {LORA_WEIGHTS})")
    if not folder.is_dir():
        raise DeradiffError(f"config key '{key}': '{folder}' is a file; expected a LoRA folder with {LORA_WEIGHTS}")
    check_lora_file(folder / _lora_weight_file(folder))
    read_lora_metadata(folder)


def check_lora_file(path: str | os.PathLike) -> None:
    """Refuse text-encoder layers and NaN/inf weights in one safetensors LoRA file, naming the file.

    Why text encoders: realignment encodes the prompt once for both branches, so a text-encoder adapter would
    stay on in the reference and lambda 0 would not be the base model. Why finite: a corrupt file with a valid
    header otherwise loads and samples NaN images without any error.
    """
    import torch
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as weights:
            _check_no_text_encoder(path, list(weights.keys()))
            for key in weights.keys():
                if not torch.isfinite(weights.get_tensor(key)).all():
                    raise DeradiffError(f"LoRA file '{path}' has non-finite weights (NaN or inf) in '{key}'; "
                                        "the file is corrupt or its training diverged")
    except SafetensorError as exc:
        raise DeradiffError(f"LoRA file '{path}' is not a readable safetensors file: {exc}") from None


def _check_no_text_encoder(path: str | os.PathLike, keys: list[str]) -> None:
    key = next((k for k in keys if k.startswith(TEXT_ENCODER_PREFIXES)), None)
    if key is not None:
        raise DeradiffError(f"LoRA file '{path}' adapts the text encoder ('{key}'); deradiff realigns UNet-only "
                            "LoRAs (both branches share one prompt encoding, so lambda 0 would not be the base)")
