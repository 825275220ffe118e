"""The code sandbox: correct code passes, and wrong, hanging, greedy, nosy or hostile code does not.

The adversarial suite at the end runs attack programs and checks the host side: no file appeared
outside the sandbox, no process survived, no connection or datagram arrived at the test's listeners.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lmlab.errors import ConfigError
from lmlab.eval import sandbox
from lmlab.eval.sandbox import Limits, Status, isolation, run_program, run_programs, sandbox_problem

FAST = Limits(timeout_s=2.0, memory_mb=512)

needs_sandbox = pytest.mark.skipif(sandbox_problem() is not None, reason=f"no sandbox: {sandbox_problem()}")


@needs_sandbox
def test_correct_solution_passes_and_wrong_one_fails():
    ok = run_program("def add(a, b):\n    return a + b\nassert add(2, 3) == 5\nprint('done')", FAST)
    assert ok.status is Status.PASSED and ok.passed and ok.stdout.strip() == "done"
    bad = run_program("def add(a, b):\n    return a * b\nassert add(2, 3) == 5", FAST)
    assert bad.status is Status.FAILED and not bad.passed
    assert "AssertionError" in bad.reason
    assert run_program("raise SystemExit(3)", FAST).reason == "exit status 3"


@needs_sandbox
def test_infinite_loop_times_out_within_the_limit():
    start = time.monotonic()
    result = run_program("while True:\n    pass", Limits(timeout_s=1.0))
    elapsed = time.monotonic() - start
    assert result.status is Status.TIMED_OUT
    assert elapsed < 1.0 + 2.0  # killed promptly, not left running


@needs_sandbox
def test_sleeping_program_is_stopped_by_the_wall_clock():
    # uses no CPU, so only the wall-clock timeout (process-group kill) can stop it
    result = run_program("import time\ntime.sleep(60)", Limits(timeout_s=0.5))
    assert result.status is Status.TIMED_OUT and "wall-clock" in result.reason
    assert result.duration_s < 3.0


@needs_sandbox
def test_memory_bomb_is_stopped():
    bomb = "blocks = []\nwhile True:\n    blocks.append(bytearray(64 * 1024 * 1024))"
    result = run_program(bomb, Limits(timeout_s=10.0, memory_mb=256))
    assert result.status in (Status.FAILED, Status.ERROR)
    assert "MemoryError" in result.reason or "signal" in result.reason
    assert result.duration_s < 10.0  # stopped by the memory limit, not the clock


@pytest.fixture
def local_server():
    """A TCP listener in the test process; reachable from an unsandboxed child."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(5)
    stop = threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
                conn.close()
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    server.close()


@needs_sandbox
def test_socket_connect_is_blocked(local_server):
    program = (
        "import socket\n"
        f"s = socket.create_connection(('127.0.0.1', {local_server}), timeout=2)\n"
        "print('connected')\n"
    )
    # control: outside the sandbox the same program connects, so the test can fail
    control = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=20)
    assert control.returncode == 0 and "connected" in control.stdout
    result = run_program(program, FAST)
    assert result.status is Status.FAILED and "connected" not in result.stdout
    assert result.isolation == "bwrap"
    # the sandbox's 127.0.0.1 is its own, empty loopback: refused by the kernel, not by a Python guard
    assert "ConnectionRefusedError" in result.reason


@needs_sandbox
def test_reading_files_outside_the_temp_dir_is_blocked():
    assert Path("/etc/passwd").read_text()  # readable to us, so the block is the sandbox's doing
    for program in (
        "print(open('/etc/passwd').read())",
        "import os\nprint(open(os.path.join('..', '..', '..', '..', '..', 'etc', 'passwd')).read())",
        "import pathlib\nprint(pathlib.Path('/etc/passwd').read_text())",
        "import os\nfd = os.open('/etc/passwd', os.O_RDONLY)\nprint(os.read(fd, 100))",
        "import os\nos.chdir('/etc')",
    ):
        result = run_program(program, FAST)
        assert result.status is Status.FAILED, program
        # the host's files are not in the sandbox's file system at all
        assert "FileNotFoundError" in result.reason and "root:" not in result.stdout


