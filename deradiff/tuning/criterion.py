"""The criterion of a tune, as written in its YAML, parsed into a typed object before any sampling.

Forms accepted (exactly one of maximize / minimize; subject_to optional):

    maximize: vividness
    minimize: path_kl
    maximize: 1.0*pickscore + 0.5*hpsv2 - 2e-3*path_kl      # weights before '*'; a bare metric has weight 1
    subject_to: ["fidelity >= 0.8", "path_kl <= 300"]       # operators >=, <=, >, <

Metric names are checked against the names the caller can compute (registered rewards, the eval's metrics,
oracle metrics where an oracle exists), so a typo fails here with one line instead of after an hour of
sampling. The objective is stored with its sign folded in (minimize negates every weight), so everything
downstream only ever maximizes.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from deradiff.errors import ConfigError

_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_NUMBER = r"(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"
_CONSTRAINT = re.compile(rf"\s*({_NAME})\s*(>=|<=|>|<)\s*([+-]?{_NUMBER})\s*")
_EXAMPLE = "a metric or a weighted sum like '1.0*pickscore + 0.5*hpsv2'"
SENSES = ("maximize", "minimize")
KEYS = (*SENSES, "subject_to")


@dataclass(frozen=True)
class Constraint:
    """`metric op bound`, judged on a whole interval (lo, hi), never on the point estimate alone."""

    metric: str
    op: str  # one of >=, <=, >, <
    bound: float

    @property
    def text(self) -> str:
        return f"{self.metric} {self.op} {self.bound:.10g}"

    @property
    def lower(self) -> bool:
        """True for >= and >: the interval's lower end is the one that must clear the bound."""
        return self.op in (">=", ">")

    def holds(self, lo: float, hi: float) -> bool:
        """Whether every value in [lo, hi] satisfies the constraint (NaN ends never do)."""
        end = lo if self.lower else hi
        return {">=": end >= self.bound, ">": end > self.bound, "<=": end <= self.bound, "<": end < self.bound}[self.op]

    def shortfall(self, lo: float, hi: float) -> float:
        """How far the relevant interval end is on the wrong side of the bound (0 when on the right side or
        exactly at the bound of a strict operator; inf when that end is NaN)."""
        end = lo if self.lower else hi
        if math.isnan(end):
            return math.inf
        return max(0.0, self.bound - end) if self.lower else max(0.0, end - self.bound)

    def violation(self, lo: float, hi: float) -> float:
        """The shortfall relative to the bound's size: comparable across constraints in different units.

        Divided by max(|bound|, 1e-12), so a bound of 0 makes any shortfall of it dominate the total.
        """
        return self.shortfall(lo, hi) / max(abs(self.bound), 1e-12)

    def describe(self) -> str:
        """Plain words for a reason string: 'whose whole fidelity interval is >= 0.8'."""
        return f"whose whole {self.metric} interval is {self.op} {self.bound:.10g}"


@dataclass(frozen=True)
class Criterion:
    """What a tune optimizes: objective (metric -> weight, larger is better) subject to interval constraints.

    `sense` and `expression` keep the objective as written (for reason strings and tune.json); `text` is the
    whole criterion in one line.
    """

    objective: dict[str, float]
    constraints: list[Constraint]
    text: str
    sense: str = "maximize"
    expression: str = ""

    def metrics(self) -> list[str]:
        """Every metric the criterion reads (objective first), each once, in order of appearance."""
        return list(dict.fromkeys([*self.objective, *(c.metric for c in self.constraints)]))

    def value(self, metrics: Mapping[str, float]) -> float:
        """The objective (larger is better) from one set of metric values, e.g. one bootstrap replicate."""
        missing = [m for m in self.objective if m not in metrics]
        if missing:
            raise ValueError(f"objective of '{self.text}' needs metric(s) {missing}; got {sorted(metrics)}")
        return float(sum(w * float(metrics[m]) for m, w in self.objective.items()))

    def goal(self) -> str:
        """'highest vividness', 'lowest path_kl', or 'highest 1.0*pickscore + 0.5*hpsv2'."""
        best = "highest" if self.sense == "maximize" else "lowest"
        return f"{best} {self.expression}"

    def to_dict(self) -> dict[str, Any]:
        constraints = [{"metric": c.metric, "op": c.op, "bound": c.bound} for c in self.constraints]
        return {"text": self.text, "sense": self.sense, "expression": self.expression,
                "objective": dict(self.objective), "constraints": constraints}


def parse_criterion(spec: Mapping[str, Any], known: Collection[str]) -> Criterion:
    """A Criterion from the YAML mapping {maximize | minimize: str, subject_to: [str, ...]}.

    `known` is every metric name the caller can compute. A None value counts as absent (a config dataclass
    with both fields optional passes both keys). Raises ConfigError with one line naming the bad text.
    """
    if not isinstance(spec, Mapping):
        raise ConfigError(f"criterion must be a mapping like {{maximize: vividness, subject_to: [...]}}, got {spec!r}")
    unknown = [k for k in spec if k not in KEYS]
    if unknown:
        raise ConfigError(f"criterion: unknown key '{unknown[0]}'; expected 'maximize' or 'minimize', and optionally "
                          "'subject_to'")
    given = [s for s in SENSES if spec.get(s) is not None]
    if len(given) != 1:
        problem = "has both 'maximize' and 'minimize'" if given else "needs 'maximize' or 'minimize'"
        raise ConfigError(f"criterion {problem}: give exactly one, e.g. 'maximize: vividness'")
    sense = given[0]
    expression, objective = _parse_objective(sense, spec[sense], known)
    constraints = [_parse_constraint(item, known) for item in _constraint_items(spec.get("subject_to"))]
    text = f"{sense} {expression}" + (f" subject to {', '.join(c.text for c in constraints)}" if constraints else "")
    return Criterion(objective=objective, constraints=constraints, text=text, sense=sense, expression=expression)


