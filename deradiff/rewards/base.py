"""One reward interface and a name -> factory registry.

Every reward, built-in or a lazy wrapper around a real model added elsewhere, is a callable
`(images [B,3,H,W] in [0,1], prompts) -> FloatTensor[B]` with a `name` and a `higher_is_better` flag, and is
obtained by name through `get_reward`, so configs can name rewards as plain strings.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from typing import Callable, Sequence, TypeVar

import torch

from deradiff.errors import ConfigError


class Reward(ABC):
    """A per-image score of images given their prompts."""

    name: str = "reward"
    higher_is_better: bool = True
    differentiable: bool = False  # score() is a torch function of the pixels (reward-gradient training may use it)

    @abstractmethod
    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Scores [B] for images [B,3,H,W] in [0,1]; inputs already validated."""

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Validate shapes/ranges once here, so every reward fails the same clear way on bad input."""
        self._check(images, prompts)
        return self.score(images.detach().float().clamp(0, 1), list(prompts)).float()

    def with_grad(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Scores that backpropagate into `images` (only for rewards marked differentiable)."""
        if not self.differentiable:
            raise ValueError(f"reward {self.name!r} is not differentiable; reward-gradient training needs one that is")
        self._check(images, prompts)
        return self.score(images.float().clamp(0, 1), list(prompts)).float()

    def _check(self, images: torch.Tensor, prompts: Sequence[str]) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"reward {self.name!r} expects images [B,3,H,W], got {tuple(images.shape)}")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"reward {self.name!r}: {images.shape[0]} images but {len(prompts)} prompts")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, higher_is_better={self.higher_is_better})"


R = TypeVar("R", bound=Callable[..., Reward])
_REGISTRY: dict[str, Callable[..., Reward]] = {}


def register_reward(name: str) -> Callable[[R], R]:
    """Decorator registering a Reward class or factory under `name` (names are unique)."""

    def decorator(factory: R) -> R:
        if name in _REGISTRY:
            raise ValueError(f"reward {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return decorator


def available_rewards() -> list[str]:
    """Registered reward names, sorted."""
    return sorted(_REGISTRY)


def check_reward_name(name: str, key: str | None = None) -> None:
    """ConfigError unless `name` is a registered reward; `key`: the config key that named it (config load)."""
    if name not in _REGISTRY:
        where = f"config key {key!r} names unknown reward" if key else "unknown reward"
        raise ConfigError(f"{where} {name!r}; known rewards: {', '.join(available_rewards())}")


def is_differentiable(name: str) -> bool:
    """Whether the reward registered as `name` scores with torch ops (checked without building it)."""
    check_reward_name(name)
    return bool(getattr(_REGISTRY[name], "differentiable", False))


def get_reward(name: str, **kwargs) -> Reward:
    """Build the reward registered as `name`; an unknown name or option is a ConfigError listing the valid ones."""
    check_reward_name(name)
    factory = _REGISTRY[name]
    _check_options(name, inspect.signature(factory), kwargs)
    reward = factory(**kwargs)
    reward.name = name
    return reward


def _check_options(name: str, signature: inspect.Signature, kwargs: dict) -> None:
    """A ConfigError naming the unknown options (or the missing required ones) of reward `name`."""
    params = signature.parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return  # the reward takes any keyword: it checks its own options
    named = [p for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    unknown = sorted(set(kwargs) - {p.name for p in named})
    if unknown:
        raise ConfigError(f"reward {name!r} does not take options {unknown}; it accepts: "
                          f"{', '.join(p.name for p in named) or 'no options'}")
    missing = [p.name for p in named if p.default is inspect.Parameter.empty and p.name not in kwargs]
    if missing:
        raise ConfigError(f"reward {name!r} needs options {missing} (pass them in the config's reward options)")