@needs_sandbox
def test_working_directory_is_private_and_writable():
    program = (
        "import os\n"
        "open('scratch.txt', 'w').write('hi')\n"
        "assert open('scratch.txt').read() == 'hi'\n"
        "print(os.getcwd())\n"
    )
    first, second = run_program(program, FAST), run_program(program, FAST)
    assert first.passed and second.passed
    assert first.stdout != second.stdout  # a fresh temp dir each time
    assert not Path(first.stdout.strip()).exists()  # and removed afterwards


@needs_sandbox
def test_environment_is_scrubbed_and_stdin_closed(monkeypatch):
    monkeypatch.setenv("LMLAB_SANDBOX_SECRET", "hunter2")
    program = (
        "import os, sys\n"
        "assert 'LMLAB_SANDBOX_SECRET' not in os.environ, 'leaked'\n"
        "assert sys.stdin.read() == ''\n"
    )
    assert run_program(program, FAST).passed


@needs_sandbox
def test_host_programs_cannot_be_started():
    assert Path("/usr/bin/true").exists() or Path("/bin/true").exists()  # there for us, absent in the sandbox
    result = run_program("import subprocess\nsubprocess.run(['true'])", FAST)
    assert result.status is Status.FAILED and "FileNotFoundError" in result.reason


@needs_sandbox
def test_run_programs_keeps_order_and_isolates_failures():
    sources = ["print(1)", "while True: pass", "assert False", "print(4)"]
    results = run_programs(sources, Limits(timeout_s=1.5), workers=2)
    assert [r.status for r in results] == [Status.PASSED, Status.TIMED_OUT, Status.FAILED, Status.PASSED]
    assert results[3].stdout.strip() == "4"


def test_isolation_reports_what_is_used():
    if sandbox_problem() is None:
        assert isolation() == "bwrap" and isolation(allow_unsandboxed=True) == "bwrap"
    else:
        assert isolation(allow_unsandboxed=True) == "none"


@pytest.fixture
def no_sandbox(monkeypatch):
    """Pretend bubblewrap is missing."""
    monkeypatch.setattr(sandbox, "sandbox_problem", lambda: "bubblewrap (bwrap) is not installed")


def test_without_a_sandbox_nothing_runs_unless_acknowledged(no_sandbox, tmp_path):
    canary = tmp_path / "ran"
    program = f"open({str(canary)!r}, 'w').write('x')"
    with pytest.raises(ConfigError) as err:
        run_program(program, FAST)
    message = str(err.value)
    assert message.startswith("allow_unsandboxed: refusing to execute model-written code without a sandbox")
    assert "bwrap" in message and "\n" not in message
    with pytest.raises(ConfigError):
        run_programs([program], FAST)
    assert not canary.exists()  # refused before anything ran
    result = run_program(program, FAST, allow_unsandboxed=True)
    assert result.passed and result.isolation == "none" and canary.read_text() == "x"


def test_evaluate_refuses_code_tasks_before_model_work(no_sandbox, tmp_path):
    from fakes import FunctionModel
    from lmlab.eval.harness import evaluate

    calls = []
    spec = tmp_path / "toy_code.yaml"
    spec.write_text(json.dumps({  # JSON is YAML
        "name": "toy_code", "type": "code", "data": {"path": "rows.jsonl"}, "doc_to_text": "{prompt}",
        "answer": "test", "target_delimiter": "", "generation": {"max_new_tokens": 16, "stop": []},
        "code": {"program": "{prompt}{completion}\n{test}\n", "timeout_s": 2.0, "memory_mb": 256, "num_samples": 1},
        "metrics": ["pass@1"],
    }))
    (tmp_path / "rows.jsonl").write_text('{"prompt": "x = ", "test": "assert x == 1"}\n')
    model = FunctionModel(generate_fn=lambda prompt: calls.append(prompt) or "1")
    with pytest.raises(ConfigError, match="^allow_unsandboxed: refusing"):
        evaluate(model, [str(spec)], data_dir=tmp_path, progress=False)
    assert calls == []  # refused before the model generated anything
    out = evaluate(model, [str(spec)], data_dir=tmp_path, progress=False, allow_unsandboxed=True)
    assert out["results"]["toy_code"]["pass@1"] == 1.0 and out["config"]["allow_unsandboxed"] is True


