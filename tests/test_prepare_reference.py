"""An lmlab checkpoint as the quality score's reference model (a tiny randomly initialised one)."""

from __future__ import annotations

import math

import pytest
import torch

from lmlab.data.prepare.config import PrepareConfig
from lmlab.data.prepare.prepare import prepare
from lmlab.data.prepare.reference_lm import CheckpointPerplexity
from lmlab.errors import ConfigError
from lmlab.models import CausalLM, TransformerConfig
from test_prepare_corpus import all_texts, mixture_config, write_mixture


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from lmlab.data.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("refmodel")
    paths = write_mixture(root / "corpus", seed=2, n_web=24)
    tok = train_bpe(all_texts(paths), 320, root / "tok")
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=320, d_model=32, n_layers=2, n_heads=4, max_seq_len=64)
    model = CausalLM(cfg)
    ckpt = root / "tiny.ckpt"
    # the layout lmlab modules save: "model."-prefixed weights plus the model config
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "lmlab": {"model_config": cfg.to_dict()}}, ckpt)
    return root, paths, tok, model, ckpt


def test_checkpoint_perplexity_matches_a_direct_computation(setup):
    root, paths, tok, model, ckpt = setup
    ppl = CheckpointPerplexity(ckpt, str(root / "tok"), max_tokens=40)
    text = "The quiet river watched the narrow bridge near the old castle, and the baker gathered every candle."
    ids = tok(text, add_special_tokens=False)["input_ids"][:40]
    seq = torch.tensor([[tok.eos_token_id, *ids]])
    with torch.no_grad():
        logits = model(seq[:, :-1])[..., :320]
    expected = math.exp(torch.nn.functional.cross_entropy(logits[0], seq[0, 1:]).item())
    assert ppl(text) == pytest.approx(expected, rel=1e-5)
    assert 150 < ppl(text) < 700  # an untrained model is close to uniform over 320 tokens
    total, n = ppl.nll(text * 10)
    assert n == 40  # only the first max_tokens tokens are scored
    assert ppl("") == math.inf


def test_bad_reference_checkpoints_are_config_errors(setup, tmp_path):
    root, _, _, model, ckpt = setup
    bare = tmp_path / "bare.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, bare)
    with pytest.raises(ConfigError, match="quality.reference_model"):
        CheckpointPerplexity(bare, str(root / "tok"))
    small = TransformerConfig(vocab_size=100, d_model=32, n_layers=1, n_heads=4, max_seq_len=64)
    other = tmp_path / "small.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in CausalLM(small).state_dict().items()},
                "lmlab": {"model_config": small.to_dict()}}, other)
    with pytest.raises(ConfigError, match="quality.reference_tokenizer"):
        CheckpointPerplexity(other, str(root / "tok"))


def test_prepare_scores_quality_with_the_checkpoint(setup, tmp_path):
    root, paths, _, _, ckpt = setup
    cfg = PrepareConfig(**mixture_config(
        paths, str(root / "tok"), sources=("web", "books"), decontaminate={"enabled": False},
        quality={"keep_fraction": 0.5, "apply_to": ["web"], "reference_model": str(ckpt),
                 "reference_tokenizer": str(root / "tok"), "reference_max_tokens": 48},
    ))
    res = prepare(cfg, out=tmp_path / "out", progress=False)
    q = res.report["sources"]["web"]["quality"]
    lo, hi = q["perplexity_norm"]
    assert 100 < lo < hi < 1000  # token perplexities of the random model, not the bigram model's ~30
    web = res.report["sources"]["web"]["stages"]
    assert web["quality"]["docs"] == round(0.5 * web["filter"]["docs"])


def test_reference_tokenizer_defaults_to_the_one_the_checkpoint_carries(setup, tmp_path):
    from lmlab.models.checkpoint import tokenizer_record

    root, _, tok, model, _ = setup
    carried = tmp_path / "carried.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "lmlab": {"model_config": model.config.to_dict(), **tokenizer_record(tok)}}, carried)
    text = "The quiet river watched the narrow bridge near the old castle, and the baker gathered every candle."
    given = CheckpointPerplexity(carried, str(root / "tok"), max_tokens=40)
    default = CheckpointPerplexity(carried, max_tokens=40)
    assert default(text) == pytest.approx(given(text), rel=1e-6)
    assert 150 < default(text) < 700
    cfg = PrepareConfig(**mixture_config(
        setup[1], str(root / "tok"), sources=("web", "books"), decontaminate={"enabled": False},
        quality={"keep_fraction": 0.5, "apply_to": ["web"], "reference_model": str(carried)},
    ))
    assert cfg.quality.reference_model == str(carried) and cfg.quality.reference_tokenizer is None
