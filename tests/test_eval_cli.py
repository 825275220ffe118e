"""``lmlab eval`` (tasks, perplexity, compare dispatch, errors) and the EvalCallback during pretraining."""

from __future__ import annotations

import csv
import json
import math
import shutil
import sys
import types
from importlib.machinery import ModuleSpec

import lightning.pytorch as pl
import pytest
import torch
import yaml

from helpers import corpus_sources, web_texts, write_corpus
from lmlab.cli import main as lmlab_main
from lmlab.data import PretrainDataModule, TokenizerTrainConfig
from lmlab.data.tokenizer import train_bpe
from lmlab.eval import cli as eval_cli
from lmlab.eval.adapter import LmlabLM
from lmlab.eval.callback import EvalCallback
from lmlab.eval.harness import evaluate
from lmlab.eval.perplexity import perplexity
from lmlab.models import CausalLM, TransformerConfig
from lmlab.modules import OptimizerConfig, PretrainModule, ScheduleConfig, TrainingSettings

WORDS = "the cat sat on a mat while the dog ran in the park".split()


pytestmark = pytest.mark.usefixtures("single_thread")


def write_tasks(root):
    """A multiple-choice, a cloze and a generation task over a few local rows."""
    data = root / "data"
    data.mkdir(parents=True)
    mc = [{"query": " ".join(WORDS[i: i + 4]), "choices": ["a mat", "the park", "old tree"], "gold": i % 3}
          for i in range(6)]
    cloze = [{"context": " ".join(WORDS[i: i + 5]), "continuation": WORDS[i + 5]} for i in range(6)]
    gen = [{"question": f"{a} plus {b}", "answer": f"#### {a + b}"} for a, b in [(1, 2), (2, 3), (3, 4), (4, 5), (5, 6)]]
    for name, rows in (("mc", mc), ("cloze", cloze), ("gen", gen)):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    specs = {
        "mc": {"name": "mc", "type": "multiple_choice", "data": {"path": "mc.jsonl"}, "doc_to_text": "{query}\nAnswer:",
               "doc_to_choice": "choices", "answer": "gold", "metrics": ["acc", "acc_norm"]},
        "cloze": {"name": "cloze", "type": "cloze", "data": {"path": "cloze.jsonl"}, "doc_to_text": "{context}",
                  "answer": "continuation", "target_delimiter": " ", "metrics": ["perplexity", "acc"]},
        "gen": {"name": "gen", "type": "generation", "data": {"path": "gen.jsonl"},
                "doc_to_text": "Question: {question}\nAnswer:", "answer": "answer", "fewshot": {"num": 1},
                "generation": {"max_new_tokens": 10, "stop": ["Question:"]},
                "filters": [{"name": "strict-match", "regex": "#### (\\-?[0-9]+)"}],
                "exact_match": {"regexes_to_ignore": ["(?s).*#### "]}},
    }
    paths = {}
    for name, spec in specs.items():
        paths[name] = root / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(spec))
    return data, paths


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalcli")
    write_corpus(root / "corpus")
    texts = web_texts(root / "corpus")
    tok = train_bpe(texts, 320, root / "run" / "tokenizer")  # beside the checkpoint: found automatically
    torch.manual_seed(0)
    model = CausalLM(TransformerConfig(vocab_size=320, d_model=32, n_layers=2, n_heads=4, max_seq_len=64)).eval()
    ckpt = root / "run" / "last.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "lmlab": {"stage": "pretrain", "model_config": model.config.to_dict()}}, ckpt)
    data, tasks = write_tasks(root / "tasks")
    return {"root": root, "tok": tok, "model": model, "ckpt": ckpt, "data": data, "tasks": tasks, "texts": texts}


