"""What `deradiff tune` shows: the trade-off figures (matplotlib Agg) and one self-contained HTML page.

Everything is drawn from the tune.json dict alone, so the page shows exactly the numbers the choice was made
on. Values may be NaN (or None, as JSON writes NaN): such points are left out of a figure, and a metric with no
finite value gets a one-line note instead of a figure.

The plotting and HTML primitives are the eval report's (`deradiff.eval.figures`, which imports no torch).
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from deradiff.eval.figures import embed_png as _embed
from deradiff.eval.figures import finish_plot as _finish_plot
from deradiff.eval.figures import fmt as _fmt
from deradiff.eval.figures import plt
from deradiff.fileio import write_text_atomic

Row = Mapping[str, Any]
FEASIBLE_COLOR, INFEASIBLE_COLOR, CHOSEN_COLOR = "tab:green", "tab:red", "gold"
PASS_MARKERS = {"dense": "o", "refine": "^"}


# ---------------------------------------------------------------- pure helpers

def num(value: Any) -> float:
    """A float from a tune.json value: None (how JSON stores NaN / inf) and non-numbers read as NaN."""
    try:
        return math.nan if value is None else float(value)
    except (TypeError, ValueError):
        return math.nan


def displayed_objective(row: Row, sense: str) -> tuple[float, float, float]:
    """(value, lo, hi) of the objective as the user wrote it: rows store it larger-is-better, so a minimize
    criterion's stored objective is negated, and negating an interval swaps its ends."""
    value, lo, hi = num(row.get("objective")), num(row.get("objective_lo")), num(row.get("objective_hi"))
    return (-value, -hi, -lo) if sense == "minimize" else (value, lo, hi)


def metric_triple(row: Row, metric: str) -> tuple[float, float, float]:
    """(value, lo, hi) of one metric in one row (NaN where absent)."""
    return num(row.get(metric)), num(row.get(f"{metric}_lo")), num(row.get(f"{metric}_hi"))


def pareto_rows(rows: Sequence[Row], metric: str, larger_is_better: bool) -> list[Row]:
    """The rows no other row dominates on (stored objective, `metric`), in the given order.

    Dominated: another row is at least as good on both and strictly better on one (so two rows at the same
    point both stay). The stored objective is larger-is-better for every sense; `metric` is better when larger
    if `larger_is_better` (a >= / > constraint), else when smaller. Rows with a NaN coordinate are left out.
    """
    sign = 1.0 if larger_is_better else -1.0
    points = [(num(r.get("objective")), sign * num(r.get(metric)), r) for r in rows]
    points = [p for p in points if math.isfinite(p[0]) and math.isfinite(p[1])]
    return [r for a, b, r in points
            if not any(a2 >= a and b2 >= b and (a2 > a or b2 > b) for a2, b2, _ in points)]


def chosen_lambda(results: Mapping[str, Any]) -> float | None:
    choice = results.get("choice")
    return None if not choice else num(choice.get("lambda"))


def beta_text(beta: Any, lam: float) -> str:
    """'0.129', 'inf' at lambda 0 (the base model), 'unknown' when beta0 is unknown."""
    value = num(beta)
    if math.isfinite(value):
        return f"{value:.4g}"
    return "inf" if lam == 0 or math.isinf(value) else "unknown"


def criterion_metrics(criterion: Mapping[str, Any]) -> list[str]:
    """Every metric the criterion reads, objective first, each once."""
    constraints = [c["metric"] for c in criterion.get("constraints", [])]
    return list(dict.fromkeys([*criterion.get("objective", {}), *constraints]))


def _is_chosen(row: Row, lam: float | None) -> bool:
    return lam is not None and math.isclose(num(row.get("lambda")), lam, rel_tol=1e-9, abs_tol=1e-12)


def _errs(values: Sequence[float], los: Sequence[float], his: Sequence[float]) -> list[list[float]]:
    """Error-bar lengths [below, above]; a NaN or inverted end draws no bar on that side rather than failing."""
    below = [v - lo if math.isfinite(v - lo) and v >= lo else 0.0 for v, lo in zip(values, los)]
    above = [hi - v if math.isfinite(hi - v) and hi >= v else 0.0 for v, hi in zip(values, his)]
    return [below, above]


