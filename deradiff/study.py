"""`deradiff study`: preference data -> anchor LoRA at beta0 -> K retrained LoRAs -> eval -> report.

Each stage is cached by a hash of its resolved config: its done-marker (stages/<name>.json, holding the key,
the measured wall time and the result) is written atomically, last. A rerun skips finished stages and
resumes an interrupted one (training resumes from its latest checkpoint), so a study survives interruption.
The measured times feed the compute accounting: what sweeping K strengths costs by realignment vs retraining.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

from deradiff.config import check_file, check_min, config_to_dict, load_config, option, validated
from deradiff.errors import ConfigError, DeradiffError
from deradiff.fileio import check_output_dir, content_key, folder_digest, read_json, write_text_atomic
from deradiff.training.checkpoint import FINAL_LORA, check_resume, weight_settings
from deradiff.training.config import TrackerSection
from deradiff.lock import OutputDirLock


REWARD_METHODS = ("ddpo", "reward_grad")  # beta in reward units: an oracle exists, the eval uses their sampler


@dataclass
class StudyConfig:
    """One realignment study: which trainer, which strengths, which eval."""

    output_dir: str = option(help="study folder: prefs/, train/beta*/, eval/, stages/, report.html, summary.json "
                                  "(relative: to the current directory)")
    beta0: float = option(help="KL strength of the anchor LoRA (the one users would train)")
    betas: list[float] = option(help="the K other strengths that get a retrained LoRA (the ground truth)")
    method: Literal["dpo", "ddpo", "reward_grad"] = option("dpo", "trainer for the anchor and the retrained LoRAs")
    train_config: str = option("configs/tiny/dpo.yaml", "trainer YAML every LoRA starts from", relative_to_yaml=True)
    train_overrides: list[str] = option(
        [], "key=value overrides for every training run (e.g. train.max_steps=40; paths in them, as on the command "
            "line: relative to the current directory)")
    make_prefs: bool = option(True, "dpo: generate tiny-world preference pairs into prefs/ when missing (own stage)")
    eval_config: str = option("configs/tiny/eval.yaml", "eval YAML; anchor/retrained/output_dir are set by the study",
                              relative_to_yaml=True)
    eval_overrides: list[str] = option([], "key=value overrides for the eval (e.g. seeds=[0,1])")
    prompts: list[str] | None = option(
        None, "ddpo / reward_grad: one prompt list for training, the oracle and the eval (the optimum is per prompt, so a LoRA is "
              "compared with its optimum on the prompts it was trained on); null: each YAML's own prompts")
    group: str | None = option(None, "W&B group of every run of this study (null: study-<folder name>)")
    sweep_sizes: list[int] = option([3, 5, 10], "K values of the realign-vs-retrain savings table")
    threads: int = option(0, "torch CPU threads for every stage (0: torch's default); shared cores: docs/benchmarks.md "
                              "('CPU threads')")
    tracker: TrackerSection = option(factory=TrackerSection, help="tracking for every stage (overrides train/eval YAML)")

    def validate(self) -> None:
        if self.beta0 <= 0 or any(b <= 0 for b in self.betas):
            raise ConfigError(f"config keys 'beta0' and 'betas' must be > 0, got {self.beta0} and {self.betas}")
        if self.beta0 in self.betas or len(set(self.betas)) != len(self.betas):
            raise ConfigError(f"config key 'betas' must be distinct and exclude beta0 ({self.beta0}), got {self.betas}")
        if self.prompts is not None and (self.method not in REWARD_METHODS or not self.prompts):
            raise ConfigError(f"config key 'prompts' needs method ddpo or reward_grad and at least one prompt, "
                              f"got {self.method} and {self.prompts}")
        if not self.betas:
            raise ConfigError("config key 'betas' must list at least one strength to retrain at")
        for i, size in enumerate(self.sweep_sizes):
            if size < 1:
                raise ConfigError(f"config key 'sweep_sizes[{i}]' must be >= 1, got {size}")
        check_min(self, "", {"threads": 0})
        check_file(self.train_config, "train_config", f"a {self.method} trainer YAML")
        check_file(self.eval_config, "eval_config", "an eval YAML")


@dataclass
class StageRecord:
    """What one stage did: its measured wall time (from the run that did the work) and its result."""

    name: str
    key: str
    seconds: float
    result: dict[str, Any]
    skipped: bool = False


@dataclass
class StudyResult:
    report: Path
    summary: dict[str, Any]
    stages: list[StageRecord] = field(default_factory=list)


# ---- stage caching ---------------------------------------------------------------------------------------
def stage_key(data: Any) -> str:
    """A short hash of a stage's resolved config (anything JSON can write)."""
    return content_key(data)


def run_stage(study_dir: Path, name: str, key_data: Any, fn: Callable[[], dict[str, Any]]) -> StageRecord:
    """Run `fn` unless a done-marker with the same key exists and every path in its result's `outputs` still
    exists (a deleted LoRA or results file reruns its stage); the marker is written last, atomically."""
    marker = study_dir / "stages" / f"{name}.json"
    key = stage_key(key_data)
    done = read_marker(marker) if marker.is_file() else None
    if done is not None and done["key"] == key and all(Path(p).exists() for p in done["result"].get("outputs", [])):
        return StageRecord(name, key, float(done["seconds"]), done["result"], skipped=True)
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    write_text_atomic(marker, json.dumps({"key": key, "seconds": seconds, "result": result}, indent=2, default=str))
    return StageRecord(name, key, seconds, result)


def read_marker(marker: Path) -> dict[str, Any]:
    """A done-marker as `run_stage` writes it ({key, seconds, result}); anything else is named as damaged."""
    done = read_json(marker, "stage marker")
    if not (isinstance(done, dict) and isinstance(done.get("key"), str) and isinstance(done.get("result"), dict)
            and isinstance(done.get("seconds"), (int, float)) and not isinstance(done["seconds"], bool)):
        raise DeradiffError(f"stage marker '{marker}' is damaged (expected key, seconds and result); delete it to "
                            "redo that stage")
    return done


# ---- stage configs ---------------------------------------------------------------------------------------
def trainer_spec(method: str) -> Any:
    from deradiff.training.registry import trainer

    return trainer(method)


def prefs_path(cfg: StudyConfig) -> Path:
    return Path(cfg.output_dir) / "prefs" / "train.parquet"


# A stage config is the stage's YAML plus the user's overrides, then the study's own settings set on the loaded
# dataclasses. Keys the schema requires (output_dir, anchor_lora, DPO's data.source) are given to the loader as
# values: a YAML written for a study may leave them to it, and the loader refuses a config without them.
def train_config(cfg: StudyConfig, beta: float) -> Any:
    """The trainer config for one strength: its own folder, its beta, the study's prompts and tracker."""
    required = {"output_dir": str(Path(cfg.output_dir) / "train" / f"beta{beta:g}")}
    if cfg.method == "dpo" and cfg.make_prefs:
        required["data.source"] = str(prefs_path(cfg))
    loaded = load_config(trainer_spec(cfg.method).schema, cfg.train_config, cfg.train_overrides, required)
    objective = replace(getattr(loaded, cfg.method), beta=beta)
    if cfg.prompts is not None:
        objective = replace(objective, prompts=list(cfg.prompts))
    return validated(replace(loaded, tracker=cfg.tracker, **{cfg.method: objective}))


