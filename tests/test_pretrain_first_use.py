"""First-use data work: the token cache is bit-identical to a per-document reference, documents are read once.

The reference below is the cache writer as it was before batch encoding through
the backend and block writes: one ``tokenizer(...)`` call per 256 documents and
one ``tofile`` per document. The packed streams must stay byte-for-byte the
same, since resumed runs and existing caches (same key) depend on them.
"""

from __future__ import annotations

import ast
import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from lmlab.data import PretrainDataModule, SourceConfig, TokenizerTrainConfig
from lmlab.data.pretrain import packing, reading
from lmlab.data.pretrain.datamodule import train_tokenizer_on_mixture
from lmlab.data.pretrain.packing import _MIN_DOCS_FOR_DOC_SPLIT, _is_val_doc, build_or_load_cache, token_dtype
from lmlab.data.pretrain.sources import iter_documents, module_docstring
from lmlab.data.tokenizer import ids_encoder, train_bpe


def _reference_streams(src: SourceConfig, tokenizer, val_fraction: float, seed: int) -> tuple[bytes, bytes, int, int]:
    """(train bytes, val bytes, documents, val documents) computed one document at a time."""
    dtype = token_dtype(len(tokenizer))
    eos = tokenizer.eos_token_id
    docs = [tokenizer(d, add_special_tokens=False)["input_ids"] + [eos] for d in iter_documents(src)]
    if len(docs) < _MIN_DOCS_FOR_DOC_SPLIT:
        stream = np.asarray([t for d in docs for t in d], dtype=dtype)
        cut = len(stream) if val_fraction <= 0 else int(len(stream) * (1 - val_fraction))
        return stream[:cut].tobytes(), stream[cut:].tobytes(), len(docs), 0
    train, val = [], []
    n_val = 0
    for i, d in enumerate(docs):
        held_out = val_fraction > 0 and _is_val_doc(seed, i, val_fraction)
        (val if held_out else train).extend(d)
        n_val += held_out
    return np.asarray(train, dtype).tobytes(), np.asarray(val, dtype).tobytes(), len(docs), n_val


def _check_cache(path: Path, sources: list[SourceConfig], tokenizer, val_fraction: float, seed: int) -> None:
    meta = json.loads((path / "meta.json").read_text())
    for src in sources:
        train, val, docs, val_docs = _reference_streams(src, tokenizer, val_fraction, seed)
        assert (path / f"{src.name}.train.bin").read_bytes() == train, src.name
        assert (path / f"{src.name}.val.bin").read_bytes() == val, src.name
        m = meta["sources"][src.name]
        assert (m["documents"], m["val_documents"]) == (docs, val_docs)
        assert m["train_tokens"] * token_dtype(len(tokenizer)).itemsize == len(train) and len(train) > 0


@pytest.fixture(scope="module")
def shared_sources(shared_data):
    return [
        SourceConfig("web", weight=2.0, path=str(shared_data / "web" / "dclm_quality_agreement_data.jsonl")),
        SourceConfig("books", path=str(shared_data / "books" / "gutenberg_11_alice_in_wonderland.txt")),
        SourceConfig("code", path=str(shared_data / "code" / "codexglue_cosqa_dev_python.json"), text_field="code",
                     max_documents=150),
    ]


@pytest.fixture(scope="module")
def shared_tokenizer(shared_sources, tmp_path_factory):
    texts = [d for s in shared_sources for d in iter_documents(s)]
    return train_bpe(texts, vocab_size=600, out_dir=tmp_path_factory.mktemp("tok") / "bpe")


@pytest.mark.parametrize("val_fraction", [0.05, 0.0])
def test_cache_is_bit_identical_to_per_document_encoding(shared_sources, shared_tokenizer, tmp_path, monkeypatch, val_fraction):
    # tiny batches and blocks so that batch and block boundaries fall inside every source
    monkeypatch.setattr(packing, "_ENCODE_DOCS", 7)
    monkeypatch.setattr(packing, "_BLOCK_TOKENS", 1000)
    path, streams = build_or_load_cache(shared_sources, shared_tokenizer, tmp_path, val_fraction=val_fraction, seed=3)
    _check_cache(path, shared_sources, shared_tokenizer, val_fraction, seed=3)
    assert streams["books"].documents == 1 and streams["web"].documents == 281


def test_cache_with_default_blocks_matches_reference_and_special_token_text(shared_tokenizer, tmp_path):
    # a document containing the special tokens' text: the backend must match them as the tokenizer call does
    f = tmp_path / "special.jsonl"
    rows = [{"text": f"doc {i} <|eos|> then <|user|> and <|pad|>{'x' * (i % 5)}"} for i in range(40)]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    srcs = [SourceConfig("special", path=str(f))]
    path, streams = build_or_load_cache(srcs, shared_tokenizer, tmp_path / "cache", val_fraction=0.1, seed=0)
    _check_cache(path, srcs, shared_tokenizer, 0.1, seed=0)
    assert shared_tokenizer.eos_token_id in np.asarray(streams["special"].train[:20])


