"""Reliability of the data and tiny-world stages: `deradiff data prefs`, `deradiff tiny pretrain`, the DPO
latent cache, prompt files that are not text, and byte-identical LoRA files.

Each test names what happened before the fix. Everything runs on tiny settings (a few seconds in all): the
refusals are checked with the heavy work replaced by a function that fails the test if it is reached.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from deradiff.errors import DeradiffError
from deradiff.lock import OutputDirLock
from test_bad_input import assert_one_line_error
from test_reliability_helpers import files_under, run_cli, tiny_assets

REPO = Path(__file__).resolve().parents[1]
BINARY = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"  # what a user gets by pointing at an image by mistake
TINY_PRETRAIN = ["classifier.steps=1", "classifier.batch_size=2", "vae.steps=1", "vae.batch_size=2",
                 "unet.steps=1", "unet.batch_size=2", "unet.dataset_size=2", "quality_images=0"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    from deradiff.testing import save_tiny_base

    return save_tiny_base(tmp_path_factory.mktemp("data-base") / "base")


def never(*args, **kwargs):
    raise AssertionError("the heavy work started although the run should have been refused")


@pytest.fixture
def hold_lock():
    """Hold a folder as another live run would (this process's own lock on it) until the test ends."""
    with contextlib.ExitStack() as held:
        yield lambda folder: held.enter_context(OutputDirLock(folder))


# ---- 1. deradiff data prefs --------------------------------------------------------------------------------
def prefs_args(out: Path, base: str, *overrides: str) -> list[str]:
    return ["data", "prefs", "--config", str(REPO / "configs/tiny/prefs.yaml"), f"output_dir={out}",
            f"base_model={base}", "generate.pairs_per_prompt=1", "generate.num_inference_steps=1", *overrides]


def test_prefs_never_replaces_existing_pairs_unless_overwrite(base, tmp_path, capsys):
    """Was: a rerun silently replaced train.parquet."""
    out = tmp_path / "prefs"
    out.mkdir()
    (out / "train.parquet").write_bytes(b"earlier pairs")
    code, _, err = run_cli(prefs_args(out, base), capsys)
    assert_one_line_error(code, err, f"'{out / 'train.parquet'}' already exists", "overwrite=true")
    assert (out / "train.parquet").read_bytes() == b"earlier pairs"

    code, _, err = run_cli(prefs_args(out, base, "overwrite=true"), capsys)
    assert code == 0, err
    assert len(pq.read_table(out / "train.parquet").column("caption")) == 116  # one pair per train prompt
    assert files_under(out) == ["train.parquet"]  # the lock is released


@pytest.mark.parametrize("case", ["file", "locked"])
def test_prefs_checks_its_output_dir_before_sampling(base, tmp_path, capsys, monkeypatch, hold_lock, case):
    """Was: an output_dir that is a file failed after 14 s of sampling; two runs could write one folder."""
    import deradiff.data.prefs

    monkeypatch.setattr(deradiff.data.prefs, "generate_preferences", never)
    out = tmp_path / "prefs"
    if case == "file":
        out.write_text("x")
        needle = "is a file"
    else:
        hold_lock(out)
        needle = "in use by another run"
    code, _, err = run_cli(prefs_args(out, base), capsys)
    assert_one_line_error(code, err, f"'{out}'", needle)


def test_a_prefs_run_stopped_by_bad_input_leaves_no_folder(tmp_path, capsys):
    out = tmp_path / "prefs"
    code, _, err = run_cli(prefs_args(out, str(tmp_path / "no-such-model")), capsys)
    assert_one_line_error(code, err, "no-such-model' does not exist")
    assert not out.exists()


# ---- 2. deradiff tiny pretrain -----------------------------------------------------------------------------
def pretrain_args(out: Path, *overrides: str) -> list[str]:
    return ["tiny", "pretrain", "--config", str(REPO / "configs/tiny/pretrain.yaml"), f"output_dir={out}",
            *TINY_PRETRAIN, *overrides]


@pytest.mark.parametrize("case", ["file", "below_a_file", "results", "locked"])
def test_pretrain_refuses_before_any_training(tmp_path, capsys, monkeypatch, hold_lock, case):
    """Was: a rerun replaced every file of the earlier world, and two runs into one folder both went ahead."""
    import deradiff.world.pretrain

    monkeypatch.setattr(deradiff.world.pretrain, "_train_into", never)
    out = tmp_path / "world"
    if case == "file":
        out.write_text("x")
        needle = "is a file"
    elif case == "below_a_file":
        (tmp_path / "plain").write_text("x")
        out = tmp_path / "plain" / "world"
        needle = "which is a file"
    elif case == "results":
        out.mkdir()
        (out / "summary.json").write_text("{}")
        needle = "overwrite=true"
    else:
        hold_lock(out)
        needle = "in use by another run"
    code, _, err = run_cli(pretrain_args(out), capsys)
    assert_one_line_error(code, err, f"'{out}'", needle)


def test_pretrain_overwrite_replaces_the_earlier_world_and_keeps_other_files(tmp_path, capsys):
    """The shipped-assets refresh (output_dir=deradiff/world/assets overwrite=true): the earlier world's files
    are all replaced (a file only the earlier run wrote is gone), the folder's README stays."""
    out = tmp_path / "assets"
    (out / "tiny-sd").mkdir(parents=True)
    (out / "tiny-sd" / "from_the_earlier_run.bin").write_text("old")
    (out / "summary.json").write_text('{"old": true}')
    (out / "README.md").write_text("kept")
    code, _, err = run_cli(pretrain_args(out, "overwrite=true"), capsys)
    assert code == 0, err
    assert not (out / "tiny-sd" / "from_the_earlier_run.bin").exists()
    assert (out / "tiny-sd" / "model_index.json").is_file() and "old" not in json.loads((out / "summary.json").read_text())
    assert (out / "README.md").read_text() == "kept"
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "classifier.json", "classifier.safetensors",
                                                     "pretrain_config.yaml", "summary.json", "tiny-sd"]