def _safe_name(metric: str) -> str:
    # Metric names are identifiers after parsing; this only guards the file name against a hand-edited JSON.
    return re.sub(r"[^A-Za-z0-9_.-]", "_", metric)


# ---------------------------------------------------------------- figures

def _chosen_label(results: Mapping[str, Any]) -> str:
    choice = results["choice"]
    lam = num(choice.get("lambda"))
    return f"chosen lambda={lam:.4g} (beta={beta_text(choice.get('beta'), lam)})"


def _front_points(rows: Sequence[Row], metric: str, sense: str) -> list[tuple[float, float, float, float, float, float, Row]]:
    """(x, x_lo, x_hi, y, y_lo, y_hi, row) for the rows where both the metric and the objective are finite."""
    points = [(*metric_triple(r, metric), *displayed_objective(r, sense), r) for r in rows]
    return [p for p in points if math.isfinite(p[0]) and math.isfinite(p[3])]


def _draw_errorbars(ax: Any, points: Sequence[tuple], color: str, label: str) -> None:
    if not points:
        return
    xs, xlo, xhi, ys, ylo, yhi = ([p[i] for p in points] for i in range(6))
    ax.errorbar(xs, ys, xerr=_errs(xs, xlo, xhi), yerr=_errs(ys, ylo, yhi), fmt="o", color=color, ms=4,
                capsize=2, lw=1, label=label)


def _annotate_lambdas(ax: Any, points: Sequence[tuple], chosen: float | None) -> None:
    """Label a few lambdas (the chosen, 0, 1 and both ends) so the reader can orient along the front
    without every label overlapping."""
    lams = sorted(num(p[-1].get("lambda")) for p in points)
    if not lams:
        return
    wanted = {lams[0], lams[-1], 0.0, 1.0} | ({chosen} if chosen is not None else set())
    for p in points:
        lam = num(p[-1].get("lambda"))
        if any(math.isclose(lam, w, abs_tol=1e-12) for w in wanted):
            ax.annotate(f"λ={lam:.3g}", (p[0], p[3]), textcoords="offset points", xytext=(4, 4), fontsize=7)


def plot_front(results: Mapping[str, Any], metric: str, larger_is_better: bool, bounds: Sequence[Mapping[str, Any]],
               path: Path) -> bool:
    """The objective (as written) against `metric`, both with interval bars; feasible / infeasible colours,
    each bound as a dashed line, the non-dominated rows joined, the chosen lambda as a star. False when
    no row has both values finite (nothing drawn)."""
    meta, rows = results["meta"], results["rows"]
    sense, chosen = meta["criterion"]["sense"], chosen_lambda(results)
    points = _front_points(rows, metric, sense)
    if not points:
        return False
    fig, ax = plt.subplots(figsize=(5.6, 3.9))
    _draw_errorbars(ax, [p for p in points if p[-1].get("feasible")], FEASIBLE_COLOR, "feasible")
    _draw_errorbars(ax, [p for p in points if not p[-1].get("feasible")], INFEASIBLE_COLOR, "infeasible")
    front_ids = {id(r) for r in pareto_rows([p[-1] for p in points], metric, larger_is_better)}
    front = sorted((p for p in points if id(p[-1]) in front_ids), key=lambda p: p[0])
    # Open rings as well as the line: a front of one point (common under minimize) would otherwise be invisible.
    ax.plot([p[0] for p in front], [p[3] for p in front], "o-", color="gray", mfc="none", ms=9, lw=1,
            label="non-dominated")
    for c in bounds:
        ax.axvline(num(c["bound"]), ls="--", color="black", lw=1, label=f"{c['metric']} {c['op']} {num(c['bound']):.10g}")
    for p in points:
        if _is_chosen(p[-1], chosen):
            ax.plot(p[0], p[3], "*", ms=16, color=CHOSEN_COLOR, mec="black", zorder=5, label=_chosen_label(results))
    _annotate_lambdas(ax, points, chosen)
    _finish_plot(fig, ax, metric, meta["criterion"]["expression"], path)
    return True


