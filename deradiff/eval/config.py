"""The eval stage's config schema (documented once, here)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from deradiff.config import check_device, check_min, check_seed, check_seeds, option
from deradiff.errors import ConfigError
from deradiff.realignment.mixing import check_lambda
from deradiff.training.config import TrackerSection


@dataclass
class SamplingSection:
    """How every model is sampled; identical for all of them, with shared per-(prompt, seed) noise."""

    steps: int = option(20, "DDIM steps")
    eta: float = option(1.0, "DDIM eta; must be > 0 (stochastic steps: shared per-step noise and a finite path KL)")
    guidance_scale: float = option(1.0, "classifier-free guidance scale (<= 1: no CFG)")
    height: int | None = option(None, "image height in pixels (null: the model's native size)")
    width: int | None = option(None, "image width in pixels (null: the model's native size)")
    batch_size: int = option(16, "images per UNet batch")
    branches: Literal["auto", "stacked", "two-call"] = option(
        "auto", "realigned models: reference and aligned branches in one stacked forward per step (stacked), "
                "two calls (two-call, least memory), or stacked only when that adds at most 2 rows (auto)")

    def validate(self) -> None:
        if self.eta <= 0:
            raise ConfigError(f"config key 'sampling.eta' must be > 0 for shared-noise eval, got {self.eta}")
        check_min(self, "sampling.", {"steps": 1, "batch_size": 1, "guidance_scale": 0})
        for key in ("height", "width"):
            value = getattr(self, key)
            if value is not None and (value < 8 or value % 8):
                raise ConfigError(f"config key 'sampling.{key}' must be a positive multiple of 8, got {value}")


@dataclass
class OracleSection:
    """The exact optimum p_ref * exp(r / beta) at every evaluated strength, by importance-weighting base samples
    drawn with the training sampler (only for LoRAs whose beta is in reward units, e.g. ddpo)."""

    enabled: Literal["auto", "on", "off"] = option(
        "auto", "auto: show it where it applies and say why not elsewhere; on: fail before sampling if it cannot apply")
    samples_per_prompt: int = option(256, "base samples per prompt (the estimate's effective sample size is at most this)")
    min_ess: float = option(20.0, "oracle rows whose worst prompt's effective sample size is below this are "
                                  "reported as unreliable and left out of the verdict")
    seed_offset: int = option(1_000_000, "base-sample seeds are seed_offset + i (kept apart from the eval seeds)")
    cache_dir: str | None = option(None, "where base samples are cached and reused across runs (relative: to the "
                                         "current directory; null: $XDG_CACHE_HOME/deradiff/oracle or ~/.cache/deradiff/oracle)")

    def validate(self) -> None:
        if self.samples_per_prompt < 2:
            raise ConfigError(f"config key 'oracle.samples_per_prompt' must be >= 2, got {self.samples_per_prompt}")
        if self.min_ess < 1:
            raise ConfigError(f"config key 'oracle.min_ess' must be >= 1, got {self.min_ess}")
        check_seed(self.seed_offset, "oracle.seed_offset", count=self.samples_per_prompt)

    def check_apart(self, seeds: list[int]) -> None:
        """The oracle's base samples must not reuse a sampled seed's noise (the two would not be independent)."""
        first, count = self.seed_offset, self.samples_per_prompt
        shared = sorted(s for s in seeds if first <= s < first + count)
        if shared:
            raise ConfigError(f"config key 'seeds' has {shared[0]}, which the oracle also draws (oracle.seed_offset + "
                              f"0..{count - 1} = {first}..{first + count - 1}); use other seeds or move oracle.seed_offset")


@dataclass
class BootstrapSection:
    """Percentile intervals from a paired bootstrap over prompts and seeds (the oracle's base samples too)."""

    replicates: int = option(1000, "bootstrap resamples (0: point estimates only, no intervals and no verdict)")
    confidence: float = option(0.95, "interval coverage")
    seed: int = option(0, "resampling seed: the same seed gives the same intervals")

    def validate(self) -> None:
        if self.replicates < 0 or 0 < self.replicates < 10:
            raise ConfigError(f"config key 'bootstrap.replicates' must be 0 or >= 10, got {self.replicates}")
        if not 0 < self.confidence < 1:
            raise ConfigError(f"config key 'bootstrap.confidence' must be in (0, 1), got {self.confidence}")
        check_seed(self.seed, "bootstrap.seed")


@dataclass
class EvalConfig:
    """Realigned vs retrained: does the anchor LoRA realigned to lambda look like a LoRA retrained at beta0/lambda?"""

    output_dir: str = option(help="folder for results.csv/json, plots, grids and report.html (relative: to the "
                                  "current directory, as are the LoRA and model paths)")
    anchor_lora: str = option(help="the LoRA trained at beta0 (its deradiff metadata gives beta0 and the base model)")
    retrained_loras: list[str] = option([], "LoRAs retrained at other betas (each beta read from its metadata)")
    base_model: str | None = option(None, "base pipeline folder or hub id ('tiny': the embedded world); null: the anchor's metadata")
    lambdas: list[float] | None = option(None, "lambda grid; null: beta0/beta of every retrained LoRA plus extra_lambdas")
    extra_lambdas: list[float] = option([1.5, 2.0], "lambdas added to the default grid (lambda > 1 extrapolates past beta0)")
    weight_scaled: bool = option(True, "also evaluate the weight-space baseline: the anchor LoRA scaled by lambda")
    prompts: list[str] | None = option(None, "prompts; null: the first num_prompts of the tiny world's eval prompts")
    num_prompts: int = option(4, "how many world eval prompts when prompts is null")
    seeds: list[int] = option([0, 1, 2, 3], "seeds; each (prompt, seed) gets the same noise for every model")
    sampling: SamplingSection = option(factory=SamplingSection, help="sampler settings shared by all models")
    rewards: list[str] = option(["vividness", "fidelity"], "reward names (deradiff.rewards registry) to score")
    reward_options: dict[str, dict] = option(
        {}, "keyword arguments per reward, e.g. {pickscore: {model_path: /models/PickScore_v1}} (see docs/rewards.md)")
    kid_features: Literal["classifier", "pixels", "none"] = option(
        "classifier", "features for KID: the tiny world's classifier, raw pixels, or skip (no Inception offline)")
    grid_prompts: int = option(2, "prompts that get an image grid (rows: models, columns: seeds)")
    grid_seeds: int = option(4, "seed columns per grid")
    save_samples: bool = option(True, "write every image and path KL to samples.safetensors (uint8)")
    threads: int = option(0, "torch CPU threads (0: torch's default); small shared CPUs: docs/benchmarks.md")
    device: str = option("auto", "torch device: auto (cuda when available), cpu, cuda, cuda:1, ...")
    group: str | None = option(None, "W&B group (one per study); null: the output folder name")
    overwrite: bool = option(False, "replace existing results in output_dir instead of refusing")
    oracle: OracleSection = option(factory=OracleSection, help="the exact optimum as ground truth (reward-unit betas)")
    bootstrap: BootstrapSection = option(factory=BootstrapSection, help="uncertainty of every reported number")
    tracker: TrackerSection = option(factory=TrackerSection, help="experiment tracking (one W&B run per evaluated model)")

    def validate(self) -> None:
        for key in ("lambdas", "extra_lambdas"):
            for i, lam in enumerate(getattr(self, key) or []):
                check_lambda(lam, f"config key '{key}[{i}]'")
        self._check_rewards()
        if len(set(self.seeds)) != len(self.seeds) or len(self.seeds) < 2:  # diversity and intervals compare seeds
            raise ConfigError(f"config key 'seeds' must list at least 2 distinct seeds, got {self.seeds}")
        check_seeds(self.seeds, "seeds")
        if self.oracle.enabled != "off":
            self.oracle.check_apart(self.seeds)
        if self.prompts is not None and not any(p.strip() for p in self.prompts):
            raise ConfigError("config key 'prompts' lists no prompts (null: the tiny world's eval prompts)")
        if self.prompts is None and self.num_prompts < 1:
            raise ConfigError(f"config key 'num_prompts' must be >= 1 when prompts is null (else no prompts), "
                              f"got {self.num_prompts}")
        check_min(self, "", {"grid_prompts": 0, "grid_seeds": 0, "threads": 0})
        check_device(self.device, "device")


    def _check_rewards(self) -> None:
        """Unknown reward names fail when the config loads, not after every model has been sampled."""
        from deradiff.rewards import check_reward_name

        for key, names in (("rewards", self.rewards), ("reward_options", list(self.reward_options))):
            for name in names:
                check_reward_name(name, key)
        unused = sorted(set(self.reward_options) - set(self.rewards))
        if unused:  # options that would silently do nothing
            raise ConfigError(f"config key 'reward_options' has options for {unused}, which 'rewards' does not list")
