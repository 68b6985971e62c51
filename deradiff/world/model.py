"""Build the tiny text-to-image model as real Stable Diffusion components (why these sizes: docs/configs.md)."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from deradiff.models.pipelines import load_pipeline
from deradiff.world.render import IMAGE_SIZE

TEXT_DIM = 32


def build_vae(image_size: int = IMAGE_SIZE) -> AutoencoderKL:
    """Narrow 2-down-block VAE without mid-block attention: 32 px -> 16x16x4 latents (why: docs/configs.md)."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=image_size,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, mid_block_add_attention=False,
    )


def build_unet(latent_size: int = IMAGE_SIZE // 2) -> UNet2DConditionModel:
    """Conv block at full latent size, cross-attention block at half size and in the middle."""
    return UNet2DConditionModel(
        sample_size=latent_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), mid_block_type="UNetMidBlock2DCrossAttn",
        cross_attention_dim=TEXT_DIM, attention_head_dim=8, norm_num_groups=8,
    )


def build_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    """A 2-layer CLIP text transformer sized to the tiny vocab; special ids taken from the tokenizer."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_DIM, intermediate_size=2 * TEXT_DIM, projection_dim=TEXT_DIM,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def build_scheduler() -> DDIMScheduler:
    """Stable Diffusion v1's noise schedule (epsilon prediction), sampled with DDIM."""
    return DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )


def assemble_pipeline(vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
                      unet: UNet2DConditionModel) -> StableDiffusionPipeline:
    """A plain StableDiffusionPipeline without safety checker (the tiny world has nothing to filter)."""
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=build_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def save_pipeline(pipe: StableDiffusionPipeline, directory: str | Path, tokenizer_dir: str | Path) -> None:
    """Save as safetensors and ship the raw vocab.json/merges.txt beside the tokenizer files."""
    directory = Path(directory)
    pipe.save_pretrained(directory, safe_serialization=True)
    for name in ("vocab.json", "merges.txt"):
        (directory / "tokenizer" / name).write_bytes((Path(tokenizer_dir) / name).read_bytes())


def load_tiny_pipeline(directory: str | Path, device: str | torch.device = "cpu") -> StableDiffusionPipeline:
    """A saved tiny pipeline (`deradiff.models.pipelines.load_pipeline`), read offline with the progress bar off:
    its callers measure quality over many small batches, and a tiny model is never fetched from the hub."""
    pipe = load_pipeline(directory, device=device, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe
