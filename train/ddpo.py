"""KL-regularized DDPO: `accelerate launch train/ddpo.py --config configs/tiny/ddpo.yaml key=value ...`."""

from deradiff.cli import run_entry

if __name__ == "__main__":
    run_entry(["train", "ddpo"])
