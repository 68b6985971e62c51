"""Rewards backed by real (local) reward models: `clip_score`, `pickscore`, `hpsv2`, `aesthetic`;
`image_reward` is registered but refuses to build (not supported yet).

Why this shape:
- Optional extras, loaded lazily: this module imports only torch at import time (it is imported by
  `deradiff.rewards` to register the names); transformers and the weights are loaded when a reward is built.
- Local weights only: every reward takes its path from a kwarg or an environment variable (see docs/rewards.md)
  and loads safetensors only (`use_safetensors=True`, `local_files_only=True`); a missing path, an empty folder
  or a folder holding only pickles (.bin/.pt/.pth) is one `DeradiffError` naming the path and what is expected.
  Pickles are never opened: they can run code when loaded.
- Images are preprocessed as tensors (resize shortest edge, bicubic with antialias, centre crop, normalise with
  the mean/std/sizes read from the folder's `preprocessor_config.json`), not through the PIL processor: no
  uint8 round trip, and the images stay on their device. At the processor's own size this equals the PIL path
  up to uint8 quantisation; after a resize it differs slightly (torch vs PIL bicubic).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

from deradiff.errors import DeradiffError
from deradiff.rewards.base import Reward, register_reward

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# LAION aesthetic predictor v2 head: Linear layers at these nn.Sequential indices (dropouts in between).
AESTHETIC_LINEAR_INDICES = (0, 2, 4, 6, 7)
AESTHETIC_DROPOUTS = {1: 0.2, 3: 0.2, 5: 0.1}


# ---------------------------------------------------------------------------------------------- paths


def resolve_path(value: Optional[str | os.PathLike], env_var: str, reward: str, what: str) -> Path:
    """The kwarg, else the env var; neither set is a DeradiffError saying how to supply it (no hub fallback:
    downloads would fail offline and would pull unreviewed files)."""
    raw = str(value) if value not in (None, "") else os.environ.get(env_var, "")
    if not raw.strip():
        raise DeradiffError(f"reward {reward!r} needs {what}: pass it as a keyword argument or set {env_var} "
                            "(see docs/rewards.md)")
    return Path(raw).expanduser()


def _pickles(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)


def require_safetensors_folder(folder: Path, reward: str, what: str) -> Path:
    """A folder with config.json and *.safetensors weights; pickle-only folders are refused, never opened."""
    if not folder.is_dir():
        raise DeradiffError(f"reward {reward!r}: {what} '{folder}' is not a folder; expected a local "
                            "transformers CLIPModel folder (config.json + model.safetensors)")
    if not any(folder.glob("*.safetensors")):
        pickles = _pickles(folder)
        found = f"only pickle weights ({', '.join(pickles)})" if pickles else "no .safetensors weights"
        raise DeradiffError(f"reward {reward!r}: {what} '{folder}' has {found}; deradiff loads safetensors only "
                            "because pickles can run code when loaded. Expected config.json + model.safetensors "
                            "(convert once with your own trusted tools, see docs/rewards.md)")
    if not (folder / "config.json").is_file():
        raise DeradiffError(f"reward {reward!r}: {what} '{folder}' has no config.json; expected a transformers "
                            "CLIPModel folder (config.json + model.safetensors)")
    return folder


def require_processor_folder(folder: Path, reward: str, what: str) -> Path:
    """A folder with a tokenizer and preprocessor_config.json (weights not needed here)."""
    if not (folder / "preprocessor_config.json").is_file():
        raise DeradiffError(f"reward {reward!r}: {what} '{folder}' has no preprocessor_config.json; expected a "
                            "CLIP processor folder (preprocessor_config.json + tokenizer files)")
    return folder


# ------------------------------------------------------------------------------------------- loading


def clip_folders(reward: str, model_path: Optional[str], processor_path: Optional[str], env_prefix: str,
                 what: str) -> tuple[Path, Path]:
    """(model folder, processor folder) of a CLIP-based reward: the arguments, else `{env_prefix}_PATH` and
    `{env_prefix}_PROCESSOR_PATH`; the processor defaults to the model folder."""
    model = require_safetensors_folder(resolve_path(model_path, f"{env_prefix}_PATH", reward, what), reward, "model_path")
    raw = processor_path or os.environ.get(f"{env_prefix}_PROCESSOR_PATH") or model
    return model, require_processor_folder(Path(raw).expanduser(), reward, "processor_path")


def load_clip(model_path: Path, processor_path: Path, reward: str, dtype: torch.dtype) -> tuple[Any, Any, Any]:
    """(CLIPModel in eval mode, tokenizer, image processor) from local folders, safetensors only."""
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "no torchvision, PIL backend" notice: we only read its settings
    try:
        model = CLIPModel.from_pretrained(str(model_path), use_safetensors=True, local_files_only=True, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(processor_path), local_files_only=True)
        processor = CLIPImageProcessor.from_pretrained(str(processor_path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise DeradiffError(f"reward {reward!r}: could not load CLIP from '{model_path}' "
                            f"(processor '{processor_path}'): {exc}") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    return model.eval().requires_grad_(False), tokenizer, processor


def _size_get(size: Any, key: str) -> Optional[int]:
    """Read a processor size field whether it is a dict or transformers' SizeDict."""
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return int(value) if value is not None else None


