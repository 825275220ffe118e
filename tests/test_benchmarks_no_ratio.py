"""Benchmarks print a ratio only when both sides ran: a side made to fail gives "no ratio" and exit status 1.

Each benchmark is run in-process on tiny inputs (seconds), with one side made to
raise through its ``--fail`` flag or a monkeypatched function.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

import pytest
import torch

from helpers import web_texts, write_corpus

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
RATIO = re.compile(r": \d+\.\d+x")


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def restore_threads(monkeypatch):
    """The benchmarks pin threads and cores for the whole process: give the test process its own back."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS",
                "VECLIB_MAXIMUM_THREADS", "RAYON_NUM_THREADS", "TOKENIZERS_PARALLELISM"):
        if var in os.environ:  # monkeypatch restores the value (or the absence) after the test
            monkeypatch.setenv(var, os.environ[var])
        else:
            monkeypatch.delenv(var, raising=False)
    threads = torch.get_num_threads()
    cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    yield
    torch.set_num_threads(threads)
    if cores is not None:
        os.sched_setaffinity(0, cores)


def tiny_data(root: Path) -> Path:
    """A data folder shaped like ``shared/data``'s books and DCLM web files, a few kilobytes."""
    corpus = write_corpus(root / "corpus")
    texts = web_texts(corpus)
    (root / "books").mkdir()
    (root / "books" / "a.txt").write_text("\n".join(texts[:20]), encoding="utf-8")
    (root / "web").mkdir()
    with open(root / "web" / "dclm_quality_tiny.jsonl", "w", encoding="utf-8") as f:
        for t in texts[20:80]:
            f.write(json.dumps({"text": t, "label": 1}) + "\n")
    return root


def test_tokenize_pack_ratio_only_when_both_sides_ran(tmp_path, capsys):
    bench = load("tokenize_pack")
    data = tiny_data(tmp_path)
    common = ["--data", str(data), "--vocab", "300", "--steps", "1"]
    assert bench.main(common) == 0
    out = capsys.readouterr().out
    assert "same BPE merges learned by both sides: yes" in out  # the two sides do the same work
    assert RATIO.search(out) and "[differs: " in out
    for side in ("lmlab", "plain"):
        assert bench.main(common + ["--fail", side]) == 1
        out = capsys.readouterr().out
        assert "no ratio" in out and f"--fail {side}" in out and not RATIO.search(out)


def test_data_pipeline_no_ratio_when_datatrove_side_fails(tmp_path, monkeypatch, capsys):
    bench = load("data_pipeline")
    data = tiny_data(tmp_path)

    def broken(splitter="spacy"):
        raise bench.BaselineFailed("datatrove cannot run: injected")

    monkeypatch.setattr(bench, "datatrove_runner", broken)
    assert bench.main(["--data", str(data), "--sources", "books"]) == 1
    captured = capsys.readouterr()
    assert "no ratio (datatrove side skipped: datatrove cannot run: injected)" in captured.out
    assert not RATIO.search(captured.out)


def test_ddp_scaling_no_ratio_when_a_run_fails(monkeypatch, capsys):
    bench = load("ddp_scaling")
    calls = []

    def fake(world, args):
        calls.append(world)
        if world == 2:
            raise RuntimeError("gloo could not start")
        return 1000.0, 900.0

    monkeypatch.setattr(bench, "tokens_per_second", fake)
    assert bench.main(["--repeats", "2"]) == 1
    out = capsys.readouterr().out
    assert calls == [1, 2, 1]  # the failed side is not retried, the other keeps running
    assert "speed-up 2 processes / 1 process: no ratio (2-process run failed)" in out and not RATIO.search(out)
    monkeypatch.setattr(bench, "tokens_per_second", lambda world, args: ({1: 1000.0, 2: 1800.0}[world], 900.0))
    assert bench.main(["--repeats", "1"]) == 0
    assert "speed-up 2 processes / 1 process (tokens/s): 1.800x" in capsys.readouterr().out


def test_scaling_fit_no_ratio_when_a_side_fails(tmp_path, capsys):
    bench = load("scaling_fit")
    args = ["--data", str(tmp_path / "absent"), "--repeat", "1", "--loop-starts", "4", "--resamples", "4"]
    for side in ("loop", "batched"):
        assert bench.main(args + ["--fail", side]) == 1
        out = capsys.readouterr().out
        assert f"{side} side failed: RuntimeError: --fail {side}" in out and "no ratio" in out
        assert not RATIO.search(out)


def test_quantize_no_ratio_when_int8_side_fails(tmp_path, capsys):
    from safetensors.torch import save_file

    from lmlab.data.tokenizer import train_bpe
    from lmlab.models import CausalLM, TransformerConfig

    corpus = write_corpus(tmp_path / "corpus")
    model_dir = tmp_path / "model"
    train_bpe(web_texts(corpus), 320, model_dir)
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=320, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, tie_embeddings=True)
    model = CausalLM(cfg)
    save_file({k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}, str(model_dir / "model.safetensors"))
    (model_dir / "lmlab_config.json").write_text(json.dumps({**cfg.to_dict(), "preset": None}))
    text = tmp_path / "held_out.jsonl"
    text.write_text("".join(json.dumps({"text": t}) + "\n" for t in web_texts(corpus)[:4]))
    bench = load("quantize")
    args = ["--ckpt", str(model_dir), "--text", str(text), "--max_documents", "4", "--max_tokens", "4", "--repeats", "1"]
    assert bench.main(args + ["--fail", "int8"]) == 1
    out = capsys.readouterr().out
    assert "| int8 | failed: RuntimeError: --fail int8" in out and "| float32 | " in out
    assert out.count("no ratio (int8 side failed)") == 2 and not RATIO.search(out)
    assert bench.main(args) == 0
    out = capsys.readouterr().out
    assert len(RATIO.findall(out)) == 2 and "[differs: int8 dynamic quantization" in out


def test_startup_no_ratio_when_lmlab_fit_fails(monkeypatch, capsys):
    bench = load("startup")
    calls = []

    def fake(cmd, env, mark, cwd):
        side = "fit" if "lmlab.cli" in cmd else "floor"
        calls.append(side)
        if side == "fit":
            raise RuntimeError("exited with 2 before the first step")
        return 3.5

    monkeypatch.setattr(bench, "run_until", fake)
    assert bench.main(["--runs", "2"]) == 1
    out = capsys.readouterr().out
    assert calls == ["fit", "floor", "floor", "floor"]  # the failed side is not retried, the floor keeps running
    assert "lmlab fit                  failed: RuntimeError: exited with 2" in out
    assert "no ratio (lmlab side failed)" in out and not RATIO.search(out)
    monkeypatch.setattr(bench, "run_until", lambda cmd, env, mark, cwd: 4.5 if "lmlab.cli" in cmd else 4.0)
    assert bench.main(["--runs", "2"]) == 0
    out = capsys.readouterr().out
    assert "lmlab above the floor:" in out and "CPU +0.50 s" in out and RATIO.search(out)