def eval_config(cfg: StudyConfig, anchor: str, retrained: Sequence[str]) -> Any:
    """The eval config, pointed at this study's LoRAs, folder and W&B group. For ddpo the eval samples with the
    training sampler (where lambda = beta0 / beta is exact and the oracle applies); so does reward_grad."""
    from deradiff.eval.config import EvalConfig

    required = {"output_dir": str(Path(cfg.output_dir) / "eval"), "anchor_lora": anchor}
    loaded = load_config(EvalConfig, cfg.eval_config, cfg.eval_overrides, required)
    composed = replace(loaded, retrained_loras=list(retrained), overwrite=True, group=study_group(cfg),
                       tracker=cfg.tracker)
    if cfg.method in REWARD_METHODS:
        sample = train_config(cfg, cfg.beta0).sample
        composed = replace(composed, sampling=replace(composed.sampling, steps=sample.num_steps, eta=sample.eta,
                                                      guidance_scale=sample.guidance_scale))
    if cfg.prompts is not None:
        composed = replace(composed, prompts=list(cfg.prompts))
    return validated(composed)


def study_group(cfg: StudyConfig) -> str:
    return cfg.group or f"study-{Path(cfg.output_dir).resolve().name}"


# ---- stages ----------------------------------------------------------------------------------------------
def prefs_stage(cfg: StudyConfig) -> StageRecord | None:
    """DPO only: sample and reward-label tiny-world preference pairs (the trainer reads them from prefs/)."""
    if cfg.method != "dpo" or not cfg.make_prefs:
        return None
    tcfg = train_config(cfg, cfg.beta0)
    key = {"base": tcfg.model.pretrained, "generate": config_to_dict(tcfg.data.generate), "output": str(prefs_path(cfg))}

    def generate() -> dict[str, Any]:
        from deradiff.data.prefs import generate_preferences
        from deradiff.models.pipelines import resolve_base_model

        info = generate_preferences(resolve_base_model(tcfg.model.pretrained), str(prefs_path(cfg)), tcfg.data.generate)
        return {"output": str(prefs_path(cfg)), "outputs": [str(prefs_path(cfg))],
                **{k: v for k, v in info.items() if isinstance(v, (int, float, str))}}

    return run_stage(Path(cfg.output_dir), "prefs", key, generate)


def train_stage(cfg: StudyConfig, beta: float, upstream: Sequence[str]) -> StageRecord:
    """Train one LoRA at `beta`; an interrupted run resumes from its latest checkpoint."""
    tcfg = train_config(cfg, beta)
    key = {"method": cfg.method, "config": weight_settings(config_to_dict(tcfg)), "upstream": list(upstream)}

    def train() -> dict[str, Any]:
        summary = trainer_spec(cfg.method).run(replace(tcfg, train=replace(tcfg.train, resume_from="latest")),
                                               group=study_group(cfg), job_type="train")
        return {"lora_dir": str(summary["lora_dir"]), "beta": beta, "train_wall_s": summary.get("train_wall_s"),
                "outputs": [str(summary["lora_dir"])]}

    return run_stage(Path(cfg.output_dir), f"train-{cfg.method}-beta{beta:g}", key, train)


def eval_stage(cfg: StudyConfig, anchor: StageRecord,
               retrained: Sequence[StageRecord]) -> tuple[StageRecord, dict[str, Any]]:
    """Compare the anchor realigned (and weight-scaled) with the retrained LoRAs. Returns the stage's record and
    the eval's results as results.json holds them: this run's, or the file's when an earlier run did the stage."""
    from deradiff.eval.report import json_safe
    from deradiff.eval.stage import run_eval

    ecfg = eval_config(cfg, anchor.result["lora_dir"], [r.result["lora_dir"] for r in retrained])
    loras = [anchor.result["lora_dir"], *(r.result["lora_dir"] for r in retrained)]
    key = {"eval": {k: v for k, v in config_to_dict(ecfg).items() if k not in ("tracker", "group")},
           "upstream": [anchor.key, *(r.key for r in retrained)],
           "loras": [folder_digest(lora) for lora in loras]}  # a LoRA replaced on disk reruns the eval
    evaluated: dict[str, Any] = {}

    def evaluate() -> dict[str, Any]:
        result = run_eval(ecfg)
        evaluated.update(json_safe(result.results))  # inf/nan as null, as in the file a rerun reads
        results = str(Path(ecfg.output_dir) / "results.json")
        return {"report": str(result.report), "results": results, "outputs": [str(result.report), results]}

    record = run_stage(Path(cfg.output_dir), "eval", key, evaluate)
    return record, (read_json(record.result["results"], "eval results") if record.skipped else evaluated)


