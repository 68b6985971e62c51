"""The shipped train/eval prompt files (prompts/train.txt, prompts/eval.txt), one prompt per line."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from deradiff.errors import DeradiffError
from deradiff.fileio import read_prompt_file
from deradiff.world.paths import PROMPTS_DIR
from deradiff.world.spec import split_prompts

SPLITS = ("train", "eval")


def load_prompts(split: Literal["train", "eval"]) -> list[str]:
    """Prompts of a split; eval prompts are held out of training (unseen size/colour/shape combinations)."""
    if split not in SPLITS:
        raise DeradiffError(f"unknown prompt split {split!r}; known: {', '.join(SPLITS)}")
    return read_prompt_file(PROMPTS_DIR / f"{split}.txt", f"world:{split}")


def write_prompt_files(directory: Path = PROMPTS_DIR) -> None:
    """Regenerate the prompt files from the grammar in spec.py (a test checks the shipped files match)."""
    directory.mkdir(parents=True, exist_ok=True)
    for split, prompts in split_prompts().items():
        (directory / f"{split}.txt").write_text("\n".join(prompts) + "\n", encoding="utf-8")
