"""The benchmark scripts still run end to end (smallest settings; the figures themselves live in docs)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def test_realign_speed_measures_every_variant(capsys):
    rows = _load("realign_speed").main(["--steps", "2", "--repeats", "1", "--cpu-batches", "1", "--threads", "1"])
    assert [r["variant"] for r in rows] == ["plain", "stacked", "two-call", "official"]
    assert all(r["s_per_image"] > 0 and r["peak_mb"] > 0 for r in rows)
    peak = {r["variant"]: r["peak_mb"] for r in rows}
    assert peak["official"] > peak["plain"]  # two full UNet copies
    assert "| official |" in capsys.readouterr().out


def test_dpo_throughput_reports_the_ladder_and_the_trainer(capsys):
    rows = _load("dpo_throughput").main(["--pairs", "2", "--steps", "1", "--rounds", "1"])
    assert list(rows) == ["plain", "+ cache", "+ cache + fused", "+ cache + fused + same-UNet ref",
                          "deradiff trainer", "deradiff trainer, no cache"]
    assert all(math.isfinite(rate) and rate > 0 for rate, _ in rows.values())
    assert "one-off cache build" in capsys.readouterr().out


def test_eval_cost_times_every_variant(capsys):
    medians = _load("eval_cost").main(["--steps", "1", "--seeds", "1", "--repeats", "1", "--batch", "3"])
    assert set(medians) == {"retrained", "realigned", "realigned+base call"}
    assert all(math.isfinite(m) and m > 0 for m in medians.values())
    assert "ratio to retrained" in capsys.readouterr().out