# ---- compute accounting ----------------------------------------------------------------------------------
def per_image_seconds(models: Sequence[dict[str, Any]], kind: str) -> float:
    """Mean model-only sampling time per image of one kind of model (measured in the eval)."""
    rows = [r for r in models if r["kind"] == kind and r["n"]]
    return sum(r["model_seconds"] / r["n"] for r in rows) / len(rows) if rows else float("nan")


def savings_table(train_seconds: Sequence[float], retrained_img_s: float, realigned_img_s: float, images: int,
                  sweep_sizes: Sequence[int]) -> list[dict[str, Any]]:
    """Cost of exploring K strengths: K trainings vs one training + realignment, from measured times.

    `training only` is the paper's comparison (1 - 1/K); `with sampling` adds drawing `images` images per
    strength, where a realigned image costs two UNet passes per step instead of one.
    """
    t_train = sum(train_seconds) / len(train_seconds)
    rows = []
    for k in sweep_sizes:
        retrain, realign = k * t_train, t_train
        retrain_all, realign_all = k * (t_train + images * retrained_img_s), t_train + k * images * realigned_img_s
        rows.append({"K": k, "retrain_s": retrain, "realign_s": realign, "savings_training": 1 - realign / retrain,
                     "retrain_with_sampling_s": retrain_all, "realign_with_sampling_s": realign_all,
                     "savings_with_sampling": 1 - realign_all / retrain_all})
    return rows


def train_seconds(trains: Sequence[StageRecord]) -> list[float]:
    """Each LoRA's training loop time over all the runs that trained it (a stage that only resumed a finished
    run, or was interrupted and resumed, still counts the work once)."""
    recorded = [r.result.get("train_wall_s") for r in trains]
    return [float(r.seconds if t is None else t) for r, t in zip(trains, recorded)]


# The study runs every stage as one process on one device (the eval alone splits across devices when it is
# launched on several, outside the study), so a stage's device-hours are its wall hours.
STUDY_DEVICES = 1


def accounting(cfg: StudyConfig, records: Sequence[StageRecord], trains: Sequence[StageRecord], results: dict[str, Any]) -> dict[str, Any]:
    """Stage wall times and the savings table, every number from this study's stage markers and eval."""
    models = results["models"]
    images = int(next(r["n"] for r in models if r["kind"] == "base"))
    ret_s, real_s = per_image_seconds(models, "retrained"), per_image_seconds(models, "realigned")
    return {
        "stages": [{"stage": r.name, "seconds": r.seconds, "device_hours": r.seconds * STUDY_DEVICES / 3600,
                    "skipped_this_run": r.skipped} for r in records],
        "total_seconds": sum(r.seconds for r in records),
        "train_seconds": train_seconds(trains),
        "images_per_strength": images,
        "retrained_image_s": ret_s,
        "realigned_image_s": real_s,
        "savings": savings_table(train_seconds(trains), ret_s, real_s, images, cfg.sweep_sizes),
    }


# ---- convergence -----------------------------------------------------------------------------------------
PLATEAU_METRIC = {"ddpo": "objective", "reward_grad": "objective", "dpo": "loss"}  # per-step training objective each trainer logs


def plateau(history: Sequence[dict[str, float]], key: str, fraction: float = 0.25) -> dict[str, Any] | None:
    """Change of `key` between the last `fraction` of logged steps and the same span before it, with a 95%
    normal interval (Welch): an interval including 0 means no detectable change (plateaued). None: too short."""
    values = [float(h[key]) for h in history if key in h and math.isfinite(float(h[key]))]
    n = max(2, int(len(values) * fraction))
    if len(values) < 2 * n:
        return None
    earlier, last = values[-2 * n : -n], values[-n:]
    change = statistics.fmean(last) - statistics.fmean(earlier)
    half = 1.96 * math.sqrt((statistics.variance(earlier) + statistics.variance(last)) / n)
    return {"metric": key, "steps": int(history[-1]["step"]), "window": n, "change": change, "change_lo": change - half,
            "change_hi": change + half, "plateaued": change - half <= 0 <= change + half}


