"""`verify: true`: train one LoRA at the chosen beta with the anchor's own config, and compare it with the anchor
realigned to the chosen lambda on the same prompts, seeds and noise (the eval's metrics, paired intervals)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from deradiff.config import load_config, validated
from deradiff.errors import DeradiffError
from deradiff.eval.generate import Loader, sample_variant
from deradiff.eval.plan import LoraInfo
from deradiff.eval.validation import with_interval
from deradiff.eval.variants import Variant
from deradiff.fileio import check_output_dir
from deradiff.training.checkpoint import TRAIN_CONFIG
from deradiff.training.registry import trainer
from deradiff.tuning.config import DELTA, ORACLE, TuneConfig
from deradiff.tuning.select import Choice

NOTE = ("Same prompts, seeds and per-step noise for both models. difference = realigned - retrained with a {conf:g}% "
        "paired bootstrap interval; 'indistinguishable' when the interval contains 0. The retrained LoRA ran the "
        "anchor's training budget: where that budget leaves it short of its optimum, a difference measures the "
        "training as much as the realignment.")


@dataclasses.dataclass(frozen=True)
class RetrainPlan:
    """How the verify LoRA is trained: the anchor's trainer and config file, and where it goes."""

    method: str
    config_path: Path
    output_dir: Path


def verify_dir(cfg: TuneConfig) -> Path:
    return Path(cfg.output_dir) / "verify"


def prepare(cfg: TuneConfig, anchor: LoraInfo) -> RetrainPlan:
    """Everything verify needs, checked before any sampling: the anchor's training config loads (with the
    overrides), its trainer exists, and the verify folder is usable."""
    path = Path(anchor.path).parent / TRAIN_CONFIG
    if not path.is_file():
        raise DeradiffError(f"verify needs the anchor's training config '{path}' (deradiff train writes it beside "
                            "the lora folder); retrain the anchor with this version, or set verify=false")
    plan = RetrainPlan(anchor.method, path, verify_dir(cfg))
    retrain_config(cfg, plan, anchor.beta)
    check_output_dir(plan.output_dir, "the tune's verify folder")
    return plan


def retrain_config(cfg: TuneConfig, plan: RetrainPlan, beta: float) -> Any:
    """The anchor's config with the tune's overrides, then the new beta, the verify folder and the tune's tracker
    set on the loaded dataclasses. It resumes an earlier verify run of the same settings (a rerun is free) and
    refuses another one unless the tune overwrites."""
    # no key goes in as an override: the anchor's train_config.yaml is a whole saved config (output_dir included)
    loaded = load_config(trainer(plan.method).schema, plan.config_path, cfg.verify_overrides)
    objective = dataclasses.replace(getattr(loaded, plan.method), beta=beta)
    train = dataclasses.replace(loaded.train, resume_from="latest", overwrite=cfg.overwrite)
    return validated(dataclasses.replace(loaded, output_dir=str(plan.output_dir), train=train, tracker=cfg.tracker,
                                         **{plan.method: objective}))


def run_verify(cfg: TuneConfig, plan: RetrainPlan, choice: Choice, anchor: LoraInfo, base_model: str, loader: Loader,
               search: Any, group: str) -> dict[str, Any]:
    """Train at beta* = beta0 / lambda*, sample it like the tune's lambdas, and compare metric by metric."""
    if choice.lam in (0.0, 1.0) or choice.beta is None or not math.isfinite(choice.beta):
        which = "the base model" if choice.lam == 0.0 else "the anchor itself"
        return {"beta": choice.beta, "skipped": f"lambda* = {choice.lam:g} is {which}: there is nothing to retrain"}
    from deradiff.eval.stage import resolve_device

    print(f"tune: verify, training one LoRA at beta {choice.beta:.4g} with the anchor's config")
    summary = trainer(plan.method).run(retrain_config(cfg, plan, choice.beta), group=group, job_type="verify")
    pipe = loader(base_model, str(summary["lora_dir"]), resolve_device(cfg.device))
    variant = Variant("retrained", "retrained", str(summary["lora_dir"]), anchor.method, choice.beta)
    retrained = sample_variant(pipe, variant, search.jobs, search.settings, search.sampling.batch_size)
    del pipe
    return compare(search, choice, retrained, summary, cfg.bootstrap.confidence)


def compare(search: Any, choice: Choice, retrained: Any, summary: dict[str, Any], confidence: float) -> dict[str, Any]:
    """Per metric (and the objective): both models' values and the paired difference, each with its interval."""
    from deradiff.tuning.stage import lambda_label, model_intervals

    realigned = lambda_label(choice.lam)
    # a delta's difference is the metric's; the optimum's own metrics are the same optimum for both
    names = [*(m for m in search.metrics() if not m.endswith(DELTA) and not m.startswith(ORACLE)), "objective"]

    value = search.criterion.value

    def differences(rows: dict[str, dict[str, float]]) -> dict[str, float]:
        diff = {f"difference/{m}": rows[realigned][m] - rows["retrained"][m] for m in names if m != "objective"}
        return diff | {"difference/objective": value(rows[realigned]) - value(rows["retrained"])}

    intervals = search.bootstrap({"retrained": retrained}, differences, extra_betas={"retrained": choice.beta})
    mine, theirs, diff = (model_intervals(intervals, n) for n in (realigned, "retrained", "difference"))
    table = []
    for m in names:
        d = diff[m]
        row = {"metric": m}
        for key, interval in (("realigned", mine[m]), ("retrained", theirs[m]), ("difference", d)):
            with_interval(row, key, interval, value=True)
        table.append(row | {"verdict": _verdict(d)})
    return {"beta": choice.beta, "lambda": choice.lam, "lora_dir": str(summary["lora_dir"]),
            "train_wall_s": summary.get("train_wall_s"), "metrics": table, "note": NOTE.format(conf=100 * confidence)}


def _verdict(diff: Any) -> str:
    """'indistinguishable' unless the difference's interval excludes 0."""
    if not (math.isfinite(diff.lo) and math.isfinite(diff.hi)) or not diff.excludes_zero():
        return "indistinguishable"
    return "realigned higher" if diff.lo > 0 else "realigned lower"
