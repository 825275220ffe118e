"""``lmlab serve`` and ``lmlab chat`` on a tiny model: the official ``openai`` client against a live server.

Greedy outputs must equal :func:`lmlab.models.generation.generate` on the same
prompt, one at a time, including when many clients are batched together.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import web_texts, write_corpus

openai = pytest.importorskip("openai", reason="the openai client is not installed (pip install -e .[dev])")
pytest.importorskip("fastapi", reason="fastapi is not installed (pip install -e .[serve])")
pytest.importorskip("uvicorn", reason="uvicorn is not installed (pip install -e .[serve])")

from lmlab.models import CausalLM, TransformerConfig  # noqa: E402
from lmlab.models.generation import generate  # noqa: E402
from lmlab.serving.engine import GenerationRequest, SamplingParams  # noqa: E402
from lmlab.serving.server import ServerThread, build_service, create_app  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODEL = dict(vocab_size=320, d_model=32, n_layers=2, n_heads=4, max_seq_len=128, tie_embeddings=True)


def write_model(root: Path, max_seq_len: int = 128) -> Path:
    """An lmlab export directory: a BPE tokenizer (with lmlab's chat template) and a random model whose
    weights are scaled up so greedy choices are not near ties."""
    from safetensors.torch import save_file

    from lmlab.data.tokenizer import train_bpe

    corpus = write_corpus(root / "corpus")
    out = root / "model"
    train_bpe(web_texts(corpus), 320, out)
    torch.manual_seed(0)
    cfg = TransformerConfig(**{**MODEL, "max_seq_len": max_seq_len})
    model = CausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    save_file({k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}, str(out / "model.safetensors"))
    (out / "lmlab_config.json").write_text(json.dumps({**cfg.to_dict(), "preset": None}))
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def server(model_dir):
    service = build_service(str(model_dir), device="cpu", model_name="tiny", max_batch=8, max_queue=256,
                            max_tokens_limit=100, max_body_bytes=20_000)
    srv = ServerThread(create_app(service)).start()
    yield srv, service
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0].url + "/v1", api_key="unused", max_retries=0, timeout=60)


def reference(service, ids: list[int], max_tokens: int, chat: bool) -> tuple[str, int]:
    """(text, generated token count) of lmlab's own generate on this prompt alone, greedy."""
    out = generate(service.engine.model, torch.tensor([ids]), max_new_tokens=max_tokens, temperature=0,
                   stop_token_ids=service.prompter.stop_ids(chat))
    tokens = out.responses[0][out.response_mask[0].bool()].tolist()
    stops = set(service.prompter.stop_ids(chat))
    text_ids = tokens[:-1] if tokens and tokens[-1] in stops else tokens
    return service.engine.tokenizer.decode(text_ids, skip_special_tokens=True), len(tokens)


PROMPTS = ["the cat sat", "a bird sang over the old tree near quiet water", "fish", "the dog ran in the park and"]


def test_models_and_greedy_completions_equal_generate(client, server):
    _, service = server
    assert [m.id for m in client.models.list().data] == ["tiny"]
    for prompt in PROMPTS:
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=20, temperature=0)
        ids = service.prompter.completion_ids(prompt)
        text, n = reference(service, ids, 20, chat=False)
        assert r.choices[0].text == text
        assert r.choices[0].finish_reason in ("length", "stop")
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), n)
    # a list of prompts and n choices: one choice per (prompt, n), indexed in order
    r = client.completions.create(model="tiny", prompt=PROMPTS[:2], max_tokens=6, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text == reference(service, service.prompter.completion_ids(PROMPTS[0]), 6, False)[0]


def test_chat_greedy_equals_generate_and_stream_equals_whole(client, server):
    _, service = server
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat sat on"}]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=24, temperature=0)
    ids = service.prompter.chat_ids(messages)
    text, n = reference(service, ids, 24, chat=True)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == text
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), n, len(ids) + n)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(deltas) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == n
    # completions stream too
    parts = [c.choices[0].text for c in client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=15,
                                                                  temperature=0, stream=True)]
    assert "".join(parts) == reference(service, service.prompter.completion_ids(PROMPTS[1]), 15, False)[0]


