"""Crash-safe writes and an exclusive lock for files and folders.

Everything lmlab writes for later reading (token caches, pipeline stages,
tokenizers, exports, results, sweep state) is built under a temporary name in
the destination's own directory and renamed into place, so a reader sees the
old version or the new one and a crash leaves no half-written file behind.

:class:`FileLock` serialises writers of a file or folder. It holds an
``flock`` on a lock file that records the holder's PID: the kernel drops the
lock when the holder dies, so a lock file left by a killed process is simply
taken over (so is one whose recorded PID is dead), and the file is removed on
release so nothing is left behind.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

# mkstemp creates 0600 files; what lmlab writes is meant to be read by others too
_FILE_MODE = 0o644


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write to (e.g. ``torch.save``, ``savefig``); on success it
    replaces ``path``, on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a synced temporary file and a rename."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(
    path: str | os.PathLike,
    obj: Any,
    *,
    indent: Optional[int] = 1,
    sort_keys: bool = False,
    allow_nan: bool = True,
    default: Optional[Callable[[Any], Any]] = None,
) -> Path:
    """Write ``obj`` as JSON (with a trailing newline) to ``path`` atomically."""
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, allow_nan=allow_nan, default=default)
    return atomic_write_text(path, text + "\n")


def publish_dir(tmp: str | os.PathLike, final: str | os.PathLike, replace: bool = True) -> bool:
    """Move the finished directory ``tmp`` to ``final`` (same filesystem).

    An existing ``final`` is moved aside first and deleted afterwards, so
    ``final`` is never half old and half new. With ``replace=False`` an
    existing ``final`` (e.g. the same cache finished first by another process)
    is kept and ``tmp`` is discarded. Returns whether ``tmp`` was published.
    """
    tmp, final = Path(tmp), Path(final)
    if final.exists():
        if not replace:
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
        return True
    try:
        os.replace(tmp, final)
    except OSError:
        # another process published the same directory between our check and the rename
        if replace or not final.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        return False
    return True


@contextmanager
def staged_dir(final: str | os.PathLike, replace: bool = True) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``final``; when the block finishes it is published as
    ``final`` (see :func:`publish_dir`), when it raises it is deleted."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        publish_dir(tmp, final, replace=replace)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _parse_pid(raw: bytes) -> Optional[int]:
    try:
        return int(raw.decode().strip() or 0) or None
    except (UnicodeDecodeError, ValueError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


class LockHeld(RuntimeError):
    """Raised by :meth:`FileLock.acquire` when another live process holds the lock."""

    def __init__(self, path: Path, pid: Optional[int]):
        self.path = path
        self.pid = pid
        holder = f"process {pid}" if pid else "another process"
        super().__init__(f"{path} is held by {holder}")


class FileLock:
    """An exclusive inter-process lock on ``path`` (a lock file, created and removed by the lock).

    ``acquire(timeout=0)`` fails at once with :class:`LockHeld` naming the
    holder's PID; ``timeout=None`` waits. Usable as a context manager (waits).
    Not re-entrant: a second ``FileLock`` on the same path in the same process
    is refused like any other holder.
    """

    def __init__(self, path: str | os.PathLike, poll_s: float = 0.05):
        self.path = Path(path)
        self.poll_s = poll_s
        self._fd: Optional[int] = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def holder_pid(self) -> Optional[int]:
        """The PID recorded in the lock file (None when absent or unreadable)."""
        try:
            return _parse_pid(self.path.read_bytes())
        except OSError:
            return None

    def _try_acquire(self) -> bool:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, _FILE_MODE)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            # the previous holder unlinks the file on release; if it did so between our open and our
            # flock we hold a lock on a deleted file, so start over on the path's current file
            try:
                st, mine = os.stat(self.path), os.fstat(fd)
                same = (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            # a lock file naming another live process is honoured even without its flock (a writer
            # that does not flock, or a file system without flock); one naming a dead process is stale
            recorded = _parse_pid(os.pread(fd, 32, 0))
            if recorded and recorded != os.getpid() and _pid_alive(recorded):
                os.close(fd)
                return False
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            self._fd = fd
            return True

    def acquire(self, timeout: Optional[float] = None) -> "FileLock":
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this FileLock")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._try_acquire():
            if deadline is not None and time.monotonic() >= deadline:
                raise LockHeld(self.path, self.holder_pid())
            time.sleep(self.poll_s)
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        # unlink while still holding the lock, so no waiter can lock the file we are about to drop
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "FileLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
