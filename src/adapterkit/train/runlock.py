"""One run at a time per run folder: an OS file lock held for the whole run.

Every command that writes a folder takes it: ``train`` (its ``--out``), ``merge`` (its
``--out``, held from the check that the folder is free until the merged model is in place) and
``convert`` (its destination, likewise).

Two ``adapterkit train`` processes writing the same ``--out`` would both report success while
one's adapter is lost and ``metrics.jsonl`` interleaves both. The first takes an exclusive
``fcntl.flock`` on ``DIR/.adapterkit.lock`` (writing its PID there) and holds it until it ends;
the kernel releases it when the process dies, even by ``kill -9``, so a crashed run never leaves
a stale lock behind. A second process finds the lock taken and stops with an ``AdapterError``
naming the PID that holds it. Bad input found after the lock was taken leaves nothing behind:
``release(discard=True)`` removes the lock file and the folder if this process created them.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from pathlib import Path
from typing import Optional

from ..checkpoint_format import LOCK_NAME
from ..errors import AdapterError

_ATTEMPTS = 50  # rounds of "folder removed or swapped under us" before giving up


def _same_file(path: Path, fd: int) -> bool:
    """``path`` names the open file ``fd`` (not removed, not replaced by another file)."""
    try:
        here, held = os.stat(path), os.fstat(fd)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (held.st_dev, held.st_ino)


def _holder(fd: int) -> list[str]:
    """The lock holder's line ``PID COMMAND``, split. A process that has just taken the lock writes
    it a moment later: wait up to about a second for a whole line before saying "unknown"."""
    for _ in range(_ATTEMPTS):
        os.lseek(fd, 0, os.SEEK_SET)
        data = os.read(fd, 64)
        if data.endswith(b"\n"):
            return data.decode("ascii", "replace").split() or ["unknown"]
        time.sleep(0.02)
    return data.decode("ascii", "replace").split() or ["unknown"]


def _unwritable(out: Path, err: OSError) -> AdapterError:
    return AdapterError(f"--out {out}: cannot write there ({err.strerror or err}); choose a folder you can write to.")


class RunLock:
    """The exclusive lock of one run folder (``acquire`` / ``release``; also a context manager)."""

    def __init__(self, out: "str | Path", command: str = "train"):
        self.out = Path(out)
        self.command = command
        self.path = self.out / LOCK_NAME
        self._fd: Optional[int] = None
        self._created_dir = False
        self._created_file = False

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "RunLock":
        """Take the lock, creating the folder if needed; ``AdapterError`` if another process has it.

        Safe against a racing process: one that creates the folder first, removes it again (a run
        refused for bad input), or swaps a new folder in (``merge``) between our ``open`` and our
        ``flock``; the lock taken is always the file now at ``DIR/.adapterkit.lock``."""
        if self._fd is not None:
            return self
        for _ in range(_ATTEMPTS):
            fd = self._open()
            if fd is None:  # the folder or its lock file vanished under us: look again
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise _unwritable(self.out, err) from None
                holder = _holder(fd)
                os.close(fd)
                # one word: a lock written before the command was recorded (train); none: a holder silent for 1 s
                what = holder[1] if len(holder) > 1 else "train" if holder[0].isdigit() else "command"
                raise AdapterError(f"--out {self.out} is in use by another adapterkit {what} (PID {holder[0]}); wait "
                                   "for it to finish (or stop it), or choose another --out.") from None
            if _same_file(self.path, fd):
                break
            os.close(fd)  # locked a file that was removed or swapped away meanwhile: not the lock of DIR
        else:
            raise AdapterError(f"--out {self.out}: another process keeps creating and removing it; wait for it to "
                               "finish, or choose another --out.")
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {self.command}\n".encode("ascii"))
        self._fd = fd
        return self

    def _open(self) -> Optional[int]:
        """Create the folder and the lock file as needed and open it; ``None`` when a racing process
        removed either between the two steps."""
        self._created_file = False
        try:
            try:
                self.out.mkdir(parents=True)
                self._created_dir = True
            except FileExistsError:  # there already, or made by a racing process just now
                if not self.out.is_dir():
                    raise AdapterError(f"--out {self.out} is a file; pass a folder path.") from None
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
                self._created_file = True
            except FileExistsError:
                fd = os.open(self.path, os.O_RDWR)
        except FileNotFoundError:
            return None
        except OSError as err:
            self._discard()
            raise _unwritable(self.out, err) from None
        return fd

    def release(self, *, discard: bool = False) -> None:
        """Let go of the lock. ``discard=True`` (the run never started) also removes the lock file
        and the folder when this process created them and nothing else was written there."""
        if self._fd is None:
            return
        if discard:
            self._discard()
        elif self._still_mine():  # finished: the lock file is no longer needed (a racing process re-checks)
            self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None

    def _still_mine(self) -> bool:
        """The lock file is still the one this process locked: a folder swapped in by an atomic write
        (``merge``) has none, or a newer process's, which must not be removed."""
        return _same_file(self.path, self._fd)  # type: ignore[arg-type]

    def _discard(self) -> None:
        if self._created_file:
            self.path.unlink(missing_ok=True)
        if self._created_dir and self.out.is_dir() and not any(self.out.iterdir()):
            self.out.rmdir()

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release(discard=exc[0] is not None)


__all__ = ["RunLock", "LOCK_NAME"]