def test_sampling_seed_top_p_and_stop(client, server):
    _, service = server
    kw = dict(model="tiny", prompt="the cat", max_tokens=20, temperature=1.0, top_p=0.9)
    a, b = (client.completions.create(seed=7, **kw).choices[0].text for _ in range(2))
    assert a == b  # the same seed gives the same sample
    others = {client.completions.create(seed=s, **kw).choices[0].text for s in range(8, 12)}
    assert len(others | {a}) > 1
    # a stop string ends the text before it
    full = client.completions.create(model="tiny", prompt="the cat", max_tokens=20, temperature=0).choices[0].text
    assert client.completions.create(model="tiny", prompt="the cat", max_tokens=20, temperature=1.0, top_p=0).choices[0].text == full
    stop = full[5:7]
    cut = client.completions.create(model="tiny", prompt="the cat", max_tokens=20, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.find(stop)] and cut.choices[0].finish_reason == "stop"


def test_concurrent_clients_get_their_own_greedy_outputs(client, server):
    _, service = server
    prompts = [" ".join(["the cat sat on a mat"] * (1 + i % 5)) + f" {i}" for i in range(16)]
    lengths = [5 + (7 * i) % 30 for i in range(16)]  # sequences finish at different steps: rows leave and join
    service.engine.max_rows_seen = 0

    def ask(i):
        return client.completions.create(model="tiny", prompt=prompts[i], max_tokens=lengths[i], temperature=0).choices[0].text

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(ask, range(16)))
    for i in range(16):
        assert got[i] == reference(service, service.prompter.completion_ids(prompts[i]), lengths[i], False)[0], i
    assert service.engine.max_rows_seen > 1  # the clients were decoded together
    assert not service.engine.rows and not service.engine.waiting


def test_load_64_requests_from_16_clients(client, server):
    _, service = server
    failures, lengths = [], []

    def worker(k):
        for j in range(4):
            try:
                r = client.chat.completions.create(model="tiny", max_tokens=12, temperature=0.8, seed=k * 4 + j,
                                                   messages=[{"role": "user", "content": f"client {k} request {j}"}])
                lengths.append(r.usage.completion_tokens)
            except Exception as e:  # counted, then asserted to be none
                failures.append(repr(e))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert len(lengths) == 64 and all(1 <= n <= 12 for n in lengths)


def test_errors_are_openai_shaped_4xx(client, server):
    import httpx

    srv, _ = server
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="tiny", prompt="x", max_tokens=101)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="tiny", prompt="cat " * 120, max_tokens=50)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="tiny", prompt="x", temperature=5)
    with pytest.raises(openai.BadRequestError, match="role"):
        client.chat.completions.create(model="tiny", messages=[{"role": "robot", "content": "hi"}])
    with pytest.raises(openai.NotFoundError, match="not served"):
        client.completions.create(model="gpt-4", prompt="x")
    r = httpx.post(srv.url + "/v1/completions", content=json.dumps({"prompt": "x" * 30_000}),
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.post(srv.url + "/v1/completions", content=b"{not json")
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


def test_full_queue_is_429_and_waiting_requests_then_run(model_dir):
    service = build_service(str(model_dir), device="cpu", model_name="tiny", max_batch=1, max_queue=1)
    start = service.engine.start
    service.engine.start = lambda: service.engine  # hold the scheduler back so the queue fills
    srv = ServerThread(create_app(service)).start()
    try:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(c.completions.create, model="tiny", prompt="the cat", max_tokens=5, temperature=0)
            deadline = time.time() + 10
            while not service.engine.waiting and time.time() < deadline:
                time.sleep(0.01)
            with pytest.raises(openai.RateLimitError, match="busy"):
                c.completions.create(model="tiny", prompt="the dog", max_tokens=5)
            start()
            assert first.result(timeout=30).usage.completion_tokens == 5
    finally:
        srv.stop()


def test_client_disconnect_mid_stream_frees_its_slot(server):
    import httpx

    srv, service = server

    class Slow(torch.nn.Module):  # decode slowly enough that the client leaves long before max_tokens
        def __init__(self, model):
            super().__init__()
            self.inner, self.config = model, model.config

        def forward(self, *a, **k):
            time.sleep(0.01)
            return self.inner(*a, **k)

    fast = service.engine.model
    service.engine.model = Slow(fast)
    cancelled = service.engine.finished.get("cancelled", 0)
    try:
        body = {"model": "tiny", "prompt": "the cat", "max_tokens": 100, "temperature": 0, "stream": True}
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=30) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
        deadline = time.time() + 10
        while (service.engine.rows or service.engine.finished.get("cancelled", 0) == cancelled) and time.time() < deadline:
            time.sleep(0.02)
        assert service.engine.finished.get("cancelled", 0) == cancelled + 1
        assert not service.engine.rows
    finally:
        service.engine.model = fast


