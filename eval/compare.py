"""Realigned vs retrained: `python eval/compare.py --config configs/tiny/eval.yaml key=value ...`
(or `accelerate launch eval/compare.py ...` to split sampling across devices)."""

from deradiff.cli import run_entry

if __name__ == "__main__":
    run_entry(["eval"])