def _lambda_series(rows: Sequence[Row], metric: str | None, sense: str) -> list[tuple[float, float, float, float, Row]]:
    """(lambda, value, lo, hi, row) sorted by lambda, finite values only; metric None means the objective."""
    series = []
    for r in rows:
        value, lo, hi = displayed_objective(r, sense) if metric is None else metric_triple(r, metric)
        if math.isfinite(value) and math.isfinite(num(r.get("lambda"))):
            series.append((num(r.get("lambda")), value, lo, hi, r))
    return sorted(series, key=lambda s: s[0])


def plot_lambda(results: Mapping[str, Any], metric: str | None, path: Path) -> bool:
    """Value vs lambda with its interval as a band, dense and refine points in different markers, the chosen
    lambda as a vertical line and a constrained metric's bounds as dashed horizontals. `metric` None draws the
    objective as written. False when no value is finite (nothing drawn)."""
    criterion, chosen = results["meta"]["criterion"], chosen_lambda(results)
    series = _lambda_series(results["rows"], metric, criterion["sense"])
    if not series:
        return False
    fig, ax = plt.subplots(figsize=(5.6, 3.6))
    lams, values = [s[0] for s in series], [s[1] for s in series]
    band = [(s[0], s[2], s[3]) for s in series if math.isfinite(s[2]) and math.isfinite(s[3])]
    if band:
        ax.fill_between([b[0] for b in band], [b[1] for b in band], [b[2] for b in band], alpha=0.25,
                        color="tab:blue", lw=0, label=f"{results['meta'].get('confidence', 0.95):.0%} interval")
    ax.plot(lams, values, "-", color="tab:blue", lw=1)
    for name, marker in PASS_MARKERS.items():
        picked = [s for s in series if s[4].get("pass", "dense") == name]
        if picked:
            ax.plot([s[0] for s in picked], [s[1] for s in picked], marker, color="tab:blue", ms=5, label=f"{name} pass")
    for c in criterion.get("constraints", []):
        if metric is not None and c["metric"] == metric:
            ax.axhline(num(c["bound"]), ls="--", color="black", lw=1, label=f"{c['metric']} {c['op']} {num(c['bound']):.10g}")
    if chosen is not None and math.isfinite(chosen):
        ax.axvline(chosen, color=CHOSEN_COLOR, lw=2, zorder=0, label=_chosen_label(results))
    ylabel = criterion["expression"] + " (objective)" if metric is None else metric
    _finish_plot(fig, ax, "lambda (emulated beta = beta0 / lambda)", ylabel, path)
    return True


def _fronts(criterion: Mapping[str, Any], measured: Sequence[str]) -> list[tuple[str, bool, list[Mapping[str, Any]]]]:
    """(metric, larger is better, its constraints) per constrained metric; with no constraints, the
    objective-vs-path_kl trade-off (smaller KL is better) when path_kl is measured and is not the objective alone."""
    constraints = criterion.get("constraints", [])
    if constraints:
        metrics = list(dict.fromkeys(c["metric"] for c in constraints))
        return [(m, next(c for c in constraints if c["metric"] == m)["op"] in (">=", ">"),
                 [c for c in constraints if c["metric"] == m]) for m in metrics]
    if "path_kl" in measured and set(criterion.get("objective", {})) != {"path_kl"}:
        return [("path_kl", False, [])]
    return []


