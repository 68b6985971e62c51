"""Models: loading base pipelines and LoRAs (`deradiff.models.pipelines`), LoRA attach/save for training
(`deradiff.models.lora`), a base pipeline set up for training (`deradiff.models.training`). Submodules are
imported on use so `import deradiff.models` stays light."""

from typing import Any

_PIPELINE_NAMES = ("load_pipeline", "load_lora", "read_lora_metadata")


def __getattr__(name: str) -> Any:
    if name in _PIPELINE_NAMES:
        from deradiff.models import pipelines

        return getattr(pipelines, name)
    raise AttributeError(f"module 'deradiff.models' has no attribute {name!r}")