def test_a_failed_pretrain_leaves_the_earlier_world_whole(tmp_path, capsys, monkeypatch):
    """Files are staged and moved in only when all are written: a crash mid-run destroys nothing."""
    import deradiff.world.pretrain

    def crash_midway(cfg, stage: Path) -> dict:
        stage.mkdir(parents=True)
        (stage / "classifier.json").write_text("half a run")
        raise RuntimeError("killed midway")

    out = tmp_path / "world"
    out.mkdir()
    (out / "classifier.json").write_text("earlier")
    monkeypatch.setattr(deradiff.world.pretrain, "_train_into", crash_midway)
    code, _, err = run_cli(pretrain_args(out, "overwrite=true"), capsys)
    assert code == 1 and "killed midway" in err
    assert files_under(out) == ["classifier.json"] and (out / "classifier.json").read_text() == "earlier"


# ---- 3. the DPO latent cache -------------------------------------------------------------------------------
def damage_shard(cache: Path) -> Path:
    shard = cache / "shard-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-40])  # truncated, as by a full disk or an interrupted copy
    return shard


def damage_index(cache: Path) -> Path:
    index = cache / "index.json"
    index.write_text(index.read_text()[:-5])
    return index


@pytest.mark.parametrize("damage", [damage_shard, damage_index], ids=["truncated_shard", "garbled_index"])
def test_a_damaged_latent_cache_is_rebuilt_with_a_note(tmp_path, capsys, damage):
    """Was: SafetensorError / JSONDecodeError, exit 1."""
    from deradiff.data.cache import CachedPairs, Encoder, build_cache
    from deradiff.data.pickapic import load_preference_pairs
    from deradiff.testing import tiny_sd_pipeline, write_pairs

    pairs, _ = load_preference_pairs(write_pairs(tmp_path / "p.parquet", 4))
    encoder = Encoder(tiny_sd_pipeline(), 16, "cpu", torch.float32, seed=1)
    cache = tmp_path / "cache"
    first = build_cache(pairs, encoder, cache, batch_size=2, shard_rows=2, progress=False).get([3, 0])
    damaged = damage(cache)
    with pytest.raises(DeradiffError, match=f"'{damaged}'"):  # read directly: one clear error naming the file
        CachedPairs(cache).check(len(pairs))
    capsys.readouterr()
    again = build_cache(pairs, encoder, cache, batch_size=2, shard_rows=2, progress=False).get([3, 0])
    err = capsys.readouterr().err
    assert "note: latent cache" in err and f"'{damaged}'" in err and "rebuilding the latent cache" in err
    for key in first:
        torch.testing.assert_close(first[key], again[key])
    capsys.readouterr()
    build_cache(pairs, encoder, cache, batch_size=2, shard_rows=2, progress=False)  # whole again: no note
    assert "note:" not in capsys.readouterr().err


def test_a_training_run_on_a_damaged_cache_rebuilds_it(tmp_path, capsys):
    """The same through `deradiff train dpo`, where the damage was met (a second run sharing the cache)."""
    assets = tiny_assets(tmp_path)
    args = ["train", "dpo", "--config", str(assets["config"]), "train.max_steps=1"]
    code, _, err = run_cli([*args, f"output_dir={tmp_path / 'first'}"], capsys)
    assert code == 0, err
    (cache,) = (tmp_path / "cache").iterdir()
    damaged = damage_shard(cache)
    code, _, err = run_cli([*args, f"output_dir={tmp_path / 'second'}"], capsys)
    assert code == 0, err
    assert f"'{damaged}' is damaged" in err and "rebuilding the latent cache" in err


