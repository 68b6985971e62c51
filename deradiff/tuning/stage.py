"""`deradiff tune`: sample the anchor realigned to many lambdas, measure each with intervals, choose lambda*.

`run_tune(cfg)` is the one entry (the CLI calls it). Order of work: every check first (config, anchor, rewards,
the verify run's config), then the dense pass, the refinement around the chosen region, the choice on all
lambdas, the optional verify training, and the outputs (tune.json first, then figures and tune.html).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from deradiff.config import config_to_dict
from deradiff.errors import DeradiffError
from deradiff.eval import report as eval_report
from deradiff.eval.stage import eval_prompts, feature_fn, resolve_device, reward_fns, settings_of
from deradiff.eval.config import BootstrapSection, SamplingSection
from deradiff.eval.generate import Job, Loader, VariantSamples, load_lora_pipeline, make_jobs, warm_up
from deradiff.eval.plan import LoraInfo, read_lora
from deradiff.eval.scoring import FeatureFn, RewardFn
from deradiff.eval.uncertainty import OracleEvidence
from deradiff.eval.validation import oracle_reason, with_interval, worst_ess
from deradiff.eval.variants import Variant
from deradiff.sampling.guidance import unet_call
from deradiff.fileio import atomic_path, check_output_dir, check_results_absent, read_json, remove_outputs, write_text_atomic
from deradiff.realignment.mixing import effective_beta
from deradiff.lock import OutputDirLock
from deradiff.training.tracking import retire_runs
from deradiff.tuning import measure
from deradiff.tuning.config import SearchSection, TuneConfig, rewards_in, uses_oracle
from deradiff.tuning.criterion import Criterion
from deradiff.tuning.search import dense_grid, refine_grid
from deradiff.tuning.tracking import log_tune, tune_group
from deradiff.tuning.select import Choice, InfeasibleError, best_feasible, choose, feasible

RESULTS = "tune.json"
# What a tune writes into output_dir, tune.json first: it marks a finished tune. verify/ is a training folder
# (resumable, checked by the trainer's own rules), so an overwrite leaves it to those.
OUTPUTS = (RESULTS, "tune.csv", "tune.html", "plots", "grids")


@dataclass
class TuneResult:
    """What a finished tune hands back: the content of tune.json, the page, the wall time."""

    results: dict[str, Any]
    page: Path
    seconds: float

    @property
    def choice(self) -> dict[str, Any] | None:
        return self.results["choice"]


def lambda_label(lam: float) -> str:
    return f"l{lam:g}"


def run_tune(cfg: TuneConfig, loader: Loader = load_lora_pipeline, rewards: dict[str, RewardFn] | None = None,
             features: FeatureFn | None | str = "config", tracker_factory: Any = None) -> TuneResult:
    """The whole tune under the output folder's lock."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    out = check_output_dir(cfg.output_dir)
    with OutputDirLock(out):
        return _run_tune(cfg, out, loader, rewards, features, tracker_factory)


def _run_tune(cfg: TuneConfig, out: Path, loader: Loader, rewards: dict[str, RewardFn] | None,
              features: FeatureFn | None | str, tracker_factory: Any) -> TuneResult:
    start = time.perf_counter()
    check_results_absent(out, (RESULTS,), cfg.overwrite)
    anchor = read_lora(cfg.anchor_lora, "anchor_lora")
    base_model = cfg.base_model or anchor.base_model
    if not base_model:
        raise DeradiffError("no base model: set base_model, or train the anchor with deradiff (metadata base_model)")
    criterion = cfg.criterion()
    rewards = reward_fns(reward_names(cfg, criterion, anchor), cfg.reward_options) if rewards is None else rewards
    features = feature_fn(cfg.kid_features) if features == "config" else features
    retrain = None
    if cfg.verify:
        from deradiff.tuning.verify import prepare

        retrain = prepare(cfg, anchor)  # the anchor's training config is read and checked before any sampling
    if cfg.wants_oracle():
        check_oracle(cfg, anchor)
    jobs = make_jobs(eval_prompts(cfg), cfg.seeds)
    device = resolve_device(cfg.device)
    pipe = loader(base_model, anchor.path, device)
    oracle = draw_oracle(cfg, anchor, base_model, jobs, rewards, loader, device) if cfg.wants_oracle() else None
    search = Search((cfg.search, cfg.sampling, cfg.bootstrap), pipe, jobs, rewards, features, criterion, anchor.beta,
                    oracle=oracle, min_ess=cfg.oracle.min_ess)
    choice, infeasible = search.run()
    tune_seconds = time.perf_counter() - start
    results = build_results(cfg, anchor, base_model, search, choice, infeasible, tune_seconds)
    if retrain is not None and choice is not None:
        from deradiff.tuning.verify import run_verify

        results["verify"] = run_verify(cfg, retrain, choice, anchor, base_model, loader, search, tune_group(cfg, anchor))
    page = write_outputs(out, cfg, search, results)
    retire_runs(out)  # the previous tune's W&B run describes results that were just replaced
    log_tune(cfg, anchor, results, out, tracker_factory)
    return TuneResult(results=results, page=page, seconds=time.perf_counter() - start)


