"""HF export and import: transformers reproduces lmlab's logits and greedy generations, and back."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import small_tokenizer
from lmlab.cli import main as lmlab_main
from lmlab.data.posttrain.chat import CHAT_TEMPLATE
from lmlab.errors import ConfigError
from lmlab.models import CausalLM, TransformerConfig, generate
from lmlab.models.checkpoint import open_checkpoint
from lmlab.models.hf import hf_architecture, load_hf_model
from lmlab.modules import PretrainModule

VOCAB = 300  # padded to 320 in lmlab; exported with the real 300 rows

LLAMA = dict(norm_type="rmsnorm", position="rope", ffn_type="swiglu")
GPT2 = dict(norm_type="layernorm", position="learned", ffn_type="gelu")
CONFIGS = {
    "llama-mha-untied": dict(**LLAMA),
    "llama-mha-tied": dict(**LLAMA, tie_embeddings=True),
    "llama-gqa-tied": dict(**LLAMA, n_kv_heads=2, tie_embeddings=True, rope_theta=500.0),
    "llama-gqa-untied-bias": dict(**LLAMA, n_kv_heads=1, bias=True, ffn_hidden=48),
    "gpt2-tied": dict(**GPT2, bias=True, tie_embeddings=True),
    "gpt2-untied-nobias": dict(**GPT2, bias=False),
}


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def tokdir(tmp_path_factory):
    return small_tokenizer(tmp_path_factory.mktemp("export"), VOCAB)


def make_model(seed: int = 0, **kw) -> CausalLM:
    torch.manual_seed(seed)
    cfg = TransformerConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, max_seq_len=48, **kw)
    model = CausalLM(cfg).eval()
    with torch.no_grad():  # every tensor distinctive, so a swapped or transposed mapping shows up
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
            elif name.endswith("bias"):
                p.normal_(0, 0.2)
            else:
                p.uniform_(0.5, 1.5)
    return model


def save_ckpt(model: CausalLM, path) -> None:
    """What a LightningModule checkpoint holds for these tools: model.-prefixed weights + lmlab metadata."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "lmlab": {"stage": "pretrain", "model_config": model.config.to_dict()}}, path)


def lmlab_logits(model, ids):
    with torch.no_grad():
        return model(ids)[..., :VOCAB]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_export_import_round_trip(name, tokdir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = make_model(seed=len(name), **CONFIGS[name])
    ckpt = tmp_path / "run" / "last.ckpt"
    save_ckpt(model, ckpt)
    out = tmp_path / "hf"
    rc = lmlab_main(["export", "--ckpt", str(ckpt), "--format", "hf", "--out", str(out), "--tokenizer", str(tokdir)])
    assert rc == 0
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "lmlab_config.json", "tokenizer.json"} <= names
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".hf")]  # no temp dirs left behind

    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    expected_cls = "LlamaForCausalLM" if name.startswith("llama") else "GPT2LMHeadModel"
    assert type(hf).__name__ == expected_cls
    assert hf.config.vocab_size == VOCAB
    ids = torch.randint(7, VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))
    ours = lmlab_logits(model, ids)
    with torch.no_grad():
        theirs = hf(ids).logits
    assert theirs.shape == ours.shape
    assert torch.allclose(theirs, ours, atol=1e-4), (theirs - ours).abs().max()

    # greedy generation: same continuation, same stop on EOS/<|end|>
    tok = AutoTokenizer.from_pretrained(out)
    stop = hf.generation_config.eos_token_id
    stop = stop if isinstance(stop, list) else [stop]
    assert tok.eos_token_id in stop and tok.convert_tokens_to_ids("<|end|>") in stop
    prompt = ids[:, :6]
    mine = generate(model, prompt, max_new_tokens=16, temperature=0, stop_token_ids=stop, pad_id=tok.pad_token_id)
    with torch.no_grad():
        hf_out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, do_sample=False)
    assert torch.equal(hf_out[:, 6:], mine.responses)

    # the tokenizer travels with its chat template
    assert tok.chat_template == CHAT_TEMPLATE
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|bos|><|user|>\nhi<|end|>\n<|assistant|>\n"

    # back into lmlab: directly, and as a .ckpt for --model.init_from
    again = load_hf_model(out)
    assert again.config.padded_vocab_size == model.config.padded_vocab_size
    assert torch.allclose(lmlab_logits(again, ids), ours, atol=1e-6)
    back = tmp_path / "back.ckpt"
    assert lmlab_main(["export", "--from_hf", str(out), "--out", str(back)]) == 0
    source = open_checkpoint(back)
    cfg, state = source.config.to_dict(), source.weights
    module = PretrainModule(TransformerConfig.from_dict(cfg), init_from=str(back))
    assert torch.allclose(lmlab_logits(module.model.eval(), ids), ours, atol=1e-6)
    assert cfg["tie_embeddings"] == model.config.tie_embeddings
    # and the HF export directory itself works as --model.init_from
    cfg_dir = open_checkpoint(out).config.to_dict()
    direct = PretrainModule(TransformerConfig.from_dict(cfg_dir), init_from=str(out))
    assert torch.allclose(lmlab_logits(direct.model.eval(), ids), ours, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_import_of_a_checkpoint_saved_by_transformers(arch, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if arch == "llama":
        hf = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                          rope_theta=1000.0, tie_word_embeddings=False))
    else:
        hf = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=32))
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2)
    hf.eval().save_pretrained(tmp_path / "hf")
    model = load_hf_model(tmp_path / "hf")
    assert model.config.vocab_size == model.config.padded_vocab_size == 100  # no padding rows needed
    ids = torch.randint(0, 100, (2, 16))
    with torch.no_grad():
        assert torch.allclose(model(ids), hf(ids).logits, atol=1e-4)