def test_ids_encoder_matches_tokenizer_call_even_with_truncation_configured(shared_tokenizer, shared_sources):
    texts = [d for _, d in zip(range(30), iter_documents(shared_sources[0]))] + ["", "<|bos|>x<|end|>"]
    expected = shared_tokenizer(texts, add_special_tokens=False)["input_ids"]
    shared_tokenizer.backend_tokenizer.enable_truncation(16)  # a saved truncation setting must not cut documents
    try:
        assert ids_encoder(shared_tokenizer)(texts) == expected
    finally:
        shared_tokenizer.backend_tokenizer.no_truncation()
    assert max(len(x) for x in expected) > 16


def test_prepare_reads_each_document_once_and_gives_the_same_tokenizer_and_cache(shared_sources, tmp_path, monkeypatch):
    pulled: dict[str, int] = {}
    real = reading.iter_documents

    def counting(src, idx=None):
        for doc in real(src, idx):
            pulled[src.name] = pulled.get(src.name, 0) + 1
            yield doc

    monkeypatch.setattr(reading, "iter_documents", counting)
    train_cfg = TokenizerTrainConfig(vocab_size=600, sample_chars=200_000)
    dm = PretrainDataModule(shared_sources, tokenizer=str(tmp_path / "tok"), tokenizer_train=train_cfg, seq_len=32,
                            batch_size=2, cache_dir=str(tmp_path / "cache"), val_fraction=0.05, seed=5)
    dm.prepare_data()
    expected = {s.name: sum(1 for _ in real(s)) for s in shared_sources}
    assert pulled == expected  # each document read once although training and packing both used it
    # the same tokenizer and the same cache bytes as training and packing each reading on their own
    alone = train_tokenizer_on_mixture(shared_sources, str(tmp_path / "tok_alone"), train_cfg)
    assert alone.backend_tokenizer.to_str() == dm.tokenizer.backend_tokenizer.to_str()
    dm.setup()
    _check_cache(dm.cache_path, shared_sources, alone, 0.05, seed=5)


def test_module_docstring_equals_a_whole_module_parse():
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("*.py"))
    assert len(files) > 100
    found = 0
    for f in files:
        text = f.read_text(encoding="utf-8")
        expected = ast.get_docstring(ast.parse(text))
        assert module_docstring(text) == expected, f.name
        found += expected is not None
    assert found > 100
    for src in ['("doc"\n "more")\nx = 1', '"a".join(x)\n', 'import x\n"""no"""', '"""a"""; x = 1', '("a", "b")\n', "b'x'\n"]:
        assert module_docstring(src) == ast.get_docstring(ast.parse(src)), src


def test_prepare_tokenize_stage_matches_per_document_encoding(shared_sources, shared_tokenizer, tmp_path):
    import gzip

    from lmlab.data.prepare.engine import ShardTask
    from lmlab.data.prepare.stages import TokenizeStage, shard_name

    texts = list(iter_documents(shared_sources[0])) + ["<|eos|> inside", "x"]
    path = tmp_path / "docs.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"n": 10 + i, "text": t}) + "\n")
    stage = TokenizeStage(cfg=None, src=None, idx=0, tokenizer_key="first-use-test", dtype="uint16")
    (tmp_path / "out").mkdir()
    stats = stage.process(shared_tokenizer, ShardTask(0, str(path), tmp_path / "out"))
    eos = shared_tokenizer.eos_token_id
    rows = [shared_tokenizer(t, add_special_tokens=False)["input_ids"] + [eos] for t in texts]
    expected = np.asarray([x for r in rows for x in r], dtype=np.uint16)
    assert (tmp_path / "out" / f"{shard_name(0)}.tokens.bin").read_bytes() == expected.tobytes()
    index = np.load(tmp_path / "out" / f"{shard_name(0)}.index.npy")
    assert index["n"].tolist() == [10 + i for i in range(len(texts))]
    assert index["length"].tolist() == [len(r) for r in rows]
    assert stats["tokens"] == len(expected) and len(texts) > 281


def test_ids_encoder_keeps_the_call_of_a_class_that_changes_it(shared_tokenizer):
    from transformers import PreTrainedTokenizerFast

    class Shouting(PreTrainedTokenizerFast):
        def _encode_plus(self, text, *args, **kwargs):
            upper = [t.upper() for t in text] if isinstance(text, list) else text.upper()
            return super()._encode_plus(upper, *args, **kwargs)

    shouting = Shouting(tokenizer_object=shared_tokenizer.backend_tokenizer, eos_token="<|eos|>")
    texts = ["quiet words here", "more quiet words"]
    expected = shouting(texts, add_special_tokens=False)["input_ids"]
    assert expected != shared_tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert ids_encoder(shouting)(texts) == expected
    assert ids_encoder(shared_tokenizer)(texts) == shared_tokenizer(texts, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("src", ['"""doc\x0cwith a form feed"""\nx = 1', '"a" \x0c "b"\n', '"""a\u2028b"""\n', '\x0c\n"""d"""\n'])
def test_module_docstring_with_line_breaks_other_than_newline(src):
    assert module_docstring(src) == ast.get_docstring(ast.parse(src))
