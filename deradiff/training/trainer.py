"""The loop shared by every trainer: accelerator, optimizer, accumulation, logging, checkpoints, resume.

A method (DPO, DDPO) supplies only what differs: its model setup and a `step_fn(step) -> metrics` that
performs ONE optimizer step, usually by calling `trainer.accumulate(step, micro_loss_fn)`. Everything
else lives here once::

    trainer = Trainer(cfg.train, cfg.optim, cfg.tracker, cfg.output_dir, config=cfg)
    params = attach_lora(unet, ...)
    unet = trainer.prepare(unet, params)          # optimizer + lr schedule + accelerate/DeepSpeed wrap
    summary = trainer.run(lambda step: trainer.accumulate(step, micro_loss), metadata={"method": "dpo", ...})

`micro_loss(micro_step) -> (loss, metrics)`; `micro_step = step * accumulation + i` indexes data and noise
(see `determinism`), which is what makes `resume_from` exact.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from accelerate import Accelerator, DeepSpeedPlugin
from accelerate.state import AcceleratorState
from accelerate.utils import InitProcessGroupKwargs
from tqdm.auto import tqdm

from deradiff.errors import DeradiffError
from deradiff.config import config_to_dict, save_config
from deradiff.fileio import atomic_path, check_output_dir, write_text_atomic
from deradiff.models.lora import save_lora
from deradiff.training.checkpoint import (
    FINAL_LORA, TRAIN_CONFIG, check_fresh_start, check_resume, load_checkpoint, save_checkpoint, weight_settings,
)
from deradiff.training.config import OptimSection, TrackerSection, TrainSection
from deradiff.lock import OutputDirLock
from deradiff.training.tracking import Tracker, make_tracker, retire_runs

MicroLossFn = Callable[[int], tuple[torch.Tensor, dict[str, float]]]
StepFn = Callable[[int], dict[str, float]]


class NonFiniteLossError(DeradiffError):
    """The loss became NaN/inf: training stops at the named step instead of silently corrupting the adapter."""


def build_accelerator(train: TrainSection, output_dir: str) -> Accelerator:
    """An Accelerator for this launch: gloo on CPU (needed for multi-process CPU and DeepSpeed-on-CPU)."""
    if train.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise DeradiffError("train.mixed_precision=fp16 needs a CUDA GPU; use bf16 (or no) on CPU")
    handlers = [InitProcessGroupKwargs(backend="gloo")] if _distributed_on_cpu(train) else []
    plugin = None
    if train.deepspeed_config:
        if not Path(train.deepspeed_config).is_file():
            raise DeradiffError(f"train.deepspeed_config '{train.deepspeed_config}' does not exist")
        plugin = DeepSpeedPlugin(hf_ds_config=train.deepspeed_config)
    if train.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    # accelerate keeps one process-wide state and refuses a second run's different mixed_precision; several
    # runs share a process (a study's LoRAs, tests), so forget the previous run's settings. The process group
    # (PartialState) is kept.
    AcceleratorState._reset_state()
    return Accelerator(
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        mixed_precision=train.mixed_precision,
        project_dir=output_dir,
        kwargs_handlers=handlers,
        deepspeed_plugin=plugin,
    )


def _distributed_on_cpu(train: TrainSection) -> bool:
    """A launcher started us as one of several ranks (or DeepSpeed is on) and there is no GPU: use gloo.

    Single-process runs must not ask for a backend (accelerate would then expect a process group).
    """
    launched = os.environ.get("LOCAL_RANK") is not None or int(os.environ.get("WORLD_SIZE", "1")) > 1
    deepspeed = bool(train.deepspeed_config) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
    return not torch.cuda.is_available() and (launched or deepspeed)


def make_optimizer(params: Sequence[torch.nn.Parameter], optim: OptimSection, lr: float) -> torch.optim.Optimizer:
    """AdamW, or bitsandbytes' 8-bit AdamW when asked (with a clear error if it is not installed)."""
    cls: Any = torch.optim.AdamW
    if optim.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise DeradiffError("optim.use_8bit_adam=true needs bitsandbytes: pip install bitsandbytes") from None
        cls = bnb.optim.AdamW8bit
    return cls(
        params,
        lr=lr,
        betas=(optim.adam_beta1, optim.adam_beta2),
        weight_decay=optim.weight_decay,
        eps=optim.adam_eps,
    )


HISTORY = "history.jsonl"
INPUT_FINGERPRINTS = ("data_fingerprint",)  # metadata keys naming a loaded input's content (DPO's preference data)


