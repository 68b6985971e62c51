"""Diffusion-DPO: `accelerate launch train/dpo.py --config configs/tiny/dpo.yaml key=value ...`."""

from deradiff.cli import run_entry

if __name__ == "__main__":
    run_entry(["train", "dpo"])