def test_chat_page_is_served_without_external_assets(server):
    import httpx

    html = httpx.get(server[0].url + "/").text
    assert "/v1/chat/completions" in html and "<script" in html
    assert "http://" not in html and "https://" not in html


def _lmlab(args, stdin_text, timeout=90):
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "lmlab.cli", *args], input=stdin_text, capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_lmlab_chat_streams_turns_resets_and_drops_old_turns(tmp_path_factory):
    from lmlab.models.checkpoint import open_checkpoint
    from lmlab.serving.prompts import Prompter

    model_dir = write_model(tmp_path_factory.mktemp("chat"), max_seq_len=64)
    ck = open_checkpoint(model_dir)
    model, tok = ck.causal_lm(), ck.tokenizer()
    prompter = Prompter(tok)
    ids = prompter.chat_ids([{"role": "user", "content": "hello"}])
    out = generate(model, torch.tensor([ids]), max_new_tokens=20, temperature=0, stop_token_ids=prompter.stop_ids(True))
    toks = out.responses[0][out.response_mask[0].bool()].tolist()
    first = tok.decode([t for t in toks if t not in prompter.stop_ids(True)], skip_special_tokens=True)

    r = _lmlab(["chat", "--ckpt", str(model_dir), "--temperature", "0", "--max_tokens", "20"],
               "hello\n/reset\nhello\nthe cat sat on a mat\nthe dog ran in the park\n/quit\nnever read\n")
    assert r.returncode == 0, r.stderr
    # /reset: the same first turn again, so the same reply
    assert r.stdout.count(f"assistant> {first}\n[conversation cleared]\nassistant> {first}\n") == 1
    assert "oldest messages to fit the context of 64 tokens]" in r.stdout
    assert r.stdout.count("assistant> ") == 4  # /quit ended the session

    r = _lmlab(["chat", "--ckpt", str(model_dir), "--temperature", "0", "--max_tokens", "10", "--mode", "complete"],
               "the cat\n")
    ids = prompter.completion_ids("the cat")
    out = generate(model, torch.tensor([ids]), max_new_tokens=10, temperature=0, stop_token_ids=prompter.stop_ids(False))
    cont = tok.decode(out.responses[0][out.response_mask[0].bool()].tolist(), skip_special_tokens=True)
    assert r.returncode == 0 and "completion" in r.stdout.splitlines()[0]
    assert f"\nthe cat{cont}\n" in r.stdout

    r = _lmlab(["serve", "--ckpt", str(model_dir), "--max_batch", "0"], "")
    assert r.returncode == 2 and r.stderr.strip() == "lmlab serve: error: --max_batch: must be at least 1, got 0 (use a positive number)"


@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["eager", "compiled"])
def test_engine_continuous_batching_matches_unbatched_generate(tmp_path_factory, compile):
    """Rows leave and join between steps, and prompts longer than the shared column force shifts of the cache:
    every sequence still equals its unbatched greedy output, and the steps taken show real batching. Compiled,
    the warm-up covers every shape serving meets (down to one row): nothing compiles after it."""
    from torch._dynamo.utils import counters

    from lmlab.models.checkpoint import open_checkpoint
    from lmlab.serving.engine import Engine, GenerationRequest, SamplingParams
    from lmlab.serving.prompts import Prompter

    ck = open_checkpoint(write_model(tmp_path_factory.mktemp("engine"), max_seq_len=64))
    model, tok = ck.causal_lm(), ck.tokenizer()
    prompter = Prompter(tok)
    engine = Engine(model, tok, max_batch=4, max_queue=64, compile=compile)
    assert engine.compiled == compile
    graphs = counters["stats"]["unique_graphs"]
    shifts = []
    shift = engine._shift
    engine._shift = lambda d: (d and shifts.append(d), shift(d))
    prompts = [prompter.completion_ids(" ".join(["the cat sat"] * (1 + (5 * i) % 7))) for i in range(12)]
    budgets = [3 + (11 * i) % 25 for i in range(12)]
    reqs = [engine.submit(GenerationRequest(p, SamplingParams(max_tokens=b, temperature=0))) for p, b in zip(prompts, budgets)]
    while not all(r.done for r in reqs):
        engine.step()
    for p, b, r in zip(prompts, budgets, reqs):
        out = generate(model, torch.tensor([p]), max_new_tokens=b, temperature=0)
        assert r.token_ids == out.responses[0].tolist()
    assert engine.max_rows_seen == 4
    assert engine.steps < sum(budgets) / 2  # several sequences per decode step
    assert any(d < 0 for d in shifts) and any(d > 0 for d in shifts)
    assert counters["stats"]["unique_graphs"] == graphs