# --- adversarial suite ---------------------------------------------------------------------------
# Each attack is a program a hostile completion could be. All run once (concurrently, as pass@k runs
# them); then, after a delay long enough for left-behind helpers to act, each test checks the host.

ATTACK_LIMITS = Limits(timeout_s=2.0, memory_mb=256, max_file_mb=1, tmpfs_mb=8, output_chars=2000)
SECRET = "lmlab-attack-secret-7f3a"

# every process of an attack carries its marker on its command line, so survivors can be found in /proc
_REEXEC = """import os, sys
if sys.argv[-1] != MARKER:
    os.execv(sys.executable, [sys.executable, "-I", "-B", "program.py", MARKER])
"""

_WRITE = """
wrote = []
for t in TARGETS:
    try:
        {write}
        wrote.append(t)
    except OSError as e:
        print("blocked", type(e).__name__)
assert wrote, "no write got out"
"""

ATTACKS: dict[str, tuple[str, str | None]] = {  # name -> (program body, substring expected in the reason)
    "fork_setsid": ("""import time
if os.fork() == 0:
    os.setsid()
    time.sleep(0.5)
    for t in TARGETS:
        try:
            open(t, "w").write("escaped")
        except OSError:
            pass
    time.sleep(30)
    os._exit(0)
raise SystemExit("parent returns while its child lives on")""", "parent returns"),
    "double_fork": ("""import time
pid = os.fork()
if pid == 0:
    if os.fork() == 0:
        os.setsid()
        time.sleep(30)
    os._exit(0)
os.waitpid(pid, 0)
raise SystemExit("the grandchild is orphaned")""", "orphaned"),
    "lingering_threads": ("""import threading, time
def linger():
    while True:
        time.sleep(0.1)
        for t in TARGETS:
            try:
                open(t, "w").write("escaped")
            except OSError:
                pass
threading.Thread(target=linger, daemon=True).start()
threading.Thread(target=linger).start()
raise SystemExit("main thread done")""", "wall-clock"),
    "write_open": (_WRITE.format(write='open(t, "w").write("x")'), "no write got out"),
    "write_io_fileio": ("import io" + _WRITE.format(write='io.FileIO(t, "w").write(b"x")'), "no write got out"),
    "write__io_fileio": ("import _io" + _WRITE.format(write='_io.FileIO(t, "w").write(b"x")'), "no write got out"),
    "write_posix_open": ("import posix" + _WRITE.format(
        write="posix.write(posix.open(t, posix.O_WRONLY | posix.O_CREAT, 0o644), b'x')"), "no write got out"),
    "write_os_open": (_WRITE.format(write="os.write(os.open(t, os.O_WRONLY | os.O_CREAT, 0o644), b'x')"),
                      "no write got out"),
    "write_pathlib": ("import pathlib" + _WRITE.format(write='pathlib.Path(t).write_text("x")'), "no write got out"),
    "write_shutil": ("import shutil" + _WRITE.format(write='shutil.copyfile("program.py", t)'), "no write got out"),
    "write_os_system": (_WRITE.format(write='assert os.system(f"echo x > {t}") == 0, "shell failed"'),
                        "shell failed"),
    "write_posix_system": ("import posix" + _WRITE.format(
        write='assert posix.system(f"echo x > {t}") == 0, "shell failed"'), "shell failed"),
    "write_subprocess": ("import subprocess" + _WRITE.format(
        write='subprocess.run(["/bin/sh", "-c", f"echo x > {t}"], check=True)'), "no write got out"),
    "write_python_subprocess": ("import subprocess" + _WRITE.format(
        write='subprocess.run([sys.executable, "-c", f"open({t!r}, \'w\')"], check=True)'), "CalledProcessError"),
    "ctypes_libc": ("""import ctypes
libc = ctypes.CDLL(None, use_errno=True)
libc.system(b"id > /tmp/x")
for t in TARGETS:
    fd = libc.open(t.encode(), 0o101, 0o644)  # O_WRONLY | O_CREAT
    if fd >= 0:
        libc.write(fd, b"x", 1)
assert all(libc.open(t.encode(), 0) < 0 for t in TARGETS), "a host file was created"
raise SystemExit("libc calls stayed inside")""", "stayed inside"),
    "ctypes_remount": ("""import ctypes
libc = ctypes.CDLL(None, use_errno=True)
libc.unshare(0x10000000 | 0x00020000)  # a user and mount namespace of its own, where allowed
for lib in (os.path.dirname(os.__file__), os.path.dirname(os.path.dirname(os.__file__))):
    rc = libc.mount(None, lib.encode(), None, 32 | 4096, None)  # MS_REMOUNT | MS_BIND, without MS_RDONLY
    errno = ctypes.get_errno()
for t in TARGETS:
    try:
        open(t, "w").write("escaped")
    except OSError:
        pass
assert rc == 0, "remount refused: errno %d" % errno
""", "remount refused"),
    "read_etc_passwd": ("print(open('/etc/passwd').read())", "FileNotFoundError"),
    "read_project": ("print(open(PROJECT + '/pyproject.toml').read())", "FileNotFoundError"),
    "read_home": ("""leaked = []
for name in HOME_FILES:
    try:
        leaked.append(open(name).read()[:40])
    except OSError:
        pass
print("LEAK", leaked, os.listdir(HOME) if os.path.isdir(HOME) else None)
assert leaked, "nothing read"
""", "nothing read"),
    "read_secret_env": ("""seen = repr(dict(os.environ))
for p in ("/proc/self/environ", "/proc/1/environ", f"/proc/{HOST_PID}/environ", f"/proc/{os.getppid()}/environ"):
    try:
        seen += open(p, "rb").read().decode(errors="replace")
    except OSError:
        pass
print(seen)
assert SECRET in seen, "secret not visible"
""", "secret not visible"),
    "tcp_loopback": ("""import socket
s = socket.create_connection(("127.0.0.1", TCP_PORT), timeout=1)
s.sendall(NAME.encode())""", "ConnectionRefusedError"),
    "tcp_socket_mro": ("""import socket
raw = socket.socket.__mro__[1]  # _socket.socket, under any Python-level wrapper
s = raw(socket.AF_INET, socket.SOCK_STREAM)
s.connect(("127.0.0.1", TCP_PORT))
s.send(NAME.encode())""", "ConnectionRefusedError"),
    "tcp_external": ("""import socket
socket.create_connection(("1.1.1.1", 53), timeout=1)""", "Network is unreachable"),
    "udp_loopback": ("""import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(0.5)
s.sendto(NAME.encode(), ("127.0.0.1", UDP_PORT))
print(s.recvfrom(100))""", "TimeoutError"),
    "dns_lookup": ("""import socket
print(socket.getaddrinfo("example.com", 80))""", "gaierror"),
    "unix_socket": ("""import socket
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(UNIX_PATH)
s.send(NAME.encode())""", "FileNotFoundError"),
    "unix_abstract": ("""import socket
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(ABSTRACT)
s.send(NAME.encode())""", "ConnectionRefusedError"),
    "raw_packet_socket": ("""import socket
socket.socket(socket.AF_PACKET, socket.SOCK_RAW)""", "PermissionError"),
    "fork_bomb": ("""while True:
    os.fork()""", "BlockingIOError"),
    "memory_exhaustion": ("""blocks = []
while True:
    blocks.append(bytearray(32 * 1024 * 1024))""", "MemoryError"),
    "disk_exhaustion": ("""i = 0
while True:
    with open(f"fill{i}", "wb") as fh:
        fh.write(b"x" * (512 * 1024))
    i += 1""", "No space left on device"),
    "output_flood": ("""while True:
    sys.stdout.write("x" * 65536)""", "File too large"),
    "ignore_sigterm": ("""import signal, time
for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
    signal.signal(sig, signal.SIG_IGN)
time.sleep(60)""", "wall-clock"),
    # targeted kills only: kill(-1) would, were the PID namespace ever lost, take down every process of the host
    "kill_parent": ("""import signal
for pid in (os.getppid(), 1, HOST_PID, VICTIM_PID):
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError as e:
        print(pid, type(e).__name__)
raise SystemExit("still here")""", "still here"),
}


