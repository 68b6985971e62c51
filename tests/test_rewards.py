"""Rewards: registry behaviour and hand-checkable values of the built-ins."""

import pytest
import torch

from deradiff.errors import ConfigError
from deradiff.rewards import Reward, available_rewards, get_reward, register_reward


def _solid(rgb, size=32):
    return torch.tensor(rgb, dtype=torch.float).view(1, 3, 1, 1).expand(1, 3, size, size).clone()


def test_registry_lists_builtins_and_rejects_unknown():
    assert {"vividness", "jpeg_compressibility", "jpeg_incompressibility", "fidelity"} <= set(available_rewards())
    with pytest.raises(ConfigError, match="'nope'.*vividness"):
        get_reward("nope")


def test_register_custom_reward():
    @register_reward("test_constant")
    class Constant(Reward):
        def __init__(self, value: float = 1.0):
            self.value = value

        def score(self, images, prompts):
            return torch.full((images.shape[0],), self.value)

    reward = get_reward("test_constant", value=2.0)
    assert reward.name == "test_constant" and reward.higher_is_better
    assert reward(torch.zeros(2, 3, 8, 8), ["a", "b"]).tolist() == [2.0, 2.0]
    with pytest.raises(ValueError, match="already registered"):
        register_reward("test_constant")(Constant)
    with pytest.raises(ValueError, match="prompts"):
        reward(torch.zeros(2, 3, 8, 8), ["a"])


def test_vividness_hand_values():
    r = get_reward("vividness")
    half = _solid([1.0, 1.0, 1.0])
    half[:, :, :, :16] = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)  # left half pure red
    images = torch.cat([_solid([1.0, 0, 0]), _solid([1.0, 1.0, 1.0]), _solid([0.5, 0.5, 0.5]), half,
                        _solid([1.0, 0.5, 0.0])])
    assert torch.allclose(r(images, [""] * 5), torch.tensor([1.0, 0.0, 0.0, 0.5, 1.0]))


def test_jpeg_rewards_prefer_flat_vs_busy():
    flat = _solid([0.2, 0.4, 0.6], 64)
    busy = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    images = torch.cat([flat, busy])
    comp, incomp = get_reward("jpeg_compressibility"), get_reward("jpeg_incompressibility")
    c, i = comp(images, ["", ""]), incomp(images, ["", ""])
    assert torch.allclose(c, -i)
    assert c[0] > c[1] and i[1] > i[0]
    assert 0 < i[0] < 2.0 < i[1] < 20.0  # kB: a flat 64x64 JPEG is well under 2 kB, noise is several kB


class _Options(Reward):
    def __init__(self, **options):
        self.options = options

    def score(self, images, prompts):
        return images.mean(dim=(1, 2, 3))


def test_reward_options_errors_name_only_the_bad_options(monkeypatch):
    from deradiff.rewards import base

    monkeypatch.setitem(base._REGISTRY, "needs_path", lambda model_path, dtype="float32": _Options(model_path=model_path))
    monkeypatch.setitem(base._REGISTRY, "open_ended", _Options)
    with pytest.raises(ConfigError, match=r"does not take options \['modle_path'\]; it accepts: model_path, dtype"):
        get_reward("needs_path", model_path="/m", modle_path="/m")  # the valid option is not blamed
    with pytest.raises(ConfigError, match=r"'needs_path' needs options \['model_path'\]"):
        get_reward("needs_path", dtype="bfloat16")
    assert get_reward("needs_path", model_path="/m").options == {"model_path": "/m"}
    assert get_reward("open_ended", anything=1).options == {"anything": 1}  # **kwargs: the reward checks itself
