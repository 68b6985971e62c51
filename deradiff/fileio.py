"""Writing result files atomically, with a one-line error when the disk is full.

Why: a sampling or training run killed (or out of disk) mid-write must not leave a truncated PNG/JSON under
its final name, where a later step, a resumed run or a person would take it for a finished result. Every
result file is written to a hidden temp name in the same folder and renamed over the final name only when
complete; on any failure the temp file is removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import errno
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

from deradiff.errors import DeradiffError

# Failures that are the user's environment (full disk, quota, read-only or forbidden folder), not a bug.
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def write_error(exc: OSError, path: str | os.PathLike) -> Exception:
    """A DeradiffError naming `path` for disk-full/permission failures; any other OSError unchanged."""
    if exc.errno in _ENVIRONMENT_ERRNOS:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        hint = "; free some space or pick another output_dir" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        return DeradiffError(f"could not write '{path}': {reason}{hint}")
    return exc


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (/proc), else by a set-and-restore."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    current = os.umask(0o022)
    os.umask(current)
    return current


def match_umask(path: str | os.PathLike) -> None:
    """Give a file (or every file directly in a folder) the mode a plain `open()` gives under the umask.

    Why: safetensors creates its files 0600, which would hide a finished LoRA, a shared latent cache or eval
    samples from teammates on a shared cluster; everything else deradiff writes follows the umask.
    """
    mode = 0o666 & ~_umask()
    path = Path(path)
    for file in (path.iterdir() if path.is_dir() else [path]):
        if file.is_file():
            file.chmod(mode)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path next to `path` (same suffix, so PIL/pyarrow pick the format); rename it over `path`
    when the block succeeds, delete it when the block fails. Disk-full errors become a DeradiffError."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.stem}.tmp-{os.getpid()}{final.suffix}")
    try:
        yield tmp
        if tmp.exists():
            match_umask(tmp)
        os.replace(tmp, final)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        error = write_error(exc, final)
        if error is exc:
            raise
        raise error from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """`Path(path).write_text(text)`, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def remove_dir(path: Path) -> None:
    """Delete a result folder by renaming it to a hidden name first: a kill mid-delete never leaves a
    half-deleted folder under a name that still looks complete (a checkpoint `latest` would pick, a LoRA)."""
    doomed = path.with_name(f".{path.name}.old-{os.getpid()}")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def replace_dir(src: Path, dst: Path) -> None:
    """Move the finished folder `src` to `dst`; an existing `dst` is renamed away first and deleted after,
    so `dst` only ever names a complete folder (with a moment where it names none)."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def content_key(data: Any) -> str:
    """A short, stable hash of anything JSON can write (stage markers and caches are keyed by it)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_output_dir(path: str | os.PathLike, key: str = "output_dir") -> Path:
    """Refuse, before any work, an output folder that cannot be one: an existing file, a dangling link, or a
    path below a file. Why: such paths otherwise fail only at the first write, after minutes of work."""
    out = Path(path)
    if out.is_symlink() and not out.exists():
        raise DeradiffError(f"{key} '{out}' is a link to '{os.readlink(out)}', which does not exist")
    if out.exists() and not out.is_dir():
        raise DeradiffError(f"{key} '{out}' is a file; expected a folder (or a path that does not exist yet)")
    for parent in out.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise DeradiffError(f"{key} '{out}' is inside '{parent}', which is a file")
            break
    return out


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """The JSON content of a file deradiff wrote; a damaged one is a one-line error naming it (everything it
    writes is atomic, so damage means an outside edit or a failing disk)."""
    try:
        return json.loads(Path(path).read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise DeradiffError(f"{what} '{path}' is not valid JSON ({exc}); delete it to redo the work it records") from None


def remove_outputs(folder: str | os.PathLike, names: tuple[str, ...]) -> None:
    """Remove the files and folders a stage writes into `folder`, in the order given (the file that marks a
    finished run first, so an interrupted removal never leaves it beside missing outputs); other files stay."""
    for name in names:
        path = Path(folder) / name
        if path.is_dir() and not path.is_symlink():
            remove_dir(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def folder_digest(folder: str | os.PathLike) -> str:
    """A short sha256 of every file's name and bytes under `folder` ("" when it does not exist): a stage keyed
    by it reruns when its input was replaced or damaged, not only when its config changed."""
    root = Path(folder)
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []:
        h.update(str(path.relative_to(root)).encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16] if root.is_dir() else ""


def check_results_absent(folder: str | os.PathLike, names: tuple[str, ...] | None, overwrite: bool, *,
                         ignore: tuple[str, ...] = (), refusal: Callable[[str, list[Path]], str] | None = None
                         ) -> list[Path]:
    """The one guard of every output folder: refuse, unless `overwrite`, a folder already holding results, so a
    finished result is never replaced without being asked. Returns what it found (what an overwrite replaces).

    `names`: the files and folders a stage writes (a link counts, even a dangling one); None: every entry but
    `ignore` (a stage that owns its whole folder). `refusal(folder, found)`: the error message, for a stage
    whose remedy is more than overwrite=true (a trainer can also resume).
    """
    root = Path(folder)
    if names is None:
        found = sorted(p for p in root.iterdir() if p.name not in ignore) if root.is_dir() else []
    else:
        found = [root / name for name in names if (root / name).exists() or (root / name).is_symlink()]
    if found and not overwrite:
        raise DeradiffError((refusal or _earlier_results)(str(folder), found))
    return found


def _earlier_results(folder: str, found: list[Path]) -> str:
    more = f" (and {', '.join(p.name for p in found[1:])})" if len(found) > 1 else ""
    return (f"output_dir '{folder}' holds an earlier run's results ('{found[0]}'{more} already exists); "
            "pass overwrite=true to replace them, or pick another output_dir")


def read_prompt_file(path: str | os.PathLike, key: str) -> list[str]:
    """The prompts of a text file, one a line, by one rule for every prompt file deradiff reads: each line is
    stripped, and blank lines and comment lines (first non-blank character '#') are skipped, so a prompt list
    can carry notes. A file without prompts is an error naming `key` and the file: a run on none would fail
    later or sample nothing."""
    lines = (line.strip() for line in read_text_file(path, key, "one prompt a line").splitlines())
    prompts = [line for line in lines if line and not line.startswith("#")]
    if not prompts:
        raise DeradiffError(f"{key} '{path}' holds no prompts")
    return prompts


def read_text_file(path: str | os.PathLike, key: str, expected: str) -> str:
    """A user's text file (BOM tolerated); one that is not UTF-8 is an error naming `key` and the file."""
    try:
        return Path(path).read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DeradiffError(f"{key} '{path}' is not a UTF-8 text file (byte {exc.start}: {exc.reason}); "
                            f"expected {expected}") from None
