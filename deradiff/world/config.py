"""The tiny world's config schemas: `deradiff tiny pretrain` (`PretrainConfig` and its stages) and
`deradiff tiny quality` (`QualityConfig`), apart from the training code so the CLI can describe them without
importing diffusers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from deradiff.config import check_min, check_positive, check_seed, option
from deradiff.errors import ConfigError

PEAK_LR_HELP = "peak learning rate (one-cycle schedule)"


def _check_one_cycle(stage: object, section: str, **minimums: float) -> None:
    """Each stage runs `steps` one-cycle AdamW steps on batches of `batch_size` at peak `lr`: steps and
    batch_size >= 1, lr > 0, and the stage's own `minimums`; `section` is its key in PretrainConfig."""
    check_min(stage, f"{section}.", {"steps": 1, "batch_size": 1, **minimums})
    check_positive(stage, f"{section}.", ["lr"])


@dataclass
class ClassifierTrainConfig:
    steps: int = option(300, "optimizer steps for the fidelity classifier (fresh renders each step)")
    batch_size: int = option(64, "images per classifier step")
    lr: float = option(3e-3, PEAK_LR_HELP)

    def validate(self) -> None:
        _check_one_cycle(self, "classifier")


@dataclass
class VaeTrainConfig:
    steps: int = option(400, "optimizer steps for the VAE (MSE reconstruction + tiny KL)")
    batch_size: int = option(32, "images per VAE step")
    lr: float = option(3e-3, PEAK_LR_HELP)
    kl_weight: float = option(1e-6, "weight of the KL term; tiny, as in SD's VAE, so latents stay informative")

    def validate(self) -> None:
        _check_one_cycle(self, "vae", kl_weight=0)


@dataclass
class UnetTrainConfig:
    steps: int = option(3000, "optimizer steps for the UNet and text encoder (trained jointly)")
    batch_size: int = option(32, "latents per UNet step")
    lr: float = option(1.5e-3, PEAK_LR_HELP)
    caption_dropout: float = option(0.1, "fraction of captions replaced by '' so classifier-free guidance works")
    dataset_size: int = option(8192, "rendered training images (encoded once by the frozen VAE)")
    min_snr_gamma: float = option(5.0, "Min-SNR loss weighting gamma (Hang et al. 2023; docs/configs.md); 0 = off")
    ema_decay: float = option(0.999, "EMA of UNet + text-encoder weights; the EMA weights are shipped; 0 = off")

    def validate(self) -> None:
        _check_one_cycle(self, "unet", dataset_size=1, min_snr_gamma=0)
        for key in ("caption_dropout", "ema_decay"):
            if not 0 <= getattr(self, key) < 1:
                raise ConfigError(f"config key 'unet.{key}' must be in [0, 1), got {getattr(self, key)}")


@dataclass
class PretrainConfig:
    output_dir: str = option("outputs/tiny-pretrain", "where tiny-sd/, classifier.* and summary.json are written "
                                                      "(relative: to the current directory)")
    seed: int = option(0, "seed for rendering, initialisation and noise: the run is reproducible from it")
    classifier: ClassifierTrainConfig = option(factory=ClassifierTrainConfig, help="fidelity classifier training")
    vae: VaeTrainConfig = option(factory=VaeTrainConfig, help="VAE training")
    unet: UnetTrainConfig = option(factory=UnetTrainConfig, help="UNet + text encoder training")
    threads: int = option(0, "torch CPU threads (0 = torch's default); shared cores: docs/benchmarks.md")
    quality_images: int = option(56, "eval-prompt images generated for the closing quality check (0 = skip)")
    # Off by default even though the default output_dir is a scratch folder: refreshing the shipped assets
    # (output_dir=deradiff/world/assets) must be asked for, since it replaces files the package ships.
    overwrite: bool = option(False, "replace an earlier pretrain's files in output_dir (tiny-sd/, classifier.*, "
                                    "summary.json, pretrain_config.yaml; other files stay) instead of refusing; "
                                    "needed to refresh the shipped assets: output_dir=deradiff/world/assets")

    def validate(self) -> None:
        check_seed(self.seed, "seed", count=2)  # the classifier is evaluated with seed + 1
        check_min(self, "", {"threads": 0, "quality_images": 0})


@dataclass
class QualityConfig:
    """`deradiff tiny quality`: how many images of which prompt split to sample and judge with the classifier."""

    output_dir: str = option("outputs/tiny-quality", "where quality.json is written (relative: to the current directory)")
    model_dir: str = option("", "tiny pipeline to measure (default: the shipped deradiff/world/assets/tiny-sd)")
    classifier_dir: str = option("", "folder holding classifier.safetensors/.json (default: the shipped one)")
    split: Literal["eval", "train"] = option("eval", "prompt split to sample: eval (held-out) or train")
    num_images: int = option(56, "images generated, cycling through the split's prompts")
    seed: int = option(0, "image i is sampled with seed + i")
    num_inference_steps: int = option(20, "denoising steps per image")
    guidance_scale: float = option(4.0, "classifier-free guidance scale")
    batch_size: int = option(16, "images per pipeline call")

    def validate(self) -> None:
        check_min(self, "", {"num_images": 1, "num_inference_steps": 1, "guidance_scale": 0, "batch_size": 1})
        check_seed(self.seed, "seed", count=self.num_images)