def convergence(cfg: StudyConfig, trains: Sequence[StageRecord]) -> list[dict[str, Any]]:
    """Per trained LoRA: did its training objective stop changing (from its history.jsonl)?"""
    from deradiff.training.trainer import read_history

    key = PLATEAU_METRIC.get(cfg.method, "loss")
    out = []
    for beta, rec in zip([cfg.beta0, *cfg.betas], trains):
        found = plateau(read_history(Path(rec.result["lora_dir"]).parent, 10**12), key)
        out.append({"beta": beta, **(found or {"metric": key, "plateaued": None})})
    return out


def convergence_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    lines = []
    for r in rows:
        if r["plateaued"] is None:
            lines.append(f"training at beta {r['beta']:g}: too few logged steps to judge convergence")
            continue
        state = "plateaued (no detectable change)" if r["plateaued"] else "still changing (not converged)"
        lines.append(f"training at beta {r['beta']:g}: {r['metric']} over the last {r['window']} logged steps changed by "
                     f"{r['change']:+.3g} [{r['change_lo']:+.3g}, {r['change_hi']:+.3g}] vs the {r['window']} before: {state}")
    return lines


# ---- findings and report ---------------------------------------------------------------------------------
def is_decreasing(values: Sequence[float]) -> bool:
    return all(b <= a for a, b in zip(values, values[1:]))


def findings(results: dict[str, Any]) -> dict[str, Any]:
    """The study's claims, checked on this run: reward falls with beta (retrained, oracle), realigned follows."""
    from deradiff.eval.report import curve_points

    models = results["models"]
    reward = next((k for k in results["meta"]["metric_keys"] if k.startswith("reward_")), None)
    if reward is None:
        return {}
    out: dict[str, Any] = {"reward": reward}
    for kind in ("retrained", "realigned", "weight_scaled", "oracle"):
        betas, values = curve_points(models, kind, reward)
        if not betas:
            continue
        out[kind] = {"effective_beta": betas, reward: values, "falls_as_beta_grows": is_decreasing(values)}
    out["mean_normalized_error"] = results["error_summary"]
    return out


def accounting_html(acc: dict[str, Any], found: dict[str, Any]) -> str:
    """The study section of the report: findings, stage times, the K-strength savings table."""
    from deradiff.eval.report import html_table

    claims = "".join(f"<li>{k}: reward falls as beta grows: <b>{v['falls_as_beta_grows']}</b></li>"
                     for k, v in found.items() if isinstance(v, dict) and "falls_as_beta_grows" in v)
    return (f"<h2>Study findings</h2><ul>{claims}</ul><h2>Compute accounting (measured in this run)</h2>"
            + html_table(acc["stages"], ["stage", "seconds", "device_hours", "skipped_this_run"])
            + f"<p>total {acc['total_seconds']:.1f} s; per image: retrained {acc['retrained_image_s']:.4f} s, "
              f"realigned {acc['realigned_image_s']:.4f} s (model calls only)</p>"
            + html_table(acc["savings"], list(acc["savings"][0]) if acc["savings"] else []))


def write_study_report(cfg: StudyConfig, results: dict[str, Any], acc: dict[str, Any], found: dict[str, Any],
                       converged: list[dict[str, Any]]) -> tuple[Path, list[str]]:
    """report.html (the eval report plus convergence, findings and compute accounting) and summary.json in the
    study folder; both open with the verdict lines. Returns the report path and the verdict."""
    from deradiff.eval.report import write_html

    study = Path(cfg.output_dir)
    verdict = [*results.get("verdict", []), *convergence_lines(converged)]
    summary = {"report": str(study / "report.html"), "eval_report": str(study / "eval" / "report.html"), "verdict": verdict,
               "convergence": converged, "findings": found, "accounting": acc}
    write_text_atomic(study / "summary.json", json.dumps(summary, indent=2, default=str))
    page = write_html(study / "eval", {**results, "verdict": verdict}, extra_html=accounting_html(acc, found), dest=study / "report.html")
    return page, verdict


