"""2-process CPU runs of the real entry script: DDP (gloo, torchrun) and DeepSpeed ZeRO-2 (gloo).

Each asserts world size 2 (the launcher traps in ENVIRONMENT.md look like success with 1 process)
and identical adapters on both ranks (per-rank digests gathered by the trainer).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from deradiff.testing import save_tiny_base, write_pairs

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(tmp_path: Path) -> list[str]:
    base = save_tiny_base(tmp_path / "base")
    data = write_pairs(tmp_path / "pairs.parquet", 8)
    return [f"output_dir={tmp_path / 'run'}", f"data.source={data}", f"model.pretrained={base}",
            "tracker.backend=none", "train.max_steps=2", "train.micro_batch_size=2",
            "train.gradient_accumulation_steps=2", "optim.lr=1e-2", "train.checkpoint_every=1"]


def _check(tmp_path: Path, proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["effective_batch_size"] == 8
    digests = summary["adapter_digest_per_rank"]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert (tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    return summary


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **extra}
    env["PATH"] = f"{BIN}:{env.get('PATH', '')}"
    return env


def test_ddp_two_cpu_processes(tmp_path):
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", str(REPO / "train" / "dpo.py"), *_args(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(ACCELERATE_USE_CPU="1"), capture_output=True, text=True, timeout=240)
    _check(tmp_path, proc)
    assert "DistributedType.MULTI_CPU" in proc.stdout + proc.stderr


# ~32 s warm; ~3 min the first time on a machine (DeepSpeed JIT-builds its comm op into TORCH_EXTENSIONS_DIR)
@pytest.mark.skipif(shutil.which("deepspeed", path=str(BIN)) is None, reason="deepspeed not installed")
def test_deepspeed_zero2_two_cpu_processes(tmp_path):
    cmd = [str(BIN / "accelerate"), "launch", "--use_deepspeed", "--deepspeed_config_file", str(REPO / "launch" / "zero2.json"),
           "--num_processes", "2", "--num_machines", "1", "--main_process_port", str(_free_port()),
           str(REPO / "train" / "dpo.py"), *_args(tmp_path)]
    ext = os.environ.get("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))
    proc = subprocess.run(cmd, cwd=REPO, env=_env(TORCH_EXTENSIONS_DIR=ext), capture_output=True, text=True, timeout=300)
    summary = _check(tmp_path, proc)
    assert "DistributedType.DEEPSPEED" in proc.stdout + proc.stderr  # not silently plain DDP
    assert summary["world_size"] == 2
