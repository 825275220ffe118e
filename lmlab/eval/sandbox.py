"""Run untrusted, model-written code isolated by the operating system.

Each program runs under bubblewrap (``bwrap``), which builds the sandbox from
kernel namespaces; nothing here relies on patching Python inside the child.

* New PID, network, IPC, UTS and (where possible) cgroup namespaces. The
  network namespace has only its own loopback device: no TCP, UDP, DNS or
  abstract unix socket reaches the host (127.0.0.1 is the sandbox's own). The PID namespace's init is bwrap;
  when the program's main process exits (or bwrap is killed), the kernel kills
  every process left in the namespace, so ``fork`` + ``setsid``, double forks
  and daemon threads cannot outlive the run.
* A new mount namespace whose root is an empty tmpfs holding, read-only, only
  what the interpreter needs: the system's shared libraries (``/usr/lib*``),
  the Python executable, its standard library and its ``LIBDIR``. There is no
  ``/etc``, no home directory, no project checkout, no shell, no ``/usr/bin``;
  ``/proc`` shows only the sandbox's own processes, ``/dev`` only the harmless
  devices. The only writable place is a private, size-limited tmpfs at
  ``/tmp`` that holds the working directory and disappears with the sandbox.
* The program runs with no capabilities, ``no_new_privs``, in its own terminal
  session, with a cleared environment (``PATH``, ``HOME``/``TMPDIR`` = the
  working directory, a UTF-8 locale) and stdin on ``/dev/null``. As root the
  sandbox drops to an unused user id (one per run, via ``setpriv``), so it owns
  no host file and the process limit applies to it; as any other user the
  sandbox also gets a user namespace with further namespaces disabled.
* ``resource`` limits, set between fork and exec so bwrap and everything it
  starts inherit them: CPU seconds, address space, file size (which also caps
  the captured stdout/stderr), open files, processes/threads, no core dumps.
* A wall-clock timeout. On expiry the whole process group of bwrap is killed
  with ``SIGKILL``; bwrap's ``--die-with-parent`` takes the namespace with it.

Where bwrap is missing or the kernel refuses the namespaces, nothing runs
unless the caller passes ``allow_unsandboxed=True``; then programs run as a
plain limited subprocess (temporary working directory, rlimits, process-group
kill, scrubbed environment) that does NOT contain hostile code.
:func:`sandbox_problem` says why the sandbox is unavailable.

Outcomes: ``passed`` (exit status 0), ``failed`` (the program raised -- a failed
assertion, ``MemoryError`` at the memory limit, an ``OSError`` from something
the sandbox lacks -- or exited non-zero), ``timed_out`` (wall-clock or CPU
limit) and ``error`` (the process was killed by a signal, hit the file-size
limit, or could not be started). Every outcome carries a one-line ``reason``.
"""

from __future__ import annotations

import itertools
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache, partial
from pathlib import Path

from lmlab.errors import ConfigError

BWRAP = "bwrap"
SANDBOXED = "bwrap"
UNSANDBOXED = "none"

# As root the program runs under a user id no host account uses: it owns no file, and the
# kernel counts its processes against RLIMIT_NPROC (uid 0 is exempt from that limit).
_UID_BASE = 0x70000000
_uid_counter = itertools.count()
_uid_lock = threading.Lock()


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
    memory_mb: int = 1024  # address space, per process
    cpu_s: int | None = None  # default: the wall-clock timeout rounded up
    max_file_mb: int = 16  # any file written, stdout/stderr included
    output_chars: int = 4000  # how much of stdout/stderr to keep in the result
    max_processes: int = 16  # processes and threads of the program together
    max_open_files: int = 64
    tmpfs_mb: int = 64  # the sandbox's only writable file system


@dataclass(frozen=True)
class ExecResult:
    """The outcome of one run; ``isolation`` is "bwrap" (sandboxed) or "none"."""

    status: Status
    reason: str
    returncode: int | None
    duration_s: float
    stdout: str = ""
    stderr: str = ""
    isolation: str = ""

    @property
    def passed(self) -> bool:
        """True iff the program exited with status 0 inside the limits."""
        return self.status is Status.PASSED


def _python() -> str:
    # the base interpreter: a virtual environment's python is a link into a tree the sandbox does not show
    exe = getattr(sys, "_base_executable", None) or sys.executable or shutil.which("python3") or "python3"
    return os.path.realpath(exe)


