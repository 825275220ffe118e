"""Run untrusted generated code in a separate, limited process.

Each program runs in its own ``subprocess`` with:

* a fresh temporary directory as working directory, deleted afterwards;
* ``resource`` limits set in ``preexec_fn`` (between fork and exec): CPU
  seconds (``RLIMIT_CPU``), address space (``RLIMIT_AS``), file size
  (``RLIMIT_FSIZE``, which also caps captured output) and no core dumps;
* a wall-clock timeout; on expiry the whole process group (the child runs in a
  new session) is killed with ``SIGKILL``, so forked helpers die too;
* a scrubbed environment (only ``PATH``, ``HOME``/``TMPDIR`` = the temp dir and
  a UTF-8 locale), Python's isolated mode (``-I``: no ``PYTHON*`` variables,
  no user site, no cwd on ``sys.path``) and stdin connected to ``/dev/null``;
* no network. Where ``unshare --net`` works (Linux, root or user namespaces;
  checked once per process with ``unshare --net true``), the program runs in a
  new, empty network namespace: the kernel enforces it. Otherwise a Python
  preamble replaces ``socket.socket`` (and the DNS helpers) with versions that
  raise ``PermissionError`` -- best effort only. ``ExecResult.network_isolation``
  records which one was used ("unshare" or "preamble").

In every case a best-effort preamble also blocks ``open``/``os.open`` and the
file-manipulating ``os`` functions on paths outside the temp dir (reads of the
Python installation stay allowed, so imports work) and blocks starting or
signalling processes. These guards are Python-level: code using ``ctypes`` or a
C extension can bypass them. They stop accidents and casual escapes, not a
determined attacker; for hostile code run the whole evaluation in a container
or VM (note that as root the process could also raise its own hard limits).

Outcomes: ``passed`` (exit status 0), ``failed`` (the program raised -- a failed
assertion, ``MemoryError`` at the memory limit, ``PermissionError`` from a
guard -- or exited non-zero), ``timed_out`` (wall-clock or CPU limit) and
``error`` (the process was killed by a signal, hit the file-size limit, or could
not be started). Every outcome carries a one-line ``reason``.
"""

from __future__ import annotations

import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache, partial
from pathlib import Path


class Status(str, Enum):
    """How a sandboxed program ended."""

    PASSED = "passed"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    ERROR = "error"


@dataclass(frozen=True)
class Limits:
    """Resource limits for one program."""

    timeout_s: float = 3.0  # wall clock, including interpreter start-up
    memory_mb: int = 1024  # address space
    cpu_s: int | None = None  # default: the wall-clock timeout rounded up
    max_file_mb: int = 16  # any file written, stdout/stderr included
    output_chars: int = 4000  # how much of stdout/stderr to keep in the result


@dataclass(frozen=True)
class ExecResult:
    """The outcome of one sandboxed run."""

    status: Status
    reason: str
    returncode: int | None
    duration_s: float
    stdout: str = ""
    stderr: str = ""
    network_isolation: str = ""

    @property
    def passed(self) -> bool:
        """True iff the program exited with status 0 inside the limits."""
        return self.status is Status.PASSED


@lru_cache(maxsize=1)
def unshare_available() -> bool:
    """Whether ``unshare --net`` can create a network namespace here (probed once)."""
    exe = shutil.which("unshare")
    if exe is None:
        return False
    try:
        probe = subprocess.run(
            [exe, "--net", "true"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, timeout=10, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return probe.returncode == 0


def network_isolation_method(network: str = "auto") -> str:
    """The isolation :func:`run_program` uses for ``network``: "unshare" or "preamble"."""
    if network not in ("auto", "unshare", "preamble"):
        raise ValueError(f"network must be auto, unshare or preamble, not {network!r}")
    if network == "auto":
        return "unshare" if unshare_available() else "preamble"
    if network == "unshare" and not unshare_available():
        raise RuntimeError("unshare --net is not available on this machine")
    return network


# The guard preamble runs inside the child before the program. It is plain source text
# (not imported from lmlab) so the child needs nothing but the standard library.
GUARD_PREAMBLE = r'''
def _lmlab_install_guards(root, block_sockets):
    import builtins, io, os, sys
    import _posixsubprocess

    root = os.path.realpath(root)
    read_roots = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix,
                                                 sys.base_exec_prefix) if p}
    read_roots |= {os.path.realpath(p) for p in sys.path if p and os.path.isdir(p)}
    read_roots = tuple(r for r in read_roots if r != os.sep)
    devices = {"/dev/null", "/dev/zero", "/dev/random", "/dev/urandom"}

    def inside(path, base):
        return path == base or path.startswith(base.rstrip(os.sep) + os.sep)

    def check(path, write):
        if isinstance(path, int):
            return  # an already-open descriptor
        try:
            name = os.fsdecode(os.fspath(path))
        except TypeError:
            return  # not a path: the real call raises its own error
        full = os.path.realpath(name)
        if inside(full, root) or full in devices:
            return
        if not write and any(inside(full, r) for r in read_roots):
            return
        raise PermissionError(13, "sandbox: access outside the working directory is blocked", name)

    real_open = builtins.open

    def guarded_open(file, mode="r", *args, **kwargs):
        check(file, any(c in mode for c in "wax+"))
        return real_open(file, mode, *args, **kwargs)

    builtins.open = io.open = guarded_open

    real_os_open = os.open
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def guarded_os_open(path, flags, mode=0o777, *, dir_fd=None):
        if dir_fd is None or os.path.isabs(os.fsdecode(path)):
            check(path, bool(flags & write_flags))
        return real_os_open(path, flags, mode, dir_fd=dir_fd)

    os.open = guarded_os_open

    def guard(name, write, nargs=1):
        real = getattr(os, name, None)
        if real is None:
            return

        def wrapper(*args, **kwargs):
            for p in args[:nargs]:
                check(p, write)
            return real(*args, **kwargs)

        setattr(os, name, wrapper)

    for name in ("remove", "unlink", "rmdir", "mkdir", "chmod", "chown", "lchown", "truncate",
                 "utime", "mkfifo", "mknod"):
        guard(name, True)
    for name in ("rename", "replace", "link", "symlink"):
        guard(name, True, 2)
    for name in ("listdir", "scandir", "chdir"):
        guard(name, name == "chdir")

    def no_processes(*args, **kwargs):
        raise PermissionError(1, "sandbox: starting or signalling processes is blocked")

    for name in ("system", "popen", "fork", "forkpty", "kill", "killpg", "posix_spawn", "posix_spawnp",
                 "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp", "execvpe",
                 "spawnv", "spawnve", "spawnvp", "spawnvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe"):
        if hasattr(os, name):
            setattr(os, name, no_processes)
    _posixsubprocess.fork_exec = no_processes  # subprocess and multiprocessing spawn through it

    if block_sockets:
        import socket, _socket

        def no_network(*args, **kwargs):
            raise PermissionError(1, "sandbox: network access is disabled")

        class BlockedSocket(socket.socket):
            def __init__(self, *args, **kwargs):
                no_network()

        socket.socket = socket.SocketType = _socket.socket = _socket.SocketType = BlockedSocket
        for name in ("create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo",
                     "gethostbyname", "gethostbyname_ex", "gethostbyaddr"):
            if hasattr(socket, name):
                setattr(socket, name, no_network)
'''

_RUNNER_TAIL = '''
with open("program.py", "rb") as _fh:
    _source = _fh.read()
_lmlab_install_guards(%r, %r)
del _lmlab_install_guards, _fh
exec(compile(_source, "program.py", "exec"), {"__name__": "__main__", "__file__": "program.py",
                                               "__builtins__": __builtins__})
'''


def _apply_limits(limits: Limits) -> None:  # runs in the child between fork and exec
    cpu = limits.cpu_s if limits.cpu_s is not None else max(1, math.ceil(limits.timeout_s))
    # soft limit -> SIGXCPU; the hard limit one second later -> SIGKILL
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    memory = limits.memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    size = limits.max_file_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # the group is already gone


def _tail(path: Path, chars: int) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - chars * 4))
            return fh.read().decode("utf-8", errors="replace")[-chars:]
    except OSError:
        return ""


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def _python() -> str:
    return sys.executable or shutil.which("python3") or "python3"


