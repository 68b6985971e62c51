"""Tiny world: prompt grammar, parser, renderer, tokenizer and shipped prompt files (fast, no model)."""

import numpy as np
import pytest
import torch

from deradiff.errors import DeradiffError
from deradiff.world import BACKGROUNDS, COLOURS, PromptSpec, load_prompts, parse_prompt, render, render_batch
from deradiff.world.render import fill_spec, to_tensor
from deradiff.world.spec import HELD_OUT_TRIPLES, format_prompt, split_prompts, world_words
from deradiff.world.tokenizer import MODEL_MAX_LENGTH, build_tokenizer


@pytest.mark.parametrize("prompt, expected", [
    ("a red circle", PromptSpec("red", "circle", None, "white")),
    ("a small blue square", PromptSpec("blue", "square", "small", "white")),
    ("A Large yellow triangle on a black background", PromptSpec("yellow", "triangle", "large", "black")),
    ("a big green circle on a grey background.", PromptSpec("green", "circle", "large", "gray")),
])
def test_parse_prompt(prompt, expected):
    assert parse_prompt(prompt) == expected


@pytest.mark.parametrize("prompt", ["a purple hexagon", "a red blob", "a red circle on a pink background"])
def test_parse_prompt_rejects_out_of_world(prompt):
    with pytest.raises(DeradiffError, match="prompt"):
        parse_prompt(prompt)


def test_format_parse_round_trip():
    spec = PromptSpec("green", "triangle", "small", "gray")
    assert format_prompt(spec) == "a small green triangle on a gray background"
    assert parse_prompt(format_prompt(spec)) == spec


def test_shipped_prompt_files_match_grammar_and_are_disjoint():
    train, evals = load_prompts("train"), load_prompts("eval")
    assert train == split_prompts()["train"] and evals == split_prompts()["eval"]
    assert not set(train) & set(evals)
    assert "a red circle" in train and "a small blue square" not in train  # a held-out triple
    for size, colour, shape in HELD_OUT_TRIPLES:
        assert not any(parse_prompt(p) == PromptSpec(colour, shape, size, parse_prompt(p).background) for p in train)
    with pytest.raises(DeradiffError, match="split"):
        load_prompts("test")  # type: ignore[arg-type]


def test_render_colours_background_and_sizes():
    rng = np.random.default_rng(0)
    img = to_tensor([render(PromptSpec("red", "square", "large", "black"), rng)])[0]
    assert img.shape == (3, 32, 32)
    assert torch.allclose(img[:, 0, 0], torch.zeros(3))  # corner shows the named background
    inside = (img.amax(0) - img.amin(0)) > 0.5
    mean_colour = img[:, inside].mean(1) * 255
    assert torch.allclose(mean_colour, torch.tensor(COLOURS["red"], dtype=torch.float), atol=14)
    white = to_tensor([render(PromptSpec("blue", "circle", "small"), rng)])[0]
    assert torch.allclose(white[:, 0, 0], torch.tensor(BACKGROUNDS["white"]) / 255.0)
    area = lambda size: (to_tensor([render(PromptSpec("blue", "circle", size), np.random.default_rng(1))])[0]
                         .amin(0) < 0.5).float().mean()  # noqa: E731
    assert area("large") > 2.5 * area("small")


def test_render_is_deterministic_and_fills_size():
    specs = [parse_prompt("a green triangle")] * 4
    a, filled = render_batch(specs, np.random.default_rng(3))
    b, _ = render_batch(specs, np.random.default_rng(3))
    assert torch.equal(a, b) and all(s.size in ("small", "large") for s in filled)
    assert fill_spec(PromptSpec("red", "circle", "small"), np.random.default_rng(0)).size == "small"


def test_tokenizer_gives_each_world_word_one_token(tmp_path):
    tok = build_tokenizer(tmp_path)
    assert (tmp_path / "vocab.json").is_file() and (tmp_path / "merges.txt").is_file()
    assert tok.model_max_length == MODEL_MAX_LENGTH
    for word in world_words():
        assert tok.tokenize(word) == [word + "</w>"]
    ids = tok("a small red circle", padding="max_length", max_length=MODEL_MAX_LENGTH).input_ids
    assert len(ids) == MODEL_MAX_LENGTH and ids[0] == tok.bos_token_id and ids[5] == tok.eos_token_id
    assert tok.tokenize("a purple hexagon")  # out-of-vocab words fall back to byte symbols


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 10, 20, 40])
def test_one_cycle_schedule_runs_for_any_length(steps):
    """OneCycleLR divides by zero when its warm-up rounds to one step (e.g. 10 steps at 10%); ours never does."""
    from deradiff.world.optim import adamw_one_cycle

    param = torch.nn.Parameter(torch.zeros(1))
    opt, sched = adamw_one_cycle([param], lr=1e-2, steps=steps, warmup_frac=0.1)
    for _ in range(steps):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] <= 1e-2


def test_one_cycle_schedule_is_plain_one_cycle_for_real_runs():
    from deradiff.world.optim import adamw_one_cycle

    param = torch.nn.Parameter(torch.zeros(1))
    opt, sched = adamw_one_cycle([param], lr=1e-2, steps=300, warmup_frac=0.1)
    assert isinstance(sched, torch.optim.lr_scheduler.OneCycleLR) and sched.total_steps == 300
