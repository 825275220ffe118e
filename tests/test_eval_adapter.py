"""LmlabLM: lm-eval compatible loglikelihood and generate over an lmlab CausalLM."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from helpers import web_texts, write_corpus
from lmlab.data.tokenizer import train_bpe
from lmlab.errors import ConfigError
from lmlab.eval.adapter import LmlabLM
from lmlab.eval.harness import evaluate
from lmlab.eval.protocol import LanguageModel
from lmlab.models import CausalLM, TransformerConfig, generate, left_pad

pytestmark = pytest.mark.usefixtures("single_thread")

VOCAB = 300  # padded to 320 inside the model: the 20 padding rows must never count


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter")
    write_corpus(root / "corpus")
    texts = web_texts(root / "corpus")
    return train_bpe(texts, VOCAB, root / "tok")


def tiny_model(seed: int = 0, **kw) -> CausalLM:
    torch.manual_seed(seed)
    cfg = TransformerConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, **kw)
    model = CausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # a peaky distribution, so argmax and sums are informative
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return model


def enc(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def reference_ll(model, tok, context, continuation, max_length=64):
    """lm-eval's recipe, written out: whitespace moves to the continuation, joint encoding, left cut."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    if context:
        whole, ctx = enc(tok, context + continuation), enc(tok, context)
        cont = whole[len(ctx):]
    else:
        ctx, cont = [tok.eos_token_id], enc(tok, continuation)
        whole = ctx + cont
    if not cont:
        return 0.0, True
    whole = whole[-(max_length + 1):]
    with torch.no_grad():
        logits = model(torch.tensor([whole[:-1]]))[0, :, :VOCAB].double().log_softmax(-1)
    picked = logits[len(whole) - 1 - len(cont):]
    target = torch.tensor(cont)
    ll = picked.gather(1, target[:, None]).sum().item()
    return ll, bool((picked.argmax(-1) == target).all())


REQUESTS = [
    ("the cat sat on a", " mat"),
    ("Question: where?\nAnswer:", " in the park while the dog ran"),
    ("a bird sang ", "over the old tree"),  # trailing space moves to the continuation
    ("", "quiet water"),  # empty context: the EOS prefix stands in
    ("near", " fish swim slowly under bright morning light and the cat sat"),
    ("x", ""),
]


def test_protocol_and_loglikelihood_match_the_reference_in_request_order(tok):
    model = tiny_model()
    lm = LmlabLM(model, tok, batch_size=4)
    assert isinstance(lm, LanguageModel)
    got = lm.loglikelihood(REQUESTS)
    assert len(got) == len(REQUESTS)
    for (ctx, cont), (ll, greedy) in zip(REQUESTS, got):
        ref_ll, ref_greedy = reference_ll(model, tok, ctx, cont)
        assert ll == pytest.approx(ref_ll, abs=1e-4), (ctx, cont)
        assert greedy == ref_greedy
    assert got[-1] == (0.0, True)  # nothing to score
    assert all(ll < 0 for ll, _ in got[:-1])
    # the batch size only changes the grouping, never the numbers
    again = LmlabLM(model, tok, batch_size=1).loglikelihood(REQUESTS)
    assert [ll for ll, _ in again] == pytest.approx([ll for ll, _ in got], abs=1e-4)


def test_uniform_model_scores_log_of_the_real_vocab_and_is_greedy_on_token_zero(tok):
    model = tiny_model()
    with torch.no_grad():
        model.backbone.norm.weight.zero_()  # hidden state 0 -> every logit 0
    lm = LmlabLM(model, tok, batch_size=2)
    (ll, greedy), = lm.loglikelihood([("the cat", " sat on a mat")])
    n = len(enc(tok, "the cat sat on a mat")) - len(enc(tok, "the cat"))
    assert ll == pytest.approx(-n * math.log(VOCAB), rel=1e-6)  # log 300, not log 320
    assert greedy is False
    zero = tok.convert_ids_to_tokens(0)
    (_, greedy0), = lm.loglikelihood([("the cat", zero + zero)])  # ties break to id 0, like argmax
    assert greedy0 is True


def test_long_contexts_lose_their_start(tok):
    model = tiny_model()
    lm = LmlabLM(model, tok, batch_size=2, max_length=16)
    ctx = " ".join(["the cat sat on a mat"] * 10)
    (ll, _), = lm.loglikelihood([(ctx, " while the dog ran")])
    ref, _ = reference_ll(model, tok, ctx, " while the dog ran", max_length=16)
    full, _ = reference_ll(model, tok, ctx, " while the dog ran", max_length=64)
    assert ll == pytest.approx(ref, abs=1e-4)
    assert abs(ref - full) > 1e-3  # the cut really changed what the model saw
    assert lm.stats["truncated_contexts"] == 1

    # a continuation longer than the window is scored in chunks of 8, each given the 16 tokens before it
    cont = " the cat sat on a mat" * 6
    (ll, greedy), = lm.loglikelihood([("a dog", cont)])
    seq = enc(tok, "a dog" + cont)
    start = len(enc(tok, "a dog"))
    assert len(seq) - start > 16 and lm.stats["split_continuations"] == 1
    expected, all_greedy = 0.0, True
    for a in range(start, len(seq), 8):
        b = min(a + 8, len(seq))
        window = seq[max(0, b - 17):b]
        with torch.no_grad():
            logp = model(torch.tensor([window[:-1]]))[0, :, :VOCAB].double().log_softmax(-1)[-(b - a):]
        target = torch.tensor(seq[a:b])
        expected += logp.gather(1, target[:, None]).sum().item()
        all_greedy &= bool((logp.argmax(-1) == target).all())
    assert ll == pytest.approx(expected, abs=1e-4) and greedy == all_greedy


