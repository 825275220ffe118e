"""The one checkpoint API: every kind of path opens the same way, and a run's checkpoint stands on its own."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
import yaml

from helpers import write_corpus
from lmlab.cli import main as lmlab_main
from lmlab.errors import ConfigError
from lmlab.models import CausalLM, TransformerConfig
from lmlab.models.checkpoint import open_checkpoint

MODEL = {"vocab_size": 320, "d_model": 32, "n_layers": 2, "n_heads": 4, "max_seq_len": 64, "tie_embeddings": True}
STEPS, BATCH, SEQ = 4, 8, 32


def run_config(root) -> dict:
    """The quickstart's layout (CSV logger, checkpoints and tokenizer in separate folders), scaled down."""
    return {
        "seed_everything": 3,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "precision": "32-true", "max_steps": STEPS, "limit_val_batches": 0,
            "num_sanity_val_steps": 0, "enable_progress_bar": False, "enable_model_summary": False,
            "default_root_dir": "runs/tiny",
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs/tiny", "name": "csv"}},
            "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                           "init_args": {"dirpath": "runs/tiny/checkpoints", "save_last": True}}],
        },
        "model": {"class_path": "lmlab.modules.PretrainModule",
                  "init_args": {"config": MODEL, "settings": {"optimizer": {"lr": 3e-3}}}},
        "data": {"class_path": "lmlab.data.PretrainDataModule", "init_args": {
            "tokenizer": ".lmlab_cache/tokenizers/tiny",
            "tokenizer_train": {"vocab_size": 320, "sample_chars": 200000},
            "sources": [{"name": "web", "path": str(root / "corpus" / "web.jsonl"), "weight": 0.7},
                        {"name": "code", "path": str(root / "corpus" / "code.jsonl"), "weight": 0.3}],
            "seq_len": SEQ, "batch_size": BATCH, "val_fraction": 0.05, "cache_dir": ".lmlab_cache"}},
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny run through ``lmlab fit``; afterwards its last.ckpt is copied alone into an empty folder and
    the run (tokenizer, saved config.yaml, logs) is deleted, so nothing but the file itself can help."""
    from lmlab.data.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("ckptapi")
    write_corpus(root / "corpus")
    (root / "work").mkdir()
    (root / "work" / "tiny.yaml").write_text(yaml.safe_dump(run_config(root)))
    cwd = os.getcwd()
    os.chdir(root / "work")
    try:
        assert lmlab_main(["fit", "--config", "tiny.yaml"]) == 0
    finally:
        os.chdir(cwd)
    tok = load_tokenizer(str(root / "work" / ".lmlab_cache" / "tokenizers" / "tiny"))
    alone = root / "elsewhere" / "model.ckpt"
    alone.parent.mkdir()
    shutil.copy(root / "work" / "runs" / "tiny" / "checkpoints" / "last.ckpt", alone)
    shutil.rmtree(root / "work")
    return {"root": root, "ckpt": alone, "tok": tok}


def test_a_run_checkpoint_carries_config_weights_metadata_and_tokenizer(run):
    ck = open_checkpoint(run["ckpt"])
    assert ck.kind == "lightning" and ck.stage == "pretrain"
    assert ck.require_config() == TransformerConfig(**MODEL)
    assert ck.tokens_seen == STEPS * BATCH * SEQ
    assert "lm_head.weight" in ck.weights and not any(k.startswith("model.") for k in ck.weights)
    assert ck.weights["backbone.tok_emb.weight"].shape == (320, 32)
    # the tokenizer itself is in the file, as plain text, and comes back identical
    files = ck.meta["tokenizer_files"]
    assert set(files) >= {"tokenizer.json", "tokenizer_config.json"} and all(isinstance(v, str) for v in files.values())
    assert sum(len(v) for v in files.values()) < 200_000  # a small share of a checkpoint, not a second copy of the data
    tok, orig = ck.tokenizer(), run["tok"]
    assert tok.get_vocab() == orig.get_vocab() and len(tok) == len(orig)
    text = "def add_3(a, b):\n    return a + b + 3"
    assert tok(text)["input_ids"] == orig(text)["input_ids"]
    assert tok.chat_template == orig.chat_template and tok.chat_template
    assert tok.eos_token == orig.eos_token and tok.pad_token == orig.pad_token
    from lmlab.data.posttrain.datamodules import tokenizer_info

    assert ck.tokenizer_info == tokenizer_info(orig)
    # and the model it builds is the trained one
    model = ck.causal_lm()
    assert torch.equal(model.lm_head.weight, ck.weights["backbone.tok_emb.weight"])


def test_a_copied_checkpoint_works_with_eval_export_and_init_from_without_tokenizer(run, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmlab.modules import PretrainModule
    from lmlab.modules.sft import SFTModule

    ckpt = run["ckpt"]
    (tmp_path / "notes.txt").write_text("def add_1(a, b):\n    return a + b + 1\n" * 5)
    assert lmlab_main(["eval", "perplexity", "--ckpt", str(ckpt), "--text", str(tmp_path / "notes.txt"),
                       "--out", str(tmp_path / "ppl.json")]) == 0
    from lmlab.eval.perplexity import perplexity

    scored = json.loads((tmp_path / "ppl.json").read_text())["text"]
    direct = perplexity(open_checkpoint(ckpt).causal_lm(), run["tok"], [(tmp_path / "notes.txt").read_text()], name="text")
    assert scored["tokens"] == direct.tokens > 0
    assert scored["ppl"] == pytest.approx(direct.ppl, rel=1e-5) and 1.0 < scored["ppl"] < 320
    data = tmp_path / "tasks"
    data.mkdir()
    (data / "mc.jsonl").write_text("".join(json.dumps({"q": f"def add_{i}(a, b):", "choices": ["return a", "the cat"], "gold": 0}) + "\n"
                                           for i in range(4)))
    spec = {"name": "mc", "type": "multiple_choice", "data": {"path": "mc.jsonl"}, "doc_to_text": "{q}\n",
            "doc_to_choice": "choices", "answer": "gold", "metrics": ["acc"]}
    (tmp_path / "mc.yaml").write_text(yaml.safe_dump(spec))
    assert lmlab_main(["eval", "--ckpt", str(ckpt), "--tasks", str(tmp_path / "mc.yaml"), "--data-dir", str(data),
                       "--out", str(tmp_path / "ev"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "ev" / "results.json").read_text())["results"]["mc"]["n"] == 4

    out = tmp_path / "hf"
    assert lmlab_main(["export", "--ckpt", str(ckpt), "--format", "hf", "--out", str(out)]) == 0
    capsys.readouterr()
    ids = torch.randint(7, 320, (1, 12))
    ours = open_checkpoint(ckpt).causal_lm()
    with torch.no_grad():
        theirs = AutoModelForCausalLM.from_pretrained(out)(ids).logits
        assert torch.allclose(theirs, ours(ids)[..., :320], atol=1e-4)
    assert AutoTokenizer.from_pretrained(out).get_vocab() == run["tok"].get_vocab()

    # init_from: the model shape and the tokenizer record come from the file
    sft = SFTModule(init_from=str(ckpt))
    assert sft.config == TransformerConfig(**MODEL)
    assert sft.init_meta["tokenizer"]["fingerprint"] == open_checkpoint(ckpt).tokenizer_info["fingerprint"]
    assert torch.equal(sft.model.lm_head.weight, ours.lm_head.weight)
    follow = PretrainModule(TransformerConfig(**MODEL), init_from=str(ckpt))
    assert torch.equal(follow.model.backbone.tok_emb.weight, ours.backbone.tok_emb.weight)


def test_every_kind_of_path_opens_alike(run, tmp_path):
    from safetensors.torch import save_file

    from lmlab.models.export import export_hf, export_lmlab

    ck = open_checkpoint(run["ckpt"])
    ref = ck.causal_lm()
    ids = torch.randint(7, 320, (1, 9))
    hf_dir, lm_dir = export_hf(run["ckpt"], tmp_path / "hf"), export_lmlab(run["ckpt"], tmp_path / "lm")
    bare = tmp_path / "bare.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items() if k != "lm_head.weight"}, str(bare))
    for path, kind in ((hf_dir, "hf"), (lm_dir, "export")):
        other = open_checkpoint(path)
        assert other.kind == kind and other.stage is None
        assert other.require_config() == ck.config
        with torch.no_grad():
            assert torch.allclose(other.causal_lm()(ids), ref(ids), atol=1e-5)
        assert other.tokenizer().get_vocab() == run["tok"].get_vocab()
        assert other.tokenizer_info == ck.tokenizer_info
    loose = open_checkpoint(bare)
    assert loose.kind == "safetensors" and loose.config is None
    assert torch.equal(loose.weights["backbone.tok_emb.weight"], ref.backbone.tok_emb.weight)
    with pytest.raises(ConfigError, match="carries no model config"):
        loose.require_config()


def test_the_imported_hf_checkpoint_records_its_tokenizer(run, tmp_path):
    hf_dir = tmp_path / "hf"
    assert lmlab_main(["export", "--ckpt", str(run["ckpt"]), "--out", str(hf_dir)]) == 0
    back = tmp_path / "back.ckpt"
    assert lmlab_main(["export", "--from-hf", str(hf_dir), "--out", str(back)]) == 0
    shutil.rmtree(hf_dir)
    ck = open_checkpoint(back)
    assert ck.stage == "import" and ck.tokenizer().get_vocab() == run["tok"].get_vocab()


def test_old_checkpoints_find_the_tokenizer_through_their_run_config(run, tmp_path, monkeypatch):
    """Checkpoints written before runs recorded their tokenizer: the logger's saved config.yaml names it."""
    run["tok"].save_pretrained(tmp_path / "tok")
    ckpt = tmp_path / "runs" / "q" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    raw = torch.load(run["ckpt"], weights_only=True)
    for key in ("tokenizer", "tokenizer_files"):
        raw["lmlab"].pop(key)
    torch.save(raw, ckpt)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="records no tokenizer"):
        open_checkpoint(ckpt).tokenizer()
    log_dir = tmp_path / "runs" / "q" / "csv" / "version_0"
    log_dir.mkdir(parents=True)
    (log_dir / "config.yaml").write_text(yaml.safe_dump({"data": {"init_args": {"tokenizer": "tok"}}}))
    assert open_checkpoint(ckpt).tokenizer().get_vocab() == run["tok"].get_vocab()


