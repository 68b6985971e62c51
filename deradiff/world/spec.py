"""The tiny world's vocabulary, prompt grammar and train/eval prompt split.

Everything the world can say lives here, so the renderer, the tokenizer (which must cover every word), the
classifier heads and the prompt files all agree on one list.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import product
from typing import Optional

from deradiff.errors import DeradiffError

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 210, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: tuple[str, ...] = ("small", "large")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
}
DEFAULT_BACKGROUND = "white"

# Synonyms accepted by the parser (and covered by the tokenizer) but never used in the shipped prompts.
SIZE_SYNONYMS = {"big": "large", "tiny": "small"}
BACKGROUND_SYNONYMS = {"grey": "gray"}
FILLER_WORDS = ("a", "an", "the", "on", "of", "with", "background", "picture", "photo", "image", "shape")

# (size, colour, shape) triples that appear only in eval prompts: the model must compose them from parts.
HELD_OUT_TRIPLES: tuple[tuple[str, str, str], ...] = (
    ("small", "red", "triangle"),
    ("large", "green", "circle"),
    ("small", "blue", "square"),
    ("large", "yellow", "triangle"),
    ("small", "yellow", "circle"),
    ("large", "blue", "triangle"),
)
# Unsized (colour, shape, background) prompts held out of training.
HELD_OUT_SCENES: tuple[tuple[str, str, str], ...] = (
    ("red", "square", "gray"),
    ("green", "triangle", "black"),
    ("blue", "circle", "white"),
    ("yellow", "square", "black"),
)


@dataclass(frozen=True)
class PromptSpec:
    """What a prompt asks for; `size` is None when the prompt leaves it open (the renderer picks one)."""

    colour: str
    shape: str
    size: Optional[str] = None
    background: str = DEFAULT_BACKGROUND


def world_words() -> list[str]:
    """Every word the world's prompts and parser use (the tokenizer gives each one a single token)."""
    words = [*COLOURS, *SHAPES, *SIZES, *BACKGROUNDS, *SIZE_SYNONYMS, *BACKGROUND_SYNONYMS, *FILLER_WORDS]
    return sorted(set(words))


def format_prompt(spec: PromptSpec, name_background: bool = False) -> str:
    """The canonical caption of a spec; a non-white background is always named (the default is white)."""
    words = ["a"] + ([spec.size] if spec.size else []) + [spec.colour, spec.shape]
    if name_background or spec.background != DEFAULT_BACKGROUND:
        words += ["on", "a", spec.background, "background"]
    return " ".join(words)


_BG_RE = re.compile(r"(\w+)\s+background")


def parse_prompt(prompt: str) -> PromptSpec:
    """Read colour, shape, size and background from a world prompt; raise DeradiffError if it names none."""
    text = prompt.lower()
    background = DEFAULT_BACKGROUND
    match = _BG_RE.search(text)
    if match:
        bg_word = BACKGROUND_SYNONYMS.get(match.group(1), match.group(1))
        if bg_word not in BACKGROUNDS:
            raise DeradiffError(f"prompt {prompt!r}: unknown background {match.group(1)!r}; "
                                f"known: {', '.join(BACKGROUNDS)}")
        background = bg_word
        text = text[: match.start()] + text[match.end():]
    words = re.findall(r"[a-z]+", text)
    colour = _first(words, COLOURS, {})
    shape = _first(words, SHAPES, {})
    size = _first(words, SIZES, SIZE_SYNONYMS)
    if colour is None or shape is None:
        raise DeradiffError(f"prompt {prompt!r} is not a tiny-world prompt: it needs one of the colours "
                            f"{', '.join(COLOURS)} and one of the shapes {', '.join(SHAPES)}")
    return PromptSpec(colour=colour, shape=shape, size=size, background=background)


def _first(words: list[str], known, synonyms: dict[str, str]) -> Optional[str]:
    """The first word that is a known value (after synonym mapping), or None."""
    for word in words:
        word = synonyms.get(word, word)
        if word in known:
            return word
    return None


def all_prompts() -> list[str]:
    """Every prompt the grammar generates (sizes optional, background named or not)."""
    prompts = []
    for size, colour, shape in product((None, *SIZES), COLOURS, SHAPES):
        for bg in (None, *BACKGROUNDS):
            spec = PromptSpec(colour, shape, size, bg or DEFAULT_BACKGROUND)
            prompts.append(format_prompt(spec, name_background=bg is not None))
    return prompts


def is_held_out(prompt: str) -> bool:
    """True for prompts reserved for evaluation (a held-out size/colour/shape triple or unsized scene)."""
    spec = parse_prompt(prompt)
    if (spec.size, spec.colour, spec.shape) in HELD_OUT_TRIPLES:
        return True
    named_bg = "background" in prompt
    return spec.size is None and named_bg and (spec.colour, spec.shape, spec.background) in HELD_OUT_SCENES


def split_prompts() -> dict[str, list[str]]:
    """The train/eval split written to prompts/train.txt and prompts/eval.txt."""
    prompts = all_prompts()
    return {"train": [p for p in prompts if not is_held_out(p)], "eval": [p for p in prompts if is_held_out(p)]}