def test_eval_runs_tasks_prints_a_table_and_writes_results(setup, tmp_path, capsys):
    t = setup["tasks"]
    out = tmp_path / "out"
    rc = lmlab_main(["eval", "--ckpt", str(setup["ckpt"]), "--tasks", f"{t['mc']},{t['cloze']},{t['gen']}",
                     "--limit", "4", "--data_dir", str(setup["data"]), "--out", str(out), "--batch_size", "3",
                     "--device", "cpu", "--no_progress"])
    printed = capsys.readouterr().out
    assert rc == 0
    results = json.loads((out / "results.json").read_text())["results"]
    assert {results[k]["n"] for k in ("mc", "cloze", "gen")} == {4}
    assert results["gen"]["num_fewshot"] == 1
    lines = printed.splitlines()
    assert lines[0].split() == ["task", "metric", "value", "stderr", "n"]
    for task, metric in (("mc", "acc"), ("mc", "acc_norm"), ("cloze", "perplexity"), ("gen", "exact_match,strict-match")):
        row = next(line.split() for line in lines if line.split()[:2] == [task, metric])
        assert float(row[2]) == pytest.approx(results[task][metric], abs=6e-5)
    # the same numbers as the adapter gives in-process
    lm = LmlabLM(setup["model"], setup["tok"], batch_size=3)
    direct = evaluate(lm, [str(t["cloze"])], data_dir=setup["data"], limit=4, progress=False)["results"]["cloze"]
    assert results["cloze"]["perplexity"] == pytest.approx(direct["perplexity"], rel=1e-5)
    assert (out / "samples_gen.jsonl").is_file()


def test_eval_on_the_shared_benchmarks(setup, shared_data, tmp_path, capsys):
    rc = eval_cli.main(["--ckpt", str(setup["ckpt"]), "--tasks", "hellaswag,arc_easy,gsm8k", "--limit", "4",
                        "--data_dir", str(shared_data / "eval"), "--out", str(tmp_path), "--no_progress"])
    captured = capsys.readouterr()
    printed = captured.out
    assert rc == 0, captured.err
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert all(results[k]["n"] == 4 for k in ("hellaswag", "arc_easy", "gsm8k"))
    assert 0.0 <= results["arc_easy"]["acc"] <= 1.0
    # gsm8k's 5-shot prompts are far longer than this model's 64 tokens: cut from the left, reported
    assert "lost their start" in printed


def test_bad_input_gives_one_line_errors(setup, tmp_path, capsys):
    def run(argv):
        rc = lmlab_main(["eval", *argv])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1, err
        assert err.startswith("lmlab eval: error: ")
        return err

    err = run(["--ckpt", str(setup["ckpt"]), "--tasks", "hellaswagg"])
    assert "unknown task 'hellaswagg'" in err and "arc_easy" in err and "gsm8k" in err
    assert "does not exist" in run(["--ckpt", str(tmp_path / "missing.ckpt"), "--tasks", "arc_easy"])
    assert "--tasks" in run(["--ckpt", str(setup["ckpt"])])
    assert "--limit" in run(["--ckpt", str(setup["ckpt"]), "--tasks", "arc_easy", "--limit", "many"])
    lonely = tmp_path / "lonely.ckpt"
    shutil.copy(setup["ckpt"], lonely)
    assert "--tokenizer" in run(["--ckpt", str(lonely), "--tasks", str(setup["tasks"]["mc"])])
    assert "--text" in run(["perplexity", "--ckpt", str(setup["ckpt"]), "--text", str(tmp_path / "none.txt")])
    assert "not UTF-8" in run(["perplexity", "--ckpt", str(setup["ckpt"]), "--text", str(setup["ckpt"])])
    (tmp_path / "t.txt").write_text("the cat sat on a mat")
    assert "stride" in run(["perplexity", "--ckpt", str(setup["ckpt"]), "--text", str(tmp_path / "t.txt"),
                            "--stride", "100"])


