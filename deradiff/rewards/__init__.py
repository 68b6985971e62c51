"""Rewards: one `Reward` interface, a registry (`get_reward(name, **kwargs)`, `@register_reward(name)`).

Built-ins: `vividness`, `jpeg_compressibility`, `jpeg_incompressibility`, `fidelity` (tiny world).
"""

from deradiff.rewards import builtin as _builtin  # noqa: F401  (registers the built-in rewards)
from deradiff.rewards.base import Reward, available_rewards, get_reward, register_reward
from deradiff.rewards.builtin import jpeg_kilobytes

__all__ = ["Reward", "available_rewards", "get_reward", "jpeg_kilobytes", "register_reward"]
