"""Training infrastructure shared by every method (Diffusion-DPO, KL-regularized DDPO).

- `config`: config sections (model, lora, optim, train, tracker) a trainer schema composes.
- `trainer.Trainer`: accelerator (gloo on CPU, DeepSpeed via accelerate), optimizer + lr schedule,
  gradient accumulation, non-finite-loss stop, logging, atomic checkpoints, exact resume, output-dir
  lock, final LoRA + summary. See its module docstring for the 5-line usage.
- `determinism`: data order and noise as functions of (seed, micro-step, rank): exact resume.
- `tracking`: the `Tracker` protocol; W&B / none / recording implementations.
- `registry`: `deradiff train <name>` dispatch; methods register themselves.

Submodules are imported on use (this package stays light for the CLI).
"""
