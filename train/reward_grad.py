"""KL-regularized reward backprop: `accelerate launch train/reward_grad.py --config configs/tiny/reward_grad.yaml key=value ...`."""

from deradiff.cli import run_entry

if __name__ == "__main__":
    run_entry(["train", "reward_grad"])
