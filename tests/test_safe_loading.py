"""Safe loading: weights from safetensors only; user pickles are refused (and never executed); no code path
enables `trust_remote_code`; every `torch.load` in the code base is `weights_only=True`.

The pickles here are real exploits: unpickling them would create a marker file, which every test checks
was never created.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest
import torch

from test_reliability_helpers import files_under, run_cli, tiny_assets, train_args

PACKAGE = Path(__file__).resolve().parents[1] / "deradiff"


class _Exploit:
    """Unpickling this runs `open(marker, 'w')`: what a malicious .bin could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _write_exploit(path: Path, marker: Path) -> Path:
    torch.save({"state": _Exploit(marker)}, str(path))
    return path


def _python_sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_no_code_enables_trust_remote_code():
    offenders = []
    for path in _python_sources():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.keyword) and node.arg == "trust_remote_code":
                if not (isinstance(node.value, ast.Constant) and node.value.value is False):
                    offenders.append(f"{path}:{node.value.lineno}")
            if isinstance(node, ast.Dict):  # **{"trust_remote_code": True}
                for key, value in zip(node.keys, node.values):
                    if isinstance(key, ast.Constant) and key.value == "trust_remote_code" and not (
                            isinstance(value, ast.Constant) and value.value is False):
                        offenders.append(f"{path}:{key.lineno}")
    assert offenders == []


def _unsafe_load_calls(tree: ast.AST, path: Path) -> list[str]:
    """torch.load without weights_only=True, any pickle/dill/joblib load, numpy load with allow_pickle=True."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
        kwargs = {k.arg: k.value for k in node.keywords}
        is_true = lambda v: isinstance(v, ast.Constant) and v.value is True  # noqa: E731
        where = f"{path}:{node.lineno}"
        if owner == "torch" and node.func.attr == "load" and not is_true(kwargs.get("weights_only")):
            found.append(where)
        if owner in ("pickle", "dill", "joblib", "cloudpickle") and node.func.attr in ("load", "loads"):
            found.append(where)
        if owner in ("np", "numpy") and node.func.attr == "load" and is_true(kwargs.get("allow_pickle")):
            found.append(where)
    return found


def test_every_torch_load_is_weights_only_and_no_pickle_loads():
    offenders = [hit for path in _python_sources() for hit in _unsafe_load_calls(ast.parse(path.read_text()), path)]
    assert offenders == []


def test_the_source_scan_catches_unsafe_loads():
    """The scanner itself must flag what it is meant to flag (or the test above could never fail)."""
    bad = ast.parse("torch.load(f)\ntorch.load(f, weights_only=False)\npickle.loads(b)\nnp.load(f, allow_pickle=True)\n"
                    "torch.load(f, weights_only=True)\n")
    assert len(_unsafe_load_calls(bad, Path("x.py"))) == 4


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return tiny_assets(tmp_path_factory.mktemp("safe"))


def test_pickled_lora_is_refused_and_never_unpickled(assets, tmp_path, capsys):
    lora = tmp_path / "lora"
    lora.mkdir()
    marker = tmp_path / "pwned"
    _write_exploit(lora / "pytorch_lora_weights.bin", marker)
    out = tmp_path / "samples"
    code, _, err = run_cli(["realign", f"output_dir={out}", f"base_model={assets['base']}", f"lora_dir={lora}",
                            "prompts=[x]", "lambdas=[1]", "seeds=[0]", "steps=1", "device=cpu"], capsys)
    assert code == 2, err
    line = err.strip().splitlines()[-1]
    assert "pytorch_lora_weights.bin" in line and "safetensors only" in line and "run code" in line
    assert not marker.exists() and files_under(out) == []


def test_base_model_with_only_pickle_weights_is_refused(assets, tmp_path, capsys):
    from deradiff.testing import tiny_sd_pipeline

    base = tmp_path / "pickled-base"
    tiny_sd_pipeline().save_pretrained(str(base), safe_serialization=False)
    assert list((base / "unet").glob("*.bin")) and not list((base / "unet").glob("*.safetensors"))
    code, _, err = run_cli(train_args(assets["config"], tmp_path / "run", f"model.pretrained={base}"), capsys)
    assert code == 2, err
    line = err.strip().splitlines()[-1]
    assert str(base) in line and "unet/diffusion_pytorch_model.bin" in line and "safetensors only" in line
    assert files_under(tmp_path / "run") == []


@pytest.fixture(scope="module")
def checkpoint(assets):
    """A real step-1 checkpoint of a 2-step DPO run (kept pristine; tests copy it)."""
    from deradiff import cli

    out = assets["root"] / "ckpt-run"
    assert cli.main(train_args(assets["config"], out, "train.max_steps=2")) == 0
    return out / "checkpoints" / "step-00000001"


def test_checkpoint_with_pickled_model_weights_is_refused(assets, checkpoint, tmp_path, capsys):
    bad = shutil.copytree(checkpoint, tmp_path / "bad-ckpt")
    (bad / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    _write_exploit(bad / "pytorch_model.bin", marker)
    code, _, err = run_cli(train_args(assets["config"], tmp_path / "run", f"train.resume_from={bad}"), capsys)
    assert code == 2, err
    line = err.strip().splitlines()[-1]
    assert str(bad) in line and "pytorch_model.bin" in line and "safetensors" in line
    assert not marker.exists()


def test_checkpoint_state_files_load_weights_only(assets, checkpoint, tmp_path, capsys):
    """optimizer.bin is a pickle accelerate writes; loading it must use weights_only (the exploit is refused)."""
    bad = shutil.copytree(checkpoint, tmp_path / "bad-ckpt")
    marker = tmp_path / "pwned"
    _write_exploit(bad / "optimizer.bin", marker)
    code, _, err = run_cli(train_args(assets["config"], tmp_path / "run", f"train.resume_from={bad}"), capsys)
    assert code == 2, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: checkpoint") and str(bad) in line and "could not be loaded" in line
    assert not marker.exists()
    # the untouched checkpoint still resumes
    code, _, err = run_cli(train_args(assets["config"], tmp_path / "ok", f"train.resume_from={checkpoint}"), capsys)
    assert code == 0, err
