"""Tiny-world preference generation: labelled pairs on disk, with progress shown while it samples."""

from __future__ import annotations

from types import SimpleNamespace

import pyarrow.parquet as pq

from deradiff.data.prefs import generate_preferences
from deradiff.testing import save_tiny_base


def test_generation_writes_labelled_pairs_and_shows_progress(tmp_path, capsys):
    """Was: the study's preference stage ran for ~100 s with no output (its sampling bar was disabled)."""
    section = SimpleNamespace(reward="vividness", reward_options={}, temperature=0.05, pairs_per_prompt=2,
                              num_inference_steps=2, guidance_scale=3.0, seed=0)
    info = generate_preferences(save_tiny_base(tmp_path / "base"), str(tmp_path / "prefs.parquet"), section,
                                prompts=["red circle", "blue square"])
    table = pq.read_table(tmp_path / "prefs.parquet").to_pydict()
    assert info["pairs"] == len(table["caption"]) == 4
    assert all(a + b == 1 for a, b in zip(table["label_0"], table["label_1"]))
    err = capsys.readouterr().err
    assert "prefs: 100%" in err and "4/4" in err


def test_the_prefs_command_samples_on_the_configured_device(tmp_path, monkeypatch):
    """Was: `deradiff data prefs` always sampled on the CPU."""
    import deradiff.data.prefs as prefs
    from deradiff.cli import main

    seen = {}
    monkeypatch.setattr(prefs, "generate_preferences", lambda base, output, section, device="cpu": seen.update(
        device=device) or {"pairs": 0})
    assert main(["data", "prefs", f"output_dir={tmp_path / 'p'}", "device=cpu"]) == 0
    assert seen == {"device": "cpu"}
    assert main(["data", "prefs", f"output_dir={tmp_path / 'q'}", "device=gpu0"]) == 2
