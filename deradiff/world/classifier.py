"""A small CNN that reads colour, shape and size off a world image: the tiny world's fidelity judge.

It is trained on rendered images of every combination (the eval hold-out concerns the text-to-image
model, not the judge), with noise/blur/contrast augmentation so that slightly smudgy generated images are
still judged on what they show rather than on rendering artefacts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from deradiff.errors import DeradiffError
from deradiff.world.paths import ASSETS_DIR
from deradiff.world.render import IMAGE_SIZE, render_batch
from deradiff.world.spec import BACKGROUNDS, COLOURS, SHAPES, SIZES, PromptSpec
from deradiff.world.optim import adamw_one_cycle

CLASSIFIER_WEIGHTS = "classifier.safetensors"
CLASSIFIER_CONFIG = "classifier.json"
HEADS = {"colour": list(COLOURS), "shape": list(SHAPES), "size": list(SIZES)}


class TinyClassifier(nn.Module):
    """Three conv stages + global pooling, one linear head per attribute (colour, shape, size)."""

    def __init__(self, channels: Sequence[int] = (32, 64, 64), image_size: int = IMAGE_SIZE,
                 heads: dict[str, list[str]] | None = None) -> None:
        super().__init__()
        self.heads = dict(heads or HEADS)
        self.image_size = image_size
        self.channels = list(channels)
        layers, c_in = [], 3
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.GELU(), nn.Conv2d(c, c, 3, padding=1), nn.GELU(),
                       nn.MaxPool2d(2)]
            c_in = c
        self.body = nn.Sequential(*layers)
        self.out = nn.ModuleDict({k: nn.Linear(2 * c_in, len(v)) for k, v in self.heads.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per head for images [B,3,H,W] in [0,1] (resized to the training size if needed)."""
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="area")
        h = self.body(images * 2 - 1)
        pooled = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)
        return {k: head(pooled) for k, head in self.out.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, list[str]]:
        """The most likely label per head."""
        logits = self(images)
        return {k: [self.heads[k][i] for i in v.argmax(-1).tolist()] for k, v in logits.items()}

    def config(self) -> dict:
        return {"channels": self.channels, "image_size": self.image_size, "heads": self.heads}


def label_tensor(specs: Sequence[PromptSpec], head: str) -> torch.Tensor:
    """Class indices of `head` for filled specs."""
    names = HEADS[head]
    return torch.tensor([names.index(getattr(s, head)) for s in specs])


def augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random blur, contrast and pixel noise, so generated (imperfect) images are judged by content."""
    b = images.shape[0]
    blurred = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    mix = torch.rand(b, 1, 1, 1, generator=gen)
    images = mix * blurred + (1 - mix) * images
    contrast = 0.8 + 0.4 * torch.rand(b, 1, 1, 1, generator=gen)
    images = (images - 0.5) * contrast + 0.5
    noise = torch.randn(images.shape, generator=gen) * 0.06 * torch.rand(b, 1, 1, 1, generator=gen)
    return (images + noise).clamp(0, 1)


def random_specs(n: int, rng: np.random.Generator) -> list[PromptSpec]:
    """Uniform over every colour x shape x size x background combination."""
    pick = lambda seq: seq[int(rng.integers(len(seq)))]  # noqa: E731
    return [PromptSpec(pick(list(COLOURS)), pick(SHAPES), pick(SIZES), pick(list(BACKGROUNDS))) for _ in range(n)]


def train_classifier(steps: int, batch_size: int, lr: float, seed: int) -> tuple[TinyClassifier, dict]:
    """Train on freshly rendered batches; returns the model (eval mode) and held-out accuracy per head."""
    torch.manual_seed(seed)
    rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    model = TinyClassifier()
    opt, sched = adamw_one_cycle(model.parameters(), lr, steps, warmup_frac=0.1)
    bar = tqdm(range(steps), desc="classifier", unit="step")
    for _ in bar:
        images, specs = render_batch(random_specs(batch_size, rng), rng)
        logits = model(augment(images, gen))
        loss = sum(F.cross_entropy(logits[h], label_tensor(specs, h)) for h in HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return model, evaluate_classifier(model, n=512, seed=seed + 1)


@torch.no_grad()
def evaluate_classifier(model: TinyClassifier, n: int, seed: int) -> dict[str, float]:
    """Accuracy per head on fresh clean renders."""
    rng = np.random.default_rng(seed)
    images, specs = render_batch(random_specs(n, rng), rng)
    preds = model.predict(images)
    return {f"{h}_acc": float(np.mean([p == getattr(s, h) for p, s in zip(preds[h], specs)])) for h in HEADS}


def save_classifier(model: TinyClassifier, directory: str | Path) -> None:
    """Weights as safetensors plus a json config (architecture and label names)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / CLASSIFIER_WEIGHTS))
    (directory / CLASSIFIER_CONFIG).write_text(json.dumps(model.config(), indent=2) + "\n")


def load_classifier(directory: str | Path | None = None) -> TinyClassifier:
    """Load the shipped classifier (or one saved by `deradiff tiny pretrain` into `directory`), eval mode."""
    directory = Path(directory) if directory is not None else ASSETS_DIR
    weights, config = directory / CLASSIFIER_WEIGHTS, directory / CLASSIFIER_CONFIG
    if not weights.is_file() or not config.is_file():
        raise DeradiffError(f"no classifier in '{directory}' (expected {CLASSIFIER_WEIGHTS} and "
                            f"{CLASSIFIER_CONFIG}; run `deradiff tiny pretrain`)")
    model = TinyClassifier(**json.loads(config.read_text()))
    model.load_state_dict(load_file(str(weights)))
    return model.eval()
