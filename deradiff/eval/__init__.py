"""Evaluation: does the anchor LoRA realigned to lambda look like a LoRA retrained at beta0/lambda?

`deradiff.eval.stage.run_eval(cfg)` samples every model with shared noise, scores them (`metrics`, `scoring`),
and writes results, plots, grids and an HTML report (`report`). Submodules import torch/diffusers, so this
package imports nothing eagerly.
"""
