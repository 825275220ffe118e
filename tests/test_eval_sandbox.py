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
    from lmlab.eval.fakes import FunctionModel
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