def _read_only_paths() -> list[str]:
    """Host paths the sandbox shows read-only: shared libraries, the interpreter, its standard library."""
    base = {"base": sys.base_prefix, "installed_base": sys.base_prefix,
            "platbase": sys.base_exec_prefix, "installed_platbase": sys.base_exec_prefix}
    stdlib = sysconfig.get_paths(vars=base)  # the base interpreter's, not a virtual environment's
    wanted = ["/usr/lib", "/usr/lib64", "/usr/lib32", "/lib", "/lib64", "/lib32", _python(),
              stdlib["stdlib"], stdlib["platstdlib"], sysconfig.get_config_var("LIBDIR") or ""]
    if os.geteuid() == 0:
        wanted.append(shutil.which("setpriv") or "/usr/bin/setpriv")
    paths: list[str] = []
    for p in wanted:
        if not p or not os.path.lexists(p):
            continue
        p = os.path.abspath(p)
        if not any(p == q or p.startswith(q.rstrip("/") + "/") for q in paths):
            paths.append(p)
    return paths


def _mount_args(paths: Sequence[str]) -> list[str]:
    args: list[str] = []
    made: set[str] = set()

    def ensure_parents(path: str) -> None:
        # bwrap would create missing parents as 0700, which an unprivileged user id cannot traverse
        parts = Path(path).parent.parts[1:]
        for i in range(len(parts)):
            d = "/" + "/".join(parts[: i + 1])
            if d not in made:
                made.add(d)
                args.extend(["--perms", "0755", "--dir", d])

    for p in paths:
        if os.path.islink(p) and os.path.dirname(p) == "/":
            args.extend(["--symlink", os.readlink(p), p])  # merged /usr: /lib -> usr/lib
            continue
        real = os.path.realpath(p)
        ensure_parents(real)
        args.extend(["--ro-bind", real, real])
        made.add(real)
    return args


def _sandbox_command(argv: Sequence[str], work: str, program: Path, env: dict[str, str],
                     limits: Limits) -> tuple[list[str], int | None]:
    """The bwrap command line running ``argv`` in ``work``; and the user id it runs as (root only)."""
    bwrap = shutil.which(BWRAP) or BWRAP
    cmd = [bwrap, "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
           "--die-with-parent", "--new-session", "--hostname", "sandbox", "--clearenv"]
    for key, value in env.items():
        cmd.extend(["--setenv", key, value])
    cmd.extend(_mount_args(_read_only_paths()))
    cmd.extend(["--proc", "/proc", "--dev", "/dev",
                "--perms", "1777", "--size", str(limits.tmpfs_mb * 1024 * 1024), "--tmpfs", "/tmp"])
    parts = Path(work).parts[2:]  # work is /tmp/<name>/work
    for i in range(len(parts)):
        cmd.extend(["--perms", "0777", "--dir", "/tmp/" + "/".join(parts[: i + 1])])
    cmd.extend(["--ro-bind", str(program), f"{work}/program.py", "--chdir", work])
    uid = None
    if os.geteuid() == 0:
        with _uid_lock:
            uid = _UID_BASE + ((os.getpid() & 0xFFFF) << 8) + (next(_uid_counter) & 0xFF)
        cmd.extend(["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--",
                    shutil.which("setpriv") or "/usr/bin/setpriv", f"--reuid={uid}", f"--regid={uid}",
                    "--clear-groups", "--inh-caps=-all", "--bounding-set=-all"])
    else:
        cmd.extend(["--unshare-user", "--disable-userns", "--cap-drop", "ALL", "--"])
    return cmd + list(argv), uid


def _tasks_of(uid: int) -> int:
    """How many processes and threads ``uid`` runs now (RLIMIT_NPROC counts them all)."""
    count = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/status", encoding="ascii", errors="replace") as fh:
                fields = dict(line.split(":", 1) for line in fh if ":" in line)
            if int(fields["Uid"].split()[0]) == uid:
                count += int(fields.get("Threads", "1"))
        except (OSError, KeyError, ValueError):
            continue
    return count


def _apply_limits(limits: Limits, nproc: int | None) -> None:  # runs in the child between fork and exec
    cpu = limits.cpu_s if limits.cpu_s is not None else max(1, math.ceil(limits.timeout_s))
    # soft limit -> SIGXCPU; the hard limit one second later -> SIGKILL
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    memory = limits.memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    size = limits.max_file_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits.max_open_files, limits.max_open_files))
    if nproc is not None:
        resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))


@lru_cache(maxsize=1)
def sandbox_problem() -> str | None:
    """Why the bwrap sandbox cannot run here (None when it can); probed once per process."""
    if not sys.platform.startswith("linux"):
        return f"the sandbox needs Linux namespaces, not {sys.platform}"
    if shutil.which(BWRAP) is None:
        return "bubblewrap (bwrap) is not installed"
    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        return "setpriv (util-linux) is not installed"
    result = _run("print('ok')\n", Limits(timeout_s=20.0), sandboxed=True)
    if result.passed and result.stdout.strip() == "ok":
        return None
    detail = _last_line(result.stderr) or result.reason
    return f"bwrap could not create the sandbox ({detail})"


