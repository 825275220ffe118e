"""lmlab's Gopher, C4 and FineWeb filters make datatrove's keep/drop decisions on the shared web pages.

Each lmlab filter (default settings) and its datatrove counterpart (default
settings) judge every page on its own: the 499 DCLM human-labelled pages (the
281 "agreement" pages are among them), the 30 Dolma Common Crawl documents and
the 181 gold article bodies of the article-extraction benchmark. Per filter, at
least 99.5% of the decisions must be the same (today: all of them), and where
both keep a page C4 must leave the same text.

Skipped when datatrove, its English word tokenizer (spaCy) or ``../shared`` is
missing.
"""

from __future__ import annotations

import gzip
import json

import pytest

from lmlab.data.prepare.filters import FILTERS

MIN_AGREEMENT = 0.995


def _web_pages(web) -> list[str]:
    texts = [json.loads(line)["text"] for line in open(web / "dclm_quality_majority_data.jsonl", encoding="utf-8")]
    for name in ("dolma_cc_en_head-0091.jsonl", "dolma_cc_en_head-0174.jsonl"):
        texts += [json.loads(line)["text"] for line in open(web / name, encoding="utf-8")]
    with gzip.open(web / "dolma_provided_documents_000.json.gz", "rt", encoding="utf-8") as f:
        texts += [json.loads(line)["text"] for line in f]
    gold = json.loads((web / "aeb_ground_truth.json").read_text(encoding="utf-8"))
    texts += [row["articleBody"] for _, row in sorted(gold.items()) if row.get("articleBody")]
    return texts


@pytest.fixture(scope="module")
def datatrove_filters():
    pytest.importorskip("datatrove")
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
    )

    try:
        from datatrove.utils.word_tokenizers import load_word_tokenizer

        load_word_tokenizer("en").word_tokenize("Is the English tokenizer installed?")
    except Exception as err:  # noqa: BLE001 - any failure to load it means the reference cannot run
        pytest.skip(f"datatrove's English word tokenizer is unavailable ({type(err).__name__}: {err}); pip install spacy")
    return {
        "gopher_repetition": GopherRepetitionFilter(),
        "gopher_quality": GopherQualityFilter(),
        "c4": C4QualityFilter(),
        "fineweb": FineWebQualityFilter(),
    }


@pytest.fixture(scope="module")
def decisions(shared_data, datatrove_filters):
    from datatrove.data import Document

    texts = _web_pages(shared_data / "web")
    assert len(texts) == 710
    ours = {name: FILTERS[name]() for name in datatrove_filters}
    out: dict[str, list] = {name: [] for name in datatrove_filters}
    # page by page, so that datatrove tokenizes each page once (its word splitting is cached per text)
    for i, text in enumerate(texts):
        for name, reference in datatrove_filters.items():
            ref_doc = Document(text=text, id=str(i))
            ref_keep = reference.filter(ref_doc) is True
            doc = {"text": text}
            keep, reason = ours[name](doc)
            out[name].append((ref_keep, keep, ref_doc.text, doc["text"], reason))
    return out


@pytest.mark.shared_data
@pytest.mark.parametrize("name", ["gopher_repetition", "gopher_quality", "c4", "fineweb"])
def test_filter_agrees_with_datatrove(name, decisions):
    rows = decisions[name]
    disagree = [i for i, (ref, ours, *_) in enumerate(rows) if ref != ours]
    agreement = 1 - len(disagree) / len(rows)
    assert agreement >= MIN_AGREEMENT, (name, agreement, disagree[:10])
    # the pages exercise both outcomes, so agreement is not trivially "keep everything"
    kept = sum(ours for _, ours, *_ in rows)
    assert kept > 0.1 * len(rows) and len(rows) - kept >= 10, (name, kept)


@pytest.mark.shared_data
def test_c4_leaves_datatrove_text(decisions):
    both = [(ref_text, text) for ref, ours, ref_text, text, _ in decisions["c4"] if ref and ours]
    assert len(both) > 100
    same = sum(ref_text == text for ref_text, text in both)
    assert same / len(both) >= MIN_AGREEMENT


@pytest.mark.shared_data
def test_benchmark_prints_no_ratio_when_datatrove_cannot_run(shared_data, monkeypatch, capsys):
    """benchmarks/data_pipeline.py compares against datatrove only when datatrove really ran."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "data_pipeline.py"
    spec = importlib.util.spec_from_file_location("data_pipeline_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for name in [m for m in sys.modules if m == "datatrove" or m.startswith("datatrove.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "datatrove", None)  # import datatrove -> ImportError
    import os

    cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    try:
        rc = bench.main(["--data", str(shared_data), "--sources", "web", "--max-mb", "0.1"])
    finally:
        if cores is not None:
            os.sched_setaffinity(0, cores)  # the benchmark pins itself to one core
    out, err = capsys.readouterr()
    assert rc == 1
    assert "throughput ratio" not in out and "datatrove cannot run" in err and "no throughput ratio" in err
