"""Sliding-window models export to transformers' MistralForCausalLM: same logits, same greedy tokens past the window."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import small_tokenizer
from lmlab.cli import main as lmlab_main
from lmlab.errors import ConfigError
from lmlab.models import TransformerConfig, generate
from lmlab.models.hf import hf_architecture, load_hf_model
from test_export_hf import VOCAB, lmlab_logits, make_model, save_ckpt

pytestmark = pytest.mark.usefixtures("single_thread")

WINDOWS = {
    "window-4-mha-untied": dict(sliding_window=4),
    "window-7-gqa-tied": dict(sliding_window=7, n_kv_heads=2, tie_embeddings=True, rope_theta=500.0),
}


@pytest.fixture(scope="module")
def tokdir(tmp_path_factory):
    return small_tokenizer(tmp_path_factory.mktemp("export_mistral"), VOCAB)


@pytest.mark.parametrize("name", list(WINDOWS))
def test_sliding_window_exports_to_mistral(name, tokdir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = make_model(seed=len(name), attention="sliding_window", **WINDOWS[name])
    W = model.config.sliding_window
    ckpt = tmp_path / "run" / "last.ckpt"
    save_ckpt(model, ckpt)
    out = tmp_path / "hf"
    assert lmlab_main(["export", "--ckpt", str(ckpt), "--format", "hf", "--out", str(out), "--tokenizer", str(tokdir)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "mistral" and cfg["sliding_window"] == W

    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "MistralForCausalLM"
    ids = torch.randint(7, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))  # 40 >> window
    ours = lmlab_logits(model, ids)
    with torch.no_grad():
        theirs = hf(ids).logits
    assert torch.allclose(theirs, ours, atol=1e-4), (theirs - ours).abs().max()
    # the window matters: the same weights with full attention give other logits past position W
    full = make_model(seed=len(name), **{k: v for k, v in WINDOWS[name].items() if k != "sliding_window"})
    assert (lmlab_logits(full, ids)[:, W + 1 :] - ours[:, W + 1 :]).abs().max() > 1e-2

    # greedy generation far past the window: lmlab's ring buffer and transformers' sliding cache agree
    prompt = ids[:, :6]
    mine = generate(model, prompt, max_new_tokens=36, temperature=0)
    with torch.no_grad():
        hf_out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=36, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    assert mine.responses.shape[1] == 36 > 4 * W
    assert torch.equal(hf_out[:, 6:], mine.responses)

    # and back: the import restores the window
    again = load_hf_model(out)
    assert again.config.attention == "sliding_window" and again.config.sliding_window == W
    assert torch.allclose(lmlab_logits(again, ids), ours, atol=1e-6)
    back = tmp_path / "back.ckpt"
    assert lmlab_main(["export", "--from_hf", str(out), "--out", str(back)]) == 0


def test_a_mistral_saved_by_transformers_imports(tmp_path):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    hf = MistralForCausalLM(MistralConfig(vocab_size=100, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                          sliding_window=5, tie_word_embeddings=False))
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2)
    hf.eval().save_pretrained(tmp_path / "hf")
    model = load_hf_model(tmp_path / "hf")
    assert model.config.attention == "sliding_window" and model.config.sliding_window == 5
    ids = torch.randint(0, 100, (2, 30))
    with torch.no_grad():
        assert torch.allclose(model(ids), hf(ids).logits, atol=1e-4)


def test_variants_without_a_transformers_class_say_so_in_one_line(tokdir, tmp_path, capsys):
    with pytest.raises(ConfigError, match="bias"):
        hf_architecture(TransformerConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, bias=True,
                                          attention="sliding_window", sliding_window=8))
    model = make_model(attention="linear")
    ckpt = tmp_path / "linear.ckpt"
    save_ckpt(model, ckpt)
    out = tmp_path / "out"
    rc = lmlab_main(["export", "--ckpt", str(ckpt), "--format", "hf", "--out", str(out), "--tokenizer", str(tokdir)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and not out.exists()
    assert err == ("lmlab export: error: --format hf: linear attention has no transformers class "
                   "(export it with --format lmlab)")
    assert lmlab_main(["export", "--ckpt", str(ckpt), "--format", "lmlab", "--out", str(out)]) == 0
