"""One live run per output directory: an OS file lock (`filelock`) on output_dir/.deradiff.lock.

Two runs writing the same checkpoints would silently corrupt each other's resume state. The operating system
releases the lock when its process dies, so a killed run never blocks the next one; the file also names its
owner (pid and host), only so that a refused run can say which run holds the folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path
from types import TracebackType

from filelock import FileLock, Timeout

from deradiff.errors import DeradiffError

LOCK_NAME = ".deradiff.lock"


class OutputDirLock:
    """Context manager: hold `output_dir/.deradiff.lock` for the run; refuse if another live run holds it."""

    def __init__(self, output_dir: str | os.PathLike) -> None:
        self.path = Path(output_dir) / LOCK_NAME
        self.lock = FileLock(self.path)
        self.created = False  # this run made the folder: removed again on release if the run left it empty

    @property
    def held(self) -> bool:
        return self.lock.is_locked

    def acquire(self) -> None:
        """Take the lock without waiting: another run holding it is refused at once, with its owner named."""
        self.created = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        owner = self._owner()  # read first: an older filelock empties the file when it tries to lock it
        try:
            self.lock.acquire(timeout=0)
        except Timeout:
            raise DeradiffError(f"output_dir '{self.path.parent}' is in use by another run{owner}; pick another "
                                "output_dir or wait for that run to end") from None
        self.path.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))

    def _owner(self) -> str:
        """' (pid N on HOST)' as the holding run wrote it; '' when the file is missing or not a record."""
        with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
            info = json.loads(self.path.read_text())
            return f" (pid {int(info['pid'])} on {info['host']})"
        return ""

    def release(self) -> None:
        """Drop the lock; a folder this run created and left empty (it stopped on bad input) goes too."""
        if self.held:
            self.path.unlink(missing_ok=True)  # while held: a run that opened the old file cannot lock a removed one
            self.lock.release()
            folder = self.path.parent
            if self.created and folder.is_dir() and not any(folder.iterdir()):
                with contextlib.suppress(OSError):  # another run may have just taken it: never mask the real error
                    folder.rmdir()

    def __enter__(self) -> "OutputDirLock":
        self.acquire()
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()
