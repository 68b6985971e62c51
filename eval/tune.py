"""Choose the KL strength: `python eval/tune.py --config configs/tiny/tune.yaml key=value ...`."""

from deradiff.cli import run_entry

if __name__ == "__main__":
    run_entry(["tune"])