def check_oracle(cfg: TuneConfig, anchor: LoraInfo) -> None:
    """The oracle needs a reward-unit anchor sampled exactly as it was trained: refused before any sampling."""
    reason = oracle_reason(cfg.sampling, anchor, [])
    if reason is not None:
        wanted = uses_oracle(cfg.criterion()) or ["oracle.enabled=on"]
        raise DeradiffError(f"the tune asks for the oracle ({wanted[0]}) but {reason}")


def draw_oracle(cfg: TuneConfig, anchor: LoraInfo, base_model: str, jobs: Sequence[Job], rewards: dict[str, RewardFn],
                loader: Loader, device: str) -> OracleEvidence:
    """The eval's oracle base samples (cached across runs), scored, with bare reward names."""
    from deradiff.eval.validation import oracle_evidence, oracle_samples

    prompts = list(dict.fromkeys(p for p, _ in jobs))
    base = Variant("base", "base", anchor.path, anchor.method, None)
    print(f"tune: oracle, {cfg.oracle.samples_per_prompt} base samples per prompt (cached across runs)")
    images, _, _ = oracle_samples(base, base_model, prompts, settings_of(cfg.sampling), cfg.oracle, cfg.sampling.batch_size,
                                  loader, device)
    found = oracle_evidence(images, prompts, rewards, anchor.reward, [])
    bare = {k.removeprefix("reward_"): v for k, v in found.per_sample.items()}
    return dataclasses.replace(found, per_sample=bare, tilt_key=found.tilt_key.removeprefix("reward_"))


def reward_names(cfg: TuneConfig, criterion: Criterion, anchor: LoraInfo) -> list[str]:
    """The rewards the criterion names, the extra ones the config lists, and the anchor's training reward."""
    from deradiff.rewards import available_rewards

    return rewards_in([*criterion.metrics(), *cfg.rewards, *([anchor.reward] if anchor.reward else [])],
                      available_rewards())


Sections = tuple[SearchSection, SamplingSection, BootstrapSection]


