"""Sample a trained LoRA at several strengths: `python realign/sample.py --config configs/tiny/realign.yaml`."""

from deradiff.cli import run_entry

if __name__ == "__main__":
    run_entry(["realign"])