class _Opens:
    """Pickles as a call to ``open``: a weights_only load must refuse it rather than run it."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def one_line_error(capsys, argv) -> str:
    rc = lmlab_main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    return err


def test_bad_checkpoints_are_one_line_errors(run, tmp_path, capsys):
    from lmlab.modules.sft import SFTModule

    marker = tmp_path / "was-run"
    evil = tmp_path / "evil.ckpt"
    raw = torch.load(run["ckpt"], weights_only=True)
    raw["lmlab"]["payload"] = _Opens(str(marker))
    torch.save(raw, evil)
    with pytest.raises(ConfigError, match="pickled Python objects") as err:
        open_checkpoint(evil, "--ckpt")
    assert str(err.value).startswith("--ckpt:") and "\n" not in str(err.value)
    assert not marker.exists()
    assert "pickled Python objects" in one_line_error(capsys, ["export", "--ckpt", str(evil), "--out", str(tmp_path / "x")])
    assert not marker.exists() and not (tmp_path / "x").exists()

    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(run["ckpt"].read_bytes()[: run["ckpt"].stat().st_size // 2])
    with pytest.raises(ConfigError, match="cannot read checkpoint"):
        open_checkpoint(cut)
    err = one_line_error(capsys, ["eval", "--ckpt", str(cut), "--tasks", "arc_easy"])
    assert err.startswith("lmlab eval: error: --ckpt: cannot read checkpoint") and "cut short" in err

    bare = tmp_path / "bare.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in CausalLM(TransformerConfig(**MODEL)).state_dict().items()}}, bare)
    with pytest.raises(ConfigError, match=r"^model.init_from: .*bare.ckpt carries no model config"):
        SFTModule(init_from=str(bare))
    err = one_line_error(capsys, ["export", "--ckpt", str(bare), "--out", str(tmp_path / "y")])
    assert "--ckpt:" in err and "carries no model config" in err
    assert "does not exist" in one_line_error(capsys, ["export", "--ckpt", str(tmp_path / "none.ckpt"), "--out", str(tmp_path / "z")])
