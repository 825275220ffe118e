"""``lmlab data prepare`` on a synthetic mixture: outputs, caching, resume, determinism, bad input."""

from __future__ import annotations

import dataclasses
import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

import lmlab.data.prepare.engine as engine
from lmlab.data.prepare.config import PrepareConfig, load_config
from lmlab.data.prepare.engine import read_jsonl_gz
from lmlab.data.prepare.prepare import prepare, token_arrays
from lmlab.errors import ConfigError
from test_prepare_corpus import all_texts, mixture_config, write_mixture


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from lmlab.data.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("prep")
    paths = write_mixture(root / "corpus")
    train_bpe(all_texts(paths), 320, root / "tok")
    return root, paths


def make_cfg(corpus, **overrides) -> PrepareConfig:
    root, paths = corpus
    return PrepareConfig(**mixture_config(paths, str(root / "tok"), **overrides))


@pytest.fixture(scope="module")
def baseline(corpus, tmp_path_factory):
    """One uninterrupted run over web, books and code: the reference for the other tests."""
    out = tmp_path_factory.mktemp("baseline")
    return prepare(make_cfg(corpus), out=out, progress=False)


def files_under(d: Path, pattern: str = "*") -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob(pattern)) if p.is_file()}


def docs_from_tokens(tokens_dir: Path, tokenizer) -> dict[str, list[str]]:
    """Decode every document of a prepared directory (train and val streams joined, split at EOS)."""
    eos = tokenizer.eos_token_id
    out = {}
    for name, arrs in token_arrays(tokens_dir).items():
        stream = np.concatenate([np.asarray(arrs["train"]), np.asarray(arrs["val"])]).astype(np.int64)
        cuts = np.flatnonzero(stream == eos)
        starts = np.concatenate(([0], cuts[:-1] + 1))
        out[name] = [tokenizer.decode(stream[a:b].tolist()) for a, b in zip(starts, cuts)]
    return out


def test_prepared_tokens_hold_exactly_the_selected_documents(baseline, corpus):
    from lmlab.data.tokenizer import load_tokenizer

    root, paths = corpus
    tok = load_tokenizer(str(root / "tok"))
    decoded = docs_from_tokens(baseline.tokens_dir, tok)
    rep = baseline.report["sources"]
    # every planted problem in web is gone, every ordinary page is there
    web_in = {json.loads(line)["id"]: json.loads(line)["text"] for line in paths["web"].read_text().splitlines()}
    squash = lambda t: " ".join(t.split())  # noqa: E731 - C4 drops blank lines, normalisation trims spaces
    web_out = {squash(t) for t in decoded["web"]}
    # the 48 ordinary pages stay, verbatim; the copies, the leak, junk and gibberish go
    assert len(decoded["web"]) == rep["web"]["stages"]["final"]["docs"] == 48
    for planted in ("w-exact", "w-near", "w-leak", "w-gibberish-0", "w-gibberish-1", "junk0", "junk1", "junk2"):
        assert squash(web_in[planted]) not in web_out, planted
    assert {squash(t) for k, t in web_in.items() if k[0] == "w" and k[1:].isdigit()} == web_out
    # code is unfiltered prose-wise and comes back verbatim
    code_in = {json.loads(line)["text"].strip() for line in paths["code"].read_text().splitlines()}
    assert set(decoded["code"]) == code_in
    # books: three documents whose concatenation is the whole (normalised) text
    assert rep["books"]["stages"]["final"]["docs"] == 3
    assert len(decoded["books"]) == 3
    # report counts are monotone through the stages and match the meta
    meta = json.loads((baseline.tokens_dir / "meta.json").read_text())
    for name, row in rep.items():
        counts = [row["stages"][s]["docs"] for s in ("read", "collect", "filter", "quality", "dedup", "decontaminate", "final")]
        assert counts == sorted(counts, reverse=True), (name, counts)
        assert row["tokens"]["train"] == meta["sources"][name]["train_tokens"] > 0
        assert row["tokens"]["val"] > 0
    assert rep["web"]["filter_dropped"].get("gopher_quality:too_few_words", 0) >= 1
    assert rep["web"]["dedup"]["exact_removed"] == 1 and rep["web"]["dedup"]["near_removed"] == 1
    assert rep["web"]["decontaminate"] == {"contaminated_docs": 1, "by_task": {"gsm8k": 1}, "dropped": True}
    assert rep["web"]["stages"]["quality"]["docs"] == rep["web"]["stages"]["filter"]["docs"] - 2
    shares = [row["mixture"]["realised_share"] for row in rep.values()]
    assert abs(sum(shares) - 1) < 1e-9
    web_epochs = 200_000 * (0.6 / 1.0) / rep["web"]["tokens"]["train"]
    assert rep["web"]["mixture"]["epochs_for_budget"] == pytest.approx(web_epochs)