def write_plots(out: Path, results: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The tune's figures under out/plots: a front per constrained metric (or objective vs path_kl without
    constraints) and value-vs-lambda for the objective and every criterion metric. Returns (paths relative to
    `out`, one-line notes on figures skipped because their values are all NaN)."""
    (out / "plots").mkdir(parents=True, exist_ok=True)
    criterion = results["meta"]["criterion"]
    files: list[str] = []
    skipped: list[str] = []
    for metric, larger, bounds in _fronts(criterion, results["meta"].get("metrics", [])):
        rel = f"plots/front_{_safe_name(metric)}.png"
        if plot_front(results, metric, larger, bounds, out / rel):
            files.append(rel)
        else:
            skipped.append(f"{criterion['expression']} vs {metric} front not drawn: no lambda has both values finite")
    for metric in [None, *criterion_metrics(criterion)]:
        name = "objective" if metric is None else metric
        rel = f"plots/lambda_{_safe_name(name)}.png"
        if plot_lambda(results, metric, out / rel):
            files.append(rel)
        else:
            skipped.append(f"{name} vs lambda not drawn: every value is nan")
    return files, skipped


# ---------------------------------------------------------------- HTML

def _interval(value: float, lo: float, hi: float) -> str:
    """'0.81 [0.79, 0.83]'; the bracket is left out when an end is not finite."""
    text = _fmt(value)
    return text + (f" [{lo:.4g}, {hi:.4g}]" if math.isfinite(lo) and math.isfinite(hi) else "")


def _headline(results: Mapping[str, Any]) -> str:
    """The chosen lambda and its beta with the reason, or the infeasible message in a visible box."""
    choice, infeasible = results.get("choice"), results.get("infeasible")
    if choice:
        lam, beta0 = num(choice.get("lambda")), num(results["meta"].get("beta0"))
        beta = beta_text(choice.get("beta"), lam)
        return (f"<p class='headline'>Chosen lambda = {lam:.4g}: emulated beta = beta0 / lambda = "
                f"{_fmt(beta0)} / {lam:.4g} = {html.escape(beta)}</p><p>{html.escape(str(choice.get('reason', '')))}</p>")
    if infeasible:
        return (f"<div class='infeasible'><b>No lambda is feasible.</b> {html.escape(str(infeasible.get('message', '')))}"
                f"<br>Least violating lambda: {_fmt(num(infeasible.get('lambda')))}</div>")
    return "<div class='infeasible'>No lambda was chosen and no reason was recorded.</div>"


def cost_line(cost: Mapping[str, Any]) -> str:
    """'tune: X s for N lambdas; retraining at each would take about Y s (anchor's training time T s x N),
    Z x more', with the unknown parts left out (plain text, not escaped)."""
    explored, tune = num(cost.get("lambdas_explored")), num(cost.get("tune_wall_s"))
    n = int(explored) if math.isfinite(explored) else 0
    head = f"tune: {tune:.4g} s for {n} lambdas"
    anchor, retrain, ratio = num(cost.get("anchor_train_wall_s")), num(cost.get("retrain_wall_s")), num(cost.get("ratio"))
    if not math.isfinite(anchor) or not math.isfinite(retrain):
        return f"{head}; anchor training time unknown, so retraining at each lambda is not estimated"
    tail = f", {ratio:.3g} x more" if math.isfinite(ratio) else ""
    return f"{head}; retraining at each would take about {retrain:.4g} s (anchor's training time {anchor:.4g} s x {n}){tail}"


def _verify_html(verify: Mapping[str, Any] | None) -> str:
    """The retrained-at-the-chosen-beta check: a table of realigned vs retrained per metric, and its note."""
    if not verify:
        return ""
    if verify.get("skipped"):
        return f"<h2>Check by retraining</h2><p>{html.escape(str(verify['skipped']))}</p>"
    head = "".join(f"<th>{h}</th>" for h in ("metric", "realigned", "retrained", "difference", "verdict"))
    body = "".join(
        f"<tr><td>{_fmt(m.get('metric'))}</td>"
        + "".join(f"<td>{_interval(*(num(m.get(f'{k}{e}')) for e in ('', '_lo', '_hi')))}</td>"
                  for k in ("realigned", "retrained", "difference"))
        + f"<td>{_fmt(m.get('verdict'))}</td></tr>" for m in verify.get("metrics", []))
    return (f"<h2>Check: retrained at beta = {_fmt(num(verify.get('beta')))}</h2>"
            f"<p>LoRA: {html.escape(str(verify.get('lora_dir', '')))}; training took "
            f"{_fmt(num(verify.get('train_wall_s')))} s</p><table><tr>{head}</tr>{body}</table>"
            f"<p>{html.escape(str(verify.get('note', '')))}</p>")


