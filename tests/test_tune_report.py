"""The tune's figures and HTML page, drawn from a synthetic tune.json dict (no model, no sampling)."""

from __future__ import annotations

import copy
import math
import shutil
from pathlib import Path
from typing import Any

import matplotlib.figure
import pytest
from PIL import Image

from deradiff.tuning import report

LAMBDAS = [(0.0, "dense"), (0.25, "dense"), (0.5, "dense"), (0.62, "refine"), (0.75, "dense"), (1.0, "dense"),
           (1.5, "dense"), (2.0, "dense")]
BETA0 = 0.08
REASON = "lambda 0.62 (beta 0.129): lambdas 0.62, 0.75 are within its interval, the smallest <is> chosen"
PROMPT = "<b>a bold</b> cat & dog"


def _metric(row: dict[str, Any], name: str, value: float, half: float = 0.02) -> None:
    row.update({name: value, f"{name}_lo": value - half, f"{name}_hi": value + half})


def _row(lam: float, pass_: str) -> dict[str, Any]:
    """vividness rises and fidelity falls with lambda; feasible when fidelity's lower end clears 0.8."""
    row: dict[str, Any] = {"lambda": lam, "beta": None if lam == 0 else BETA0 / lam, "pass": pass_}
    _metric(row, "vividness", 0.3 + 0.3 * lam)
    _metric(row, "fidelity", 0.95 - 0.15 * lam)
    _metric(row, "path_kl", 40.0 * lam, 2.0)
    _metric(row, "diversity", 0.5)
    row.update({"kid": math.nan, "kid_lo": math.nan, "kid_hi": math.nan})
    _metric(row, "objective", row["vividness"])
    row["feasible"] = row["fidelity_lo"] >= 0.8
    return row


def make_results(**overrides: Any) -> dict[str, Any]:
    criterion = {"text": "maximize vividness subject to fidelity >= 0.8", "sense": "maximize", "expression": "vividness",
                 "objective": {"vividness": 1.0}, "constraints": [{"metric": "fidelity", "op": ">=", "bound": 0.8}]}
    results = {
        "meta": {"anchor_lora": "runs/anchor<1>", "beta0": BETA0, "method": "ddpo", "base_model": "tiny",
                 "prompts": [PROMPT, "a plain prompt"], "seeds": [0, 1], "confidence": 0.95, "replicates": 200,
                 "criterion": criterion, "metrics": ["vividness", "fidelity", "path_kl", "diversity", "kid"]},
        "rows": [_row(lam, p) for lam, p in LAMBDAS],
        "choice": {"lambda": 0.62, "beta": BETA0 / 0.62, "best": 0.75, "feasible": [0.0, 0.25, 0.5, 0.62, 0.75],
                   "tied": [0.62, 0.75], "reason": REASON},
        "infeasible": None,
        "cost": {"tune_wall_s": 120.0, "anchor_train_wall_s": 600.0, "lambdas_explored": 8,
                 "retrain_wall_s": 4800.0, "ratio": 40.0},
        "verify": None, "plots": [], "grids": [],
    }
    results.update(overrides)
    return results


def _minimize(results: dict[str, Any]) -> dict[str, Any]:
    """The same table under 'minimize path_kl subject to fidelity >= 0.8': the stored objective is -path_kl."""
    results["meta"]["criterion"].update(text="minimize path_kl subject to fidelity >= 0.8", sense="minimize",
                                        expression="path_kl", objective={"path_kl": -1.0})
    for row in results["rows"]:
        row.update(objective=-row["path_kl"], objective_lo=-row["path_kl_hi"], objective_hi=-row["path_kl_lo"])
    return results


def _spy(seen: dict[str, dict[str, Any]]) -> Any:
    """A stand-in for report._finish_plot that records each figure's legend labels, annotations, y label and
    plotted lines (keyed by file name) just before the real one saves it."""
    original = report._finish_plot

    def spy(fig: Any, ax: Any, xlabel: str, ylabel: str, path: Path) -> None:
        seen[path.name] = {"labels": ax.get_legend_handles_labels()[1], "texts": [t.get_text() for t in ax.texts],
                           "ylabel": ylabel, "lines": [line.get_ydata() for line in ax.get_lines()]}
        original(fig, ax, xlabel, ylabel, path)
    return spy


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> dict[str, dict[str, Any]]:
    seen: dict[str, dict[str, Any]] = {}
    monkeypatch.setattr(report, "_finish_plot", _spy(seen))
    return seen