class Search:
    """The lambdas sampled so far, their measurements and the table the choice reads."""

    def __init__(self, sections: Sections, pipe: Any, jobs: Sequence[Job], rewards: dict[str, RewardFn],
                 features: FeatureFn | None, criterion: Criterion, beta0: float | None, aligned_unet: Any = None,
                 oracle: OracleEvidence | None = None, min_ess: float = 0.0):
        self.search, self.sampling, self.boot = sections
        self.oracle_evidence, self.min_ess = oracle, min_ess  # base samples tilted to the optimum (or None)
        self.pipe, self.jobs, self.rewards, self.features = pipe, list(jobs), rewards, features
        self.criterion, self.beta0, self.aligned_unet = criterion, beta0, aligned_unet
        self.settings = settings_of(self.sampling)
        self.samples: dict[float, VariantSamples] = {}
        self.passes: dict[float, str] = {}
        self.rows: list[dict[str, Any]] = []
        self._measured: dict[str, measure.Measured] = {}

    def run(self) -> tuple[Choice | None, dict[str, Any] | None]:
        """Dense pass, refinement around the chosen (or least violating) lambda, then the choice on all lambdas."""
        s = self.search
        warm_up(self.pipe, self.jobs, self.settings, unet_call(self.pipe.unet) if self.aligned_unet is not None else None)
        self.sample(dense_grid(s.lambda_min, s.lambda_max, s.num_lambdas), "dense")
        choice, infeasible = self.choose()
        center = choice.lam if choice is not None else infeasible["lambda"]
        refine = refine_grid(list(self.samples), center, s.refine_lambdas)
        if refine:
            self.sample(refine, "refine")
            choice, infeasible = self.choose()
        return choice, infeasible

    def sample(self, lambdas: Sequence[float], name: str) -> None:
        from deradiff.eval.generate import sample_lambdas

        print(f"tune: {name} pass, {len(lambdas)} lambdas from {min(lambdas):g} to {max(lambdas):g}, "
              f"{len(self.jobs)} images each")
        with tqdm(total=len(lambdas) * len(self.jobs), desc=f"tune {name}", unit="image") as bar:
            got = sample_lambdas(self.pipe, lambdas, self.jobs, self.settings, self.sampling.batch_size, bar.update,
                                 self.aligned_unet)
        self.samples.update(got)
        self.passes.update({lam: name for lam in got})

    def choose(self) -> tuple[Choice | None, dict[str, Any] | None]:
        """Measure every sampled lambda (one paired bootstrap over all of them), measure each one's objective
        gap to the best feasible one on the same draws, then apply the choice rule."""
        self.rows = self.table()
        # an objective the data cannot form (an oracle metric where the oracle is unreliable) is not a candidate
        candidates = [r for r in self.rows if math.isfinite(r["objective"])]
        ok = [r for r in candidates if r["feasible"]]
        if ok:
            self.add_gaps(best_feasible(ok)["lambda"])
        try:
            return choose(candidates, self.criterion, self.beta0), None
        except InfeasibleError as exc:
            return None, {"message": str(exc), "lambda": exc.lam}

    def table(self) -> list[dict[str, Any]]:
        """One row per lambda: every metric and the objective with intervals (see tuning.select for the keys)."""
        intervals = self.bootstrap()
        rows = []
        for lam in sorted(self.samples):
            beta = effective_beta(self.beta0, lam)
            row: dict[str, Any] = {"lambda": lam, "beta": None if beta is None or math.isinf(beta) else beta, "pass": self.passes[lam]}
            for metric, interval in model_intervals(intervals, lambda_label(lam)).items():
                with_interval(row, metric, interval, value=True)
            rows.append(row)
        ok = {r["lambda"] for r in feasible([r for r in rows if math.isfinite(r["objective"])], self.criterion)}
        for row in rows:
            row["feasible"] = row["lambda"] in ok
        return rows

    def add_gaps(self, best: float) -> None:
        """'objective_gap' (with interval) on every row: its objective minus the best's, per bootstrap draw."""
        value, top = self.criterion.value, lambda_label(best)

        def gaps(rows: dict[str, dict[str, float]]) -> dict[str, float]:
            return {f"{name}/objective_gap": value(row) - value(rows[top]) for name, row in rows.items()}

        intervals = self.bootstrap(derived=gaps)
        for row in self.rows:
            with_interval(row, "objective_gap", intervals[f"{lambda_label(row['lambda'])}/objective_gap"], value=True)

    def bootstrap(self, extra: dict[str, VariantSamples] | None = None, derived: measure.Derived = lambda rows: {},
                  extra_betas: dict[str, float] | None = None) -> dict[str, measure.Interval]:
        """Intervals of every model's metrics and objective ('<model>/<metric>'; models: every lambda's label and
        the `extra` ones, all measured on the same draws) and of what `derived` computes from one draw's rows.
        `extra_betas`: the strength of each extra model, for its KL to the optimum (with an oracle)."""
        measured = self.measured(extra or {})
        betas = {lambda_label(lam): effective_beta(self.beta0, lam) for lam in self.samples} | (extra_betas or {})
        oracle = self.oracle_at({k: None if math.isinf(v) else v for k, v in betas.items()})
        value, b = self.criterion.value, self.boot

        def objective_and_derived(rows: dict[str, dict[str, float]]) -> dict[str, float]:
            return {f"{n}/objective": value(r) for n, r in rows.items()} | derived(rows)

        with tqdm(total=b.replicates, desc="tune bootstrap", unit="draw", leave=False) as bar:
            return measure.intervals(measured, lambda_label(0.0), b.replicates, b.seed, b.confidence,
                                     objective_and_derived, progress=bar.update, oracle=oracle)

    def oracle_at(self, betas: dict[str, float | None]) -> measure.Oracle | None:
        """The oracle at these models' strengths (None without base samples); strengths where some prompt's
        effective sample size is below oracle.min_ess are unreliable (their oracle metrics NaN, as in the eval)."""
        if self.oracle_evidence is None:
            return None
        finite = sorted({b for b in betas.values() if b is not None})
        evidence = dataclasses.replace(self.oracle_evidence, betas=finite)
        weak = {b for b in finite if worst_ess(evidence, b) < self.min_ess}
        return measure.Oracle(evidence, betas, {name for name, b in betas.items() if b in weak})

    def measured(self, extra: dict[str, VariantSamples]) -> dict[str, measure.Measured]:
        """Every lambda's (and `extra` model's) per-sample numbers, each model scored once."""
        base = lambda_label(0.0)
        models = {lambda_label(lam): s for lam, s in self.samples.items()} | extra
        new = {k: v for k, v in models.items() if k not in self._measured}
        if new:  # the base rides along: features are standardized by its spread
            self._measured |= measure.measure(new | {base: models[base]}, self.jobs, self.rewards, self.features, base)
        return {k: self._measured[k] for k in models}

    def metrics(self) -> list[str]:
        """Every measured metric, in the order the table shows them."""
        row = self.rows[0]
        return [k for k in row if f"{k}_lo" in row and k not in ("objective", "objective_gap")]