def test_report_files_are_written(baseline):
    paths = baseline.report_paths
    for key in ("json", "markdown", "quality_hist", "filter_reasons"):
        assert paths[key].exists(), key
    for key in ("quality_hist", "filter_reasons"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = paths["markdown"].read_text()
    assert "| web | prose |" in md and "gsm8k: 1" in md
    assert json.loads(paths["json"].read_text())["sources"]["web"]["stages"]["final"]["docs"] == 48


def test_report_is_logged_to_an_active_wandb_run(baseline, monkeypatch):
    import sys
    import types

    from lmlab.data.prepare.report import log_to_wandb

    logged: list[dict] = []
    fake = types.SimpleNamespace(
        run=None,
        Table=lambda columns, data: ("table", columns, data),
        Image=lambda path: ("image", path),
        log=logged.append,
    )
    monkeypatch.setitem(sys.modules, "wandb", fake)
    assert not log_to_wandb(baseline.report, baseline.report_paths)  # no active run: nothing logged
    fake.run = types.SimpleNamespace(summary={})
    assert log_to_wandb(baseline.report, baseline.report_paths)
    (payload,) = logged
    kind, columns, rows = payload["data/prepare"]
    assert [r[0] for r in rows] == ["web", "books", "code"]
    assert rows[0][columns.index("final_docs")] == 48
    assert payload["data/quality_hist"] == ("image", str(baseline.report_paths["quality_hist"]))
    assert fake.run.summary["data/web/train_tokens"] == baseline.report["sources"]["web"]["tokens"]["train"]


def test_second_run_reuses_everything(baseline, corpus):
    again = prepare(make_cfg(corpus), out=baseline.out, progress=False)
    assert again.computed == []
    assert "pack" in again.reused and "filter/web" in again.reused


def test_crash_then_resume_gives_identical_bytes(baseline, corpus, tmp_path, monkeypatch):
    cfg = make_cfg(corpus)
    seen: list[tuple[str, str, int]] = []

    def crash_after_two_filter_shards(stage, source, k):
        seen.append((stage, source, k))
        if (stage, source, k) == ("filter", "web", 1):
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(engine, "after_shard_hook", crash_after_two_filter_shards)
    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare(cfg, out=tmp_path, progress=False)
    partial = tmp_path / "stages" / "filter" / "web.partial"
    assert sorted(p.name for p in partial.glob("*.stats.json")) == ["shard-00000.stats.json", "shard-00001.stats.json"]
    assert not (tmp_path / "stages" / "filter" / "web").exists()  # nothing half-done looks finished
    assert not (tmp_path / "tokens").exists()

    seen.clear()
    monkeypatch.setattr(engine, "after_shard_hook", lambda *a: seen.append(a))
    resumed = prepare(cfg, out=tmp_path, resume=True, progress=False)
    web_filter = [k for st, src, k in seen if (st, src) == ("filter", "web")]
    assert web_filter == [2, 3]  # shards 0 and 1 were kept from the crashed run
    assert not any(st == "collect" for st, _, _ in seen)  # finished stages were reused
    assert files_under(resumed.tokens_dir, "*.bin") == files_under(baseline.tokens_dir, "*.bin")
    a = files_under(baseline.out / "stages", "shard-*")
    b = files_under(tmp_path / "stages", "shard-*")
    assert a.keys() == b.keys() and a == b


def test_without_resume_a_partial_stage_starts_over(corpus, tmp_path, monkeypatch):
    cfg = make_cfg(corpus, sources=("web", "books"))

    def crash(stage, source, k):
        if stage == "collect" and k == 1:
            raise RuntimeError("crash")

    monkeypatch.setattr(engine, "after_shard_hook", crash)
    with pytest.raises(RuntimeError):
        prepare(cfg, out=tmp_path, progress=False)
    seen = []
    monkeypatch.setattr(engine, "after_shard_hook", lambda *a: seen.append(a))
    prepare(cfg, out=tmp_path, progress=False)
    assert [k for st, src, k in seen if (st, src) == ("collect", "web")] == [0, 1, 2, 3]


def test_one_run_per_output_directory(corpus, tmp_path):
    import os
    import subprocess

    out = tmp_path / "o"
    out.mkdir()
    (out / ".lock").write_text(str(os.getppid()))  # a live process holds it
    with pytest.raises(ConfigError, match="being prepared by process"):
        prepare(make_cfg(corpus, sources=("web", "books")), out=out, progress=False)
    done = subprocess.Popen(["true"])
    done.wait()
    (out / ".lock").write_text(str(done.pid))  # left by a process that died: taken over
    prepare(make_cfg(corpus, sources=("web", "books")), out=out, progress=False)
    assert not (out / ".lock").exists() and (out / "tokens" / "meta.json").exists()


def test_same_seed_same_bytes_any_process_count_other_seed_other_order(baseline, corpus, tmp_path):
    two = prepare(make_cfg(corpus), out=tmp_path / "two", num_proc=2, progress=False)
    assert files_under(two.tokens_dir, "*.bin") == files_under(baseline.tokens_dir, "*.bin")
    other = prepare(make_cfg(corpus, seed=12), out=tmp_path / "seed12", progress=False)
    a, b = token_arrays(baseline.tokens_dir)["web"], token_arrays(other.tokens_dir)["web"]
    assert not np.array_equal(np.asarray(a["train"]), np.asarray(b["train"]))
    # the same documents, shuffled and split differently
    both = lambda arrs: np.sort(np.concatenate([np.asarray(arrs["train"]), np.asarray(arrs["val"])]))  # noqa: E731
    assert np.array_equal(both(a), both(b))


def test_adding_a_source_computes_only_that_source(baseline, corpus, tmp_path):
    shutil.copytree(baseline.out, tmp_path / "out")
    cfg = make_cfg(corpus, sources=("web", "books", "code", "news"))
    res = prepare(cfg, out=tmp_path / "out", progress=False)
    per_source = [c for c in res.computed if c.count("/") == 1 and not c.startswith("dedup/")]
    assert per_source and all(c.endswith("/news") for c in per_source)
    assert {"collect/news", "filter/news", "tokenize/news"} <= set(per_source)
    assert "dedup/global" in res.computed
    # the copy of a web page in news loses to web (listed first); web itself is untouched
    news = res.report["sources"]["news"]
    assert news["dedup"]["exact_removed"] == 1 and news["dedup"]["duplicates_kept_in"] == {"web": 1}
    old = files_under(baseline.tokens_dir, "*.bin")
    new = files_under(res.tokens_dir, "*.bin")
    assert {k: v for k, v in new.items() if not k.startswith("news")} == old


def test_quality_threshold_change_recomputes_only_quality(baseline, corpus, tmp_path):
    shutil.copytree(baseline.out, tmp_path / "out")
    cfg = make_cfg(corpus)
    cfg.quality = dataclasses.replace(cfg.quality, keep_fraction=0.5)
    res = prepare(cfg, out=tmp_path / "out", progress=False)
    assert {c for c in res.computed if "/" in c and c != "dedup/global"} == {"quality/web"}
    assert res.report["sources"]["web"]["stages"]["quality"]["docs"] == round(0.5 * 53)


def test_bad_input_is_skipped_and_counted(corpus, tmp_path):
    import random

    from test_prepare_corpus import prose

    rng = random.Random(99)
    page = lambda: json.dumps(prose(rng)).encode()  # noqa: E731 - a fresh page each time (no duplicates)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.jsonl").write_bytes(
        b'{"text": ' + page() + b"}\n"
        b'{"text": "broken\n'  # malformed JSON line
        b"[1, 2, 3]\n"  # valid JSON, not an object
        b'{"title": 7}\n'  # no text field
        b'{"text": "   "}\n'  # empty after normalisation
        b'{"text": ' + page()[:-1] + b"\\n" + b"x" * 5000 + b'\\nThe end."}\n'  # one gigantic line
    )
    (bad / "b.jsonl").write_bytes(b'{"text": ' + page()[:-1] + b' caf\xe9 \xff\xfe end."}\n')  # latin-1 bytes in JSON
    with gzip.open(bad / "c.jsonl.gz", "wb") as f:
        f.write(b'{"text": ' + page() + b"}\n")
    data = (bad / "c.jsonl.gz").read_bytes()
    (bad / "c.jsonl.gz").write_bytes(data[: len(data) // 2])  # truncated archive
    (bad / "d.jsonl").write_bytes(b"")  # empty file
    (bad / "e.txt").write_bytes(prose(rng).encode() + b"\nIt was \xe9t\xe9 then.\n")  # latin-1 in a text file
    cfg = make_cfg(corpus, sources=("web", "books"), max_line_chars=2000)
    # 1 of its 5 JSON records has no text field: allowed here, counted
    messy = dataclasses.replace(cfg.sources[0], name="messy", path=str(bad), weight=0.1, filters=[], max_missing_text_fraction=0.5)
    cfg.sources.append(messy)
    res = prepare(cfg, out=tmp_path / "out", progress=False)
    row = res.report["sources"]["messy"]
    sk = row["skipped"]
    assert sk == {"malformed_json": 2, "no_text_field": 1, "empty": 1, "unreadable_file": 1}
    assert any("c.jsonl.gz" in e for e in row["skip_examples"])
    assert row["read_counts"]["long_lines_removed"] == 1
    assert row["read_counts"]["documents_with_decode_errors"] == 2
    assert row["read_counts"]["replaced_byte_sequences"] == 5  # \xe9 \xff \xfe in b.jsonl, \xe9 \xe9 in e.txt
    assert row["stages"]["final"]["docs"] == 4
    texts = [d["text"] for d in read_jsonl_gz(res.out / "stages" / "collect" / "messy" / "shard-00000.jsonl.gz")]
    assert len(texts) == 4 and max(len(line) for t in texts for line in t.split("\n")) <= 2000
    assert sum("caf\ufffd \ufffd\ufffd end." in t for t in texts) == 1
    assert sum("It was \ufffdt\ufffd then." in t for t in texts) == 1


def test_logged_stage_counts_equal_the_report(baseline, corpus, tmp_path):
    import re

    lines: list[str] = []
    shutil.copytree(baseline.out, tmp_path / "out")
    cfg = make_cfg(corpus)
    cfg.quality = dataclasses.replace(cfg.quality, keep_fraction=0.9)  # quality drops documents that scoring kept
    res = prepare(cfg, out=tmp_path / "out", progress=False, log=lines.append)
    logged = {}
    for line in lines:
        m = re.fullmatch(r"(\w+) +(\w+) +([\d,]+) -> +([\d,]+) docs", line)
        if m:
            logged[(m[1], m[2])] = (int(m[3].replace(",", "")), int(m[4].replace(",", "")))
    stages = ("read", "collect", "filter", "quality", "dedup", "decontaminate", "final")
    assert len(logged) == 3 * (len(stages) - 1)
    for name, row in res.report["sources"].items():
        for prev, st in zip(stages, stages[1:]):
            assert logged[(st, name)] == (row["stages"][prev]["docs"], row["stages"][st]["docs"])
    web = res.report["sources"]["web"]["stages"]
    assert web["quality"]["docs"] < web["filter"]["docs"]  # the case the per-stage counts got wrong
    assert logged[("quality", "web")][1] == web["quality"]["docs"]


def test_json_source_without_its_text_field_stops_prepare_in_one_line(corpus, tmp_path, capsys):
    from lmlab.cli import main

    root, paths = corpus
    cfg = mixture_config(paths, str(root / "tok"), sources=("web", "books"))
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"code": f"x = {i}", "lang": "py"}) + "\n" for i in range(20)))
    cfg["sources"].append({"name": "code", "weight": 0.1, "path": str(tmp_path / "c.jsonl"), "kind": "code"})
    path = tmp_path / "mix.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["data", "prepare", "--config", str(path), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "lmlab data: error: sources[2].text_field: no record of source 'code' has the text field 'text' "
        "(its records have: code, lang) (set text_field to the field holding the text)"
    ]
    assert not (tmp_path / "o" / "tokens").exists()