def test_perplexity_on_text_files(setup, tmp_path, capsys):
    a = tmp_path / "a.txt"
    a.write_text(" ".join(setup["texts"][:8]))  # longer than the context: sliding window
    b = tmp_path / "b.jsonl"
    b.write_text("".join(json.dumps({"text": t}) + "\n" for t in setup["texts"][8:11]))
    out = tmp_path / "ppl.json"
    rc = eval_cli.main(["perplexity", "--ckpt", str(setup["ckpt"]), "--text", str(a), "--text", str(b),
                        "--stride", "16", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0
    got = json.loads(out.read_text())["text"]
    ref = perplexity(setup["model"], setup["tok"], [a.read_text()] + setup["texts"][8:11], stride=16)
    assert got["documents"] == 4 and got["tokens"] == ref.tokens
    assert got["ppl"] == pytest.approx(ref.ppl, rel=1e-5) and got["bpb"] == pytest.approx(ref.bpb, rel=1e-5)
    row = next(line.split() for line in printed.splitlines() if line.startswith("text"))
    assert float(row[3]) == pytest.approx(ref.ppl, abs=1e-3)


def test_perplexity_per_source_of_an_experiment(setup, tmp_path, capsys):
    root = setup["root"]
    cfg = {"model": {"class_path": "lmlab.modules.PretrainModule"},
           "data": {"class_path": "lmlab.data.PretrainDataModule", "init_args": {
               "sources": [{"name": s.name, "path": s.path, "weight": s.weight} for s in corpus_sources(root / "corpus")],
               "tokenizer": str(root / "run" / "tokenizer"), "val_fraction": 0.05, "seed": 3,
               "cache_dir": str(tmp_path / "cache")}}}
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(cfg))
    rc = lmlab_main(["eval", "perplexity", "--ckpt", str(setup["ckpt"]), "--config", str(tmp_path / "exp.yaml"),
                     "--max_documents", "4", "--max_length", "32"])
    printed = capsys.readouterr().out
    assert rc == 0
    rows = {line.split()[0]: line.split() for line in printed.splitlines()[2:]}
    assert set(rows) == {"web", "books", "code", "all"}
    assert int(rows["all"][2]) == sum(int(rows[s][2]) for s in ("web", "books", "code"))
    # a fresh random model is close to uniform over 320 tokens
    assert all(100 < float(rows[s][3]) < 1000 for s in rows)


def test_compare_is_forwarded_when_installed(monkeypatch, capsys):
    seen = []
    fake = types.ModuleType("lmlab_fake_compare")
    fake.__spec__ = ModuleSpec("lmlab_fake_compare", None)
    fake.main = lambda argv: seen.append(argv) or 7
    monkeypatch.setitem(sys.modules, "lmlab_fake_compare", fake)
    monkeypatch.setattr(eval_cli, "COMPARE_MODULE", "lmlab_fake_compare")
    assert lmlab_main(["eval", "compare", "a.json", "--metric", "acc"]) == 7
    assert seen == [["a.json", "--metric", "acc"]]
    monkeypatch.setattr(eval_cli, "COMPARE_MODULE", "lmlab.eval._no_such_module")
    assert lmlab_main(["eval", "compare", "x"]) == 2
    assert "not available" in capsys.readouterr().err


def test_tasks_lists_the_builtin_tasks(capsys):
    assert eval_cli.main(["tasks"]) == 0
    listed = capsys.readouterr().out.split()
    assert {"arc_easy", "hellaswag", "gsm8k"} <= set(listed)


# --- the callback ---------------------------------------------------------------------------


class ModeProbe(pl.Callback):
    """Records whether the model is back in training mode after every step."""

    def __init__(self):
        self.training = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.training.append(pl_module.model.training)


def test_eval_callback_logs_task_metrics_during_pretraining(setup, tmp_path):
    root = setup["root"]
    pl.seed_everything(0)
    dm = PretrainDataModule(sources=corpus_sources(root / "corpus"), tokenizer=str(tmp_path / "tok"),
                            tokenizer_train=TokenizerTrainConfig(vocab_size=320, sample_chars=100_000), seq_len=32,
                            batch_size=8, val_fraction=0.05, cache_dir=str(tmp_path / "cache"), seed=7)
    module = PretrainModule(TransformerConfig(vocab_size=320, d_model=32, n_layers=2, n_heads=4, max_seq_len=64),
                            settings=TrainingSettings(optimizer=OptimizerConfig(lr=1e-2), schedule=ScheduleConfig(name="constant")))
    tasks = [str(setup["tasks"]["cloze"]), str(setup["tasks"]["mc"])]
    cb = EvalCallback(tasks=tasks, every_n_steps=3, limit=4, data_dir=str(setup["data"]), batch_size=4)
    probe = ModeProbe()
    logger = pl.loggers.CSVLogger(str(tmp_path / "logs"), name="run")
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=7, logger=logger, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, log_every_n_steps=50, callbacks=[cb, probe])
    trainer.fit(module, datamodule=dm)

    # steps 3 and 6, then once more after the last step (7)
    assert [h["step"] for h in cb.history] == [3, 6, 7]
    assert all(probe.training) and len(probe.training) == 7
    key = "eval/cloze/perplexity"
    assert {key, "eval/cloze/acc", "eval/mc/acc", "eval/mc/acc_norm", "eval/mc/acc_stderr"} <= set(cb.history[0])
    # the model changes between evaluations, and the last one is exactly what evaluating the final model gives
    assert cb.history[0][key] != cb.history[1][key]
    final = evaluate(LmlabLM(module.model, dm.tokenizer, batch_size=4), tasks, data_dir=setup["data"], limit=4,
                     progress=False)["results"]
    assert cb.history[-1][key] == pytest.approx(final["cloze"]["perplexity"], rel=1e-6)
    assert math.isfinite(cb.history[-1][key]) and cb.history[-1][key] > 1.0
    assert float(trainer.callback_metrics[key]) == pytest.approx(cb.history[-1][key], rel=1e-6)

    # the logger got them at the right steps even though log_every_n_steps is 50
    logger.save()
    with open(f"{logger.log_dir}/metrics.csv") as fh:
        logged = [row for row in csv.DictReader(fh) if row.get(key)]
    assert [int(row["step"]) for row in logged] == [3, 6, 7]
    assert float(logged[0][key]) == pytest.approx(cb.history[0][key], rel=1e-6)


