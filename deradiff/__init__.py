"""deradiff: train one aligned LoRA at one KL strength, explore every other strength at sampling time.

DeRaDiff (arXiv 2601.20198): the KL-regularized optimum at strength beta/l is proportional to
p_ref^(1-l) * p_beta^l; for Gaussian reverse steps that is a per-step linear mix of the two predictions.
"""

from typing import Any

__version__ = "0.1.0"

__all__ = ["realign", "tune", "unrealign", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy so `import deradiff` (and the CLI's --help) stays fast and free of diffusers imports.
    if name in ("realign", "unrealign"):
        from deradiff.realignment import api

        return getattr(api, name)
    if name == "tune":
        from deradiff.tuning.api import tune

        return tune
    if name in ("world", "rewards", "config", "models"):
        import importlib

        return importlib.import_module(f"deradiff.{name}")
    raise AttributeError(f"module 'deradiff' has no attribute {name!r}")
