"""Everything the eval writes: results CSV/JSON, plots (matplotlib Agg), image grids (PIL) and one HTML report.

The HTML is built from results.json only, and embeds every plot and grid as base64, so it opens anywhere and
shows exactly the numbers of this run.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from deradiff.eval.generate import Job, VariantSamples  # noqa: E402
from deradiff.eval.figures import embed_png, finish_plot, fmt  # noqa: E402
from deradiff.fileio import atomic_path, write_text_atomic  # noqa: E402

CURVES = (("retrained", "o-", "retrained"), ("realigned", "s--", "DeRaDiff realigned"), ("weight_scaled", "^:", "weight-scaled LoRA"),
          ("oracle", "k*-", "exact optimum (oracle)"))


def json_safe(value: Any) -> Any:
    """inf/nan are not JSON: write them as null (the CSV keeps inf/nan)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


def write_results(out: Path, results: dict[str, Any]) -> None:
    """results.json (everything) plus results.csv (models), approximation.csv and samples.csv."""
    write_text_atomic(out / "results.json", json.dumps(json_safe(results), indent=2))
    for name, key in (("results.csv", "models"), ("approximation.csv", "approximation"), ("samples.csv", "samples")):
        with atomic_path(out / name) as tmp:
            pd.DataFrame(results[key]).to_csv(tmp, index=False)


def in_curve(row: dict[str, Any], kind: str) -> bool:
    """Rows of one curve: the anchor is the lambda = 1 point of every model curve; unreliable oracle rows are left out."""
    if kind == "oracle":
        return row["kind"] == "oracle" and bool(row.get("reliable"))
    return row["kind"] == kind or (bool(row.get("anchor")) and kind in ("realigned", "weight_scaled"))