# ---- 4. prompt files that are not UTF-8 text ---------------------------------------------------------------
@pytest.mark.parametrize("trainer", ["ddpo", "reward_grad"])
def test_a_binary_prompt_file_names_the_trainers_key(tmp_path, capsys, trainer):
    """Was: UnicodeDecodeError, exit 1; and reward_grad's errors named 'ddpo.prompts'."""
    prompts = tmp_path / "prompts.png"
    prompts.write_bytes(BINARY)
    code, _, err = run_cli(["train", trainer, "--config", str(REPO / f"configs/tiny/{trainer}.yaml"),
                            f"output_dir={tmp_path / 'run'}", f"{trainer}.prompts={prompts}",
                            "tracker.backend=none"], capsys)
    assert_one_line_error(code, err, f"{trainer}.prompts '{prompts}' is not a UTF-8 text file")


def test_load_prompt_source_names_the_key_it_is_given(tmp_path):
    from deradiff.training.ddpo import load_prompt_source

    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(DeradiffError, match=f"reward_grad.prompts '{empty}' holds no prompts"):
        load_prompt_source(str(empty), "reward_grad.prompts")
    with_bom = tmp_path / "bom.txt"
    with_bom.write_bytes("\ufeffa red circle\n".encode())  # as Windows editors save: the mark is no prompt text
    assert load_prompt_source(str(with_bom), "reward_grad.prompts") == ["a red circle"]


def test_every_prompt_file_follows_one_comment_rule(tmp_path):
    """Trainer prompt files and realign's prompts_file share one reader: a line whose first non-blank character
    is '#' is a note (was: a prompt for the trainers, and for realign when indented); a '#' later is text."""
    from deradiff.fileio import read_prompt_file
    from deradiff.training.ddpo import load_prompt_source

    path = tmp_path / "p.txt"
    path.write_text("# colours\n a red circle \n\n   # an indented note\na #1 blue square\n")
    assert read_prompt_file(path, "prompts_file") == ["a red circle", "a #1 blue square"]
    assert load_prompt_source(str(path), "ddpo.prompts") == ["a red circle", "a #1 blue square"]


def test_a_binary_prompts_file_for_realign_is_one_clear_error(tmp_path, capsys):
    """Was: UnicodeDecodeError, exit 1."""
    prompts = tmp_path / "prompts.png"
    prompts.write_bytes(BINARY)
    code, _, err = run_cli(["realign", "--config", str(REPO / "configs/tiny/realign.yaml"),
                            f"output_dir={tmp_path / 'out'}", f"lora_dir={tmp_path}", f"prompts_file={prompts}"],
                           capsys)
    assert_one_line_error(code, err, f"prompts_file '{prompts}' is not a UTF-8 text file")


# ---- 5. byte-identical LoRA files --------------------------------------------------------------------------
class _OrderedSet(set):
    """A set that iterates in a given order: how one process's string hashing may order target_modules."""

    order: list[str] = []

    def __iter__(self):
        return iter(self.order)


def test_identical_adapters_give_byte_identical_lora_files(tmp_path):
    """Was: target_modules in the safetensors header followed set order, which differs between processes."""
    from safetensors import safe_open

    from deradiff.models.lora import DEFAULT_TARGET_MODULES, attach_lora, lora_state_dict, save_lora
    from deradiff.testing import tiny_sd_pipeline

    unet = tiny_sd_pipeline().unet
    attach_lora(unet, rank=2)
    config = unet.peft_config["default"]
    written = []
    for name, order in (("a", list(DEFAULT_TARGET_MODULES)), ("b", list(reversed(DEFAULT_TARGET_MODULES)))):
        config.target_modules = type("Ordered", (_OrderedSet,), {"order": order})(order)
        save_lora(unet, tmp_path / name, {"method": "dpo", "beta": 1.0})
        written.append({f: (tmp_path / name / f).read_bytes() for f in files_under(tmp_path / name)})
    assert written[0].keys() == {"pytorch_lora_weights.safetensors", "deradiff_metadata.json", "README.md"}
    assert written[0] == written[1]
    with safe_open(str(tmp_path / "a" / "pytorch_lora_weights.safetensors"), framework="pt") as f:  # still valid
        assert f.metadata()["format"] == "pt"
        assert json.loads(f.metadata()["lora_adapter_metadata"])["unet.target_modules"] == sorted(DEFAULT_TARGET_MODULES)
        assert len(f.keys()) == len(lora_state_dict(unet))