def test_streamed_text_decoded_in_windows_equals_the_full_decode(model_dir):
    """The engine decodes a few tokens per step, not the whole sequence; what it streams must still add up to
    the full decode, also for byte tokens that leave UTF-8 characters incomplete (and for stop strings)."""
    from lmlab.models.checkpoint import open_checkpoint
    from lmlab.serving.engine import Engine
    from lmlab.serving.prompts import Prompter

    ck = open_checkpoint(model_dir)
    tok = ck.tokenizer()
    engine = Engine(ck.causal_lm(), tok, max_batch=1)
    assert engine.incremental
    # windows are decoded by the tokenizers backend directly, as transformers' decode would
    ids = list(range(len(tok) - 70, len(tok))) + [5, 200, 7]
    assert engine._decode_ids(ids) == tok.decode(ids, skip_special_tokens=True)
    assert "backend" in engine._decode_ids.__code__.co_freevars
    # byte-level BPE: ids of single bytes, among them lead and continuation bytes of multi-byte characters
    byte_ids = [i for i in range(len(tok)) if len(tok.convert_ids_to_tokens(i)) == 1]
    rng = np.random.default_rng(0)
    windowed = 0
    for trial in range(40):
        ids = rng.choice(byte_ids + list(range(len(tok) - 60, len(tok))), size=int(rng.integers(1, 60))).tolist()
        stop = [] if trial % 2 else [tok.decode(ids[3:5], skip_special_tokens=True)[:2]]
        deltas, states = [], []
        r = GenerationRequest([0], SamplingParams(max_tokens=len(ids), stop=[s for s in stop if s.strip("\ufffd")]),
                              on_event=lambda req, d: d is not None and deltas.append(d))
        for t in ids:
            if r.done:
                break
            engine._accept(r, t)
            states.append(r.text)
        full = tok.decode(r.token_ids, skip_special_tokens=True)
        if r.params.stop and r.finish_reason == "stop":
            full = full[: full.find(r.params.stop[0])]
        assert "".join(deltas) == r.text == full, trial
        # every state is a prefix of the final text; without stop strings (whose first characters are held
        # back) a partial character at the end is never sent before the end
        assert all(full.startswith(t) and (r.params.stop or not t.endswith("\ufffd")) for t in states[:-1]), trial
        windowed += r._read > 0
    assert windowed > 30  # the window path ran (not a full decode every token)
    # completions stop where an HF export's generation_config says generation ends: EOS and <|end|>
    assert Prompter(tok).stop_ids(False) == [tok.eos_token_id, tok.convert_tokens_to_ids("<|end|>")]


def test_export_gguf_reads_back_with_ggufs_reader(model_dir, tmp_path):
    """No llama.cpp here: the file is read back with the gguf package's reader and every tensor compared."""
    gguf = pytest.importorskip("gguf", reason="the gguf package is not installed")
    from lmlab.cli import main as lmlab_main
    from lmlab.models.gguf import gguf_tensors, permute_rotary
    from lmlab.models.checkpoint import open_checkpoint

    out = tmp_path / "tiny.gguf"
    assert lmlab_main(["export", "--ckpt", str(model_dir), "--format", "gguf", "--out", str(out)]) == 0
    ck = open_checkpoint(model_dir)
    model, tok = ck.causal_lm(), ck.tokenizer()
    cfg = model.config
    expected = gguf_tensors(cfg, model.state_dict())
    reader = gguf.GGUFReader(str(out))
    got = {t.name: np.asarray(t.data) for t in reader.tensors}
    assert set(got) == set(expected) and len(got) == 2 + 9 * cfg.n_layers
    for name, t in expected.items():
        np.testing.assert_array_equal(got[name].reshape(t.shape), t.numpy(), err_msg=name)
    # the q rows are lmlab's, reordered within each head (and the reorder is a permutation)
    q = model.backbone.blocks[0].attn.qkv.weight[: cfg.n_heads * cfg.head_dim]
    np.testing.assert_array_equal(got["blk.0.attn_q.weight"].reshape(q.shape), permute_rotary(q, cfg.n_heads).detach().numpy())
    assert not torch.equal(permute_rotary(q, cfg.n_heads), q)

    def field(name):
        f = reader.fields[name]
        return f.contents() if hasattr(f, "contents") else f.parts[f.data[0]].tolist()

    assert field("general.architecture") == "llama"
    assert field("llama.block_count") == cfg.n_layers and field("llama.embedding_length") == cfg.d_model
    assert field("llama.context_length") == cfg.max_seq_len and field("llama.attention.head_count") == cfg.n_heads
    tokens = field("tokenizer.ggml.tokens")
    assert len(tokens) == len(tok) and tokens[tok.eos_token_id] == tok.eos_token
    assert field("tokenizer.ggml.eos_token_id") == tok.eos_token_id
    assert field("tokenizer.chat_template") == tok.chat_template


