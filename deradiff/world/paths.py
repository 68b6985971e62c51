"""Where the tiny world's shipped files live (inside the package, so an installed package finds them)."""

from __future__ import annotations

from pathlib import Path

WORLD_DIR = Path(__file__).resolve().parent
ASSETS_DIR = WORLD_DIR / "assets"
PROMPTS_DIR = WORLD_DIR / "prompts"
TINY_MODEL_DIR = str(ASSETS_DIR / "tiny-sd")