def test_source_left_empty_is_a_one_line_error(corpus, tmp_path, capsys):
    from lmlab.cli import main

    root, paths = corpus
    cfg = mixture_config(paths, str(root / "tok"), sources=("web", "books", "code"))
    cfg["sources"][2]["kind"] = "prose"  # code through the prose filters: nothing survives
    path = tmp_path / "mix.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["data", "prepare", "--config", str(path), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("lmlab data: error: sources[2]: source 'code' has no documents left after filtering")
    assert not (tmp_path / "o" / "tokens").exists()


@pytest.mark.parametrize(
    "change, field",
    [
        ({"filters": {"prose": ["gopher_quality", "no_such_filter"]}}, "filters.prose: web.filters[1].name"),
        ({"filters": {"prose": [{"name": "c4", "min_sentences": -1}]}}, "filters.prose: c4.min_sentences"),
        ({"quality": {"keep_fraction": 1.5}}, "quality.keep_fraction"),
        ({"quality": {"weights": {"fluency": 1.0}}}, "quality.weights.fluency"),
        ({"quality": {"keep_fraction": 0.5, "reference_sources": ["nope"]}}, "quality.reference_sources"),
        ({"dedup": {"threshold": 2}}, "dedup.threshold"),
        ({"sources": [{"name": "web", "type": "ftp"}]}, "sources[0].type"),
        ({"sources": [{"name": "web", "colour": "red"}]}, "sources[0].colour"),
        ({"shard_docs": 0}, "shard_docs"),
    ],
)
def test_config_errors_name_the_field(corpus, change, field):
    root, paths = corpus
    cfg = mixture_config(paths, str(root / "tok"))
    cfg.update(change)
    with pytest.raises(ConfigError) as e:
        PrepareConfig(**cfg)
    assert e.value.field.startswith(field), e.value.field


