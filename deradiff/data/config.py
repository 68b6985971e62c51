"""Config schemas of the preference data: `PrefsSection` (`data.generate` in a DPO config, `generate` in
`deradiff data prefs`) and `PrefsConfig` (the whole `deradiff data prefs` config).

Light to import (dataclasses only; the reward registry loads inside `check`): `deradiff data --help` builds
its options from these classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from deradiff.config import check_device, check_min, check_positive, check_seed, option


@dataclass
class PrefsSection:
    """How `data.source: tiny` preference pairs are generated when the file is missing (see `deradiff data prefs`)."""

    reward: str = option("vividness", "reward (deradiff.rewards registry) that labels the pairs")
    reward_options: dict[str, Any] = option({}, "keyword arguments for the reward, e.g. {model_path: /models/PickScore_v1}")
    temperature: float = option(0.05, "Bradley-Terry temperature: P(a preferred) = sigmoid((r_a - r_b) / T)")
    pairs_per_prompt: int = option(4, "image pairs sampled per train prompt")
    num_inference_steps: int = option(20, "sampling steps for the pair images")
    guidance_scale: float = option(3.0, "classifier-free guidance for the pair images")
    seed: int = option(0, "seed for sampling and labelling")

    def check(self, prefix: str) -> None:
        """Fails at config load, not after the model has sampled every pair; `prefix` is where this section sits
        in the user's config (the section does not know its own path), e.g. 'data.generate.'."""
        from deradiff.rewards import check_reward_name

        check_reward_name(self.reward, f"{prefix}reward")
        check_seed(self.seed, f"{prefix}seed")
        check_min(self, prefix, {"pairs_per_prompt": 1, "num_inference_steps": 1, "guidance_scale": 0})
        check_positive(self, prefix, ["temperature"])


@dataclass
class PrefsConfig:
    """Where to write the pairs and how to make them."""

    output_dir: str = option("outputs/tiny/prefs", "folder for train.parquet (Pick-a-Pic columns; relative: to the "
                                                    "current directory)")
    base_model: str = option("tiny", "model that samples the pairs: 'tiny' or a diffusers folder")
    generate: PrefsSection = option(factory=PrefsSection, help="sampling and labelling")
    device: str = option("auto", "torch device that samples the pairs: auto (cuda when available), cpu, cuda:1, ...")
    overwrite: bool = option(False, "replace an existing output_dir/train.parquet instead of refusing")

    def validate(self) -> None:
        self.generate.check("generate.")
        check_device(self.device, "device")