def model_intervals(intervals: dict[str, measure.Interval], name: str) -> dict[str, measure.Interval]:
    """metric -> interval of one model, from the flat '<model>/<metric>' keys."""
    return {key.partition("/")[2]: v for key, v in intervals.items() if key.partition("/")[0] == name}


def anchor_train_seconds(anchor: LoraInfo) -> float | None:
    """The anchor's measured training time (its trainer's summary.json beside the LoRA), None if unknown."""
    summary = Path(anchor.path).parent / "summary.json"
    if not summary.is_file():
        return None
    value = read_json(summary, "the anchor's training summary").get("train_wall_s")
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


def cost(tune_seconds: float, anchor: LoraInfo, lambdas: Sequence[float]) -> dict[str, Any]:
    """The tune's wall time against retraining at each explored lambda (0 is the base and 1 the anchor: no
    training needed), priced at the anchor's own measured training time."""
    explored = [lam for lam in lambdas if lam not in (0.0, 1.0)]
    train_s = anchor_train_seconds(anchor)
    retrain = train_s * len(explored) if train_s is not None else None
    return {"tune_wall_s": round(tune_seconds, 3), "anchor_train_wall_s": train_s, "lambdas_explored": len(explored),
            "retrain_wall_s": retrain, "ratio": round(retrain / tune_seconds, 2) if retrain else None}