def sandbox_available() -> bool:
    """Whether programs can run in the bwrap sandbox here."""
    return sandbox_problem() is None


def isolation(allow_unsandboxed: bool = False) -> str:
    """The isolation runs will use: "bwrap", or "none" when permitted; else a one-line ConfigError."""
    problem = sandbox_problem()
    if problem is None:
        return SANDBOXED
    if allow_unsandboxed:
        return UNSANDBOXED
    raise ConfigError(
        "allow_unsandboxed", f"refusing to execute model-written code without a sandbox: {problem}",
        "install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap), or acknowledge running it "
        "unisolated with --allow_unsandboxed (allow_unsandboxed=True in Python)",
    )


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


def run_program(source: str, limits: Limits = Limits(), *, allow_unsandboxed: bool = False) -> ExecResult:
    """Run Python ``source`` in the sandbox and classify the outcome.

    Raises :class:`~lmlab.errors.ConfigError` when the sandbox is unavailable,
    unless ``allow_unsandboxed`` acknowledges running the code without it.
    """
    return _run(source, limits, sandboxed=isolation(allow_unsandboxed) == SANDBOXED)


def _run(source: str, limits: Limits, *, sandboxed: bool) -> ExecResult:
    method = SANDBOXED if sandboxed else UNSANDBOXED
    tmp = Path(tempfile.mkdtemp(prefix="lmlab_sandbox_"))
    start = time.monotonic()
    try:
        program = tmp / "program.py"
        program.write_text(source, encoding="utf-8")
        program.chmod(0o644)
        argv = [_python(), "-I", "-B", "program.py"]
        if sandboxed:
            # the working directory lives in the sandbox's tmpfs; its name is unique per run
            work = f"/tmp/{tmp.name}/work"
            env = {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
            cmd, uid = _sandbox_command(argv, work, program, env, limits)
            nproc = limits.max_processes if uid is not None else _tasks_of(os.getuid()) + limits.max_processes
            cwd: str | Path = tmp
        else:
            work_dir = tmp / "work"
            work_dir.mkdir()
            shutil.copy(program, work_dir / "program.py")
            env = {"PATH": "/usr/bin:/bin", "HOME": str(work_dir), "TMPDIR": str(work_dir),
                   "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
            cmd, nproc, cwd = argv, None, work_dir
        with open(tmp / "stdout", "wb") as out, open(tmp / "stderr", "wb") as err:
            try:
                proc = subprocess.Popen(
                    cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                    start_new_session=True, preexec_fn=partial(_apply_limits, limits, nproc), close_fds=True,
                )
            except (OSError, subprocess.SubprocessError) as e:
                return ExecResult(Status.ERROR, f"could not start: {e}", None, time.monotonic() - start,
                                  isolation=method)
            timed_out = False
            try:
                returncode = proc.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(proc.pid)
                returncode = proc.wait()
            finally:
                _kill_group(proc.pid)  # helpers the program left behind (unsandboxed runs)
        duration = time.monotonic() - start
        stdout = _tail(tmp / "stdout", limits.output_chars)
        stderr = _tail(tmp / "stderr", limits.output_chars)
        status, reason = _classify(returncode, timed_out, stderr, limits, sandboxed)
        return ExecResult(status, reason, returncode, duration, stdout, stderr, method)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _classify(returncode: int, timed_out: bool, stderr: str, limits: Limits,
              sandboxed: bool) -> tuple[Status, str]:
    if timed_out:
        return Status.TIMED_OUT, f"wall-clock limit of {limits.timeout_s:g}s exceeded"
    if returncode == 0:
        return Status.PASSED, ""
    sig = -returncode if returncode < 0 else 0
    if sandboxed and 128 < returncode < 128 + signal.NSIG:
        sig = returncode - 128  # bwrap reports a program killed by signal N as exit status 128 + N
    if sig:
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
    allow_unsandboxed: bool = False,
    on_done: Callable[[], None] | None = None,
) -> list[ExecResult]:
    """Run many programs concurrently (threads waiting on processes); results in input order.

    Refuses (``ConfigError``) before running anything when the sandbox is
    unavailable, unless ``allow_unsandboxed`` is set.
    """
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    sandboxed = isolation(allow_unsandboxed) == SANDBOXED  # probe once, before the threads race to do it

    def one(source: str) -> ExecResult:
        result = _run(source, limits, sandboxed=sandboxed)
        if on_done is not None:
            on_done()
        return result

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, sources))
