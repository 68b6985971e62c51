"""One live run per output directory: a lock file holding the owner's host and pid.

Two runs writing the same checkpoints would silently corrupt each other's resume state. The lock is
created with O_EXCL (atomic); a lock whose pid is dead on this host is stale and is taken over.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path
from types import TracebackType

from deradiff.errors import DeradiffError

LOCK_NAME = ".deradiff.lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputDirLock:
    """Context manager: hold `output_dir/.deradiff.lock` for the run; refuse if another live run holds it."""

    def __init__(self, output_dir: str | os.PathLike) -> None:
        self.path = Path(output_dir) / LOCK_NAME
        self.held = False
        self.created = False  # this run made the folder: removed again on release if the run left it empty

    def acquire(self) -> None:
        self.created = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        owner = json.dumps({"pid": os.getpid(), "host": socket.gethostname()})
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._check_stale()
                continue
            with os.fdopen(fd, "w") as f:
                f.write(owner)
            self.held = True
            return
        raise DeradiffError(f"could not take the lock {self.path}; remove it if no run is using this output_dir")

    def _check_stale(self) -> None:
        """Remove the lock if its owner is dead on this host; otherwise refuse with the owner named."""
        try:
            info = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            info = {}
        pid, host = info.get("pid"), info.get("host")
        if host == socket.gethostname() and isinstance(pid, int) and pid != os.getpid() and not _pid_alive(pid):
            self.path.unlink(missing_ok=True)
            return
        if pid == os.getpid() and host == socket.gethostname():
            self.path.unlink(missing_ok=True)
            return
        if not isinstance(pid, int):
            raise DeradiffError(f"lock file {self.path} is unreadable; delete it if no run is using this output_dir")
        raise DeradiffError(
            f"output_dir '{self.path.parent}' is in use by another run (pid {pid} on {host}); "
            f"pick another output_dir or delete {self.path} if that run is gone"
        )

    def release(self) -> None:
        """Drop the lock; a folder this run created and left empty (it stopped on bad input) goes too."""
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
            folder = self.path.parent
            if self.created and folder.is_dir() and not any(folder.iterdir()):
                with contextlib.suppress(OSError):  # another run may have just taken it: never mask the real error
                    folder.rmdir()

    def __enter__(self) -> "OutputDirLock":
        self.acquire()
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()