def run_program(source: str, limits: Limits = Limits(), *, network: str = "auto") -> ExecResult:
    """Run Python ``source`` in the sandbox and classify the outcome.

    ``network``: "auto" (``unshare`` when available, else the socket preamble),
    or force "unshare" / "preamble".
    """
    method = network_isolation_method(network)
    tmp = Path(tempfile.mkdtemp(prefix="lmlab_sandbox_"))
    work = tmp / "work"
    start = time.monotonic()
    try:
        work.mkdir()
        (work / "program.py").write_text(source, encoding="utf-8")
        runner = GUARD_PREAMBLE + _RUNNER_TAIL % (str(work), method == "preamble")
        (work / "runner.py").write_text(runner, encoding="utf-8")
        cmd = [_python(), "-I", "-B", "runner.py"]
        if method == "unshare":
            cmd = [shutil.which("unshare") or "unshare", "--net", "--", *cmd]
        env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(work),
               "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
        with open(tmp / "stdout", "wb") as out, open(tmp / "stderr", "wb") as err:
            try:
                proc = subprocess.Popen(
                    cmd, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                    start_new_session=True, preexec_fn=partial(_apply_limits, limits), close_fds=True,
                )
            except (OSError, subprocess.SubprocessError) as e:
                return ExecResult(Status.ERROR, f"could not start: {e}", None,
                                  time.monotonic() - start, network_isolation=method)
            timed_out = False
            try:
                returncode = proc.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(proc.pid)
                returncode = proc.wait()
            finally:
                _kill_group(proc.pid)  # helpers the program left behind
        duration = time.monotonic() - start
        stdout = _tail(tmp / "stdout", limits.output_chars)
        stderr = _tail(tmp / "stderr", limits.output_chars)
        status, reason = _classify(returncode, timed_out, stderr, limits)
        return ExecResult(status, reason, returncode, duration, stdout, stderr, method)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _classify(returncode: int, timed_out: bool, stderr: str, limits: Limits) -> tuple[Status, str]:
    if timed_out:
        return Status.TIMED_OUT, f"wall-clock limit of {limits.timeout_s:g}s exceeded"
    if returncode == 0:
        return Status.PASSED, ""
    if returncode < 0:
        sig = -returncode
        if sig == signal.SIGXCPU:
            return Status.TIMED_OUT, "CPU time limit exceeded"
        if sig == signal.SIGXFSZ:
            return Status.ERROR, f"file size limit of {limits.max_file_mb} MB exceeded"
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        return Status.ERROR, f"killed by signal {name}"
    return Status.FAILED, _last_line(stderr) or f"exit status {returncode}"


def run_programs(
    sources: Sequence[str],
    limits: Limits = Limits(),
    *,
    workers: int | None = None,
    network: str = "auto",
    on_done: Callable[[], None] | None = None,
) -> list[ExecResult]:
    """Run many programs concurrently (threads waiting on processes); results in input order."""
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    network_isolation_method(network)  # probe once, before the threads race to do it

    def one(source: str) -> ExecResult:
        result = run_program(source, limits, network=network)
        if on_done is not None:
            on_done()
        return result

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, sources))