def preprocess(images: torch.Tensor, processor: Any) -> torch.Tensor:
    """Images [B,3,H,W] in [0,1] -> CLIP pixel_values, following the processor's settings as tensors."""
    x = images
    if getattr(processor, "do_resize", True):
        x = _resize(x, processor.size)
    if getattr(processor, "do_center_crop", True) and processor.crop_size is not None:
        x = _center_crop(x, _size_get(processor.crop_size, "height"), _size_get(processor.crop_size, "width"))
    if getattr(processor, "do_normalize", True):
        mean = torch.tensor(processor.image_mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(processor.image_std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        x = (x - mean) / std
    return x


def _resize(x: torch.Tensor, size: Any) -> torch.Tensor:
    """Shortest edge to `shortest_edge` (aspect kept, as CLIP does) or to an exact height x width."""
    short = _size_get(size, "shortest_edge")
    h, w = x.shape[-2:]
    if short is not None:
        target = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
    else:
        target = (_size_get(size, "height"), _size_get(size, "width"))
    if tuple(target) == (h, w):
        return x
    return F.interpolate(x, size=target, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)


def _center_crop(x: torch.Tensor, height: Optional[int], width: Optional[int]) -> torch.Tensor:
    h, w = x.shape[-2:]
    height, width = height or h, width or w
    if height > h or width > w:  # only if the processor's crop exceeds its resize: stretch rather than pad
        return F.interpolate(x, size=(height, width), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    top, left = (h - height) // 2, (w - width) // 2
    return x[..., top:top + height, left:left + width]


def _pooled(output: Any) -> torch.Tensor:
    """get_*_features returns a tensor in transformers 4 and an output with pooler_output in 5."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


# ------------------------------------------------------------------------------------------- rewards


class _ClipReward(Reward):
    """Shared CLIP plumbing: device placement, preprocessing, normalised image/text embeddings."""

    reward_name = "clip"

    def __init__(self, model_path: Path, processor_path: Path, dtype: torch.dtype) -> None:
        self.model, self.tokenizer, self.processor = load_clip(model_path, processor_path, self.reward_name, dtype)

    def _to(self, device: torch.device) -> torch.dtype:
        """Run on the images' device (moved once, on first use there); compute in the model's dtype."""
        param = next(self.model.parameters())
        if param.device != device:
            self.model.to(device)
        return param.dtype

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        dtype = self._to(images.device)
        pixels = preprocess(images, self.processor).to(dtype)
        return F.normalize(_pooled(self.model.get_image_features(pixel_values=pixels)).float(), dim=-1)

    def text_embeddings(self, prompts: Sequence[str], device: torch.device) -> torch.Tensor:
        max_length = min(self.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)
        tokens = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=max_length,
                                return_tensors="pt").to(device)
        features = self.model.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
        return F.normalize(_pooled(features).float(), dim=-1)

    def cosine(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Per-pair cosine(image_i, prompt_i)."""
        return (self.image_embeddings(images) * self.text_embeddings(prompts, images.device)).sum(-1)


class _PromptReward(_ClipReward):
    """A CLIP-style image-prompt reward: model + processor folders from kwargs or `{env_prefix}_PATH` /
    `{env_prefix}_PROCESSOR_PATH`."""

    env_prefix = ""
    model_what = ""

    def __init__(self, model_path: Optional[str] = None, processor_path: Optional[str] = None,
                 dtype: torch.dtype = torch.float32) -> None:
        folders = clip_folders(self.reward_name, model_path, processor_path, self.env_prefix, self.model_what)
        super().__init__(*folders, dtype)


@register_reward("clip_score")
class ClipScore(_PromptReward):
    """CLIPScore as in torchmetrics: 100 * max(cosine(image, prompt), 0); range [0, 100].

    (Hessel et al.'s paper scales by 2.5 instead of 100; only the scale differs.) Default model: CLIP
    ViT-L/14 (`openai/clip-vit-large-patch14`), or any local CLIPModel folder holding its processor files.
    """

    reward_name = "clip_score"

    env_prefix = "DERADIFF_CLIP_SCORE"
    model_what = "a local CLIP model folder (model_path)"

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return 100.0 * self.cosine(images, prompts).clamp(min=0)


@register_reward("pickscore")
class PickScore(_PromptReward):
    """PickScore (Kirstain et al. 2023): logit_scale.exp() * cosine(image, prompt), as in the paper's scoring
    code (scale and typical values: docs/rewards.md). Not softmaxed across images: the
    score of one image does not depend on the others in the batch.

    `model_path`: the PickScore_v1 CLIPModel folder; `processor_path`: its processor (the paper uses the
    `laion/CLIP-ViT-H-14-laion2B-s32B-b79K` processor); defaults to `model_path` when that holds one.
    """

    reward_name = "pickscore"

    env_prefix = "DERADIFF_PICKSCORE"
    model_what = "the PickScore_v1 model folder (model_path)"

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.model.logit_scale.exp().float() * self.cosine(images, prompts)


@register_reward("hpsv2")
class HPSv2(_PromptReward):
    """HPSv2 / HPSv2.1 (Wu et al. 2023): cosine(image, prompt) of the HPS fine-tuned CLIP ViT-H/14, the
    score the hpsv2 package reports (no logit scale; typical values: docs/rewards.md).

    `model_path`: the HPS weights as a transformers CLIPModel folder with safetensors (a conversion of the
    open_clip checkpoint, e.g. the community `adams-story/HPSv2-hf`); the original `HPS_v2_compressed.pt`
    is a pickle and is refused. `processor_path`: the `laion/CLIP-ViT-H-14-laion2B-s32B-b79K` processor
    (open_clip's ViT-H-14 preprocessing and tokenizer); defaults to `model_path` when that holds one.
    """

    reward_name = "hpsv2"

    env_prefix = "DERADIFF_HPSV2"
    model_what = "the HPSv2 CLIPModel folder (model_path)"

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.cosine(images, prompts)


def load_aesthetic_head(path: Path, in_features: int) -> torch.nn.Sequential:
    """The LAION aesthetic v2 MLP from a safetensors file with keys layers.{0,2,4,6,7}.{weight,bias};
    layer sizes come from the file (1024-128-64-16-1 for the published head) and must chain."""
    from safetensors.torch import load_file

    if path.suffix != ".safetensors" or not path.is_file():
        raise DeradiffError(f"reward 'aesthetic': head_path '{path}' is not a .safetensors file; expected the LAION "
                            "aesthetic v2 MLP head converted once to safetensors (see docs/rewards.md)")
    state = load_file(str(path))
    expected = {f"layers.{i}.{p}" for i in AESTHETIC_LINEAR_INDICES for p in ("weight", "bias")}
    if set(state) != expected:
        raise DeradiffError(f"reward 'aesthetic': head '{path}' has keys {sorted(state)}; expected {sorted(expected)}")
    layers: list[torch.nn.Module] = []
    width = in_features
    for i in range(AESTHETIC_LINEAR_INDICES[-1] + 1):
        if i in AESTHETIC_DROPOUTS:
            layers.append(torch.nn.Dropout(AESTHETIC_DROPOUTS[i]))
            continue
        out_features, got_in = state[f"layers.{i}.weight"].shape
        if got_in != width:
            raise DeradiffError(f"reward 'aesthetic': head '{path}' layer {i} takes {got_in} inputs, expected {width} "
                                "(the CLIP image embedding size, then the previous layer's width)")
        layers.append(torch.nn.Linear(width, out_features))
        width = out_features
    if width != 1:
        raise DeradiffError(f"reward 'aesthetic': head '{path}' outputs {width} values, expected 1")
    head = torch.nn.Sequential(*layers)
    head.load_state_dict({key.removeprefix("layers."): value for key, value in state.items()})
    return head.eval().requires_grad_(False)


@register_reward("aesthetic")
class Aesthetic(_ClipReward):
    """LAION aesthetic predictor v2 (improved-aesthetic-predictor): MLP(L2-normalised CLIP ViT-L/14 image
    embedding), a 1-10 style rating; prompts are ignored. The head is float32 and runs on the images' device."""

    reward_name = "aesthetic"

    def __init__(self, clip_path: Optional[str] = None, head_path: Optional[str] = None,
                 processor_path: Optional[str] = None, dtype: torch.dtype = torch.float32) -> None:
        clip = require_safetensors_folder(resolve_path(clip_path, "DERADIFF_AESTHETIC_CLIP_PATH", self.reward_name,
                                                       "a local CLIP ViT-L/14 folder (clip_path)"),
                                          self.reward_name, "clip_path")
        head = resolve_path(head_path, "DERADIFF_AESTHETIC_HEAD_PATH", self.reward_name,
                            "the aesthetic MLP head as a .safetensors file (head_path)")
        proc = require_processor_folder(Path(processor_path).expanduser() if processor_path else clip,
                                        self.reward_name, "processor_path")
        super().__init__(clip, proc, dtype)
        self.head = load_aesthetic_head(head, self.model.config.projection_dim)

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        embedding = self.image_embeddings(images)
        self.head.to(embedding.device)
        return self.head(embedding).squeeze(-1)


def _unsupported(name: str, needs: str) -> type[Reward]:
    """A registered name whose construction is one clear error: better than a missing name or a fake score."""

    class Unsupported(Reward):
        def __init__(self, **kwargs: Any) -> None:
            raise DeradiffError(f"reward {name!r} is not supported yet: it needs {needs}. deradiff loads "
                                "safetensors only and does not run these packages; use clip_score, pickscore, "
                                "hpsv2 or aesthetic, or register your own Reward (see docs/rewards.md)")

        def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:  # pragma: no cover
            raise NotImplementedError

    Unsupported.__name__ = Unsupported.__qualname__ = f"Unsupported_{name}"
    return register_reward(name)(Unsupported)


_unsupported("image_reward", "the image-reward package (BLIP + MLP) and its pickled ImageReward.pt checkpoint")
