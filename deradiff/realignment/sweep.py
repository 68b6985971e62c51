"""Lambda sweeps: K strengths for the same prompts and seeds sampled as ONE batch of trajectories.

    result = deradiff.realignment.sweep.sweep(pipe, ["a red circle"], seeds=[0, 1], lambdas=[0, 0.5, 1, 2])
    result.images[k][p][s]        # lambda k, prompt p, seed s

Each lambda gives its own trajectory x_t after the first step, so every (lambda, prompt, seed) is one row of
the pipeline batch with its own `torch.Generator` seeded from its seed: row (k, p, s) draws exactly the noise
a single-lambda run with per-image generators draws for (p, s), so it equals that run (up to the float
rounding of a different batch size). Per step the denoiser computes only what some trajectory needs:
- lambda 0 rows need the reference branch only, lambda 1 rows the aligned branch only, others both;
- trajectories of the same prompt and seed that have seen the same lambdas so far share one input
  (at step 0 all K do), so their branches are computed once (checked with torch.equal before sharing).
With K=4 lambdas [0, 0.5, 1, 2] that is 2 rows per (prompt, seed) at step 0 and 6 later, against 8 for
"2 branches x K trajectories", all in one forward (stacked with peft per-row adapters, see `batched`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from deradiff.errors import DeradiffError
from deradiff.realignment.batched import replace_sample
from deradiff.realignment.branches import Branches, BranchMode, check_mode
from deradiff.realignment.mixing import LambdaSchedule, LambdaSpec, mix_predictions

# Arguments sweep() builds itself from prompts/seeds; a caller passing them would silently break the layout.
OWNED_KWARGS = ("prompt", "num_images_per_prompt", "generator", "latents", "prompt_embeds",
                "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
REPEATED_KWARGS = ("prompt_2", "negative_prompt", "negative_prompt_2")  # per-prompt lists, repeated per lambda


class TrajectoryLambdas:
    """Per-trajectory lambda schedules for a batch whose rows are trajectories (repeated per CFG copy).

    groups[t]: trajectories with the same group start from the same input (same prompt and seed), so while
    their lambda histories agree their inputs agree and one evaluation serves them all.
    """

    def __init__(self, schedules: Sequence[LambdaSpec], groups: Sequence[int]):
        if len(schedules) != len(groups) or not schedules:
            raise DeradiffError("a sweep needs one group id per trajectory schedule (and at least one)")
        self.schedules = [LambdaSchedule(s) for s in schedules]
        self.groups = list(groups)
        self._history: list[tuple[float, ...]] = [()] * len(self.schedules)
        self.rows_per_step: list[int] = []  # model rows evaluated per step (for tests and benchmarks)

    def __len__(self) -> int:
        return len(self.schedules)

    def at(self, step: int, timestep: float) -> list[float]:
        if step == 0:
            self._history = [()] * len(self)
            self.rows_per_step = []
        return [schedule.at(step, timestep) for schedule in self.schedules]

    def check_length(self, num_steps: int) -> None:
        for schedule in self.schedules:
            schedule.check_length(num_steps)

    def predict(self, branches: Branches, lams: list[float], args: tuple, kwargs: dict,
                with_reference: bool = False) -> Any:
        """The mixed prediction of every row, from one evaluation of the rows and branches needed; with
        `with_reference`, (that output, every row's reference prediction: the base model at the row's state)."""
        x = _sample_argument(args, kwargs)
        copies = self._copies(x.shape[0])
        reps = self._representatives(x, copies)
        ref_rows, aligned_rows = self._needed_rows(lams, reps, copies, with_reference)
        template, ref, aligned = branches.rows(args, kwargs, ref_rows, aligned_rows)
        self.rows_per_step.append(len(ref_rows) + len(aligned_rows))
        mixed = self._mix(lams, reps, copies, (ref_rows, ref), (aligned_rows, aligned))
        self._history = [h + (lam,) for h, lam in zip(self._history, lams)]
        output = replace_sample(template, mixed)
        if not with_reference:
            return output
        spread = [c * len(self) + reps[t] for c in range(copies) for t in range(len(self))]
        position = {row: i for i, row in enumerate(ref_rows)}
        return output, _rows(ref, [position[row] for row in spread])

    def _copies(self, rows: int) -> int:
        """How many times the trajectories repeat in the batch (2 with classifier-free guidance)."""
        if rows % len(self):
            raise DeradiffError(f"the denoiser got {rows} rows for {len(self)} sweep trajectories; "
                                "a sweep needs a whole number of rows per trajectory")
        return rows // len(self)

    def _representatives(self, x: torch.Tensor, copies: int) -> list[int]:
        """reps[t]: the trajectory whose evaluation t reuses (itself unless the inputs are provably equal)."""
        count, first, reps = len(self), {}, []
        for t in range(count):
            r = first.setdefault((self.groups[t], self._history[t]), t)
            if r != t and not all(torch.equal(x[c * count + t], x[c * count + r]) for c in range(copies)):
                r = t  # same history but different input (e.g. a nondeterministic kernel): compute it
            reps.append(r)
        return reps

    def _needed_rows(self, lams: list[float], reps: list[int], copies: int,
                     with_reference: bool) -> tuple[list[int], list[int]]:
        """Rows to evaluate without / with the adapter: lambda 1 needs no reference (unless asked for), lambda 0
        no aligned."""
        need_ref, need_aligned = set(), set()
        for t, lam in enumerate(lams):
            if lam != 1.0 or with_reference:
                need_ref.add(reps[t])
            if lam != 0.0:
                need_aligned.add(reps[t])
        count = len(self)
        ref = [c * count + r for c in range(copies) for r in sorted(need_ref)]
        aligned = [c * count + r for c in range(copies) for r in sorted(need_aligned)]
        return ref, aligned

    def _mix(self, lams: list[float], reps: list[int], copies: int, ref: tuple[list[int], torch.Tensor],
             aligned: tuple[list[int], torch.Tensor]) -> torch.Tensor:
        """Rows grouped by lambda and mixed with `mix_predictions` (same float ops as a single-lambda run)."""
        count = len(self)
        pos_ref = {row: i for i, row in enumerate(ref[0])}
        pos_aligned = {row: i for i, row in enumerate(aligned[0])}
        like = ref[1] if ref[0] else aligned[1]
        out = like.new_empty((copies * count, *like.shape[1:]))
        for lam in dict.fromkeys(lams):
            rows = [c * count + t for c in range(copies) for t in range(count) if lams[t] == lam]
            src = [c * count + reps[t] for c in range(copies) for t in range(count) if lams[t] == lam]
            r = _rows(ref[1], [pos_ref[s] for s in src]) if lam != 1.0 else None
            a = _rows(aligned[1], [pos_aligned[s] for s in src]) if lam != 0.0 else None
            out[_index(rows, out)] = mix_predictions(r, a, lam)
        return out


def _rows(pred: torch.Tensor, index: list[int]) -> torch.Tensor:
    return pred.index_select(0, _index(index, pred))


def _index(rows: list[int], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long, device=like.device)


def _sample_argument(args: tuple, kwargs: dict) -> torch.Tensor:
    x = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
    if not isinstance(x, torch.Tensor):
        raise DeradiffError("a sweep needs the denoiser's input as a tensor (sample or hidden_states)")
    return x


@dataclasses.dataclass
class SweepResult:
    """images[k][p][s]: the image (PIL, array or latent tensor, as output_type) for lambda k, prompt p, seed s."""

    lambdas: list[LambdaSpec]
    prompts: list[str]
    seeds: list[int]
    images: list[list[list[Any]]]


def sweep(pipe: Any, prompts: str | Sequence[str], seeds: Sequence[int], lambdas: Sequence[LambdaSpec], *,
          max_batch: int | None = None, branches: BranchMode | None = None,
          generator_device: str | torch.device | None = None, **pipe_kwargs: Any) -> SweepResult:
    """Sample every (lambda, prompt, seed) with shared noise per seed, as few batched pipeline calls.

    pipe: a pipeline carrying a LoRA adapter, realigned or not (left as it was found). max_batch: most
    trajectories (lambda x prompt x seed) per pipeline call; lambdas are split across calls to respect it
    (default: all in one call). branches: as in `deradiff.realign`, for this sweep; None: the pipeline's
    setting ("auto" unless set).
    pipe_kwargs: passed to every pipeline call (num_inference_steps, guidance_scale, eta, output_type, ...).
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    seeds, lambdas = list(seeds), list(lambdas)
    _check_sweep(prompts, seeds, lambdas, max_batch, pipe_kwargs)
    if branches is not None:
        check_mode(branches)
    per_call = len(lambdas) if max_batch is None else max(1, max_batch // (len(prompts) * len(seeds)))
    device = _generator_device(pipe, generator_device)
    with _realigned(pipe, lambdas[0], branches) as denoiser:
        images: list[list[list[Any]]] = []
        for start in range(0, len(lambdas), per_call):
            chunk = lambdas[start:start + per_call]
            images.extend(_sweep_call(pipe, denoiser, prompts, seeds, chunk, device, pipe_kwargs))
    return SweepResult(lambdas, prompts, seeds, images)


def _sweep_call(pipe: Any, denoiser: Any, prompts: list[str], seeds: list[int], lambdas: list[LambdaSpec],
                device: torch.device, pipe_kwargs: dict) -> list[list[list[Any]]]:
    """One pipeline call for lambdas x prompts x seeds; rows are lambda-major, then prompt, then seed."""
    per_lambda = len(prompts) * len(seeds)
    trajectories = TrajectoryLambdas([lam for lam in lambdas for _ in range(per_lambda)],
                                     [g for _ in lambdas for g in range(per_lambda)])
    generators = [torch.Generator(device).manual_seed(seed) for _ in lambdas for _ in prompts for seed in seeds]
    kwargs = {k: (list(v) * len(lambdas) if k in REPEATED_KWARGS and isinstance(v, (list, tuple)) else v)
              for k, v in pipe_kwargs.items()}
    with denoiser.use_trajectories(trajectories):
        images = pipe(prompt=prompts * len(lambdas), num_images_per_prompt=len(seeds), generator=generators,
                      **kwargs).images
    return [[[images[(k * len(prompts) + p) * len(seeds) + s] for s in range(len(seeds))]
             for p in range(len(prompts))] for k in range(len(lambdas))]


def _check_sweep(prompts: list[str], seeds: list[int], lambdas: list[LambdaSpec], max_batch: int | None,
                 pipe_kwargs: dict) -> None:
    if not prompts or not seeds or not lambdas:
        raise DeradiffError("sweep() needs at least one prompt, one seed and one lambda")
    for i, lam in enumerate(lambdas):
        try:
            LambdaSchedule(lam)
        except DeradiffError as exc:
            raise DeradiffError(f"lambdas[{i}]: {exc}") from None
    if max_batch is not None and max_batch < 1:
        raise DeradiffError(f"max_batch must be >= 1, got {max_batch}")
    owned = [k for k in OWNED_KWARGS if k in pipe_kwargs]
    if owned:
        raise DeradiffError(f"sweep() builds {', '.join(owned)} itself from prompts and seeds; do not pass it")


def _generator_device(pipe: Any, device: str | torch.device | None) -> torch.device:
    """Where the per-trajectory generators live: the pipeline's device (mps draws on the CPU)."""
    if device is None:
        device = getattr(pipe, "_execution_device", None) or getattr(pipe, "device", "cpu")
    device = torch.device(device)
    return torch.device("cpu") if device.type == "mps" else device


class _realigned:
    """The pipeline's live RealignedDenoiser for the block; realigns first (and undoes after) if needed."""

    def __init__(self, pipe: Any, lam: LambdaSpec, branches: BranchMode | None):
        self.pipe, self.lam, self.mode = pipe, lam, branches

    def __enter__(self) -> Any:
        from deradiff.realignment.api import realign, realignment

        handle = realignment(self.pipe)
        self.created = handle is None
        if self.created:
            handle = realign(self.pipe, lam=self.lam)
        self.handle, self.denoiser = handle, handle.denoiser
        self.previous = self.denoiser.branches.mode
        if self.mode is not None:
            self.denoiser.branches.mode = self.mode
        return self.denoiser

    def __exit__(self, *exc: object) -> None:
        self.denoiser.branches.mode = self.previous
        if self.created:
            self.handle.undo()


class TrajectoryCall:
    """A model call for loops that call the denoiser once per step themselves (the eval's shared-noise loop):
    every row follows its trajectory's lambda, and each call returns (mixed predictions, reference predictions),
    the reference being the base model's prediction at that row's state (for its path KL)."""

    def __init__(self, branches: Branches, trajectories: TrajectoryLambdas):
        self.branches, self.trajectories, self.step = branches, trajectories, 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        lams = self.trajectories.at(self.step, float(t.reshape(-1)[0]))
        self.step += 1
        output, ref = self.trajectories.predict(self.branches, lams, (x, t), {**inputs, "return_dict": False},
                                                with_reference=True)
        return output[0], ref