def test_architectures_without_an_exact_equivalent_are_refused(tokdir, tmp_path, capsys):
    with pytest.raises(ConfigError, match="qk_norm"):
        hf_architecture(TransformerConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, qk_norm=True))
    with pytest.raises(ConfigError, match="n_kv_heads"):
        hf_architecture(TransformerConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, **GPT2))
    model = make_model(norm_type="rmsnorm", position="learned", ffn_type="swiglu")
    ckpt = tmp_path / "mixed.ckpt"
    save_ckpt(model, ckpt)
    out = tmp_path / "out"
    rc = lmlab_main(["export", "--ckpt", str(ckpt), "--format", "hf", "--out", str(out), "--tokenizer", str(tokdir)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert err.startswith("lmlab export: error: --format hf:") and "position='learned'" in err
    assert not out.exists()
    # the lmlab layout takes any architecture, and open_checkpoint reads it as init_from does
    assert lmlab_main(["export", "--ckpt", str(ckpt), "--format", "lmlab", "--out", str(out)]) == 0
    source = open_checkpoint(out)
    cfg, state = source.config.to_dict(), source.weights
    assert cfg["position"] == "learned"
    module = PretrainModule(TransformerConfig.from_dict(cfg), init_from=str(out))
    ids = torch.randint(0, VOCAB, (1, 12))
    assert torch.equal(lmlab_logits(module.model.eval(), ids), lmlab_logits(model, ids))


def test_export_finds_the_tokenizer_beside_the_checkpoint_and_never_half_writes(tokdir, tmp_path, monkeypatch, capsys):
    import shutil

    import safetensors.torch

    model = make_model(tie_embeddings=True)
    ckpt = tmp_path / "run" / "last.ckpt"
    save_ckpt(model, ckpt)
    out = tmp_path / "exp"
    # no tokenizer anywhere: a clear error, nothing written
    assert lmlab_main(["export", "--ckpt", str(ckpt), "--format", "hf", "--out", str(out)]) == 2
    assert "--tokenizer" in capsys.readouterr().err and not out.exists()
    shutil.copytree(tokdir, ckpt.parent / "tokenizer")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError):
        lmlab_main(["export", "--ckpt", str(ckpt), "--format", "hf", "--out", str(out)])
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["run"]
    monkeypatch.undo()

    assert lmlab_main(["export", "--ckpt", str(ckpt), "--format", "hf", "--out", str(out)]) == 0
    assert (out / "tokenizer.json").is_file()
    assert lmlab_main(["export", "--ckpt", str(ckpt), "--format", "hf", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert lmlab_main(["export", "--ckpt", str(ckpt), "--format", "hf", "--out", str(out), "--force",
                       "--dtype", "bfloat16"]) == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp", "run"]


def test_bad_inputs_give_one_line_errors(tokdir, tmp_path, capsys):
    assert lmlab_main(["export", "--ckpt", str(tmp_path / "nope.ckpt"), "--format", "hf", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not exist" in err
    assert lmlab_main(["export", "--ckpt", "x", "--format", "onnx", "--out", "o"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    small = CausalLM(TransformerConfig(vocab_size=280, d_model=32, n_layers=1, n_heads=4, max_seq_len=16))
    save_ckpt(small, tmp_path / "small.ckpt")
    rc = lmlab_main(["export", "--ckpt", str(tmp_path / "small.ckpt"), "--out", str(tmp_path / "o"),
                     "--tokenizer", str(tokdir)])
    assert rc == 2 and "300 tokens but the model only 280" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