def _images_html(out: Path, entries: Sequence[tuple[str, str]]) -> str:
    """Embedded images (relative path, caption); a missing file gets a note instead of stopping the page."""
    parts = []
    for rel, caption in entries:
        cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
        if (out / rel).is_file():
            parts.append(f"<figure><img src='{_embed(out / rel)}' alt='{html.escape(rel)}'>{cap}</figure>")
        else:
            parts.append(f"<p class='note'>image '{html.escape(rel)}' is missing; not shown</p>")
    return "".join(parts)


def _rows_html(results: Mapping[str, Any]) -> str:
    """Every measured lambda: beta, pass, each metric and the objective with intervals, feasible; feasible rows
    shaded, the chosen row bold."""
    meta, chosen = results["meta"], chosen_lambda(results)
    metrics, expression = meta.get("metrics", []), meta["criterion"]["expression"]
    head = "".join(f"<th>{html.escape(h)}</th>" for h in ("lambda", "beta", "pass", *metrics, f"objective: {expression}", "feasible"))
    body = []
    for r in results["rows"]:
        lam = num(r.get("lambda"))
        cls = " ".join(c for c, on in (("feasible", r.get("feasible")), ("chosen", _is_chosen(r, chosen))) if on)
        cells = [_fmt(lam), html.escape(beta_text(r.get("beta"), lam)), _fmt(r.get("pass")),
                 *(_interval(*metric_triple(r, m)) for m in metrics),
                 _interval(*displayed_objective(r, meta["criterion"]["sense"])), "yes" if r.get("feasible") else "no"]
        body.append(f"<tr class='{cls}'>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


_STYLE = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:12px}"
          "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}figure{display:inline-block;margin:4px}"
          ".headline{font-size:1.3em;font-weight:bold}.infeasible{border:2px solid #c00;background:#fee;padding:1em}"
          "tr.feasible{background:#e6f5e6}tr.chosen{font-weight:bold;outline:2px solid #c90}.note{color:#666}")


def write_html(out: Path, results: dict[str, Any]) -> Path:
    """out/tune.html from the tune.json dict, every figure and grid embedded (one self-contained file).

    Figures are results['plots'] (paths relative to `out`, as write_plots returns them) with the notes in
    results['skipped_plots']; grids are results['grids'] entries {prompt, path}."""
    meta, criterion = results["meta"], results["meta"]["criterion"]
    grids = [(str(g.get("path") or g.get("file") or ""), str(g.get("prompt", ""))) for g in results.get("grids", [])]
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>deradiff tune</title><style>{_STYLE}</style></head><body>",
        "<h1>Choosing lambda</h1>",
        f"<p>anchor: {html.escape(str(meta.get('anchor_lora', '')))} (beta0 = {_fmt(num(meta.get('beta0')))}, method "
        f"{html.escape(str(meta.get('method', '')))}); base: {html.escape(str(meta.get('base_model', '')))}; "
        f"{len(meta.get('prompts', []))} prompts x {len(meta.get('seeds', []))} seeds; "
        f"{num(meta.get('confidence')):.0%} bootstrap intervals from {_fmt(meta.get('replicates'))} replicates; "
        f"measured {html.escape(str(meta.get('date', 'on an unrecorded date')))}</p>",
        _headline(results),
        f"<p>Criterion: <code>{html.escape(str(criterion.get('text', '')))}</code>. A lambda is feasible only when "
        "every constrained metric's whole interval satisfies its constraint.</p>",
        f"<p>{html.escape(cost_line(results.get('cost', {})))}</p>",
        _verify_html(results.get("verify")),
        "<h2>Figures</h2>", _images_html(out, [(str(f), "") for f in results.get("plots", [])]),
        "".join(f"<p class='note'>{html.escape(str(n))}</p>" for n in results.get("skipped_plots", [])),
        "<h2>Image grids</h2>", _images_html(out, grids),
        "<h2>Every lambda (bracketed: bootstrap interval; shaded: feasible; bold: chosen)</h2>", _rows_html(results),
        "<h2>Prompts</h2><ol>" + "".join(f"<li>{html.escape(str(p))}</li>" for p in meta.get("prompts", [])) + "</ol>",
        "</body></html>",
    ]
    return write_text_atomic(out / "tune.html", "\n".join(parts))