def curve_rows(rows: Sequence[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """One curve's rows with a finite effective beta, sorted by it."""
    return sorted((r for r in rows if in_curve(r, kind) and math.isfinite(r["effective_beta"])), key=lambda r: r["effective_beta"])


def curve_points(rows: Sequence[dict[str, Any]], kind: str, key: str) -> tuple[list[float], list[float]]:
    """(effective beta, metric) sorted by beta."""
    picked = curve_rows(rows, kind)
    return [r["effective_beta"] for r in picked], [r[key] for r in picked]


def plot_metric(rows: Sequence[dict[str, Any]], key: str, path: Path) -> None:
    """Metric vs effective beta (log x) per family, with bootstrap interval bars where computed; base as a line."""
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for kind, style, label in CURVES:
        picked = [r for r in curve_rows(rows, kind) if math.isfinite(r[key])]
        if len(picked) < 2:
            continue
        xs, ys = [r["effective_beta"] for r in picked], [r[key] for r in picked]
        if all(math.isfinite(r.get(f"{key}_lo", math.nan)) for r in picked):
            yerr = [[y - r[f"{key}_lo"] for y, r in zip(ys, picked)], [r[f"{key}_hi"] - y for y, r in zip(ys, picked)]]
            ax.errorbar(xs, ys, yerr=yerr, fmt=style, label=label, capsize=2)
        else:
            ax.plot(xs, ys, style, label=label)
    base = next(r[key] for r in rows if r["kind"] == "base")
    ax.axhline(base, color="gray", lw=1, label="base (beta = inf)")
    ax.set_xscale("log")
    finish_plot(fig, ax, "effective beta (beta0 / lambda for realigned)", key, path)


def plot_pareto(rows: Sequence[dict[str, Any]], reward: str, path: Path) -> None:
    """Reward vs path KL to base: the trade-off each family of models traces."""
    fig, ax = plt.subplots(figsize=(5, 3.4))
    base = next(r for r in rows if r["kind"] == "base")
    for kind, style, label in CURVES:
        pts = sorted((r["path_kl"], r[reward]) for r in rows if in_curve(r, kind) and math.isfinite(r["path_kl"] + r[reward]))
        if not pts:
            continue
        pts = [(base["path_kl"], base[reward])] + pts
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
    finish_plot(fig, ax, "path KL to base (nats / image)", reward, path)


def to_pil(image: torch.Tensor, scale: int) -> Image.Image:
    array = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    pil = Image.fromarray(array)
    return pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST) if scale > 1 else pil


def image_grid(samples: dict[str, VariantSamples], names: Sequence[str], indices: Sequence[int], path: Path,
               column_labels: Sequence[str] = ()) -> None:
    """Rows: models (labelled), columns: the given sample indices (seeds of one prompt, labelled). The images are
    diffusers' `make_image_grid`, pasted after the labels so that a long label never covers an image."""
    from diffusers.utils import make_image_grid

    first = samples[names[0]].images[indices[0]]
    scale = max(1, 96 // first.shape[-1])
    cell_h, cell_w, label_w, top = first.shape[-2] * scale, first.shape[-1] * scale, 150, 16
    grid = Image.new("RGB", (label_w + cell_w * len(indices), top + cell_h * len(names)), "white")
    draw = ImageDraw.Draw(grid)
    for c, label in enumerate(column_labels):
        draw.text((label_w + c * cell_w + 4, 2), label, fill="black")
    for r, name in enumerate(names):
        draw.text((4, top + r * cell_h + cell_h // 2 - 6), name, fill="black")
    cells = [to_pil(samples[name].images[i], scale) for name in names for i in indices]
    grid.paste(make_image_grid(cells, rows=len(names), cols=len(indices)), (label_w, top))
    with atomic_path(path) as tmp:
        grid.save(tmp)


def write_grids(out: Path, samples: dict[str, VariantSamples], names: Sequence[str], jobs: Sequence[Job], n_prompts: int, n_seeds: int) -> list[dict[str, str]]:
    """One grid per prompt (first n_prompts): returns [{prompt, file}] with paths relative to `out`."""
    grids = []
    prompts = list(dict.fromkeys(p for p, _ in jobs))[:n_prompts]
    for k, prompt in enumerate(prompts):
        indices = [i for i, (p, _) in enumerate(jobs) if p == prompt][:n_seeds]
        rel = f"grids/grid_{k}.png"
        image_grid(samples, names, indices, out / rel, [f"seed {jobs[i][1]}" for i in indices])
        grids.append({"prompt": prompt, "file": rel, "seeds": [jobs[i][1] for i in indices]})
    return grids


def write_plots(out: Path, rows: Sequence[dict[str, Any]], metric_keys: Sequence[str],
                reward: str | None) -> tuple[list[str], list[str]]:
    """Metric-vs-beta plots for every metric plus the reward/path-KL Pareto plot: (relative paths, notes on the
    plots skipped because their numbers are not finite)."""
    files, skipped = [], []
    for key in metric_keys:
        if not plottable(rows, key):
            skipped.append(f"{key} vs beta not drawn: the base model's {key} or every curve's values are not finite")
            continue
        rel = f"plots/{key}_vs_beta.png"
        plot_metric(rows, key, out / rel)
        files.append(rel)
    if reward is not None and plottable(rows, reward) and plottable(rows, "path_kl"):
        rel = f"plots/pareto_{reward}_vs_path_kl.png"
        plot_pareto(rows, reward, out / rel)
        files.append(rel)
    elif reward is not None:
        skipped.append(f"{reward} vs path KL not drawn: values are not finite")
    return files, skipped


def plottable(rows: Sequence[dict[str, Any]], key: str) -> bool:
    """A finite base value and at least one curve with two finite points."""
    base = next(r[key] for r in rows if r["kind"] == "base")
    curves = [[r for r in curve_rows(rows, kind) if math.isfinite(r[key])] for kind, _, _ in CURVES]
    return math.isfinite(base) and any(len(c) >= 2 for c in curves)


def html_table(rows: Sequence[dict[str, Any]], keys: Sequence[str], estimated: Sequence[str] = ()) -> str:
    """A table of `keys`; a value with `<key>_lo/_hi` shows its interval. In rows marked reliable = false
    (oracle rows with too few effective samples) the `estimated` keys read "unreliable (ESS k)" instead."""
    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    body = "".join("<tr>" + "".join(f"<td>{_cell(r, k, k in estimated)}</td>" for k in keys) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _cell(row: dict[str, Any], key: str, estimated: bool) -> str:
    if estimated and row.get("reliable") is False:
        return f"unreliable (ESS {row['ess']:.0f})"
    text = fmt(row.get(key))
    lo, hi = row.get(f"{key}_lo"), row.get(f"{key}_hi")
    if isinstance(lo, float) and isinstance(hi, float) and math.isfinite(lo) and math.isfinite(hi):
        text += f" [{lo:.4g}, {hi:.4g}]"
    return text


def write_html(out: Path, results: dict[str, Any], extra_html: str = "", dest: Path | None = None) -> Path:
    """report.html from results.json's content, with every plot and grid embedded (self-contained).

    `extra_html` (e.g. the study's compute accounting) goes after the summary; `dest` defaults to out/report.html.
    """
    meta = results["meta"]
    estimated = [*meta["metric_keys"], "kl_to_optimum"]
    model_keys = ["name", "kind", "beta", "lambda", "effective_beta", *estimated, "ess", "kid_vs_base",
                  "mse_vs_target", "psnr_vs_target", "kid_vs_target", "model_seconds"]
    summary = [{"kind": k, **v} for k, v in results["error_summary"].items()]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>deradiff eval</title><style>"
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:12px}"
        "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}img{margin:4px}</style></head><body>",
        f"<h1>Realigned vs retrained</h1><p>anchor: {html.escape(meta['anchor_lora'])} (beta0 = {meta['beta0']:g}, "
        f"method {html.escape(meta['method'])}); base: {html.escape(str(meta['base_model']))}; "
        f"{meta['num_prompts']} prompts x {meta['num_seeds']} seeds, shared noise; {meta['notes']}</p>",
        "<h2>Verdict</h2><ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in results.get("verdict", [])) + "</ul>",
        "<h2>Approximation error (|approx - retrained| / |retrained - base|, mean over lambdas)</h2>",
        html_table(summary, ["kind", *meta["metric_keys"]]),
        "<h2>Realigned minus weight-scaled normalized error (negative: realignment is closer)</h2>",
        html_table(results.get("comparisons", []), ["reference", "scope", "metric", "difference", "verdict"]),
        "<h2>Gaps to the exact optimum at each model's effective beta (model - oracle)</h2>",
        f"<p>{html.escape(str(meta.get('oracle', {}).get('status', '')))}</p>",
        html_table(results.get("oracle_gaps", []), ["name", "kind", "oracle", "metric", "gap", "normalized_error", "consistent_with_oracle"]),
        extra_html,
        "<h2>Models (bracketed: bootstrap interval)</h2>", html_table(results["models"], model_keys, estimated),
        "<h2>Plots</h2>", "".join(f"<img src='{embed_png(out / f)}' alt='{html.escape(f)}'>" for f in results["plots"]),
        "".join(f"<p>{html.escape(note)}</p>" for note in results.get("skipped_plots", [])),
        "<h2>Image grids (rows: models; columns: seeds)</h2>",
        "".join(f"<h3>{html.escape(g['prompt'])}</h3><img src='{embed_png(out / g['file'])}' alt='{html.escape(g['file'])}'>" for g in results["grids"]),
        "<h2>Per-lambda approximation errors</h2>",
        html_table(results["approximation"], ["name", "kind", "lambda", "target", "metric", "value", "target_value", "base_value", "normalized_error"]),
        "</body></html>",
    ]
    path = dest or out / "report.html"
    write_text_atomic(path, "\n".join(parts))
    return path