@pytest.mark.parametrize("variant, word", [
    (dict(attention="sliding_window", sliding_window=8), "sliding-window"),
    (dict(moe_experts=4, moe_top_k=2), "mixture-of-experts"),
    (dict(attention="linear"), "linear attention"),
])
def test_export_gguf_refuses_what_llama_cpp_would_misread(model_dir, tmp_path, variant, word, capsys):
    """GGUF is written with llama's tensor layout only: other backbones stop with one line naming the variant."""
    pytest.importorskip("gguf", reason="the gguf package is not installed")
    import shutil

    from lmlab.cli import main as lmlab_main

    other = tmp_path / "variant"
    shutil.copytree(model_dir, other)
    cfg = TransformerConfig(**{**json.loads((other / "lmlab_config.json").read_text()), **variant})
    torch.manual_seed(0)
    from safetensors.torch import save_file

    save_file({k: v for k, v in CausalLM(cfg).state_dict().items() if k != "lm_head.weight"},
              str(other / "model.safetensors"))
    (other / "lmlab_config.json").write_text(json.dumps(cfg.to_dict()))
    out = tmp_path / "x.gguf"
    assert lmlab_main(["export", "--ckpt", str(other), "--format", "gguf", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--format" in err[0] and word in err[0], err
    assert not out.exists()


def test_int8_quantized_model_serves_close_logits(model_dir):
    from lmlab.serving.prompts import load_model

    fp32, tok, _ = load_model(str(model_dir), device="cpu")
    q8, _, _ = load_model(str(model_dir), device="cpu", quantize="int8")
    assert type(q8.backbone.blocks[0].attn.qkv).__module__.startswith("torch.ao.nn.quantized")
    ids = torch.tensor([tok("the cat sat on a mat")["input_ids"]])
    a, b = fp32(ids), q8(ids)
    assert (a - b).abs().max() < 0.1 * a.abs().max()  # int8 weights: close, not equal
    assert not torch.equal(a, b)
    service = build_service(str(model_dir), device="cpu", quantize="int8", model_name="q8")
    req = GenerationRequest(service.prompter.completion_ids("the cat"), SamplingParams(max_tokens=5, temperature=0))
    assert len(service.engine.run_until_done(req).token_ids) == 5


def test_lmlab_serve_command_answers_on_a_free_port(model_dir):
    """The verb itself: ``--port 0`` binds a free port on 127.0.0.1 and prints the address; the test stops it."""
    import httpx

    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "lmlab.cli", "serve", "--ckpt", str(model_dir), "--port", "0",
                             "--model_name", "cli", "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.startswith("lmlab serve: model 'cli' at http://127.0.0.1:"), line + proc.stderr.read()
        url = line.split(" at ")[1].split("/ ")[0]
        deadline = time.time() + 30
        while True:
            try:
                models = httpx.get(url + "/v1/models", timeout=5).json()
                break
            except httpx.TransportError:
                assert time.time() < deadline and proc.poll() is None
                time.sleep(0.1)
        assert models["data"][0]["id"] == "cli"
        r = httpx.post(url + "/v1/completions", json={"prompt": "the cat", "max_tokens": 4, "temperature": 0}, timeout=30)
        assert r.json()["usage"]["completion_tokens"] == 4
    finally:
        proc.terminate()
        proc.wait(timeout=30)
