"""Sources, tokenizer, packing cache, mixture sampling and the DataModule."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest

from lmlab.data import PretrainDataModule, SourceConfig, TokenizerTrainConfig
from lmlab.data.pretrain.datamodule import MixtureBatches
from lmlab.data.pretrain.mixture import MixtureSampler
from lmlab.data.pretrain.packing import build_or_load_cache
from lmlab.data.pretrain.sources import iter_documents
from lmlab.data.tokenizer import SPECIAL_TOKENS, load_tokenizer, token_byte_lengths, train_bpe
from lmlab.errors import ConfigError

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau".split()


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)) + "."


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    (root / "web").mkdir()
    with open(root / "web" / "part0.jsonl", "w") as f:
        for i in range(120):
            f.write(json.dumps({"text": _text(rng, 60), "id": i}) + "\n")
    (root / "books").mkdir()
    for i in range(3):
        (root / "books" / f"book{i}.txt").write_text("\n".join(_text(rng, 40) for _ in range(40)))
    (root / "code").mkdir()
    with open(root / "code" / "snippets.jsonl", "w") as f:
        for i in range(60):
            f.write(json.dumps({"content": f"def f{i}(x):\n    return x + {i}\n"}) + "\n")
    return root


@pytest.fixture(scope="module")
def tokenizer_dir(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "bpe"
    src = [SourceConfig("web", path=str(corpus / "web")), SourceConfig("books", path=str(corpus / "books"))]
    texts = [t for s in src for t in iter_documents(s)]
    train_bpe(texts, vocab_size=400, out_dir=out)
    return out


def sources(corpus, weights=(0.6, 0.3, 0.1)):
    return [
        SourceConfig("web", weight=weights[0], path=str(corpus / "web" / "*.jsonl")),
        SourceConfig("books", weight=weights[1], path=str(corpus / "books")),
        SourceConfig("code", weight=weights[2], path=str(corpus / "code" / "snippets.jsonl"), text_field="content"),
    ]


def test_tokenizer_roundtrip_special_tokens_and_byte_lengths(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert 256 + len(SPECIAL_TOKENS) < len(tok) <= 400  # a small corpus may run out of merges
    for s in SPECIAL_TOKENS:
        assert tok.convert_tokens_to_ids(s) is not None and tok.convert_tokens_to_ids(s) != tok.unk_token_id
    text = "alpha beta — ünïcode 123"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    nbytes = token_byte_lengths(tok)
    assert int(nbytes[ids].sum()) == len(text.encode("utf-8"))
    assert nbytes[tok.eos_token_id] == 0


def test_sources_read_txt_as_whole_documents_and_pick_fields(corpus):
    books = list(iter_documents(SourceConfig("books", path=str(corpus / "books"))))
    assert len(books) == 3 and books[0].count("\n") >= 39
    code = list(iter_documents(SourceConfig("code", path=str(corpus / "code" / "*.jsonl"), text_field="content")))
    assert len(code) == 60 and code[5].startswith("def f5")
    with pytest.raises(ConfigError, match=r"text_field"):
        list(iter_documents(SourceConfig("code", path=str(corpus / "code" / "*.jsonl"), text_field="body")))


def test_stdlib_sources_are_available_offline():
    code = list(iter_documents(SourceConfig("code", type="stdlib", path="code", max_documents=5)))
    docs = list(iter_documents(SourceConfig("ref", type="stdlib", path="docs", max_documents=5)))
    assert len(code) == 5 and any("def " in c or "import" in c for c in code)
    assert len(docs) == 5 and all(len(d) > 50 for d in docs)


def test_cache_is_keyed_reused_and_splits_validation(corpus, tokenizer_dir, tmp_path):
    tok = load_tokenizer(str(tokenizer_dir))
    path1, streams = build_or_load_cache(sources(corpus), tok, tmp_path, val_fraction=0.1, seed=0)
    mtime = os.path.getmtime(path1 / "meta.json")
    path2, _ = build_or_load_cache(sources(corpus), tok, tmp_path, val_fraction=0.1, seed=0)
    assert path1 == path2 and os.path.getmtime(path2 / "meta.json") == mtime
    path3, _ = build_or_load_cache(sources(corpus), tok, tmp_path, val_fraction=0.2, seed=0)
    assert path3 != path1
    web = streams["web"]
    assert web.train.dtype == np.uint16
    assert web.val_documents == 12  # evenly spaced: exactly 10% of 120 documents
    assert (web.train == tok.eos_token_id).sum() == 108
    books = streams["books"]  # 3 documents: the tail of the stream is held out
    total = len(books.train) + len(books.val)
    assert abs(len(books.val) / total - 0.1) < 0.01
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_corrupt_cache_gives_one_line_error(corpus, tokenizer_dir, tmp_path):
    tok = load_tokenizer(str(tokenizer_dir))
    path, _ = build_or_load_cache(sources(corpus), tok, tmp_path, val_fraction=0.1)
    with open(path / "web.train.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(ConfigError, match="corrupt") as e:
        build_or_load_cache(sources(corpus), tok, tmp_path, val_fraction=0.1)
    assert "\n" not in str(e.value) and "delete" in str(e.value)


@pytest.mark.parametrize("weights", [(0.65, 0.2, 0.15), (0.05, 0.9, 0.05), (3.0, 1.0, 0.0)])
def test_realised_shares_within_one_point_of_weights(weights):
    sampler = MixtureSampler(["a", "b", "c"], weights, sizes=[1000, 37, 5], seed=3)
    w = np.asarray(weights) / sum(weights)
    for n in (1000, 5000, 20_000):
        share = sampler.counts(n) / n
        assert np.abs(share - w).max() < 0.01, (n, share, w)
    # at allocation-chunk boundaries each source is within one sample of its exact share
    for chunks in (1, 7, 40):
        n = chunks * sampler.chunk_size
        assert np.abs(sampler.counts(n) - n * w).max() < 1.0


def test_small_sources_repeat_with_fresh_order_and_report_epochs():
    sampler = MixtureSampler(["big", "small"], [0.5, 0.5], sizes=[10_000, 10], seed=0)
    src, win = sampler.draw(0, 512)  # two whole allocation chunks
    small = win[src == 1]
    assert len(small) == 256
    first, second = small[:10], small[10:20]
    assert sorted(first) == list(range(10)) and sorted(second) == list(range(10))
    assert list(first) != list(second)
    assert sampler.epochs(512)["small"] == pytest.approx(25.6)
    assert sampler.epochs(512)["big"] < 1


def test_sampler_is_a_pure_function_of_seed_and_index():
    a = MixtureSampler(["x", "y"], [0.7, 0.3], [500, 300], seed=11)
    b = MixtureSampler(["x", "y"], [0.7, 0.3], [500, 300], seed=11)
    c = MixtureSampler(["x", "y"], [0.7, 0.3], [500, 300], seed=12)
    whole = a.draw(0, 3000)
    # drawing a later range first (as a resumed run does) gives the same samples
    part = b.draw(1700, 3000)
    assert np.array_equal(whole[0][1700:], part[0]) and np.array_equal(whole[1][1700:], part[1])
    assert not np.array_equal(whole[1], c.draw(0, 3000)[1])


def test_bad_weights_and_sources(corpus):
    with pytest.raises(ConfigError, match="weight"):
        MixtureSampler(["a"], [-1.0], [10])
    with pytest.raises(ConfigError, match="sum to zero"):
        MixtureSampler(["a", "b"], [0.0, 0.0], [10, 10])
    with pytest.raises(ConfigError, match=r"data.sources\[0\].path"):
        PretrainDataModule([SourceConfig("web", path=str(corpus / "missing" / "*.jsonl"))], tokenizer="x")
    with pytest.raises(ConfigError, match=r"data.sources\[1\].weight"):
        PretrainDataModule(
            [SourceConfig("web", path=str(corpus / "web")), SourceConfig("b", weight=-2, path=str(corpus / "books"))],
            tokenizer="x",
        )
    with pytest.raises(ConfigError, match="type"):
        PretrainDataModule([SourceConfig("web", type="ftp", path="x")], tokenizer="x")


def test_empty_source_fails_clearly_and_leaves_nothing(corpus, tokenizer_dir, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"text": "   "}) + "\n")
    srcs = [SourceConfig("web", path=str(corpus / "web")), SourceConfig("void", path=str(empty))]
    cache = tmp_path / "cache"
    with pytest.raises(ConfigError, match=r"void.*no documents"):
        build_or_load_cache(srcs, load_tokenizer(str(tokenizer_dir)), cache)
    assert os.listdir(cache) == []


def _dm(corpus, tokenizer_dir, tmp_path, **kw):
    args = dict(sources=sources(corpus), tokenizer=str(tokenizer_dir), seq_len=32, batch_size=8,
                cache_dir=str(tmp_path), val_fraction=0.1, seed=5)
    args.update(kw)
    dm = PretrainDataModule(**args)
    dm.setup()
    return dm


def test_each_rank_gets_distinct_slices_of_the_same_global_batch(corpus, tokenizer_dir, tmp_path):
    dm = _dm(corpus, tokenizer_dir, tmp_path)
    streams = [dm.streams[s.name].train for s in dm.sources]
    single = MixtureBatches(streams, dm.sampler, dm.schedule, 32, rank=0, world_size=1)
    r0 = MixtureBatches(streams, dm.sampler, dm.schedule, 32, rank=0, world_size=2)
    r1 = MixtureBatches(streams, dm.sampler, dm.schedule, 32, rank=1, world_size=2)
    for step in (0, 3):
        whole = single.batch_for_step(step)["tokens"]
        a, b = r0.batch_for_step(step)["tokens"], r1.batch_for_step(step)["tokens"]
        assert a.shape == (4, 33) and b.shape == (4, 33)
        assert (whole[:4] == a).all() and (whole[4:] == b).all()


def test_stream_resumes_at_a_step_and_workers_keep_order(corpus, tokenizer_dir, tmp_path):
    dm = _dm(corpus, tokenizer_dir, tmp_path, batch_ramp_interval=3, batch_ramp_cap=32)
    streams = [dm.streams[s.name].train for s in dm.sources]
    full = list(MixtureBatches(streams, dm.sampler, dm.schedule, 32, 0, 1, 0, 8))
    resumed = list(MixtureBatches(streams, dm.sampler, dm.schedule, 32, 0, 1, 5, 8))
    assert [b["step"] for b in resumed] == [5, 6, 7]
    for x, y in zip(full[5:], resumed):
        assert (x["tokens"] == y["tokens"]).all()
    assert [b["tokens"].shape[0] for b in full] == [8, 8, 8, 16, 16, 16, 32, 32]
    from torch.utils.data import DataLoader

    ds = MixtureBatches(streams, dm.sampler, dm.schedule, 32, 0, 1, 0, 8)
    two = list(DataLoader(ds, batch_size=None, num_workers=2))
    assert [b["step"] for b in two] == list(range(8))
    assert all((x["tokens"] == y["tokens"]).all() for x, y in zip(full, two))


def test_datamodule_reports_shares_and_val_loaders(corpus, tokenizer_dir, tmp_path):
    dm = _dm(corpus, tokenizer_dir, tmp_path)
    stats = dm.train_stats(steps=200)
    for s in dm.sources:
        assert abs(stats["share"][s.name] - s.weight) < 0.01
    assert stats["tokens"] == 200 * 8 * 32
    assert stats["epochs"]["code"] > 1  # the small code source is repeated
    names = dm.val_source_names
    assert set(names) == {"web", "books", "code"}
    loaders = dm.val_dataloader()
    assert len(loaders) == 3 and next(iter(loaders[0])).shape[1] == 33


# -- no silent data errors: the text field and invalid UTF-8 (shared with `lmlab data prepare`) --


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_json_source_without_its_text_field_is_a_one_line_error_listing_the_fields(tmp_path):
    # no `text` key: the first string column (`title`) must not be trained on instead
    _jsonl(tmp_path / "a.jsonl", [{"title": f"t{i}", "body": f"document {i}", "id": i} for i in range(30)])
    with pytest.raises(ConfigError) as e:
        list(iter_documents(SourceConfig("web", path=str(tmp_path / "a.jsonl")), 0))
    msg = str(e.value)
    assert e.value.field == "data.sources[0].text_field"
    assert "'text'" in msg and "body, id, title" in msg and "\n" not in msg
    with pytest.raises(ConfigError, match=r"text_field: no record of source 'web' has the text field 'content'"):
        list(iter_documents(SourceConfig("web", path=str(tmp_path / "a.jsonl"), text_field="content")))
    docs = list(iter_documents(SourceConfig("web", path=str(tmp_path / "a.jsonl"), text_field="body")))
    assert docs == [f"document {i}" for i in range(30)]


def test_records_without_the_text_field_are_counted_and_fail_past_the_fraction(tmp_path, caplog):
    rows = [{"text": f"document {i}"} for i in range(200)]
    rows[7] = {"txt": "typo"}
    _jsonl(tmp_path / "one.jsonl", rows)
    with caplog.at_level("WARNING", logger="lmlab.data.textread"):
        docs = list(iter_documents(SourceConfig("web", path=str(tmp_path / "one.jsonl"))))
    assert len(docs) == 199 and "document 7" not in docs
    assert any("1 of 200 records" in r.getMessage() and "'web'" in r.getMessage() for r in caplog.records)
    assert SourceConfig("web").max_missing_text_fraction == 0.01
    for i in range(0, 200, 20):  # 11 of 200 missing: 5.5% > 1%
        rows[i] = {"txt": "typo"}
    _jsonl(tmp_path / "many.jsonl", rows)
    with pytest.raises(ConfigError) as e:
        list(iter_documents(SourceConfig("web", path=str(tmp_path / "many.jsonl")), 2))
    assert e.value.field == "data.sources[2].max_missing_text_fraction"
    assert "11 of 200 records (5.50%)" in str(e.value)
    loose = SourceConfig("web", path=str(tmp_path / "many.jsonl"), max_missing_text_fraction=0.1)
    assert len(list(iter_documents(loose))) == 189


def test_invalid_utf8_is_replaced_and_counted_in_fit_sources(tmp_path, caplog):
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "a.jsonl").write_bytes(b'{"text": "caf\xe9 ok"}\n{"text": "clean"}\n{"text": "\xff\xfe end"}\n')
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "a.txt").write_bytes(b"It was \xe9t\xe9 then.\r\nNext line.\n")
    with caplog.at_level("WARNING", logger="lmlab.data.pretrain.sources"):
        docs = list(iter_documents(SourceConfig("web", path=str(tmp_path / "j"))))
        books = list(iter_documents(SourceConfig("books", path=str(tmp_path / "t"))))
    assert docs == ["caf\ufffd ok", "clean", "\ufffd\ufffd end"]
    assert books == ["It was \ufffdt\ufffd then.\nNext line.\n"]
    msgs = [r.getMessage() for r in caplog.records]
    assert any("'web'" in m and "3 invalid UTF-8 byte sequences in 2 documents" in m for m in msgs)
    assert any("'books'" in m and "2 invalid UTF-8 byte sequences in 1 documents" in m for m in msgs)


def test_fit_and_prepare_read_the_same_documents_and_fail_the_same_way(tmp_path):
    from collections import Counter

    from lmlab.data.prepare.config import PrepSource
    from lmlab.data.prepare.normalize import NormalizeConfig, Normalizer
    from lmlab.data.prepare.readers import SkipLog, iter_raw_records, record_to_document
    from lmlab.data.prepare.selection import check_text_fields
    from lmlab.data.textread import TextFieldTally

    _jsonl(tmp_path / "a.jsonl", [{"body": f"document {i}", "id": i} for i in range(10)])
    src = PrepSource("web", path=str(tmp_path / "a.jsonl"))
    norm = Normalizer(NormalizeConfig(unicode_form=None, collapse_spaces=False, strip_document=False))
    tally = TextFieldTally()
    docs = [record_to_document(r, src, norm, None, None, Counter(), tally) for r in iter_raw_records(src, 0, SkipLog())]
    assert [why for _, why in docs] == ["no_text_field"] * 10

    class _Res:
        stats = {"json_records": tally.rows, "json_records_without_text": tally.missing,
                 "fields_of_records_without_text": dict(tally.fields)}

    class _Cfg:
        sources = [src]

    with pytest.raises(ConfigError) as prep:
        check_text_fields(_Cfg, {"web": _Res})
    with pytest.raises(ConfigError) as fit:
        list(iter_documents(src.source_config(), 0))
    assert prep.value.field == "sources[0].text_field" and fit.value.field == "data.sources[0].text_field"
    assert prep.value.problem == fit.value.problem == "no record of source 'web' has the text field 'text' (its records have: body, id)"
