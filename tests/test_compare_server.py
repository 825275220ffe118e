"""Pairs, storage, the judging server's API and defences, crash safety, and the CLI's web flow."""

from __future__ import annotations

import http.client
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from functools import partial
from pathlib import Path

import pytest

from lmlab.errors import ConfigError
from lmlab.eval.compare.pairs import build_pairs, load_prompts, pair_id, parse_prompt
from lmlab.eval.compare.report import build_report
from lmlab.eval.compare.server import CompareApp, CompareServer
from lmlab.eval.compare.session import prepare_pairs
from lmlab.eval.compare.store import JudgmentStore
from helpers import free_port

CHOICE_KEYS = ("overall", "helpfulness", "harmlessness", "honesty")


def fake_generators(calls: list | None = None) -> dict:
    def make(name):
        def generate(prompts):
            if calls is not None:
                calls.append((name, list(prompts)))
            return [f"{name} says: {p[::-1]}" for p in prompts]

        return generate

    return {"good": make("good"), "bad": make("bad")}


@pytest.fixture
def prompts():
    return [parse_prompt(f"prompt number {i}?", "t") for i in range(3)]


@pytest.fixture
def served(tmp_path, prompts):
    store = JudgmentStore(tmp_path / "judgments.sqlite")
    pairs = prepare_pairs(store, fake_generators(), prompts, seed=0)
    app = CompareApp(store, pairs, report=partial(build_report, n_bootstrap=50))
    server = CompareServer(app).start()
    yield server, store, pairs
    server.shutdown()
    store.close()