def test_generate_matches_lmlab_generate_and_records_unstopped_generations(tok):
    model = tiny_model(seed=1)
    prompts = ["the cat sat", "a bird sang over the old tree near", "fish"]
    lm = LmlabLM(model, tok, batch_size=2)
    texts = lm.generate(prompts, 12, [])
    reasons = []
    for prompt, text in zip(prompts, texts):
        ids, mask = left_pad([enc(tok, prompt)], tok.pad_token_id)
        out = generate(model, ids, mask, max_new_tokens=12, temperature=0, stop_token_ids=lm.stop_ids,
                       pad_id=tok.pad_token_id)
        tokens = out.responses[0][out.response_mask[0].bool()].tolist()
        if out.finished[0]:
            tokens = tokens[:-1]
        else:
            assert len(tokens) == 12
        reasons.append("stop_token" if out.finished[0] else "length")
        assert text == tok.decode(tokens, skip_special_tokens=True)
    assert lm.finish_reasons == reasons
    assert lm.stats["hit_max_new_tokens"] == reasons.count("length") > 0

    # decoding in segments of 5 tokens (to check stop strings) changes nothing when no stop string occurs
    seg = LmlabLM(model, tok, batch_size=3, stop_check_every=5)
    assert seg.generate(prompts, 12, ["\u2603never\u2603"]) == texts

    # a stop string cuts the text before it, and the reason is recorded
    full = texts[1]
    stop = next(full[i: i + 2] for i in range(len(full) // 2, len(full) - 1) if full[i: i + 2].strip())
    cut = seg.generate([prompts[1]], 12, [stop])[0]
    assert cut == full[: full.find(stop)]
    assert seg.finish_reasons == ["stop_string"]


def test_generate_cuts_prompts_from_the_left(tok):
    model = tiny_model(seed=2)
    lm = LmlabLM(model, tok, batch_size=2, max_length=20)
    long_prompt = "the cat sat on a mat " * 12
    text = lm.generate([long_prompt], 8, [])[0]
    ids = enc(tok, long_prompt)[-(20 - 8):]
    out = generate(model, torch.tensor([ids]), max_new_tokens=8, temperature=0, stop_token_ids=lm.stop_ids)
    tokens = out.responses[0][out.response_mask[0].bool()].tolist()
    tokens = tokens[:-1] if out.finished[0] else tokens
    assert text == tok.decode(tokens, skip_special_tokens=True)
    assert lm.stats["truncated_prompts"] == 1


def test_from_checkpoint_finds_the_tokenizer_in_the_run_config(tok, tmp_path, monkeypatch):
    model = tiny_model(seed=3, tie_embeddings=True)
    run = tmp_path / "runs" / "exp" / "version_0"
    (run / "checkpoints").mkdir(parents=True)
    ckpt = run / "checkpoints" / "last.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "lmlab": {"stage": "pretrain", "model_config": model.config.to_dict()}}, ckpt)
    tok.save_pretrained(tmp_path / "tokdir")
    # LightningCLI saves the run's config beside the log dir; its tokenizer path is relative to the cwd
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"init_args": {"tokenizer": "tokdir"}}}))
    monkeypatch.chdir(tmp_path)
    lm = LmlabLM.from_checkpoint(ckpt, batch_size=2)
    assert lm.model.lm_head.weight is lm.model.backbone.tok_emb.weight
    expected = LmlabLM(model, tok, batch_size=2).loglikelihood(REQUESTS[:3])
    got = lm.loglikelihood(REQUESTS[:3])
    assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in expected], abs=1e-5)
    assert [g for _, g in got] == [g for _, g in expected]

    (run / "config.yaml").unlink()
    with pytest.raises(ConfigError, match="--tokenizer"):
        LmlabLM.from_checkpoint(ckpt)
    with pytest.raises(ConfigError, match="does not exist"):
        LmlabLM.from_checkpoint(tmp_path / "missing.ckpt", tokenizer=tmp_path / "tokdir")


def test_bad_tokenizers_are_rejected(tok, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    no_eos = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]")
    with pytest.raises(ConfigError, match="EOS"):
        LmlabLM(tiny_model(), no_eos)
    small = CausalLM(TransformerConfig(vocab_size=200, d_model=32, n_layers=1, n_heads=4, max_seq_len=32))
    with pytest.raises(ConfigError, match="300 tokens but the model only 200"):
        LmlabLM(small, tok)
    with pytest.raises(ConfigError, match="max_length"):
        LmlabLM(tiny_model(), tok, max_length=1000)


def test_evaluate_runs_local_tasks_through_the_adapter(tok, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"query": f"the cat sat on {w}", "choices": ["a mat", "the park", "water"], "gold": i % 3}
            for i, w in enumerate(["a", "the", "old", "quiet", "bright"])]
    (data / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = tmp_path / "mc.yaml"
    spec.write_text(yaml.safe_dump({"name": "mc", "type": "multiple_choice", "data": {"path": "mc.jsonl"},
                                    "doc_to_text": "{query}\nAnswer:", "doc_to_choice": "choices", "answer": "gold",
                                    "metrics": ["acc", "acc_norm"]}))
    model = tiny_model(seed=4)
    lm = LmlabLM(model, tok, batch_size=4)
    out = evaluate(lm, [str(spec)], data_dir=data, limit=4, progress=False)
    res = out["results"]["mc"]
    assert res["n"] == 4
    # acc recomputed from the adapter's own scores
    correct = []
    for r in rows[:4]:
        scores = [ll for ll, _ in lm.loglikelihood([(r["query"] + "\nAnswer:", " " + c) for c in r["choices"]])]
        correct.append(float(max(range(3), key=lambda i: (scores[i], -i)) == r["gold"]))
    assert res["acc"] == pytest.approx(sum(correct) / 4)
