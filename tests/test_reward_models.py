"""Model-backed rewards (clip_score, pickscore, hpsv2, aesthetic) on a tiny random CLIPModel saved to a temp folder.

Values are checked against an independent computation: the PIL CLIPImageProcessor + get_image_features /
get_text_features + cosine by hand, so the reward's tensor preprocessing and score conventions are both tested.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from deradiff.errors import DeradiffError
from deradiff.rewards import available_rewards, get_reward
from deradiff.testing import char_tokenizer

PROMPTS = ["a red circle", "a blue square", "green"]
LOGIT_SCALE = 2.0  # exp(2) ~ 7.39: not CLIP's init value, so pickscore's scale is really read from the weights
HEAD_WIDTHS = (1024, 128, 64, 16, 1)


def _tiny_clip():
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    text = dict(vocab_size=len(char_tokenizer()), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                  num_attention_heads=4)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)).eval()
    with torch.no_grad():
        model.logit_scale.fill_(LOGIT_SCALE)
    return model


def _processor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-clip")
    _tiny_clip().save_pretrained(folder, safe_serialization=True)
    char_tokenizer().save_pretrained(folder)
    _processor().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def head_file(tmp_path_factory) -> Path:
    torch.manual_seed(1)
    widths = (24, *HEAD_WIDTHS)
    state = {}
    for index, (n_in, n_out) in zip((0, 2, 4, 6, 7), zip(widths, widths[1:])):
        state[f"layers.{index}.weight"] = torch.randn(n_out, n_in) / n_in ** 0.5
        state[f"layers.{index}.bias"] = torch.randn(n_out) * 0.1
    path = tmp_path_factory.mktemp("head") / "aesthetic_head.safetensors"
    save_file(state, str(path))
    return path


def _images(size=(32, 32), n=3, seed=0) -> torch.Tensor:
    """Random images on the uint8 grid, so the PIL reference path loses nothing to quantisation."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, *size), generator=g).float() / 255


