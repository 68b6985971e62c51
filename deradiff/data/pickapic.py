"""Pick-a-Pic v2 schema preference pairs: load from a hub name or local parquet/arrow, clean, orient.

Schema: caption (str), jpg_0 / jpg_1 (encoded image bytes), label_0 / label_1 (1 = preferred, 0.5 = tie).
Cleaning, with every count reported: ties dropped; rows whose labels are not a decided pair dropped;
rows with an undecodable image skipped with a warning (never a crash); pairs oriented preferred-first
into columns caption, jpg_w, jpg_l.
"""

from __future__ import annotations

import hashlib
import io
import logging
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from deradiff.errors import DeradiffError

log = logging.getLogger(__name__)
REQUIRED_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")


@dataclass
class CleaningStats:
    """What cleaning did to the rows (logged, and stored in the LoRA metadata)."""

    rows: int = 0
    ties: int = 0
    bad_labels: int = 0
    undecodable: int = 0
    kept: int = 0

    def line(self) -> str:
        return (
            f"preference rows: {self.rows} read, {self.ties} ties dropped, {self.bad_labels} bad labels dropped, "
            f"{self.undecodable} undecodable images skipped, {self.kept} pairs kept"
        )


def image_bytes(value: Any) -> bytes | None:
    """Encoded bytes from a parquet binary cell or a `datasets.Image` cell ({'bytes':..., 'path':...})."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        if value.get("path") and Path(value["path"]).is_file():
            return Path(value["path"]).read_bytes()
    return None


def decode_image(data: bytes | None):
    """A fully decoded RGB PIL image, or None if the bytes are not a readable image."""
    from PIL import Image

    if not data:
        return None
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.convert("RGB")
    except Exception:  # noqa: BLE001 - PIL raises many types for corrupt files; all mean "skip this row"
        return None


def load_raw(source: str, split: str = "train", cache_dir: str | None = None):
    """A `datasets.Dataset` from a parquet file/glob/folder, an arrow folder (save_to_disk) or a hub name."""
    import datasets

    path = Path(source).expanduser()
    try:
        if path.is_dir() and (path / "dataset_info.json").is_file():
            ds = datasets.load_from_disk(str(path))
            return ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        files = _parquet_files(source, path)
        if files:
            return datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=cache_dir)
        if path.exists() or source.startswith((".", "/", "~")) or "*" in source:
            raise DeradiffError(f"preference data '{source}' has no parquet files or saved dataset")
        return datasets.load_dataset(source, split=split, cache_dir=cache_dir)
    except DeradiffError:
        raise
    except Exception as exc:  # noqa: BLE001 - hub/network/format failures become one readable line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DeradiffError(f"could not load preference data '{source}': {first}") from exc


def _parquet_files(source: str, path: Path) -> list[str]:
    if path.is_file():
        return [str(path)]
    if path.is_dir():
        return sorted(str(p) for p in path.rglob("*.parquet"))
    if "*" in source:
        import glob

        return sorted(glob.glob(source))
    return []


def clean_pairs(raw, max_pairs: int | None = None, num_proc: int | None = None, source: str | None = None):
    """(Dataset[caption, jpg_w, jpg_l], CleaningStats): ties/bad labels dropped, undecodable skipped, oriented.

    `source` only names the data in error messages.
    """
    name = f"preference data '{source}'" if source else "preference data"
    missing = [c for c in REQUIRED_COLUMNS if c not in raw.column_names]
    if missing:
        raise DeradiffError(
            f"{name} lacks column(s) {', '.join(missing)}; expected the Pick-a-Pic schema "
            f"({', '.join(REQUIRED_COLUMNS)}), found {', '.join(raw.column_names)}"
        )
    stats = CleaningStats(rows=len(raw))
    oriented = raw.map(_orient, batched=True, remove_columns=raw.column_names, num_proc=num_proc,
                       desc="orienting preference pairs")
    stats.ties = sum(1 for s in oriented["status"] if s == "tie")
    stats.bad_labels = sum(1 for s in oriented["status"] if s == "bad")
    decided = oriented.filter(lambda s: s == "ok", input_columns="status")
    if max_pairs is not None:
        decided = decided.select(range(min(max_pairs, len(decided))))
    readable = decided.filter(_decodable, batched=True, num_proc=num_proc, desc="checking images")
    stats.undecodable = len(decided) - len(readable)
    stats.kept = len(readable)
    if stats.undecodable:
        warnings.warn(f"skipped {stats.undecodable} preference pairs with undecodable images in {name}")
    log.info(stats.line())
    if stats.kept == 0:
        raise DeradiffError(f"{name} has no usable preference pairs ({stats.line()}); expected rows with "
                            "decodable images and labels (1, 0) or (0, 1)")
    return readable.remove_columns("status"), stats


def _orient(batch: dict[str, list]) -> dict[str, list]:
    out: dict[str, list] = {"caption": [], "jpg_w": [], "jpg_l": [], "status": []}
    for cap, a, b, l0, l1 in zip(*(batch[c] for c in REQUIRED_COLUMNS)):
        status, first = _label_status(l0, l1)
        out["caption"].append(str(cap) if cap is not None else "")
        w, l = (a, b) if first else (b, a)
        out["jpg_w"].append(image_bytes(w))
        out["jpg_l"].append(image_bytes(l))
        out["status"].append(status)
    return out


def _label_status(l0: Any, l1: Any) -> tuple[str, bool]:
    """('ok'|'tie'|'bad', image 0 is preferred)."""
    try:
        l0, l1 = float(l0), float(l1)
    except (TypeError, ValueError):
        return "bad", True
    if l0 == 0.5 and l1 == 0.5:
        return "tie", True
    if {l0, l1} == {0.0, 1.0}:
        return "ok", l0 == 1.0
    return "bad", True


def _decodable(batch: dict[str, list]) -> list[bool]:
    return [decode_image(w) is not None and decode_image(l) is not None for w, l in zip(batch["jpg_w"], batch["jpg_l"])]


def load_preference_pairs(source: str, split: str = "train", max_pairs: int | None = None,
                          cache_dir: str | None = None):
    """Load + clean: the one call trainers make. Returns (Dataset[caption, jpg_w, jpg_l], CleaningStats)."""
    return clean_pairs(load_raw(source, split, cache_dir), max_pairs=max_pairs, source=source)


def data_fingerprint(source: str, stats: CleaningStats | None = None, max_bytes: int = 2 << 30) -> str:
    """sha256 identity of the data: file contents when they total under `max_bytes`, else names + sizes."""
    h = hashlib.sha256(source.encode())
    path = Path(source).expanduser()
    files = sorted(p for p in ([path] if path.is_file() else path.rglob("*") if path.is_dir() else []) if p.is_file())
    total = sum(p.stat().st_size for p in files)
    for p in files:
        h.update(f"{p.relative_to(path) if path.is_dir() else p.name}:{p.stat().st_size}".encode())
        if total <= max_bytes:
            h.update(p.read_bytes())
    if stats is not None:
        h.update(repr(sorted(asdict(stats).items())).encode())
    return h.hexdigest()[:16]
