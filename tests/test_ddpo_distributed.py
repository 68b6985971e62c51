"""2-process CPU DDPO through the real entry script (torchrun, gloo): gathered advantages, synced adapters.

Asserts world size 2 (launcher traps in ENVIRONMENT.md look like success with one process) and that both
ranks end with the same adapter (per-rank digests gathered by the shared trainer).
"""

from __future__ import annotations

import pytest

import json
import os
import subprocess
import sys
from pathlib import Path

from deradiff.testing import tiny_sd_pipeline

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.mark.slow  # ~16 s; 2-process DDP itself stays in the default suite (test_dpo_distributed)
def test_ddpo_two_cpu_processes(tmp_path: Path) -> None:
    base = tmp_path / "base"
    tiny_sd_pipeline().save_pretrained(str(base))
    args = [f"output_dir={tmp_path / 'run'}", f"model.pretrained={base}", "tracker.backend=none",
            "ddpo.reward=vividness", "ddpo.prompts=[red, blue, green]", "ddpo.beta=0.1", "ddpo.kl_in=loss",
            "sample.num_steps=2", "sample.batch_size=2", "sample.batches_per_round=1", "sample.images_per_prompt=2",
            "train.micro_batch_size=2", "train.max_steps=2", "optim.lr=1e-2"]
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", str(REPO / "train" / "ddpo.py"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "ACCELERATE_USE_CPU": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "DistributedType.MULTI_CPU" in proc.stdout + proc.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps_run"] == 2
    digests = summary["adapter_digest_per_rank"]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert summary["final_kl"] > 0  # KL gathered from both ranks after the first update