class _Listeners:
    """TCP, UDP, unix and abstract-unix listeners on the host that record whatever reaches them."""

    def __init__(self, unix_path: Path):
        self.received: list[bytes] = []
        self.stop = threading.Event()
        self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.tcp.bind(("127.0.0.1", 0))
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.unix.bind(str(unix_path))
        self.abstract_name = f"\0lmlab-attack-{os.getpid()}-{time.monotonic_ns()}"
        self.abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.abstract.bind(self.abstract_name)
        self.threads = [threading.Thread(target=self._accept, args=(s,), daemon=True)
                        for s in (self.tcp, self.unix, self.abstract)]
        self.threads.append(threading.Thread(target=self._datagrams, daemon=True))
        for s in (self.tcp, self.unix, self.abstract):
            s.listen(16)
            s.settimeout(0.1)
        self.udp.settimeout(0.1)
        for t in self.threads:
            t.start()

    def _accept(self, server: socket.socket) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            conn.settimeout(1.0)
            try:
                self.received.append(b"connection:" + conn.recv(100))
            except OSError:
                self.received.append(b"connection:")
            conn.close()

    def _datagrams(self) -> None:
        while not self.stop.is_set():
            try:
                data, addr = self.udp.recvfrom(100)
            except OSError:
                continue
            self.received.append(b"datagram:" + data)
            self.udp.sendto(b"ack", addr)

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()
        for s in (self.tcp, self.udp, self.unix, self.abstract):
            s.close()