def run_study(cfg: StudyConfig) -> StudyResult:
    """All stages in order (finished ones skipped), then the report; returns the report path and summary."""
    if cfg.threads > 0:
        import torch

        torch.set_num_threads(cfg.threads)
    preflight(cfg)
    with OutputDirLock(cfg.output_dir):  # two studies in one folder would mix their stages
        records, trains, results = run_stages(cfg)
        acc, found, converged = accounting(cfg, records, trains, results), findings(results), convergence(cfg, trains)
        report, verdict = write_study_report(cfg, results, acc, found, converged)
    return StudyResult(report=report, summary={"verdict": verdict, "convergence": converged, "findings": found, "accounting": acc},
                       stages=records)


def preflight(cfg: StudyConfig) -> None:
    """What a stage would refuse, checked before the first one runs: every output folder, every stage's config,
    and whether each train folder's earlier run may be continued."""
    check_output_dir(cfg.output_dir)
    check_output_dir(prefs_path(cfg).parent, "the study's prefs folder")
    check_output_dir(Path(cfg.output_dir) / "stages", "the study's stages folder")
    loras = []
    for beta in [cfg.beta0, *cfg.betas]:
        tcfg = train_config(cfg, beta)
        check_output_dir(tcfg.output_dir)
        check_resume(tcfg.output_dir, replace(tcfg.train, resume_from="latest"), config_to_dict(tcfg))
        loras.append(str(Path(tcfg.output_dir) / FINAL_LORA))
    check_output_dir(eval_config(cfg, loras[0], loras[1:]).output_dir)


def run_stages(cfg: StudyConfig) -> tuple[list[StageRecord], list[StageRecord], dict[str, Any]]:
    """(every stage's record, the train stages' records, the eval's results), finished stages skipped."""
    from tqdm.auto import tqdm

    records: list[StageRecord] = []
    bar = tqdm(total=len(cfg.betas) + 3, desc="study", unit="stage")
    prefs = prefs_stage(cfg)
    records += [prefs] if prefs else []
    bar.update()
    upstream = [prefs.key] if prefs else []
    trains = []
    for beta in [cfg.beta0, *cfg.betas]:
        bar.set_postfix_str(f"train beta={beta:g}")
        trains.append(train_stage(cfg, beta, upstream))
        bar.update()
    records += trains
    bar.set_postfix_str("eval")
    eval_record, results = eval_stage(cfg, trains[0], trains[1:])
    records.append(eval_record)
    bar.update()
    bar.close()
    return records, trains, results


def format_summary(result: StudyResult) -> str:
    """The lines the CLI prints at the end: stage times, savings, claims, and where the report is."""
    acc = result.summary["accounting"]
    lines = [f"{s['stage']:<28} {s['seconds']:8.1f} s{'  (done earlier)' if s['skipped_this_run'] else ''}" for s in acc["stages"]]
    lines.append(f"{'total':<28} {acc['total_seconds']:8.1f} s")
    lines += [f"K={r['K']:<3} realign saves {100 * r['savings_training']:.1f}% of training time "
              f"({100 * r['savings_with_sampling']:.1f}% incl. sampling)" for r in acc["savings"]]
    for kind, v in result.summary["findings"].items():
        if isinstance(v, dict) and "falls_as_beta_grows" in v:
            lines.append(f"{kind}: reward falls as beta grows: {v['falls_as_beta_grows']}")
    lines += result.summary["verdict"]
    lines.append(f"report: {result.report}")
    return "\n".join(lines)