def _reference_cosine(folder: Path, images: torch.Tensor, prompts) -> torch.Tensor:
    """Independent: PIL processor, the model's own feature functions, cosine by hand."""
    from transformers import AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(folder).eval()
    pils = [Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for im in images]
    pixels = torch.as_tensor(np.asarray(_processor()(images=pils, return_tensors="np")["pixel_values"]))
    tokens = AutoTokenizer.from_pretrained(folder)(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        img = model.get_image_features(pixel_values=pixels)
        txt = model.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
    img = img if isinstance(img, torch.Tensor) else img.pooler_output
    txt = txt if isinstance(txt, torch.Tensor) else txt.pooler_output
    return (img * txt).sum(-1) / (img.norm(dim=-1) * txt.norm(dim=-1)), img


def test_all_model_rewards_are_registered():
    assert {"clip_score", "pickscore", "aesthetic", "hpsv2", "image_reward"} <= set(available_rewards())


def test_clip_score_pickscore_and_hpsv2_match_hand_computation(clip_dir):
    images = _images()
    cosine, _ = _reference_cosine(clip_dir, images, PROMPTS)
    clip = get_reward("clip_score", model_path=str(clip_dir))
    pick = get_reward("pickscore", model_path=str(clip_dir), processor_path=str(clip_dir))
    hps = get_reward("hpsv2", model_path=str(clip_dir))
    assert clip.name == "clip_score" and clip.higher_is_better and hps.name == "hpsv2"
    torch.testing.assert_close(clip(images, PROMPTS), 100 * cosine.clamp(min=0), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(pick(images, PROMPTS), float(np.exp(LOGIT_SCALE)) * cosine, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(hps(images, PROMPTS), cosine, atol=1e-6, rtol=1e-5)  # hpsv2 reports the raw cosine
    assert (cosine < 0).any() and (cosine > 0).any()  # both sides of clip_score's clip at 0 are exercised


def test_scores_do_not_depend_on_batch_companions(clip_dir):
    pick = get_reward("pickscore", model_path=str(clip_dir))
    images = _images()
    alone = torch.cat([pick(images[i:i + 1], PROMPTS[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(pick(images, PROMPTS), alone, atol=1e-4, rtol=1e-4)


def test_tensor_preprocessing_tracks_pil_processor_after_resize(clip_dir):
    from deradiff.rewards.models import preprocess

    images = _images(size=(40, 56), n=2, seed=3)  # not square: shortest edge -> 32, centre crop 32x32
    smooth = F.avg_pool2d(F.interpolate(images, scale_factor=2, mode="nearest"), 3, 1, 1)[..., ::2, ::2]
    pils = [Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for im in smooth]
    reference = torch.as_tensor(np.asarray(_processor()(images=pils, return_tensors="np")["pixel_values"]))
    ours = preprocess(torch.round(smooth * 255) / 255, _processor())
    assert ours.shape == reference.shape == (2, 3, 32, 32)
    assert (ours - reference).abs().mean() < 0.02  # torch vs PIL bicubic: ~0.005 (a 1-px crop shift: ~0.45)


def test_env_var_fallback_and_dtype(clip_dir, monkeypatch):
    monkeypatch.setenv("DERADIFF_CLIP_SCORE_PATH", str(clip_dir))
    monkeypatch.setenv("DERADIFF_HPSV2_PATH", str(clip_dir))
    monkeypatch.setenv("DERADIFF_HPSV2_PROCESSOR_PATH", str(clip_dir / "no-processor"))
    with pytest.raises(DeradiffError, match="no-processor"):  # the processor variable is read too
        get_reward("hpsv2")
    images = _images()
    full = get_reward("clip_score")(images, PROMPTS)
    half = get_reward("clip_score", dtype=torch.bfloat16)(images, PROMPTS)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, full, atol=3.0, rtol=0.1)


def test_aesthetic_matches_hand_computation(clip_dir, head_file):
    from safetensors.torch import load_file

    images = _images()
    _, embedding = _reference_cosine(clip_dir, images, PROMPTS)
    x = F.normalize(embedding, dim=-1)
    state = load_file(str(head_file))
    for index in (0, 2, 4, 6, 7):  # the published head has no activations between its linear layers
        x = x @ state[f"layers.{index}.weight"].T + state[f"layers.{index}.bias"]
    reward = get_reward("aesthetic", clip_path=str(clip_dir), head_path=str(head_file))
    torch.testing.assert_close(reward(images, ["", "", ""]), x.squeeze(-1), atol=1e-4, rtol=1e-4)


def test_missing_paths_are_one_clear_error(tmp_path, monkeypatch, clip_dir):
    for var in ("DERADIFF_CLIP_SCORE_PATH", "DERADIFF_PICKSCORE_PATH", "DERADIFF_AESTHETIC_CLIP_PATH",
                "DERADIFF_AESTHETIC_HEAD_PATH", "DERADIFF_HPSV2_PATH"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(DeradiffError, match="DERADIFF_PICKSCORE_PATH"):
        get_reward("pickscore")
    with pytest.raises(DeradiffError, match="'hpsv2' needs the HPSv2 CLIPModel folder.*DERADIFF_HPSV2_PATH"):
        get_reward("hpsv2")
    with pytest.raises(DeradiffError, match="'/nowhere/clip'.*not a folder"):
        get_reward("clip_score", model_path="/nowhere/clip")
    with pytest.raises(DeradiffError, match=f"'{tmp_path}' has no .safetensors weights"):
        get_reward("clip_score", model_path=str(tmp_path))
    with pytest.raises(DeradiffError, match="DERADIFF_AESTHETIC_HEAD_PATH"):
        get_reward("aesthetic", clip_path=str(clip_dir))
    with pytest.raises(DeradiffError, match="head.pth.*not a .safetensors file"):
        get_reward("aesthetic", clip_path=str(clip_dir), head_path=str(tmp_path / "head.pth"))


def test_wrong_aesthetic_head_is_refused(clip_dir, tmp_path):
    bad = tmp_path / "bad.safetensors"
    save_file({"layers.0.weight": torch.zeros(4, 24)}, str(bad))
    with pytest.raises(DeradiffError, match="expected"):
        get_reward("aesthetic", clip_path=str(clip_dir), head_path=str(bad))
    wrong_in = tmp_path / "wrong_in.safetensors"
    widths = (768, *HEAD_WIDTHS)  # a ViT-L/14 head on a 24-d CLIP
    save_file({f"layers.{i}.{p}": torch.zeros(o, n) if p == "weight" else torch.zeros(o)
               for i, (n, o) in zip((0, 2, 4, 6, 7), zip(widths, widths[1:])) for p in ("weight", "bias")},
              str(wrong_in))
    with pytest.raises(DeradiffError, match="768 inputs, expected 24"):
        get_reward("aesthetic", clip_path=str(clip_dir), head_path=str(wrong_in))


class _Exploit:
    """Unpickling this creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_only_folder_is_refused_and_never_unpickled(clip_dir, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text((clip_dir / "config.json").read_text())
    marker = tmp_path / "pwned"
    torch.save({"state": _Exploit(marker)}, str(folder / "pytorch_model.bin"))
    with pytest.raises(DeradiffError, match=r"only pickle weights \(pytorch_model.bin\).*safetensors only"):
        get_reward("pickscore", model_path=str(folder), processor_path=str(clip_dir))
    assert not marker.exists()


def test_image_reward_raises_clear_error():
    with pytest.raises(DeradiffError, match="'image_reward' is not supported yet"):
        get_reward("image_reward", model_path="/anything")


def test_importing_rewards_does_not_import_transformers():
    code = "import sys, deradiff.rewards; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