def request(server, method, path, body=None, headers=None):
    """Raw HTTP (no client-side path normalisation): returns (status, parsed JSON or bytes, headers)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        hdrs = {"Content-Type": "application/json"} if body is not None else {}
        hdrs.update(headers or {})
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
        elif isinstance(body, str):
            body = body.encode()
        conn.request(method, path, body=body, headers=hdrs)
        resp = conn.getresponse()
        data = resp.read()
        ctype = resp.getheader("Content-Type", "")
        return resp.status, (json.loads(data) if ctype.startswith("application/json") else data), dict(resp.getheaders())
    finally:
        conn.close()


def judgment(pair_id_, overall="a", **axes):
    body = {"pair_id": pair_id_, "overall": overall, "helpfulness": "a", "harmlessness": "tie", "honesty": "b"}
    body.update(axes)
    return body


def db_rows(store):
    with sqlite3.connect(store.path) as conn:
        return conn.execute("SELECT pair_id, overall, helpfulness, harmlessness, honesty, source FROM judgments ORDER BY id").fetchall()


# --------------------------------------------------------------------------- pairs and store


def test_pairs_sides_are_seeded_and_stable(prompts):
    responses = {m: {p.id: f"{m}-{p.id}" for p in prompts} for m in ("x", "y", "z")}
    pairs = build_pairs(prompts, responses, seed=0)
    assert len(pairs) == 3 * 3  # 3 model pairs x 3 prompts
    assert len({p.pair_id for p in pairs}) == 9
    assert [p.position for p in pairs] == list(range(9))
    for p in pairs:
        assert p.response_a == f"{p.model_a}-{p.prompt_id}" and p.response_b == f"{p.model_b}-{p.prompt_id}"
        assert p.pair_id == pair_id(p.prompt_id, p.model_b, p.model_a)
    # the same seed gives the same sides whatever the order of models and prompts
    again = build_pairs(list(reversed(prompts)), {m: responses[m] for m in ("z", "x", "y")}, seed=0)
    assert {(p.pair_id, p.model_a) for p in again} == {(p.pair_id, p.model_a) for p in pairs}
    # sides are actually drawn: over many prompts both sides occur about equally
    many = [parse_prompt(f"q{i}", "t") for i in range(200)]
    blank = {m: {q.id: "" for q in many} for m in ("x", "y")}
    seed5 = {p.pair_id: p.model_a for p in build_pairs(many, blank, seed=5)}
    assert 70 < Counter(seed5.values())["x"] < 130
    seed6 = {p.pair_id: p.model_a for p in build_pairs(many, blank, seed=6)}
    assert 70 < sum(seed5[k] != seed6[k] for k in seed5) < 130  # another seed redraws about half the sides


def test_load_prompts_formats_and_errors(tmp_path):
    (tmp_path / "p.txt").write_text("first\n\nsecond\n")
    assert [p.text for p in load_prompts(tmp_path / "p.txt")] == ["first", "second"]
    (tmp_path / "p.jsonl").write_text(
        json.dumps({"id": 7, "prompt": "hello"}) + "\n"
        + json.dumps({"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]}) + "\n"
    )
    ps = load_prompts(tmp_path / "p.jsonl")
    assert ps[0].id == "7" and ps[1].messages[0] == ("system", "be brief")
    assert ps[1].text == "System: be brief\n\nUser: hi"
    (tmp_path / "dup.txt").write_text("same\nsame\n")
    for name, content, message in [
        ("dup.txt", None, "repeats prompt id"),
        ("bad.jsonl", '{"prompt": 3}\n', "expected a string"),
        ("end.jsonl", json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}) + "\n", "ends with a assistant turn"),
        ("x.csv", "a\n", "unknown prompt file type"),
        ("empty.txt", "\n", "holds no prompts"),
        ("missing.txt", None, "does not exist"),
    ]:
        if content is not None:
            (tmp_path / name).write_text(content)
        with pytest.raises(ConfigError, match=message):
            load_prompts(tmp_path / name)


def test_prepare_pairs_caches_responses_and_binds_names(tmp_path, prompts):
    calls: list = []
    db = tmp_path / "j.sqlite"
    with JudgmentStore(db) as store:
        first = prepare_pairs(store, fake_generators(calls), prompts[:2], seed=0, sources={"good": "g.ckpt", "bad": "b.ckpt"})
    assert [(n, len(ps)) for n, ps in calls] == [("good", 2), ("bad", 2)]
    calls.clear()
    with JudgmentStore(db) as store:
        second = prepare_pairs(store, fake_generators(calls), prompts, seed=0, sources={"good": "g.ckpt", "bad": "b.ckpt"})
        assert [(n, len(ps)) for n, ps in calls] == [("good", 1), ("bad", 1)]  # only the new prompt is generated
        assert {p.pair_id for p in first} < {p.pair_id for p in second}
        with pytest.raises(ConfigError, match="was generated from"):
            prepare_pairs(store, fake_generators(), prompts, sources={"good": "other.ckpt", "bad": "b.ckpt"})
        with pytest.raises(ConfigError, match="one string per prompt"):
            prepare_pairs(store, {"x": lambda ps: ["only one"], "y": lambda ps: ps}, prompts)
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT COUNT(*) FROM responses").fetchone()[0] == 6


# --------------------------------------------------------------------------- API


def test_next_is_blind_and_judging_is_stored(served):
    server, store, pairs = served
    status, nxt, headers = request(server, "GET", "/api/next")
    assert status == 200 and nxt["done"] is False
    assert nxt["progress"] == {"judged": 0, "total": 3}  # 2 models x 3 prompts
    assert set(nxt["pair"]) == {"pair_id", "prompt", "response_a", "response_b"}
    assert headers["X-Content-Type-Options"] == "nosniff" and "default-src 'self'" in headers["Content-Security-Policy"]
    first = nxt["pair"]["pair_id"]
    assert first == pairs[0].pair_id  # judging order is the shuffled session order
    status, body, _ = request(server, "POST", "/api/judge", judgment(first, "b"))
    assert status == 200 and body == {"ok": True, "progress": {"judged": 1, "total": 3}}
    assert db_rows(store) == [(first, "b", "a", "tie", "b", "web")]
    status, nxt2, _ = request(server, "GET", "/api/next")
    assert nxt2["pair"]["pair_id"] == pairs[1].pair_id
    status, body, _ = request(server, "POST", "/api/judge", judgment(first))
    assert status == 409 and "already judged" in body["error"]
    assert len(db_rows(store)) == 1


def test_results_match_judgments(served):
    server, store, pairs = served
    for p in pairs:  # prefer "good" except on the last pair, which is a tie
        choice = "tie" if p is pairs[-1] else ("a" if p.model_a == "good" else "b")
        assert request(server, "POST", "/api/judge", judgment(p.pair_id, choice))[0] == 200
    status, nxt, _ = request(server, "GET", "/api/next")
    assert nxt == {"done": True, "pair": None, "progress": {"judged": 3, "total": 3}}
    status, res, _ = request(server, "GET", "/api/results")
    assert status == 200 and res["n_judgments"] == 3
    models = {m["model"]: m for m in res["criteria"]["overall"]["models"]}
    assert (models["good"]["wins"], models["good"]["losses"], models["good"]["ties"]) == (2, 0, 1)
    assert models["good"]["win_rate"] == pytest.approx(2.5 / 3)
    assert models["bad"]["win_rate"] == pytest.approx(0.5 / 3)


BAD_POSTS = [
    ("not json", b"{nope", 400, "not valid JSON"),
    ("array", [1, 2], 400, "expected a JSON object"),
    ("deep nesting", b"[" * 8000 + b"]" * 8000, 400, "not valid JSON"),
    ("bad utf-8", b'{"pair_id": "\xff"}', 400, "not valid JSON"),
    ("missing field", {"pair_id": "x", "overall": "a"}, 400, "missing fields"),
    ("unknown field", {**judgment("x"), "model": "good"}, 400, "unknown fields"),
    ("unknown pair", judgment("0000000000000000"), 400, "unknown pair_id"),
    ("pair id not a string", judgment(["x"]), 400, "unknown pair_id"),
]


@pytest.mark.parametrize("name,body,status,message", BAD_POSTS, ids=[b[0] for b in BAD_POSTS])
def test_malformed_posts_are_rejected(served, name, body, status, message):
    server, store, pairs = served
    got, resp, _ = request(server, "POST", "/api/judge", body)
    assert got == status and message in resp["error"]
    assert db_rows(store) == []


def test_wrong_values_types_and_sizes_are_rejected(served):
    server, store, pairs = served
    pid = pairs[0].pair_id
    for field in CHOICE_KEYS:
        for value in ("A", "left", 1, None, ["a"]):
            status, resp, _ = request(server, "POST", "/api/judge", judgment(pid, **{field: value}))
            assert status == 400 and field in resp["error"], (field, value)
    status, resp, _ = request(server, "POST", "/api/judge", judgment(pid), headers={"Content-Type": "text/plain"})
    assert status == 415
    status, resp, _ = request(server, "POST", "/api/judge", {**judgment(pid), "pad": "x" * 20000})
    assert status == 413 and "larger than" in resp["error"]
    # a huge declared length is refused before anything is read
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.putrequest("POST", "/api/judge")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(10**9))
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 413 and "error" in json.loads(resp.read())
    conn.close()
    status, resp, _ = request(server, "POST", "/api/next", judgment(pid))
    assert status == 404
    status, resp, _ = request(server, "PUT", "/api/judge", judgment(pid))
    assert status == 405
    assert db_rows(store) == []
    # and a good judgment still goes through afterwards
    assert request(server, "POST", "/api/judge", judgment(pid))[0] == 200


TRAVERSALS = [
    "/static/../../../../etc/passwd",
    "/static/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "/static/..%2f..%2f..%2fetc%2fpasswd",
    "/../pyproject.toml",
    "//etc/passwd",
    "/static/",
    "/static",
    "/static/app.js/../../server.py",
    "/lmlab/eval/compare/server.py",
    "/favicon.ico",
    "/api/",
]


def test_traversal_and_listing_are_404(served):
    server, _, _ = served
    for path in TRAVERSALS:
        status, body, _ = request(server, "GET", path)
        assert status == 404 and body == {"error": "not found"}, path
    for path, kind in (("/", "text/html"), ("/static/app.js", "text/javascript"), ("/static/style.css", "text/css")):
        status, body, headers = request(server, "GET", path)
        assert status == 200 and headers["Content-Type"].startswith(kind) and len(body) > 100


def test_foreign_host_header_is_refused(served):
    server, _, _ = served
    status, body, _ = request(server, "GET", "/api/next", headers={"Host": "attacker.example:80"})
    assert status == 403
    assert request(server, "GET", "/api/next", headers={"Host": f"localhost:{server.port}"})[0] == 200


# --------------------------------------------------------------------------- crash safety

SERVE_SCRIPT = textwrap.dedent(
    """
    import sys
    from lmlab.eval.compare.server import CompareApp, CompareServer
    from lmlab.eval.compare.store import JudgmentStore
    store = JudgmentStore(sys.argv[1])
    pairs = sorted(store.pairs().values(), key=lambda p: p.position)
    server = CompareServer(CompareApp(store, pairs), port=0)
    print(server.port, flush=True)
    server.serve_forever()
    """
)


def _start_server_process(db: Path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-c", SERVE_SCRIPT, str(db)], stdout=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()
    assert line.strip().isdigit(), f"server did not start: {line!r}"
    return proc, int(line)


class _Port:
    def __init__(self, port):
        self.port = port


def test_judgments_survive_a_killed_server(tmp_path, prompts):
    db = tmp_path / "judgments.sqlite"
    with JudgmentStore(db) as store:
        pairs = prepare_pairs(store, fake_generators(), prompts, seed=0)
    proc, port = _start_server_process(db)
    try:
        judged = []
        for _ in range(2):
            _, nxt, _ = request(_Port(port), "GET", "/api/next")
            pid = nxt["pair"]["pair_id"]
            assert request(_Port(port), "POST", "/api/judge", judgment(pid, "tie"))[0] == 200
            judged.append(pid)
    finally:
        proc.send_signal(signal.SIGKILL)  # no chance to flush or clean up
        proc.wait(timeout=10)
    proc, port = _start_server_process(db)
    try:
        _, nxt, _ = request(_Port(port), "GET", "/api/next")
        assert nxt["progress"] == {"judged": 2, "total": len(pairs)}
        seen = []
        while not nxt["done"]:
            pid = nxt["pair"]["pair_id"]
            assert pid not in judged and pid not in seen  # judged pairs are never served again
            seen.append(pid)
            assert request(_Port(port), "POST", "/api/judge", judgment(pid))[0] == 200
            _, nxt, _ = request(_Port(port), "GET", "/api/next")
        assert sorted(judged + seen) == sorted(p.pair_id for p in pairs)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    with JudgmentStore(db) as store:
        assert [j.overall for j in store.judgments("web")] == ["tie", "tie"] + ["a"] * (len(pairs) - 2)


# --------------------------------------------------------------------------- the command


class FakeLM:
    """Stands in for the checkpoint adapter: answers by checkpoint name, overshooting a stop string."""

    seen: list = []

    def __init__(self, path):
        self.path = path

    def generate(self, prompts, max_new_tokens, stop):
        FakeLM.seen.append((self.path, list(prompts), max_new_tokens, list(stop)))
        return [f"{Path(self.path).stem} answer {i}<|end|>junk" for i, _ in enumerate(prompts)]


def _wait_up(port: int, thread: threading.Thread) -> None:
    # generous: rendering the chat prompt imports lmlab.data, which loads Lightning (slow on a busy machine)
    for _ in range(2400):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/next", timeout=1).read()
            return
        except (urllib.error.URLError, ConnectionError):
            assert thread.is_alive(), "the command ended before serving"
            time.sleep(0.05)
    raise AssertionError("server did not come up")


def test_cli_web_flow_and_resume(tmp_path, monkeypatch, capsys):
    from lmlab.eval import compare_cli

    FakeLM.seen = []
    monkeypatch.setattr(compare_cli.CheckpointGenerator, "_load", lambda self: FakeLM(self.path))
    monkeypatch.setattr(compare_cli, "DONE_GRACE_S", 0.05)
    (tmp_path / "prompts.txt").write_text("what is 2+2?\nname a colour\n")
    db = tmp_path / "run" / "judgments.sqlite"
    port = free_port()
    argv = ["--a", "sft=ckpts/sft.ckpt", "--b", "ckpts/base.ckpt", "--model", "rl=ckpts/rl.ckpt", "--prompts", str(tmp_path / "prompts.txt"),
            "--db", str(db), "--port", str(port), "--bootstrap", "30", "--max_new_tokens", "16"]
    rc = []
    thread = threading.Thread(target=lambda: rc.append(compare_cli.main(argv)))
    thread.start()
    try:
        _wait_up(port, thread)
        server = _Port(port)
        while True:
            _, nxt, _ = request(server, "GET", "/api/next")
            if nxt["done"]:
                break
            pair = nxt["pair"]
            assert pair["response_a"].endswith(tuple(f"answer {i}" for i in range(2)))  # cut at <|end|>
            choice = "a" if pair["response_a"].startswith("sft") else "b" if pair["response_b"].startswith("sft") else "tie"
            assert request(server, "POST", "/api/judge", judgment(pair["pair_id"], choice))[0] == 200
    finally:
        thread.join(timeout=30)
    assert rc == [0]  # the command stops by itself once every pair is judged
    assert len(FakeLM.seen) == 3 and all(n == 16 for _, _, n, _ in FakeLM.seen)
    assert all(p.startswith("<|bos|><|user|>\n") and p.endswith("<|assistant|>\n") for _, ps, _, _ in FakeLM.seen for p in ps)
    res = json.loads((db.parent / "results.json").read_text())
    assert res["models"] == ["sft", "b", "rl"] and res["progress"] == {"judged": 6, "total": 6}
    rows = {m["model"]: m for m in res["criteria"]["overall"]["models"]}
    assert (rows["sft"]["wins"], rows["sft"]["games"]) == (4, 4)
    assert rows["b"]["ties"] == rows["rl"]["ties"] == 2
    assert (db.parent / "ratings.png").stat().st_size > 0
    assert "judge 6 of 6 pairs at http://127.0.0.1:" in capsys.readouterr().out

    # resuming a finished comparison serves nothing, generates nothing, and reports again
    FakeLM.seen = []
    assert compare_cli.main(argv) == 0
    assert FakeLM.seen == [] and "already judged" in capsys.readouterr().out
    # a name bound to another checkpoint is refused
    bad = list(argv)
    bad[bad.index("sft=ckpts/sft.ckpt")] = "sft=ckpts/other.ckpt"
    assert compare_cli.main(bad) == 2
    assert "was generated from" in capsys.readouterr().err


def test_cli_reward_model_judge(tmp_path, monkeypatch):
    from lmlab.eval import compare_cli
    from lmlab.eval.compare import judges

    monkeypatch.setattr(compare_cli.CheckpointGenerator, "_load", lambda self: FakeLM(self.path))
    loaded = []

    def fake_loader(path, tokenizer, device=None):
        loaded.append(path)
        return lambda prompt, response: 1.0 if response.startswith("long") else 0.0

    monkeypatch.setattr(judges, "load_reward_scorer", fake_loader)
    (tmp_path / "prompts.txt").write_text("a\nb\nc\n")
    argv = ["--a", "ckpts/long.ckpt", "--b", "ckpts/short.ckpt", "--prompts", str(tmp_path / "prompts.txt"), "--judge", "reward-model",
            "--reward_model", "rm.ckpt", "--db", str(tmp_path / "j.sqlite"), "--out", str(tmp_path / "out"), "--bootstrap", "20"]
    assert compare_cli.main(argv) == 0
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    rows = {m["model"]: m for m in res["criteria"]["overall"]["models"]}
    assert rows["a"]["wins"] == 3 and rows["b"]["losses"] == 3 and res["judge"] == "reward-model"
    assert res["criteria"]["helpfulness"] is None
    assert compare_cli.main(argv) == 0 and loaded == ["rm.ckpt"]  # second run: all judged, the reward model is not loaded