def _unknown_metric(where: str, name: str, known: Collection[str]) -> ConfigError:
    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"{where}: unknown metric '{name}'{hint}; known: {', '.join(sorted(known))}")


def _parse_objective(sense: str, raw: Any, known: Collection[str]) -> tuple[str, dict[str, float]]:
    """(the expression with whitespace collapsed, metric -> weight with the sense folded in)."""
    text = " ".join(str(raw).split())
    where = f"criterion '{sense}: {text}'"
    if not isinstance(raw, str):
        raise ConfigError(f"{where}: expected {_EXAMPLE}")
    if not text:
        raise ConfigError(f"criterion '{sense}' is empty; expected {_EXAMPLE}")
    direction = 1.0 if sense == "maximize" else -1.0
    objective: dict[str, float] = {}
    for sign, term in _split_terms(text, where):
        weight, name = _parse_term(term, where)
        if name not in known:
            raise _unknown_metric(where, name, known)
        if name in objective:
            raise ConfigError(f"{where}: metric '{name}' appears twice; give it once with the combined weight")
        objective[name] = direction * sign * weight
    return text, objective


def _split_terms(text: str, where: str) -> list[tuple[float, str]]:
    """Split at + and - into (sign, term text); a sign inside a number's exponent (1e-3) does not split."""
    terms: list[tuple[float, str]] = []
    sign, buf, signed = 1.0, "", False
    for i, ch in enumerate(text):
        if ch not in "+-" or _in_exponent(text, i):
            buf += ch
            continue
        if buf.strip():
            terms.append((sign, buf.strip()))
        elif terms or signed:
            raise ConfigError(f"{where}: sign '{ch}' follows another sign; expected {_EXAMPLE}")
        sign, buf, signed = (1.0 if ch == "+" else -1.0), "", True
    if not buf.strip():
        raise ConfigError(f"{where}: ends with a sign; expected {_EXAMPLE}")
    return [*terms, (sign, buf.strip())]


def _in_exponent(text: str, i: int) -> bool:
    """Whether text[i] (a + or -) is the sign of an exponent: right after 'e' of a word that starts like a number."""
    if i == 0 or text[i - 1] not in "eE":
        return False
    start = i - 1
    while start > 0 and (text[start - 1].isalnum() or text[start - 1] in "._"):
        start -= 1
    return text[start].isdigit() or text[start] == "."


def _parse_term(term: str, where: str) -> tuple[float, str]:
    """(weight, metric) from '0.5*hpsv2', '0.5 * hpsv2' or 'hpsv2' (weight 1)."""
    if "*" in term:
        weight, _, name = (part.strip() for part in term.partition("*"))
        if not re.fullmatch(_NUMBER, weight):
            raise ConfigError(f"{where}: weight '{weight}' in '{term}' is not a number; write terms like '0.5*hpsv2'")
        if not re.fullmatch(_NAME, name):
            raise ConfigError(f"{where}: '{name}' in '{term}' is not a metric name; write terms like '0.5*hpsv2'")
        if not math.isfinite(float(weight)):
            raise ConfigError(f"{where}: weight '{weight}' in '{term}' is not a finite number")
        return float(weight), name
    if re.fullmatch(_NAME, term):
        return 1.0, term
    glued = re.fullmatch(rf"({_NUMBER})\s*({_NAME})", term)
    hint = f"write '{glued[1]}*{glued[2]}'" if glued else "write terms like '0.5*hpsv2'"
    raise ConfigError(f"{where}: cannot read term '{term}'; {hint}")


def _constraint_items(raw: Any) -> list[Any]:
    """subject_to as a list: absent -> [], one string -> [it]."""
    if raw is None:
        return []
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, (list, tuple)):
        return list(raw)
    raise ConfigError(f"criterion 'subject_to' must be a list of constraints like ['fidelity >= 0.8'], got {raw!r}")


def _parse_constraint(raw: Any, known: Collection[str]) -> Constraint:
    text = " ".join(str(raw).split())
    match = _CONSTRAINT.fullmatch(raw) if isinstance(raw, str) else None
    if match is None:
        raise ConfigError(f"constraint '{text}' must look like '<metric> >= <number>' (operators >=, <=, >, <)")
    name, op, bound = match.groups()
    if name not in known:
        raise _unknown_metric(f"constraint '{text}'", name, known)
    if not math.isfinite(float(bound)):
        raise ConfigError(f"constraint '{text}': bound '{bound}' is not a finite number")
    return Constraint(metric=name, op=op, bound=float(bound))