def test_eval_callback_in_a_real_checkpoint_and_a_yaml_config(setup, tmp_path, capsys, monkeypatch, repo_root):
    """A Trainer-written .ckpt (with the callback's state in it) feeds lmlab eval and export; YAML configures it."""
    root = setup["root"]
    dm = PretrainDataModule(sources=corpus_sources(root / "corpus"), tokenizer=str(root / "run" / "tokenizer"),
                            seq_len=32, batch_size=8, val_fraction=0.05, cache_dir=str(tmp_path / "cache"), seed=7)
    module = PretrainModule(TransformerConfig(vocab_size=320, d_model=32, n_layers=2, n_heads=4, max_seq_len=64,
                                              tie_embeddings=True), settings=TrainingSettings(optimizer=OptimizerConfig(lr=1e-2)))
    cb = EvalCallback(tasks=[str(setup["tasks"]["mc"])], every_n_steps=2, limit=3, data_dir=str(setup["data"]))
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[cb])
    trainer.fit(module, datamodule=dm)
    ckpt = tmp_path / "run" / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    assert eval_cli.main(["--ckpt", str(ckpt), "--tokenizer", str(root / "run" / "tokenizer"),
                          "--tasks", str(setup["tasks"]["mc"]), "--limit", "3", "--data_dir", str(setup["data"]),
                          "--no_progress"]) == 0
    row = next(line.split() for line in capsys.readouterr().out.splitlines() if line.split()[:2] == ["mc", "acc"])
    assert float(row[2]) == pytest.approx(cb.history[-1]["eval/mc/acc"], abs=1e-4)
    out = tmp_path / "hf"
    assert lmlab_main(["export", "--ckpt", str(ckpt), "--format", "hf", "--out", str(out),
                       "--tokenizer", str(root / "run" / "tokenizer")]) == 0
    assert "LlamaForCausalLM" in capsys.readouterr().out
    from transformers import AutoModelForCausalLM

    ids = torch.randint(7, 320, (1, 10))
    with torch.no_grad():
        assert torch.allclose(AutoModelForCausalLM.from_pretrained(out)(ids).logits, module.model.eval()(ids)[..., :320],
                              atol=1e-4)

    # the callback's arguments resolve through LightningCLI like any trainer callback
    cfg = yaml.safe_load((repo_root / "experiments" / "quickstart.yaml").read_text())
    cfg["trainer"]["callbacks"] = [{"class_path": "lmlab.eval.callback.EvalCallback",
                                    "init_args": {"tasks": ["arc_easy", "hellaswag"], "every_n_steps": 50, "limit": 8}}]
    (tmp_path / "with_eval.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.chdir(repo_root)
    with pytest.raises(SystemExit) as e:
        lmlab_main(["fit", "--config", str(tmp_path / "with_eval.yaml"), "--print_config"])
    assert e.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    args = printed["trainer"]["callbacks"][0]["init_args"]
    assert args["tasks"] == ["arc_easy", "hellaswag"] and args["every_n_steps"] == 50 and args["limit"] == 8


def test_eval_callback_rejects_bad_settings():
    from lmlab.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown task"):
        EvalCallback(tasks="arc_easy,nope", every_n_steps=10)
    with pytest.raises(ConfigError, match="every_n_steps"):
        EvalCallback(tasks=["arc_easy"], every_n_steps=0)