def test_missing_files_and_eval_dir_are_config_errors(corpus, tmp_path):
    cfg = make_cfg(corpus, sources=("web", "books"))
    cfg.sources[0].path = str(tmp_path / "none*.jsonl")
    with pytest.raises(ConfigError, match=r"sources\[0\].path"):
        prepare(cfg, out=tmp_path / "o", progress=False)
    cfg = make_cfg(corpus, sources=("web", "books"), decontaminate={"eval_dir": str(tmp_path / "noeval")})
    with pytest.raises(ConfigError, match="decontaminate.eval_dir"):
        prepare(cfg, out=tmp_path / "o2", progress=False)


def test_training_yaml_is_accepted(tmp_path):
    train = {
        "trainer": {"max_steps": 10},
        "model": {"class_path": "lmlab.modules.PretrainModule"},
        "data": {
            "class_path": "lmlab.data.PretrainDataModule",
            "init_args": {
                "tokenizer": "tok",
                "prepared_dir": str(tmp_path / "mix" / "tokens"),
                "val_fraction": 0.03,
                "seed": 5,
                "sources": [{"name": "web", "weight": 0.7, "path": "a.jsonl"}, {"name": "code", "weight": 0.3, "path": "b.jsonl"}],
            },
        },
    }
    p = tmp_path / "exp.yaml"
    p.write_text(yaml.safe_dump(train))
    cfg = load_config(p)
    assert cfg.out == str(tmp_path / "mix")
    assert [(s.name, s.kind) for s in cfg.sources] == [("web", "prose"), ("code", "code")]
    assert (cfg.val_fraction, cfg.seed, cfg.tokenizer) == (0.03, 5, "tok")
    train["data"]["init_args"]["prepared_dir"] = str(tmp_path / "elsewhere")
    p.write_text(yaml.safe_dump(train))
    with pytest.raises(ConfigError, match="prepared_dir"):
        load_config(p)
