"""One config system for every stage: typed dataclasses + YAML + `key=value` overrides."""

from deradiff.config.checks import (SEED_MAX, check_device, check_file, check_min, check_positive, check_prompt_source,
                                    check_seed, check_seeds)
from deradiff.config.loader import REQUIRED, config_to_dict, describe, load_config, option, save_config, validated

__all__ = ["REQUIRED", "SEED_MAX", "check_device", "check_file", "check_min", "check_positive", "check_prompt_source",
           "check_seed", "check_seeds", "config_to_dict", "describe", "load_config", "option", "save_config",
           "validated"]
