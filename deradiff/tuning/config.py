"""The tune stage's config schema (documented once, here)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from deradiff.config import check_device, check_min, check_seeds, option
from deradiff.errors import ConfigError
from deradiff.eval.config import BootstrapSection, OracleSection, SamplingSection
from deradiff.realignment.mixing import check_lambda
from deradiff.training.config import TrackerSection
from deradiff.tuning.criterion import Criterion, parse_criterion

# What the sampling itself measures, beside the registered rewards. path_kl and kid are already "to the base".
SAMPLE_METRICS = ("path_kl", "diversity", "kid")
DELTA = "_delta"  # '<metric>_delta': the metric minus the base's (lambda 0) on the same draws, e.g. fidelity_delta


def with_deltas(names: list[str]) -> list[str]:
    """The names plus '<name>_delta' for every one that is not already measured against the base."""
    return [*names, *(f"{n}{DELTA}" for n in names if n not in ("path_kl", "kid"))]


KL_TO_OPTIMUM = "kl_to_optimum"  # KL(realigned lambda || the exact optimum at beta0 / lambda), nats
ORACLE = "oracle_"  # 'oracle_<metric>': the exact optimum's value at beta0 / lambda (e.g. oracle_vividness)


def oracle_metrics(names: list[str]) -> list[str]:
    return [KL_TO_OPTIMUM, *(f"{ORACLE}{n}" for n in names if n != "kid")]


def rewards_in(metrics: list[str], rewards: list[str]) -> list[str]:
    """The rewards (among `rewards`) that metric names read, each once, in order: 'fidelity', 'fidelity_delta'
    and 'oracle_fidelity' all need fidelity scored."""
    bare = [m.removeprefix(ORACLE).removesuffix(DELTA) for m in metrics]
    return list(dict.fromkeys(m for m in bare if m in rewards))


def uses_oracle(criterion: Criterion) -> list[str]:
    """The criterion's metrics that need the oracle."""
    return [m for m in criterion.metrics() if m == KL_TO_OPTIMUM or m.startswith(ORACLE)]


def known_metrics() -> list[str]:
    """Every name a criterion may use: the registered rewards, the measured sample metrics, their deltas, and
    the oracle's metrics (reward-unit anchors only; checked when the anchor is read)."""
    from deradiff.rewards import available_rewards

    names = [*available_rewards(), *SAMPLE_METRICS]
    return [*with_deltas(names), *oracle_metrics(names)]


@dataclass
class SearchSection:
    """Which lambdas are sampled: a dense grid, then a finer one around the best region."""

    lambda_min: float = option(0.0, "smallest lambda of the dense pass (0: the base model)")
    lambda_max: float = option(2.0, "largest lambda of the dense pass (> 1: extrapolation past the anchor)")
    num_lambdas: int = option(16, "lambdas of the dense pass, evenly spaced; 0 and 1 are always added")
    refine_lambdas: int = option(8, "extra lambdas between the chosen lambda's dense neighbours (0: no refinement)")

    def validate(self) -> None:
        for key in ("lambda_min", "lambda_max"):
            check_lambda(getattr(self, key), f"config key 'search.{key}'")
        if self.lambda_max <= max(self.lambda_min, 1.0):
            raise ConfigError(f"config key 'search.lambda_max' must be > 1 and > search.lambda_min "
                              f"(the search extrapolates past the anchor), got {self.lambda_max}")
        check_min(self, "search.", {"num_lambdas": 3, "refine_lambdas": 0})