def build_results(cfg: TuneConfig, anchor: LoraInfo, base_model: str, search: Search, choice: Choice | None,
                  infeasible: dict[str, Any] | None, tune_seconds: float) -> dict[str, Any]:
    """Everything tune.json holds (figure paths are filled in when they are written)."""
    prompts = list(dict.fromkeys(p for p, _ in search.jobs))
    meta = {"anchor_lora": anchor.path, "beta0": anchor.beta, "method": anchor.method, "base_model": base_model,
            "prompts": prompts, "seeds": list(cfg.seeds), "confidence": cfg.bootstrap.confidence,
            "replicates": cfg.bootstrap.replicates, "criterion": search.criterion.to_dict(),
            "metrics": search.metrics(), "config": config_to_dict(cfg),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")}  # when these numbers were measured
    chosen = None
    if choice is not None:
        chosen = {"lambda": choice.lam, "beta": choice.beta, "best": choice.best, "feasible": choice.feasible,
                  "tied": choice.tied, "reason": choice.reason}
    return {"meta": meta, "rows": search.rows, "choice": chosen, "infeasible": infeasible,
            "cost": cost(tune_seconds, anchor, list(search.samples)), "verify": None, "plots": [], "grids": []}


def grid_lambdas(lambdas: Sequence[float], chosen: float | None, count: int) -> list[float]:
    """Rows of the image grid: 0, 1 and the chosen lambda, then evenly spread others up to `count`."""
    ordered = sorted(lambdas)
    keep = {lam for lam in (0.0, 1.0, chosen) if lam is not None and lam in ordered}
    rest = [lam for lam in ordered if lam not in keep]
    room = max(count - len(keep), 0)
    if room >= len(rest):
        return ordered
    step = len(rest) / room if room else 0.0
    keep |= {rest[int(i * step + step / 2)] for i in range(room)}
    return sorted(keep)


def write_results(out: Path, results: dict[str, Any]) -> None:
    """tune.json (everything; inf/nan as null) and tune.csv (one row per lambda)."""
    import pandas as pd

    write_text_atomic(out / RESULTS, json.dumps(eval_report.json_safe(results), indent=2))
    with atomic_path(out / "tune.csv") as tmp:
        pd.DataFrame(results["rows"]).to_csv(tmp, index=False)


def write_outputs(out: Path, cfg: TuneConfig, search: Search, results: dict[str, Any]) -> Path:
    """tune.json first (the numbers survive whatever happens to a figure), then grids, plots, tune.json with
    their paths, and tune.html."""
    from deradiff.tuning import report

    remove_outputs(out, OUTPUTS)  # an overwrite leaves no figure of the earlier tune
    write_results(out, results)
    (out / "grids").mkdir(parents=True, exist_ok=True)
    chosen = results["choice"]["lambda"] if results["choice"] else None
    shown = grid_lambdas(list(search.samples), chosen, cfg.grid_lambdas)
    names = {lam: f"lambda {lam:g}" + (" (chosen)" if lam == chosen else "") for lam in shown}
    samples = {names[lam]: search.samples[lam] for lam in shown}
    grids = eval_report.write_grids(out, samples, list(samples), search.jobs, cfg.grid_prompts, cfg.grid_seeds)
    results["grids"] = [{"prompt": g["prompt"], "path": g["file"], "seeds": g["seeds"], "lambdas": shown} for g in grids]
    results["plots"], results["skipped_plots"] = report.write_plots(out, results)
    write_results(out, results)
    return report.write_html(out, results)


def format_summary(result: TuneResult) -> str:
    """The lines the CLI prints at the end: the choice (or why none), the check by retraining, the cost."""
    r = result.results
    lines = [f"tune finished in {result.seconds:.1f} s over {len(r['rows'])} lambdas"]
    if r["choice"]:
        lines.append(f"chosen: {r['choice']['reason']}")
    else:
        lines.append(f"no lambda meets the criterion: {r['infeasible']['message']}")
    verify = r.get("verify")
    if verify and verify.get("skipped"):
        lines.append(f"verify: {verify['skipped']}")
    elif verify:
        parts = [f"{m['metric']} {m['difference']:+.4g} [{m['difference_lo']:+.4g}, {m['difference_hi']:+.4g}] "
                 f"({m['verdict']})" for m in verify["metrics"]]
        lines.append(f"verify (realigned - retrained at beta {verify['beta']:.4g}): " + "; ".join(parts))
    c = r["cost"]
    if c["ratio"] is not None:
        lines.append(f"cost: {c['tune_wall_s']:.0f} s for {c['lambdas_explored']} lambdas; retraining at each would take "
                     f"about {c['retrain_wall_s']:.0f} s ({c['anchor_train_wall_s']:.0f} s each), {c['ratio']:.1f}x more")
    lines.append(f"page: {result.page}")
    return "\n".join(lines)
