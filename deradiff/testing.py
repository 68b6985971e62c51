"""Tiny random-weight Stable Diffusion and SDXL pipelines built from configs, and synthetic preference
pairs, for fast CPU tests and benchmarks.

Like diffusers' own dummy components: real classes, real code paths, a few thousand parameters, no network.
(The embedded *trained* tiny model lives in `deradiff.world`; these are for shape-and-plumbing tests.)
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from deradiff.data.prefs import png_bytes, write_parquet

MAX_TOKENS = 16


def char_tokenizer(max_length: int = MAX_TOKENS) -> CLIPTokenizer:
    """A CLIPTokenizer over single printable characters (empty merge list), written to a temp dir."""
    chars = [chr(c) for c in range(33, 127)]
    tokens = ["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars)]
    folder = Path(tempfile.mkdtemp(prefix="deradiff-tok-"))
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)


def _text_config(vocab_size: int, projection_dim: int | None = None) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=projection_dim or 32,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )


def _vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    )


def _scheduler() -> DDIMScheduler:
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, steps_offset=1)


def _tiny_unet(**layout) -> UNet2DConditionModel:
    """The tiny UNet both tiny pipelines share (two levels, 8x8 latents); `layout` adds each one's blocks,
    attention and conditioning."""
    return UNet2DConditionModel(block_out_channels=(16, 32), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, norm_num_groups=8, **layout)


def tiny_sd_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """A random tiny StableDiffusionPipeline (16x16 images, 8x8 latents)."""
    torch.manual_seed(seed)
    unet = _tiny_unet(down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=4)
    tokenizer = char_tokenizer()
    text_encoder = CLIPTextModel(_text_config(len(tokenizer)))
    pipe = StableDiffusionPipeline(
        vae=_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """A random tiny StableDiffusionXLPipeline (two text encoders, text_time added conditioning)."""
    torch.manual_seed(seed)
    unet = _tiny_unet(
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=80,  # 6 * 8 time ids + 32 pooled text
        cross_attention_dim=64,
    )
    tokenizer = char_tokenizer()
    tokenizer_2 = char_tokenizer()
    pipe = StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=CLIPTextModel(_text_config(len(tokenizer))),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(len(tokenizer_2), projection_dim=32)),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=_scheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --- SD1.5-sized random models (benchmarks) ----------------------------------------------------------
# Stable Diffusion 1.5's published component configs (runwayml/stable-diffusion-v1-5: unet/, vae/ and the
# CLIP ViT-L/14 text_encoder/ config.json), written out so nothing is downloaded.
SD15_UNET_CONFIG = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "center_input_sample": False,
    "flip_sin_to_cos": True, "freq_shift": 0, "layers_per_block": 2, "downsample_padding": 1,
    "mid_block_scale_factor": 1, "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5,
    "cross_attention_dim": 768, "attention_head_dim": 8, "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
}
SD15_VAE_CONFIG = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "act_fn": "silu", "sample_size": 512, "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
}
SD15_TEXT_CONFIG = {
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 768,
}


def sd15_sized_unet(seed: int = 0, device: torch.device | str = "cpu") -> UNet2DConditionModel:
    """A UNet with SD1.5's architecture (860M parameters) and random weights, built directly on `device`."""
    torch.manual_seed(seed)
    with torch.device(device):
        return UNet2DConditionModel(**SD15_UNET_CONFIG)


def sd15_sized_pipeline(seed: int = 0, device: torch.device | str = "cpu") -> StableDiffusionPipeline:
    """SD1.5's UNet, VAE and text encoder at full size with random weights (a character tokenizer padded to
    77 tokens stands in for CLIP's BPE vocabulary, which cannot be downloaded here)."""
    unet = sd15_sized_unet(seed, device)
    with torch.device(device):
        vae = AutoencoderKL(**SD15_VAE_CONFIG)
        text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT_CONFIG, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=char_tokenizer(77), unet=unet,
                                   scheduler=_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --- synthetic Pick-a-Pic data (tests and benchmarks) ------------------------------------------------
def save_tiny_base(folder: Path, sdxl: bool = False) -> str:
    pipe = (tiny_sdxl_pipeline if sdxl else tiny_sd_pipeline)()
    pipe.save_pretrained(str(folder))
    return str(folder)


def save_random_lora(out_dir: Path, metadata: dict, scale: float = 1.0, rank: int = 4) -> str:
    """A rank-`rank` LoRA on the tiny SD UNet with fixed random B (times `scale`): LoRAs 'trained' at other betas
    are the same direction scaled, so weight scaling reproduces them exactly."""
    from deradiff.models.lora import attach_lora, save_lora

    pipe = tiny_sd_pipeline(seed=0)
    attach_lora(pipe.unet, rank=rank)
    gen = torch.Generator().manual_seed(7)
    for name, param in pipe.unet.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=gen) * 0.5 * scale
    save_lora(pipe.unet, out_dir, metadata)
    return str(out_dir)


def synthetic_pairs(n: int, size: int = 16, seed: int = 0, ties: int = 0, corrupt: int = 0) -> dict[str, list]:
    """Pairs where image 0 (bright) is preferred in even rows and image 1 in odd rows."""
    g = torch.Generator().manual_seed(seed)
    rows: dict[str, list] = {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": [], "label_1": []}
    for i in range(n):
        bright = torch.rand(3, size, size, generator=g) * 0.3 + 0.7
        dark = torch.rand(3, size, size, generator=g) * 0.3
        first, second = (bright, dark) if i % 2 == 0 else (dark, bright)
        rows["caption"].append(f"a red circle {i % 3}")
        rows["jpg_0"].append(png_bytes(first))
        rows["jpg_1"].append(png_bytes(second))
        label = 1.0 if i % 2 == 0 else 0.0
        rows["label_0"].append(0.5 if i < ties else label)
        rows["label_1"].append(0.5 if i < ties else 1 - label)
    for j in range(corrupt):
        rows["jpg_1"][n - 1 - j] = b"not an image"
    return rows


def write_pairs(path: Path, n: int, **kwargs) -> str:
    write_parquet(synthetic_pairs(n, **kwargs), path)
    return str(path)