@pytest.fixture(scope="module")
def drawn(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], list[str], dict[str, dict[str, Any]]]:
    """The standard results' figures, drawn once for the module (drawing is the slow part of these tests):
    (out, files, skipped, what each figure showed)."""
    out, seen = tmp_path_factory.mktemp("drawn"), {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(report, "_finish_plot", _spy(seen))
        files, skipped = report.write_plots(out, make_results())
    return out, files, skipped, seen


def _leftovers(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if p.name.startswith(".") or ".tmp-" in p.name]


def test_plots_written_as_valid_images(drawn: tuple) -> None:
    out, files, skipped, _ = drawn
    assert files == ["plots/front_fidelity.png", "plots/lambda_objective.png", "plots/lambda_vividness.png",
                     "plots/lambda_fidelity.png"]
    assert skipped == []
    for rel in files:
        with Image.open(out / rel) as image:
            image.verify()
            assert image.format == "PNG" and image.size[0] > 100
    assert _leftovers(out) == []


def test_front_marks_choice_bound_front_and_lambdas(drawn: tuple) -> None:
    captured = drawn[3]
    front = captured["front_fidelity.png"]
    for label in ("feasible", "infeasible", "non-dominated", "fidelity >= 0.8", "chosen lambda=0.62 (beta=0.129)"):
        assert label in front["labels"]
    assert {"λ=0", "λ=0.62", "λ=1", "λ=2"} <= set(front["texts"])
    assert front["ylabel"] == "vividness"
    fidelity = captured["lambda_fidelity.png"]
    assert {"dense pass", "refine pass", "fidelity >= 0.8"} <= set(fidelity["labels"])
    assert "fidelity >= 0.8" not in captured["lambda_vividness.png"]["labels"]


def test_no_constraints_draws_reward_vs_path_kl(tmp_path: Path) -> None:
    results = make_results()
    results["meta"]["criterion"].update(text="maximize vividness", constraints=[])
    files, _ = report.write_plots(tmp_path, results)
    assert files[0] == "plots/front_path_kl.png" and (tmp_path / files[0]).is_file()
    assert "plots/lambda_fidelity.png" not in files


def test_pareto_rows_drops_dominated_keeps_ties() -> None:
    a = {"lambda": 0.0, "objective": 1.0, "m": 0.9}
    b = {"lambda": 0.5, "objective": 1.0, "m": 0.8}  # same objective as a, worse m when larger is better
    c = {"lambda": 1.0, "objective": 2.0, "m": 0.5}
    d = {"lambda": 1.5, "objective": 2.0, "m": 0.5}  # the same point as c: neither beats the other
    nan = {"lambda": 2.0, "objective": 5.0, "m": math.nan}
    assert report.pareto_rows([a, b, c, d, nan], "m", larger_is_better=True) == [a, c, d]
    assert report.pareto_rows([a, b, c, d, nan], "m", larger_is_better=False) == [c, d]


def test_minimize_displays_negated_objective(tmp_path: Path, captured: dict[str, dict[str, Any]]) -> None:
    row = {"objective": -3.0, "objective_lo": -3.5, "objective_hi": -2.5}
    assert report.displayed_objective(row, "minimize") == (3.0, 2.5, 3.5)
    assert report.displayed_objective(row, "maximize") == (-3.0, -3.5, -2.5)
    results = _minimize(make_results())
    report.write_plots(tmp_path, results)
    plotted = [list(y) for y in captured["lambda_objective.png"]["lines"] if len(y) == len(LAMBDAS)]
    assert plotted and plotted[0] == pytest.approx([40.0 * lam for lam, _ in LAMBDAS])
    assert captured["front_fidelity.png"]["ylabel"] == "path_kl"
    page = report.write_html(tmp_path, results).read_text()
    assert "80 [78, 82]" in page  # lambda 2's path_kl as written, not -80 [-82, -78]


@pytest.mark.parametrize("missing", [math.nan, None])
def test_all_nan_metric_skipped_with_note(tmp_path: Path, missing: float | None) -> None:
    results = make_results()
    results["meta"]["criterion"].update(text="maximize vividness subject to kid <= 0.1",
                                        constraints=[{"metric": "kid", "op": "<=", "bound": 0.1}])
    for row in results["rows"]:
        row.update(kid=missing, kid_lo=missing, kid_hi=missing)
    files, skipped = report.write_plots(tmp_path, results)
    assert not (tmp_path / "plots/lambda_kid.png").exists() and not (tmp_path / "plots/front_kid.png").exists()
    assert files == ["plots/lambda_objective.png", "plots/lambda_vividness.png"]
    assert len([n for n in skipped if "kid" in n]) == 2 and all("\n" not in n for n in skipped)


def _page(out: Path, results: dict[str, Any], drawn: tuple) -> str:
    """tune.html for `results` with the module's drawn figures copied into `out`."""
    for rel in drawn[1]:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(drawn[0] / rel, out / rel)
    results.update(plots=drawn[1], skipped_plots=["kid vs lambda not drawn: <nan>"])
    path = report.write_html(out, results)
    assert path == out / "tune.html"
    return path.read_text()


def test_html_headline_escaping_rows_and_figures(tmp_path: Path, drawn: tuple) -> None:
    page = _page(tmp_path, make_results(), drawn)
    assert "Chosen lambda = 0.62" in page and "= 0.129" in page
    assert REASON.replace("<is>", "&lt;is&gt;") in page
    assert "&lt;b&gt;a bold&lt;/b&gt; cat &amp; dog" in page and "<b>a" not in page
    assert "runs/anchor&lt;1&gt;" in page
    assert "maximize vividness subject to fidelity &gt;= 0.8" in page
    assert page.count("<tr class='feasible'>") == 4 and page.count("<tr class='feasible chosen'>") == 1
    assert page.count("<tr class=''>") == 3
    assert page.count("data:image/png;base64,") == 4 and "kid vs lambda not drawn: &lt;nan&gt;" in page
    assert "tune: 120 s for 8 lambdas; retraining at each would take about 4800 s (anchor&#x27;s training time 600 s x 8), 40 x more" in page
    assert "Check: retrained" not in page and "No lambda is feasible" not in page
    assert _leftovers(tmp_path) == []


def test_html_cost_without_anchor_time(tmp_path: Path, drawn: tuple) -> None:
    cost = {"tune_wall_s": 120.0, "anchor_train_wall_s": None, "lambdas_explored": 8, "retrain_wall_s": None, "ratio": None}
    page = _page(tmp_path, make_results(cost=cost), drawn)
    assert "tune: 120 s for 8 lambdas; anchor training time unknown" in page and "x more" not in page


def test_html_verify_table(tmp_path: Path, drawn: tuple) -> None:
    verify = {"beta": 0.129, "lora_dir": "verify/lora<x>", "train_wall_s": 610.0, "note": "one retrain <only>",
              "metrics": [{"metric": "vividness", "realigned": 0.486, "realigned_lo": 0.466, "realigned_hi": 0.506,
                           "retrained": 0.5, "retrained_lo": 0.48, "retrained_hi": 0.52, "difference": -0.014,
                           "difference_lo": -0.04, "difference_hi": 0.012, "verdict": "consistent"}]}
    page = _page(tmp_path, make_results(verify=verify), drawn)
    assert "Check: retrained at beta = 0.129" in page
    assert "<td>vividness</td><td>0.486 [0.466, 0.506]</td><td>0.5 [0.48, 0.52]</td><td>-0.014 [-0.04, 0.012]</td><td>consistent</td>" in page
    assert "verify/lora&lt;x&gt;" in page and "one retrain &lt;only&gt;" in page


def test_html_infeasible_box(tmp_path: Path, drawn: tuple) -> None:
    infeasible = {"message": "no lambda satisfies 'fidelity >= 0.99' with its whole interval", "lambda": 0.0}
    results = make_results(choice=None, infeasible=infeasible)
    for row in results["rows"]:
        row["feasible"] = False
    page = _page(tmp_path, results, drawn)
    assert "<div class='infeasible'><b>No lambda is feasible.</b> no lambda satisfies &#x27;fidelity &gt;= 0.99&#x27;" in page
    assert "Chosen lambda" not in page and "chosen'>" not in page and "<tr class='feasible" not in page
    assert page.count("<tr class=''>") == len(LAMBDAS)
    assert "Least violating lambda: 0" in page


def test_html_grids_embedded_and_missing_noted(tmp_path: Path, drawn: tuple) -> None:
    (tmp_path / "grids").mkdir()
    Image.new("RGB", (8, 8), "red").save(tmp_path / "grids/grid_0.png")
    grids = [{"prompt": PROMPT, "path": "grids/grid_0.png"}, {"prompt": "gone", "path": "grids/missing.png"}]
    page = _page(tmp_path, make_results(grids=grids), drawn)
    assert "<figcaption>&lt;b&gt;a bold&lt;/b&gt; cat &amp; dog</figcaption>" in page
    assert "image 'grids/missing.png' is missing" in page
    assert page.count("data:image/png;base64,") == 5  # 4 figures + the one grid that exists


def test_png_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A savefig that dies half-way leaves neither a truncated PNG under its name nor a temp file."""
    def broken(self: Any, fname: Any, **kwargs: Any) -> None:
        Path(fname).write_bytes(b"\x89PNG half")
        raise OSError("disk died")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", broken)
    with pytest.raises(OSError, match="disk died"):
        report.write_plots(tmp_path, make_results())
    assert list((tmp_path / "plots").iterdir()) == []


def test_html_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that dies half-way leaves no truncated tune.html and no temp file."""
    def broken(self: Path, text: str, *args: Any, **kwargs: Any) -> int:
        with open(self, "w") as f:
            f.write(text[:50])
        raise OSError("disk died")

    monkeypatch.setattr(Path, "write_text", broken)
    with pytest.raises(OSError, match="disk died"):
        report.write_html(tmp_path, copy.deepcopy(make_results()))
    assert list(tmp_path.iterdir()) == []