def _survivors(marker: str) -> list[int]:
    """Host processes whose command line carries ``marker``."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/cmdline", "rb") as fh:
                    if marker.encode() in fh.read():
                        found.append(int(entry.name))
            except OSError:
                continue
    return found


@pytest.fixture(scope="module")
def attack_run(tmp_path_factory, repo_root):
    """Run every attack once; return what the evaluator reported and what the host observed."""
    if sandbox_problem() is not None:
        pytest.skip(f"no sandbox: {sandbox_problem()}")
    base = tmp_path_factory.mktemp("attacks")
    canaries, home = base / "canaries", Path.home()
    canaries.mkdir()
    listeners = _Listeners(base / "host.sock")
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    stdlib = Path(os.__file__).parent
    run_id = f"{os.getpid()}-{time.monotonic_ns()}"
    targets, markers, sources = {}, {}, []
    for name, (body, _) in ATTACKS.items():
        markers[name] = f"lmlab-attack-{name}-{run_id}"
        targets[name] = [str(canaries / name), str(repo_root / f".lmlab_canary_{name}"),
                         str(home / f".lmlab_canary_{name}"), str(stdlib / f"lmlab_canary_{name}")]
        constants = {
            "MARKER": markers[name], "NAME": name, "TARGETS": targets[name], "PROJECT": str(repo_root),
            "HOME": str(home), "HOME_FILES": [str(p) for p in sorted(home.iterdir()) if p.is_file()][:20],
            "HOST_PID": os.getpid(), "VICTIM_PID": victim.pid, "SECRET": SECRET,
            "TCP_PORT": listeners.tcp.getsockname()[1], "UDP_PORT": listeners.udp.getsockname()[1],
            "UNIX_PATH": str(base / "host.sock"), "ABSTRACT": listeners.abstract_name,
        }
        header = "".join(f"{k} = {v!r}\n" for k, v in constants.items())
        sources.append(header + _REEXEC + body + "\n")
    old_secret = os.environ.get("LMLAB_SANDBOX_SECRET")
    os.environ["LMLAB_SANDBOX_SECRET"] = SECRET  # in the evaluator's environment, to be hidden from the child
    start = time.monotonic()
    try:
        results = run_programs(sources, ATTACK_LIMITS, workers=4)
        elapsed = time.monotonic() - start
        time.sleep(1.0)  # long enough for a surviving helper to write its canary
        survivors = {name: _survivors(m) for name, m in markers.items()}
        created = {name: [t for t in ts if Path(t).exists()] for name, ts in targets.items()}
        victim_alive = victim.poll() is None
        received = list(listeners.received)
    finally:
        if old_secret is None:
            os.environ.pop("LMLAB_SANDBOX_SECRET", None)
        else:
            os.environ["LMLAB_SANDBOX_SECRET"] = old_secret
        listeners.close()
        victim.kill()
        victim.wait()
        for ts in targets.values():  # only there if the sandbox failed; do not leave them behind
            for t in ts:
                Path(t).unlink(missing_ok=True)
    yield {"results": dict(zip(ATTACKS, results)), "elapsed": elapsed, "survivors": survivors,
           "created": created, "victim_alive": victim_alive, "received": received}
    for pids in survivors.values():
        for pid in pids:
            try:
                os.kill(pid, 9)
            except OSError:
                pass


@pytest.mark.parametrize("name", list(ATTACKS))
def test_attack_is_contained(attack_run, name):
    result = attack_run["results"][name]
    assert result.isolation == "bwrap"
    # a failure record, not a pass (and not an evaluator crash: run_programs returned it)
    assert result.status is not Status.PASSED, (name, result)
    expected = ATTACKS[name][1]
    if expected is not None:
        assert expected in result.reason, (name, result.reason, result.stderr[-500:])
    assert attack_run["created"][name] == []  # no file outside the sandbox
    assert attack_run["survivors"][name] == []  # no process outlived the run
    assert not [r for r in attack_run["received"] if name.encode() in r]  # nothing reached the listeners
    assert SECRET not in result.stdout + result.stderr
    assert "root:x:0:0" not in result.stdout + result.stderr
    assert len(result.stdout) <= ATTACK_LIMITS.output_chars and len(result.stderr) <= ATTACK_LIMITS.output_chars


def test_attacks_reached_no_host_service_or_process(attack_run):
    assert attack_run["received"] == []  # not one connection or datagram at any listener
    assert attack_run["victim_alive"]  # a host process the attacks tried to kill
    assert len(ATTACKS) >= 20
    assert attack_run["elapsed"] < 40  # fork bombs, floods and hangs are cut short


def test_attacks_that_hang_are_cut_at_the_wall_clock(attack_run):
    for name in ("lingering_threads", "ignore_sigterm"):
        result = attack_run["results"][name]
        assert result.status is Status.TIMED_OUT
        assert result.duration_s < ATTACK_LIMITS.timeout_s + 2.0
    bomb = attack_run["results"]["fork_bomb"]
    assert bomb.status is not Status.PASSED and bomb.duration_s < ATTACK_LIMITS.timeout_s + 2.0
