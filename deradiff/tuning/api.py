"""`deradiff.tune(pipe, maximize=..., subject_to=[...], prompts=[...])`: the tune on a pipeline in memory.

The same search, measurements and choice rule as `deradiff tune`, without files: the pipeline carries an
aligned LoRA (as for `deradiff.realign`), or is the base pipeline with `aligned_unet` the aligned model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from deradiff.errors import DeradiffError
from deradiff.eval.config import BootstrapSection, SamplingSection
from deradiff.eval.generate import VariantSamples, make_jobs
from deradiff.eval.scoring import FeatureFn, RewardFn
from deradiff.tuning.config import SAMPLE_METRICS, SearchSection, rewards_in, with_deltas
from deradiff.tuning.criterion import parse_criterion
from deradiff.tuning.select import Choice


@dataclass
class Tuned:
    """What `deradiff.tune` returns: the choice (None when nothing is feasible, see `infeasible`), one row per
    lambda (metrics with intervals, as in tune.json), and every lambda's images [prompt-major (prompt, seed)]."""

    choice: Choice | None
    rows: list[dict[str, Any]]
    infeasible: str | None
    samples: dict[float, VariantSamples]


def _section(kind: type, value: Any, name: str) -> Any:
    """A config section from None (defaults), an instance, or a mapping of its YAML keys (validated)."""
    if value is None:
        section = kind()
    elif isinstance(value, kind):
        section = value
    elif isinstance(value, Mapping):
        known = {f.name for f in dataclasses.fields(kind)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise DeradiffError(f"tune(): {name} has no key {unknown[0]!r}; known: {', '.join(sorted(known))}")
        section = kind(**value)
    else:
        raise DeradiffError(f"tune(): {name} must be a mapping of its keys, got {type(value).__name__}")
    section.validate()
    return section


def _rewards(names: Sequence[str], given: Mapping[str, RewardFn] | Sequence[str] | None) -> dict[str, RewardFn]:
    """Callables for the criterion's rewards: the given ones by name, the rest from the registry."""
    from deradiff.rewards import available_rewards, get_reward

    custom = dict(given) if isinstance(given, Mapping) else {}
    extra = list(given) if given is not None and not isinstance(given, Mapping) else []
    wanted = list(dict.fromkeys([*rewards_in(list(names), [*available_rewards(), *custom]), *extra, *custom]))
    return {n: custom[n] if n in custom else get_reward(n) for n in wanted}


def tune(pipe: Any, maximize: str | None = None, *, minimize: str | None = None, subject_to: Sequence[str] = (),
         prompts: Sequence[str], seeds: Sequence[int] = (0, 1, 2, 3), beta: float | None = None,
         aligned_unet: Any = None, rewards: Mapping[str, RewardFn] | Sequence[str] | None = None,
         features: FeatureFn | None = None, search: Any = None, sampling: Any = None, bootstrap: Any = None) -> Tuned:
    """Choose lambda for `pipe`'s aligned model: dense pass, refinement, interval-respecting choice.

    maximize / minimize, subject_to: the criterion, as in the tune YAML ('fidelity >= 0.8'); metrics are rewards
    (registered names or the keys of `rewards`), path_kl, diversity, with `features` kid, and '<metric>_delta'
    (minus the base's value). beta: the aligned
    model's KL strength (default: its deradiff metadata), for the emulated beta*. search / sampling / bootstrap:
    mappings with the YAML sections' keys (e.g. {"num_lambdas": 16, "lambda_max": 3}).
    """
    from deradiff.models.pipelines import loaded_lora_beta
    from deradiff.rewards import available_rewards
    from deradiff.tuning.stage import Search

    custom = list(rewards) if isinstance(rewards, Mapping) else []
    known = with_deltas([*available_rewards(), *custom, *(m for m in SAMPLE_METRICS if m != "kid" or features is not None)])
    criterion = parse_criterion({"maximize": maximize, "minimize": minimize, "subject_to": list(subject_to)}, known)
    if len(set(seeds)) < 2 or not prompts:
        raise DeradiffError(f"tune() needs at least one prompt and 2 distinct seeds, got {len(prompts)} and {list(seeds)}")
    if bootstrap is not None and dict(bootstrap if isinstance(bootstrap, Mapping) else vars(bootstrap)).get("replicates") == 0:
        raise DeradiffError("tune(): bootstrap replicates must be >= 10: the choice reads intervals")
    sections = (_section(SearchSection, search, "search"), _section(SamplingSection, sampling, "sampling"),
                _section(BootstrapSection, bootstrap, "bootstrap"))
    beta0 = beta if beta is not None else loaded_lora_beta(pipe)
    found = Search(sections, pipe, make_jobs(list(prompts), list(seeds)), _rewards(criterion.metrics(), rewards),
                   features, criterion, beta0, aligned_unet)
    choice, infeasible = found.run()
    return Tuned(choice, found.rows, infeasible["message"] if infeasible else None, found.samples)
