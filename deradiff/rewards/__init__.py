"""Rewards: one `Reward` interface, a registry (`get_reward(name, **kwargs)`, `@register_reward(name)`).

Built-ins: `vividness`, `jpeg_compressibility`, `jpeg_incompressibility`, `fidelity` (tiny world).
Model-backed (local safetensors weights, loaded only when built; docs/rewards.md): `clip_score`, `pickscore`,
`hpsv2`, `aesthetic`; `image_reward` is registered but raises a DeradiffError (not supported yet).
"""

from deradiff.rewards import builtin as _builtin  # noqa: F401  (registers the built-in rewards)
from deradiff.rewards import models as _models  # noqa: F401  (registers model rewards; imports only torch)
from deradiff.rewards.base import Reward, available_rewards, check_reward_name, get_reward, is_differentiable, register_reward
from deradiff.rewards.builtin import jpeg_kilobytes

__all__ = ["Reward", "available_rewards", "check_reward_name", "get_reward", "is_differentiable", "jpeg_kilobytes", "register_reward"]