@dataclass
class TuneConfig:
    """Which lambda (hence beta = beta0 / lambda) best meets the criterion, measured with intervals."""

    output_dir: str = option(help="folder for tune.json, tune.html, plots/, grids/ (relative: to the current directory)")
    anchor_lora: str = option(help="the aligned LoRA (its deradiff metadata gives beta0, the method and the base model)")
    maximize: str | None = option(None, "objective to maximize: a metric or a weighted sum ('1.0*pickscore + 0.5*hpsv2')")
    minimize: str | None = option(None, "objective to minimize instead (give exactly one of maximize / minimize)")
    subject_to: list[str] = option([], "constraints like 'fidelity >= 0.8', judged on each lambda's whole interval")
    base_model: str | None = option(None, "base pipeline folder or hub id ('tiny': the embedded world); null: the anchor's metadata")
    prompts: list[str] | None = option(None, "prompts; null: the first num_prompts of the tiny world's eval prompts")
    num_prompts: int = option(4, "how many world eval prompts when prompts is null")
    seeds: list[int] = option([0, 1, 2, 3], "seeds; each (prompt, seed) gets the same noise at every lambda")
    search: SearchSection = option(factory=SearchSection, help="the lambdas explored")
    sampling: SamplingSection = option(factory=SamplingSection, help="sampler settings (shared noise, as the eval's)")
    rewards: list[str] = option([], "rewards reported beside the ones the criterion names and the anchor's own")
    reward_options: dict[str, dict] = option({}, "keyword arguments per reward (see docs/rewards.md)")
    kid_features: Literal["classifier", "pixels", "none"] = option(
        "classifier", "features for KID to the base (lambda 0): the tiny world's classifier, raw pixels, or skip")
    grid_prompts: int = option(2, "prompts that get an image grid (rows: lambdas, columns: seeds)")
    grid_seeds: int = option(4, "seed columns per grid")
    grid_lambdas: int = option(7, "lambda rows per grid (0, 1, the chosen one and evenly spread others)")
    verify: bool = option(False, "train one LoRA at the chosen beta with the anchor's own config and compare it "
                                 "with the anchor realigned to the chosen lambda")
    verify_overrides: list[str] = option([], "key=value overrides for the verify training run (e.g. train.max_steps=40)")
    oracle: OracleSection = option(factory=OracleSection, help="the exact optimum at beta0 / lambda from importance-"
                                   "weighted base samples (reward-unit anchors): drawn when the criterion uses "
                                   "kl_to_optimum or oracle_<metric>, or when oracle.enabled is on")
    bootstrap: BootstrapSection = option(factory=BootstrapSection, help="intervals over (prompt, seed)")
    threads: int = option(0, "torch CPU threads (0: torch's default); small shared CPUs: docs/benchmarks.md")
    device: str = option("auto", "torch device: auto (cuda when available), cpu, cuda, cuda:1, ...")
    group: str | None = option(None, "W&B group; null: the anchor's training group (from its metadata), else the folder name")
    overwrite: bool = option(False, "replace a finished tune in output_dir instead of refusing")
    tracker: TrackerSection = option(factory=TrackerSection, help="experiment tracking (one W&B run for the tune)")

    def criterion(self) -> Criterion:
        return parse_criterion({"maximize": self.maximize, "minimize": self.minimize, "subject_to": self.subject_to},
                               known_metrics())

    def wants_oracle(self) -> bool:
        """The oracle's base samples cost minutes: drawn only when the criterion reads them, or when asked."""
        return self.oracle.enabled == "on" or bool(uses_oracle(self.criterion()))

    def validate(self) -> None:
        criterion = self.criterion()  # a malformed criterion or an unknown metric fails at load, before any sampling
        if self.kid_features == "none" and "kid" in criterion.metrics():
            raise ConfigError("the criterion uses kid but config key 'kid_features' is none; choose classifier or pixels")
        if self.oracle.enabled == "off" and uses_oracle(criterion):
            raise ConfigError(f"the criterion uses {uses_oracle(criterion)[0]} but config key 'oracle.enabled' is off")
        if self.wants_oracle():
            self.oracle.check_apart(self.seeds)
        from deradiff.rewards import check_reward_name

        for key, names in (("rewards", self.rewards), ("reward_options", list(self.reward_options))):
            for name in names:
                check_reward_name(name, key)
        if len(set(self.seeds)) != len(self.seeds) or len(self.seeds) < 2:  # intervals and diversity compare seeds
            raise ConfigError(f"config key 'seeds' must list at least 2 distinct seeds, got {self.seeds}")
        check_seeds(self.seeds, "seeds")
        if self.prompts is not None and not any(p.strip() for p in self.prompts):
            raise ConfigError("config key 'prompts' lists no prompts (null: the tiny world's eval prompts)")
        if self.bootstrap.replicates == 0:
            raise ConfigError("config key 'bootstrap.replicates' must be >= 10 for a tune: the choice reads intervals")
        check_min(self, "", {"num_prompts": 1, "grid_prompts": 0, "grid_seeds": 0, "grid_lambdas": 2, "threads": 0})
        check_device(self.device, "device")
