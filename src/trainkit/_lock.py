"""A lock on a directory for the lifetime of a run: one live writer, stale locks taken over.

The lock is the operating system's own file lock (`flock`) on `<directory>/.trainkit.lock`; the
file holds the holder's pid and host, for the message that refuses a second run. The system
releases the lock when its holder's process ends in any way, a `kill -9` too, so a lock file left
by a dead process is stale and is simply taken over: no pid guessing decides who holds it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
from pathlib import Path

__all__ = ["LOCK_NAME", "DirectoryLock", "pid_alive"]

LOCK_NAME = ".trainkit.lock"


class DirectoryLock:
    """An exclusive lock on `directory`, held from `acquire` to `release`.

    Two runs in one process conflict too: the lock belongs to an open file, not to a process.
    """

    def __init__(self, directory: Path, owner: str) -> None:
        self.directory = directory
        self.path = directory / LOCK_NAME
        self.owner = owner  # how the refusal names the caller, e.g. "ModelCheckpoint(dirpath='ck')"
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or refuse, naming the live holder's pid.

        Raises:
            RuntimeError: another live run holds the lock (its pid and host are named).
            OSError: the lock file cannot be created, written or locked (the message names it).
        """
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                raise OSError(
                    err.errno, f"{self.owner}: cannot create the lock file ({err.strerror})",
                    str(self.path),
                ) from err  # fmt: skip
            try:
                locked = _try_lock(fd)
            except OSError as err:  # a file system without locks (some network or FUSE mounts)
                os.close(fd)
                raise OSError(
                    err.errno, f"{self.owner}: cannot lock the directory ({err.strerror}); "
                    "this file system may not support file locks", str(self.path),
                ) from err  # fmt: skip
            if not locked:
                os.close(fd)
                raise RuntimeError(
                    f"{self.owner}: {str(self.directory)!r} is in use by another run "
                    f"({_holder(self.path)}, which holds {LOCK_NAME} there); two runs writing one "
                    "directory would overwrite each other's checkpoints. Wait for that run to "
                    "end, or give this run another directory."
                )
            if _same_file(fd, self.path):
                break
            os.close(fd)  # its holder released (and removed) it between our open and lock: again
        try:  # who holds it, for the message that refuses another run
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        except OSError as err:
            _unlock(fd)
            os.close(fd)
            raise OSError(
                err.errno, f"{self.owner}: cannot write the lock file ({err.strerror})",
                str(self.path),
            ) from err  # fmt: skip
        self._fd = fd

    def release(self) -> None:
        """Give the lock up and remove its file (nothing happens if it is not held)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if sys.platform != "win32":  # removed while still held, so no one locks a removed file
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        try:
            _unlock(fd)
        finally:
            os.close(fd)
        if sys.platform == "win32":  # an open file cannot be removed there
            with contextlib.suppress(OSError):
                os.unlink(self.path)

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None


def pid_alive(pid: int) -> bool:
    """Whether a process `pid` runs on this machine (on Windows: always assumed)."""
    if sys.platform == "win32":
        return True  # os.kill(pid, 0) would send Ctrl-C there
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _holder(path: Path) -> str:
    """`pid N on host H` from the lock file; the holder may be writing it just now, so wait a
    little for a live pid rather than name a previous, dead holder."""
    text = ""
    for _ in range(20):
        with contextlib.suppress(OSError):
            text = path.read_text(encoding="utf-8", errors="replace").strip()
        pid, _, host = text.partition(" ")
        if pid.isdigit() and (host != socket.gethostname() or pid_alive(int(pid))):
            if int(pid) == os.getpid() and host == socket.gethostname():
                return f"pid {pid}, this very process"
            return f"pid {pid} on host {host}"
        time.sleep(0.05)
    return "its pid could not be read"


def _same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (on_disk.st_dev, on_disk.st_ino)


if sys.platform == "win32":  # pragma: no cover - the test machines are POSIX
    import msvcrt

    _FAR = 1 << 30  # lock a byte far past the pid text, so others can still read it

    def _try_lock(fd: int) -> bool:
        os.lseek(fd, _FAR, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        finally:
            os.lseek(fd, 0, os.SEEK_SET)
        return True

    def _unlock(fd: int) -> None:
        os.lseek(fd, _FAR, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)

else:
    import fcntl

    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)
