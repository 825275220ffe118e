"""Sliding-window perplexity and bits per byte."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import corpus_sources, web_texts, write_corpus
from lmlab.data.tokenizer import token_byte_lengths, train_bpe
from lmlab.errors import ConfigError
from lmlab.eval.perplexity import mixture_perplexity, perplexity, score_documents, split_stream, window_spans
from lmlab.models import CausalLM, TransformerConfig

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppl")
    write_corpus(root / "corpus")
    texts = web_texts(root / "corpus")
    tok = train_bpe(texts, 300, root / "tok")
    return root, texts, tok


def random_model(vocab: int = 300, max_seq_len: int = 64, seed: int = 0) -> CausalLM:
    torch.manual_seed(seed)
    model = CausalLM(TransformerConfig(vocab_size=vocab, d_model=32, n_layers=2, n_heads=4, max_seq_len=max_seq_len))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return model.eval()


def token_nll(model, inputs: list[int], targets: list[int]) -> float:
    """Summed NLL of ``targets`` given ``inputs`` (aligned), one unpadded forward pass."""
    with torch.no_grad():
        logp = model(torch.tensor([inputs]))[0, :, : model.config.vocab_size].double().log_softmax(-1)
    return -logp.gather(1, torch.tensor(targets)[:, None]).sum().item()


@pytest.mark.parametrize("n,L,stride", [(1, 8, 8), (7, 8, 3), (8, 8, 8), (30, 8, 8), (30, 8, 3), (31, 10, 1), (50, 16, 5)])
def test_window_spans_score_every_token_once_with_bounded_context(n, L, stride):
    seen = []
    min_ctx = []
    for begin, end, scored in window_spans(n, L, stride):
        assert 0 <= begin < end <= n and end - begin <= L and 1 <= scored <= end - begin
        targets = range(end - scored + 1, end + 1)
        seen.extend(targets)
        min_ctx.append(min(i - begin for i in targets))
    assert seen == list(range(1, n + 1))
    # after the first window every token sees at least L - stride + 1 tokens (or all that precede it)
    for (begin, end, scored), ctx in zip(window_spans(n, L, stride)[1:], min_ctx[1:]):
        assert ctx >= min(L - stride + 1, end - scored + 1)
    with pytest.raises(ConfigError, match="stride"):
        window_spans(n, L, L + 1)


def test_stride_equal_to_window_is_chunked_evaluation(corpus):
    _, texts, tok = corpus
    model = random_model()
    docs = [tok(t, add_special_tokens=False)["input_ids"] for t in texts[:4]]
    L = 16
    res = score_documents(model, docs, max_length=L, stride=L, batch_size=3, prefix_token_id=tok.eos_token_id)
    # chunked, written out: [eos] + doc cut into consecutive chunks of L inputs, each scoring its L targets
    expected, count = 0.0, 0
    for doc in docs:
        seq = [tok.eos_token_id] + doc
        for start in range(0, len(seq) - 1, L):
            inputs, targets = seq[start: start + L], seq[start + 1: start + L + 1]
            expected += token_nll(model, inputs[: len(targets)], targets)
            count += len(targets)
    assert res.tokens == count == sum(len(d) for d in docs)
    assert res.nll == pytest.approx(expected, rel=1e-5)
    assert res.ppl == pytest.approx(math.exp(expected / count), rel=1e-5)
    assert res.windows == sum(math.ceil(len(d) / L) for d in docs)


def test_short_document_equals_a_full_context_computation_exactly(corpus):
    _, texts, tok = corpus
    model = random_model()
    doc = tok(texts[0], add_special_tokens=False)["input_ids"][:40]
    seq = [tok.eos_token_id] + doc
    with torch.no_grad():
        logp = model(torch.tensor([seq[:-1]]))[0, :, :300].float().log_softmax(-1)
        full = (-logp.gather(1, torch.tensor(seq[1:])[:, None]).squeeze(1)).tolist()
    for stride in (64, 7):  # one window either way: the document fits the context
        res = score_documents(model, [doc], max_length=64, stride=stride, batch_size=1, prefix_token_id=tok.eos_token_id)
        assert res.windows == 1 and res.tokens == len(doc)
        assert res.nll == sum(full)  # the very same computation, not merely close
    # without a prefix the first token is context only (the HF perplexity guide's convention)
    res = score_documents(model, [doc], max_length=64, batch_size=1)
    assert res.tokens == len(doc) - 1
    assert res.nll == pytest.approx(token_nll(model, doc[:-1], doc[1:]), rel=1e-6)


def test_smaller_stride_gives_more_context_and_lower_nll_on_a_memorised_text():
    # A random 40-token sequence over 12 symbols, repeated: one token rarely identifies the position,
    # a few tokens do. A small model memorises it; chunked scoring starts each chunk almost blind.
    g = torch.Generator().manual_seed(0)
    period = torch.randint(0, 12, (40,), generator=g)
    stream = period.repeat(12)
    torch.manual_seed(0)
    model = CausalLM(TransformerConfig(vocab_size=16, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, pad_vocab_to=1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(120):
        starts = torch.randint(0, len(stream) - 33, (8,), generator=g)
        batch = torch.stack([stream[s: s + 33] for s in starts])
        logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    doc = stream[:200].tolist()
    chunked = score_documents(model, [doc], max_length=16, stride=16, batch_size=8)
    sliding = score_documents(model, [doc], max_length=16, stride=4, batch_size=8)
    assert chunked.tokens == sliding.tokens == 199
    assert sliding.mean_context > chunked.mean_context + 3
    assert sliding.windows > chunked.windows
    assert sliding.mean_nll <= chunked.mean_nll
    assert chunked.mean_nll - sliding.mean_nll > 0.05, (chunked.mean_nll, sliding.mean_nll)


def test_text_perplexity_reports_bits_per_utf8_byte(corpus):
    _, texts, tok = corpus
    model = random_model()
    docs = texts[:3] + ["caf\u00e9 na\u00efve \u2603 snow"]
    res = perplexity(model, tok, docs, max_length=32, stride=16, batch_size=4)
    assert res.documents == 4
    assert res.bytes == sum(len(t.encode("utf-8")) for t in docs)  # byte-level BPE: every byte counted once
    assert res.bpb == pytest.approx(res.nll / (math.log(2) * res.bytes))
    assert res.tokens == sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in docs)
    one = perplexity(model, tok, docs[0], max_length=32, stride=16)
    assert one.documents == 1 and one.nll < res.nll
    capped = perplexity(model, tok, docs, max_length=32, stride=16, max_documents=2)
    assert capped.documents == 2
    with pytest.raises(ConfigError, match="max_length"):
        perplexity(model, tok, docs, max_length=128)


def test_split_stream_recovers_documents():
    stream = [5, 6, 0, 7, 0, 0, 8, 9]
    assert [d.tolist() for d in split_stream(stream, 0)] == [[5, 6], [7], [8, 9]]


def test_mixture_validation_splits_are_scored_per_source(corpus):
    root, _, tok = corpus
    model = random_model()
    sources = corpus_sources(root / "corpus")
    out = mixture_perplexity(model, tok, sources, val_fraction=0.05, seed=7, cache_dir=root / "cache",
                             max_length=32, stride=16, batch_size=8, max_documents=5)
    assert set(out) == {"web", "books", "code", "all"}
    parts = [out[n] for n in ("web", "books", "code")]
    assert out["all"].tokens == sum(p.tokens for p in parts)
    assert out["all"].nll == pytest.approx(sum(p.nll for p in parts))
    assert out["all"].bytes == sum(p.bytes for p in parts)
    assert all(p.documents <= 5 and p.tokens > 0 for p in parts)
    # the scored bytes are the ones the validation stream's tokens stand for
    from lmlab.data.pretrain.packing import build_or_load_cache

    _, streams = build_or_load_cache(sources, tok, root / "cache", 0.05, 7)
    nbytes = token_byte_lengths(tok)
    docs = list(split_stream(streams["code"].val, tok.eos_token_id))[:5]
    assert out["code"].bytes == sum(int(nbytes[d].sum()) for d in docs)
    assert out["code"].tokens == sum(len(d) for d in docs)
    # different sources really differ (code is far more repetitive than prose)
    assert out["code"].ppl != pytest.approx(out["web"].ppl)
