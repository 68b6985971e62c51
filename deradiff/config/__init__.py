"""One config system for every stage: typed dataclasses + YAML + `key=value` overrides."""

from deradiff.config.loader import REQUIRED, config_to_dict, describe, load_config, option, save_config

__all__ = ["REQUIRED", "config_to_dict", "describe", "load_config", "option", "save_config"]
