"""Range and environment checks that `validate` methods share, each failing with one line naming the key.

Seeds: accelerate's `set_seed` calls numpy's `np.random.seed`, which takes [0, 2**32 - 1]; torch generators
take more, but one range for every seed keeps a seed meaning the same everywhere, and a seed from which the
code derives a run of seeds (seed + i) must leave room for all of them, so no two draws share a seed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable, Mapping

from deradiff.errors import ConfigError

SEED_MAX = 2**32 - 1
_DEVICE = re.compile(r"(cuda|mps)(:([0-9]+))?")


def check_seed(value: int, key: str, count: int = 1) -> None:
    """`value` and the `count` seeds `value + i` the code derives from it lie in [0, SEED_MAX]."""
    high = SEED_MAX - (count - 1)
    if not 0 <= value <= high:
        derived = f" so that the {count} seeds {key} + 0..{count - 1} stay below 2**32" if count > 1 else ""
        raise ConfigError(f"config key '{key}' must be an integer in [0, {high}]{derived}, got {value}")


def check_seeds(values: Iterable[int], key: str) -> None:
    for i, value in enumerate(values):
        check_seed(value, f"{key}[{i}]")


def check_min(section: Any, prefix: str, minimums: Mapping[str, float]) -> None:
    """Each named field of `section` (unless null) is >= its minimum; `prefix` is the section's dotted key."""
    for name, low in minimums.items():
        value = getattr(section, name)
        if value is not None and value < low:
            raise ConfigError(f"config key '{prefix}{name}' must be >= {low}, got {value}")


def check_positive(section: Any, prefix: str, names: Iterable[str]) -> None:
    """Each named field of `section` (unless null) is > 0."""
    for name in names:
        value = getattr(section, name)
        if value is not None and value <= 0:
            raise ConfigError(f"config key '{prefix}{name}' must be > 0, got {value}")


def check_file(path: str, key: str, expected: str) -> None:
    """`path` is an existing file; the message says where relative paths are read from."""
    if not Path(path).is_file():
        raise ConfigError(f"config key '{key}' names '{path}', which does not exist (expected {expected}; a relative "
                          "path in a YAML is read from that YAML's folder, on the command line from the current one)")


def check_prompt_source(source: str | list[str], key: str) -> None:
    """A trainer's prompt source names the tiny world's train/eval split, an existing text file, or lists prompts."""
    if isinstance(source, list):
        if not any(p.strip() for p in source):
            raise ConfigError(f"config key '{key}' lists no prompts")
    elif source.startswith("world:"):
        if source not in ("world:train", "world:eval"):
            raise ConfigError(f"config key '{key}' must be world:train, world:eval, a text file or a list, got '{source}'")
    else:
        check_file(source, key, "a text file with one prompt per line, world:train or world:eval")


def check_device(value: str, key: str) -> None:
    """`value` is auto, cpu or a torch device this machine has; fails at config load, not deep inside torch.
    Imports torch only for accelerator names, so loading a cpu/auto config stays fast."""
    if value in ("auto", "cpu"):
        return
    match = _DEVICE.fullmatch(value)
    if match is None:
        _check_torch_device_name(value, key)
        return
    available = available_devices()
    kind, index = match[1], match[3]
    if not any(d.startswith(kind) for d in available):
        raise ConfigError(f"config key '{key}' is '{value}' but {kind.upper()} is not available on this machine "
                          f"(available devices: {', '.join(available)}); use {key}=auto or {key}=cpu")
    if index is not None and kind == "cuda" and f"cuda:{int(index)}" not in available:
        raise ConfigError(f"config key '{key}' is '{value}' but this machine has {len(available) - 1} CUDA device(s) "
                          f"(available devices: {', '.join(available)})")


def available_devices() -> list[str]:
    """cpu, then cuda:0..cuda:N-1 and mps where present."""
    import torch

    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        devices.append("mps")
    return devices


def _check_torch_device_name(value: str, key: str) -> None:
    """Other accelerators (xpu, ...) are accepted when torch knows the name; their availability is torch's."""
    import torch

    try:
        torch.device(value)
    except (RuntimeError, ValueError):
        raise ConfigError(f"config key '{key}' must be a torch device: auto, cpu, cuda, cuda:N or mps, got '{value}'") from None