def read_history(output_dir: Path, upto: int) -> list[dict[str, float]]:
    """The logged metrics of an earlier run up to step `upto` (a resumed run continues its curves)."""
    path = Path(output_dir) / HISTORY
    if upto == 0 or not path.is_file():
        return []
    try:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except ValueError as exc:
        raise DeradiffError(f"training history '{path}' is damaged ({exc}); delete it (the curves restart) to resume") from None
    return [r for r in rows if r.get("step", 0) <= upto]


class Trainer:
    """Owns the accelerator, optimizer, tracker and the step loop; see the module docstring."""

    def __init__(
        self,
        train: TrainSection,
        optim: OptimSection,
        tracker: TrackerSection,
        output_dir: str,
        config_dict: dict[str, Any] | None = None,
        tracker_override: Tracker | None = None,
        sample_unit: str = "samples",
        config: Any = None,
        group: str | None = None,
        job_type: str | None = None,
    ) -> None:
        self.train_cfg, self.optim_cfg, self.tracker_cfg = train, optim, tracker
        self.group, self.job_type = group, job_type  # W&B's, from the caller (a study, a tune's verify)
        self.output_dir = Path(output_dir)
        self.config = config  # the whole run config (a dataclass): saved as train_config.yaml beside the LoRA
        self.config_dict = config_to_dict(config) if config is not None else (config_dict or {})
        self.sample_unit = sample_unit
        check_output_dir(output_dir, "output_dir")
        self.accelerator = build_accelerator(train, output_dir)
        self._tracker_override = tracker_override
        self.tracker: Tracker | None = None
        self.model: torch.nn.Module | None = None
        self.params: list[torch.nn.Parameter] = []
        self._wall_before = 0.0  # loop seconds of the earlier runs this one resumes (0 when fresh)
        self._t0 = time.perf_counter()  # start of this run's loop
        self.inputs: dict[str, str] = {}  # fingerprints of loaded inputs (set by `run`), checked on resume
        check_resume(self.output_dir, train, self.config_dict)  # refused before the caller loads models or data

    # ---- facts about this launch -------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def effective_batch_size(self) -> int:
        """micro × accumulation × world size: samples behind one optimizer step."""
        return self.train_cfg.micro_batch_size * self.train_cfg.gradient_accumulation_steps * self.world_size

    @property
    def weight_dtype(self) -> torch.dtype:
        """dtype for frozen weights (VAE, text encoders, base UNet): the mixed-precision dtype, else fp32."""
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.accelerator.mixed_precision, torch.float32)

    # ---- setup ----------------------------------------------------------------------------------------
    def prepare(self, model: torch.nn.Module, params: Sequence[torch.nn.Parameter]) -> torch.nn.Module:
        """Build optimizer + lr schedule and wrap everything for DDP/DeepSpeed; returns the wrapped model."""
        from diffusers.optimization import get_scheduler

        self.params = list(params)
        if self.train_cfg.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        lr = self.optim_cfg.lr * (self.effective_batch_size if self.optim_cfg.scale_lr else 1)
        optimizer = make_optimizer(self.params, self.optim_cfg, lr)
        # accelerate steps a prepared scheduler once per process per optimizer step: scale to match.
        scheduler = get_scheduler(
            self.optim_cfg.lr_scheduler,
            optimizer,
            num_warmup_steps=self.optim_cfg.warmup_steps * self.world_size,
            num_training_steps=self.train_cfg.max_steps * self.world_size,
        )
        plugin = self.accelerator.state.deepspeed_plugin
        if plugin is not None:  # no dataloader is prepared, so DeepSpeed cannot infer its micro-batch
            plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = self.train_cfg.micro_batch_size
        self.model, self.optimizer, self.lr_scheduler = self.accelerator.prepare(model, optimizer, scheduler)
        return self.model

    # ---- one optimizer step ---------------------------------------------------------------------------
    def accumulate(self, step: int, micro_loss: MicroLossFn) -> dict[str, float]:
        """Run `gradient_accumulation_steps` micro-batches and one optimizer step; metrics averaged over all."""
        accum = self.train_cfg.gradient_accumulation_steps
        totals: dict[str, float] = {}
        for i in range(accum):
            micro_step = step * accum + i
            with self.accelerator.accumulate(self.model):
                loss, metrics = micro_loss(micro_step)
                self._check_finite(loss, step, micro_step)
                self.accelerator.backward(loss)
                if self.accelerator.sync_gradients and self.optim_cfg.max_grad_norm:
                    grad_norm = self.accelerator.clip_grad_norm_(self.params, self.optim_cfg.max_grad_norm)
                    if grad_norm is not None:
                        totals["grad_norm"] = float(grad_norm)
                self.optimizer.step()
                self.lr_scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
            for key, value in {"loss": float(loss.detach()), **metrics}.items():
                totals[key] = totals.get(key, 0.0) + float(value) / accum
        totals["lr"] = float(self.lr_scheduler.get_last_lr()[0])
        return self._mean_over_processes(totals)

    def _check_finite(self, loss: torch.Tensor, step: int, micro_step: int) -> None:
        # Reduced first so every rank sees the same verdict and none hangs in the next collective.
        value = self.accelerator.reduce(loss.detach().float().reshape(1).clone(), reduction="mean")
        if not torch.isfinite(value).all():
            raise NonFiniteLossError(
                f"loss became {float(value[0])} at step {step} (micro-batch {micro_step}); "
                "training stopped - lower optim.lr, use mixed_precision=no, or check the data"
            )

    def _mean_over_processes(self, metrics: dict[str, float]) -> dict[str, float]:
        if self.world_size == 1 or not metrics:
            return metrics
        keys = sorted(metrics)
        values = torch.tensor([metrics[k] for k in keys], device=self.device, dtype=torch.float64)
        values = self.accelerator.reduce(values, reduction="mean")
        return dict(zip(keys, values.tolist()))

    # ---- the loop ---------------------------------------------------------------------------------------
    def run(self, step_fn: StepFn, metadata: dict[str, Any]) -> dict[str, Any]:
        """Lock the output dir, resume if asked, loop to `max_steps`, checkpoint, save the LoRA, summarize."""
        lock = OutputDirLock(self.output_dir) if self.accelerator.is_main_process else None
        if lock is not None:
            lock.acquire()
        try:
            return self._run_locked(step_fn, metadata)
        finally:
            if lock is not None:
                lock.release()

    def _run_locked(self, step_fn: StepFn, metadata: dict[str, Any]) -> dict[str, Any]:
        acc, cfg = self.accelerator, self.train_cfg
        self.inputs = {k: str(metadata[k]) for k in INPUT_FINGERPRINTS if k in metadata}
        start = self._resume()  # first: a refused run logs nothing
        if acc.is_main_process and self.config is not None:
            with atomic_path(self.output_dir / TRAIN_CONFIG) as tmp:
                save_config(self.config, tmp)
        self.tracker = self._tracker_override or make_tracker(self.tracker_cfg, str(self.output_dir), acc.is_main_process,
                                                              group=self.wandb_group, job_type=self.job_type)
        self._announce(start)
        self.history = read_history(self.output_dir, start)
        # a resume with no step left keeps the metrics of the step that finished the run
        last, step = {k: v for k, v in (self.history[-1] if self.history else {}).items() if k != "step"}, start
        self._t0 = t0 = time.perf_counter()
        # closed on errors too, so an error line never lands on the unfinished progress-bar line
        with tqdm(total=cfg.max_steps, initial=start, disable=not acc.is_main_process, desc="train") as progress:
            for step in range(start, cfg.max_steps):
                last = step_fn(step)
                progress.update(1)
                progress.set_postfix(loss=f"{last.get('loss', float('nan')):.4f}")
                if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.max_steps:
                    self.tracker.log_scalars(last, step=step + 1)
                    self.history.append({"step": step + 1, **last})
                if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.max_steps:
                    self._write_history()  # first: a checkpoint never lacks the curves up to its step
                    self.checkpoint(step + 1, metadata)
        elapsed = time.perf_counter() - t0
        self.checkpoint(cfg.max_steps, metadata)  # always: a later resume checks its settings against this one
        lora_dir = self.save_final(metadata)
        self._write_history()
        return self._summarize(start, elapsed, last, lora_dir)

    def _write_history(self) -> None:
        """Every logged step's metrics as JSON lines (the study's plateau check reads the curves from here)."""
        if self.accelerator.is_main_process:
            write_text_atomic(self.output_dir / HISTORY, "".join(json.dumps(h) + "\n" for h in self.history))

    def _resume(self) -> int:
        path, discarded = check_resume(self.output_dir, self.train_cfg, self.config_dict, self.inputs)
        if discarded:
            self.accelerator.print(f"{discarded}; starting fresh (train.overwrite=true)")
        if self.train_cfg.resume_from is None or discarded:
            self._start_fresh()
        if path is None:
            return 0
        state = load_checkpoint(self.accelerator, path)
        if state.get("world_size") not in (None, self.world_size):
            self.accelerator.print(f"note: resuming a {state['world_size']}-process run with {self.world_size} processes")
        self.accelerator.print(f"resumed from {path} at step {state['step']}")
        self._wall_before = float(state.get("wall_s", 0.0))
        return int(state["step"])

    def _start_fresh(self) -> None:
        """Clear an earlier run in output_dir (`check_resume` allowed it), its W&B runs retired."""
        main = self.accelerator.is_main_process
        self.accelerator.wait_for_everyone()  # every rank has read the old checkpoints before they go
        check_fresh_start(self.output_dir, True, remove=main)
        if main:
            retire_runs(self.output_dir)
        self.accelerator.wait_for_everyone()

    def _announce(self, start: int) -> None:
        cfg = self.train_cfg
        facts = {
            "world_size": self.world_size,
            "micro_batch_size": cfg.micro_batch_size,
            "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
            "effective_batch_size": self.effective_batch_size,
            "distributed_type": str(self.accelerator.distributed_type),
            "mixed_precision": self.accelerator.mixed_precision,
            "trainable_params": sum(p.numel() for p in self.params),
        }
        self.tracker.log_config({**self.config_dict, "launch": facts})
        self.accelerator.print(
            f"effective batch {self.effective_batch_size} {self.sample_unit} = {cfg.micro_batch_size} micro x "
            f"{cfg.gradient_accumulation_steps} accumulation x {self.world_size} processes "
            f"({facts['distributed_type']}); "
            f"{facts['trainable_params']:,} trainable params; steps {start}->{cfg.max_steps}"
        )

    def _lora_metadata(self, metadata: dict[str, Any], step: int) -> dict[str, Any]:
        return {
            **metadata,
            "steps": step,
            "seed": self.train_cfg.seed,
            "effective_batch_size": self.effective_batch_size,
            "world_size": self.world_size,
            "wandb_group": self.wandb_group,  # later stages on this LoRA (tune) log beside its training
        }

    @property
    def wandb_group(self) -> str:
        """The W&B group of this run: the caller's, else the user's WANDB_RUN_GROUP, else train-<output folder>.
        Always a name (not W&B's None), since the LoRA's metadata records it for the stages that follow."""
        return self.group or os.environ.get("WANDB_RUN_GROUP") or f"train-{self.output_dir.resolve().name}"

    def train_seconds(self) -> float:
        """Loop wall time of the whole training so far, the runs it resumed included."""
        return round(self._wall_before + time.perf_counter() - self._t0, 3)

    def checkpoint(self, step: int, metadata: dict[str, Any]) -> Path:
        """Resumable state at `step` (collective; every rank must call)."""
        state = {"step": step, "world_size": self.world_size, "seed": self.train_cfg.seed,
                 "settings": weight_settings(self.config_dict), "inputs": self.inputs, "wall_s": self.train_seconds()}
        return save_checkpoint(
            self.accelerator,
            self.output_dir,
            step,
            state,
            write_extra=lambda tmp: save_lora(self.model, tmp / "lora", self._lora_metadata(metadata, step)),
            keep=self.train_cfg.keep_checkpoints,
        )

    def save_final(self, metadata: dict[str, Any]) -> Path:
        """The trained adapter at `output_dir/lora` (main process writes; all wait)."""
        lora_dir = self.output_dir / FINAL_LORA
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            save_lora(self.model, lora_dir, self._lora_metadata(metadata, self.train_cfg.max_steps))
        self.accelerator.wait_for_everyone()
        return lora_dir

    def adapter_digests(self) -> list[str]:
        """sha256 (16 hex) of the trainable weights on every rank (collective): all equal unless ranks desynced."""
        h = hashlib.sha256()
        for p in self.params:
            h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
        mine = torch.tensor([int(h.hexdigest()[:15], 16)], dtype=torch.int64, device=self.device)
        return [f"{int(v):015x}" for v in self.accelerator.gather(mine).tolist()]

    def _summarize(self, start: int, elapsed: float, last: dict[str, float], lora_dir: Path) -> dict[str, Any]:
        digests = self.adapter_digests()
        if len(set(digests)) > 1:
            self.accelerator.print(f"WARNING: adapters differ across ranks: {digests}")
        steps = self.train_cfg.max_steps - start
        rate = steps * self.effective_batch_size / elapsed if elapsed > 0 and steps else 0.0
        summary = {
            "steps_run": steps,
            "final_step": self.train_cfg.max_steps,
            "wall_s": round(elapsed, 3),
            "train_wall_s": round(self._wall_before + elapsed, 3),  # with the runs this one resumed
            f"{self.sample_unit}_per_s": round(rate, 3),
            "effective_batch_size": self.effective_batch_size,
            "world_size": self.world_size,
            "lora_dir": str(lora_dir),
            "adapter_digest_per_rank": digests,
            **{f"final_{k}": v for k, v in last.items() if isinstance(v, float) and math.isfinite(v)},
        }
        if self.accelerator.is_main_process:
            write_text_atomic(self.output_dir / "summary.json", json.dumps(summary, indent=2))
            self.accelerator.print("summary: " + ", ".join(f"{k}={v}" for k, v in summary.items()))
        self.tracker.finish(summary)
        return summary
