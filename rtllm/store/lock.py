"""One writer per output directory: an exclusive lock held for the whole run.

`flock` on a lock file inside the directory. The kernel releases it when the process ends in
any way (kill -9 included), so a killed run never leaves a stale lock and `--resume` just works;
a second run on the same directory gets one line naming the process that holds it. A run that
ends normally (or is refused) removes the file again, so it leaves the directory as it found it.
"""
from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

LOCK_FILE = ".rtllm.lock"


class DirectoryLocked(ValueError):
    """Another process holds the directory's lock."""


class DirectoryLock:
    """The exclusive lock of `directory` (which must exist); `release()` or process exit frees it."""

    def __init__(self, directory: Path, what: str = "run") -> None:
        self._fd: int | None = None
        self.path = Path(directory) / LOCK_FILE
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                raise DirectoryLocked(
                    f"{directory} is in use by another rtllm {what} ({self._holder()}); wait for "
                    f"it to finish or stop it, or choose another --out") from None
            if self._is_current(fd):
                break
            os.close(fd)  # the holder removed the file as we opened it: lock the new one
        # The holder's PID, for the message above (written only while we hold the lock).
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def _is_current(self, fd: int) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def _holder(self) -> str:
        try:
            text = self.path.read_text().strip()
        except OSError:
            text = ""
        return f"PID {text}" if text.isdigit() else "PID unknown"

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:  # removed while still held, so no other process can be holding this file
                self.path.unlink(missing_ok=True)
            finally:
                os.close(fd)  # closing the only descriptor drops the flock

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            self.release()
