"""Every verb besides fit/validate/test/predict: --help, --print_config round trips, overrides, and one-line errors.

A user mistake (unknown key, bad type, missing value, missing file, value out
of range) gives exactly one stderr line ``lmlab VERB: error: <field>: ...``
naming the field, exit status 2, nothing on stdout and no traceback.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Literal

import pytest
import yaml

from lmlab.cli import main

REPO = Path(__file__).resolve().parents[1]
SWEEP = str(REPO / "sweeps" / "chinchilla_grid.yaml")
QUICKSTART = str(REPO / "experiments" / "quickstart.yaml")
PREPARE = str(REPO / "experiments" / "data" / "shared_mix.yaml")


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


# -- --help ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, words",
    [
        (["scaling", "fit"], "Fit a scaling law"),
        (["scaling", "plan"], "Compute-optimal model size"),
        (["sweep", "run"], "Run (or resume) a sweep YAML"),
        (["sweep", "status"], "Table of a sweep's runs"),
        (["sweep", "lr-rule"], "Fit lr_opt"),
        (["plan"], "Memory and compute plan"),
        (["export"], "Export a checkpoint"),
        (["eval"], "perplexity"),
        (["eval", "run"], "Evaluate a checkpoint on downstream tasks"),
        (["eval", "perplexity"], "Perplexity and bits per byte"),
        (["eval", "tasks"], "List the built-in tasks"),
        (["eval", "compare"], "Pairwise preference evaluation"),
        (["tokenizer", "train"], "Train a byte-level BPE"),
        (["tokenizer", "info"], "Vocabulary, special tokens"),
        (["data", "prepare"], "Prepare a mixture"),
        (["data", "extract-eval"], "Mean token F1"),
        (["data", "agreement"], "Agreement of a prepare config's filters and quality score"),
    ],
)
def test_help_shows_the_docstring_and_the_flags(argv, words, capsys):
    rc, out, err = run(capsys, *argv, "--help")
    assert rc == 0 and err == ""
    assert out.startswith("usage: lmlab") and words in " ".join(out.split())
    assert "--print_config" in out or argv == ["eval"]


# -- --print_config round trips ------------------------------------------------------------------


def _print_config(capsys, *argv: str) -> str:
    rc, out, err = run(capsys, *argv, "--print_config")
    assert rc == 0, err
    return out


@pytest.mark.parametrize(
    "verb, argv",
    [
        (["scaling", "plan"], ["--compute", "1e21", "--mfu", "0.5"]),
        (["scaling", "fit"], ["runs.csv", "--method", "kaplan", "--n-col", "params"]),
        (["sweep", "run"], [SWEEP, "--dry-run", "--no-check", "--env", "A=1", "--env", "B=2"]),
        (["sweep", "lr-rule"], ["results.jsonl", "--refine", "parabola"]),
        (["plan"], ["--preset", "llama-7b", "--world-size", "8", "--activation-checkpointing"]),
        (["export"], ["--ckpt", "x.ckpt", "--out", "o", "--format", "lmlab", "--force"]),
        (["eval"], ["--ckpt", "x.ckpt", "--tasks", "arc_easy", "--limit", "0.5", "--no-progress"]),
        (["eval", "perplexity"], ["--ckpt", "x.ckpt", "--text", "a.txt", "--text", "b.jsonl", "--no-prefix"]),
        (["eval", "compare"], ["--a", "x.ckpt", "--b", "y.ckpt", "--model", "c=z.ckpt", "--judge", "reward-model"]),
        (["tokenizer", "train"], ["--config", QUICKSTART, "--vocab-size", "300"]),
        (["data", "prepare"], ["--config", PREPARE, "--max-documents", "5", "--engine", "datatrove"]),
        (["data", "extract-eval"], ["--html", "p.tar", "--gold", "g.json"]),
    ],
)
def test_print_config_reads_back_to_the_same_settings(verb, argv, capsys, tmp_path):
    printed = _print_config(capsys, *verb, *argv)
    settings = yaml.safe_load(printed)
    assert isinstance(settings, dict) and len(settings) >= 2
    path = tmp_path / "settings.yaml"
    path.write_text(printed)
    flag = "--settings" if "config" in settings else "--config"  # where the verb's own --config names a training YAML
    assert yaml.safe_load(_print_config(capsys, *verb, flag, str(path))) == settings


def test_print_config_round_trip_gives_the_same_result(capsys, tmp_path):
    direct = ["scaling", "plan", "--compute", "1e21", "--mfu", "0.5", "--accelerators", "8", "--json"]
    rc, out, _ = run(capsys, *direct)
    assert rc == 0
    path = tmp_path / "plan.yaml"
    path.write_text(_print_config(capsys, *direct))
    rc, again, _ = run(capsys, "scaling", "plan", "--config", str(path))
    assert rc == 0 and json.loads(again) == json.loads(out) and json.loads(out)["mfu"] == 0.5

    rc, out, _ = run(capsys, "plan", "--preset", "llama-7b", "--world_size", "8", "--strategy", "fsdp", "--json")
    path.write_text(_print_config(capsys, "plan", "--preset", "llama-7b", "--world_size", "8", "--strategy", "fsdp", "--json"))
    rc2, again, _ = run(capsys, "plan", "--settings", str(path))
    assert (rc, json.loads(again)) == (rc2, json.loads(out)) and json.loads(out)["memory"]["input"]["world_size"] == 8

    dry = ["sweep", "run", SWEEP, "--dry_run", "--no_check", "--state", str(tmp_path / "s")]
    rc, out, _ = run(capsys, *dry)
    path.write_text(_print_config(capsys, *dry))
    rc2, again, _ = run(capsys, "sweep", "run", "--config", str(path))
    assert rc == rc2 == 0 and again == out and "run(s)" in out and not (tmp_path / "s").exists()


def test_compare_from_a_settings_file(capsys, tmp_path):
    rows = [{"prompt": f"q{i}", "model_a": "sft", "model_b": "base", "overall": "a" if i < 6 else "tie"} for i in range(8)]
    judgments = tmp_path / "j.jsonl"
    judgments.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["eval", "compare", "--judge", "jsonl", "--judgments", str(judgments), "--bootstrap", "20",
            "--db", str(tmp_path / "none.sqlite")]
    settings = tmp_path / "compare.yaml"
    settings.write_text(_print_config(capsys, *argv, "--out", str(tmp_path / "a")))
    assert run(capsys, *argv, "--out", str(tmp_path / "a"))[0] == 0
    rc, _, err = run(capsys, "eval", "compare", "--config", str(settings), "--out", str(tmp_path / "b"))  # flag over file
    assert rc == 0, err
    a = json.loads((tmp_path / "a" / "results.json").read_text())["criteria"]["overall"]
    b = json.loads((tmp_path / "b" / "results.json").read_text())["criteria"]["overall"]
    assert a == b and a["n_judgments"] == 8


# -- overrides -----------------------------------------------------------------------------------------


def test_flags_override_a_settings_file(capsys, tmp_path):
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump({"compute": 1e21, "mfu": 0.5, "json": True}))
    rc, out, _ = run(capsys, "scaling", "plan", "--config", str(path), "--mfu", "0.25")
    assert rc == 0 and json.loads(out)["mfu"] == 0.25


def test_plan_takes_dotted_overrides_of_the_training_config(capsys):
    rc, base, err = run(capsys, "plan", "--config", QUICKSTART, "--json")
    assert rc == 0, err
    rc, deeper, err = run(capsys, "plan", "--config", QUICKSTART, "--override", "model.config.n_layers=8",
                          "--override", "trainer.max_steps=10", "--json")
    assert rc == 0, err
    base, deeper = json.loads(base), json.loads(deeper)
    assert deeper["memory"]["bytes"]["params"] > base["memory"]["bytes"]["params"]
    assert deeper["compute"]["tokens"] == base["compute"]["tokens"] * 10 / 300


def test_training_config_helper_reads_yaml_like_fit(tmp_path):
    from lmlab.errors import ConfigError
    from lmlab.training_config import init_args, load_training_config

    cfg = load_training_config([QUICKSTART], ["model.config.n_layers=3"], budget=False)
    model = init_args(cfg.model)
    assert cfg.model.class_path == "lmlab.modules.PretrainModule" and model["config"]["n_layers"] == 3
    assert init_args(cfg.data)["sources"] and cfg.trainer.max_steps == 300
    with pytest.raises(ConfigError) as e:
        load_training_config([QUICKSTART], ["model.config.n_layerz=3"])
    assert "model.config.n_layerz" in e.value.field and "n_layers" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_training_config([str(tmp_path / "none.yaml")])
    assert e.value.field == "--config" and "does not exist" in str(e.value)


# -- one-line errors -------------------------------------------------------------------------------------


BAD = [
    # scaling
    (["scaling", "plan", "--compute", "1e21", "--mfux", "0.5"], "scaling", "--mfux", "--mfu?"),
    (["scaling", "plan", "--compute", "lots"], "scaling", "--compute", "float"),
    (["scaling", "plan"], "scaling", "--compute", "required"),
    (["scaling", "plan", "--compute", "1e21", "--mfu", "2"], "scaling", "--mfu", "(0, 1]"),
    (["scaling", "fit", "/nonexistent/runs.csv"], "scaling", "/nonexistent/runs.csv", "not found"),
    (["scaling", "plan", "--compute", "1e21", "--config", "/nonexistent/s.yaml"], "scaling", "--config", "does not exist"),
    (["scaling", "plan", "--compute", "1e21", "--law", "epoch"], "scaling", "--law", "epoch2024"),
    (["scaling", "fitt"], "scaling", "command", "did you mean fit?"),
    # sweep
    (["sweep", "run", "/nonexistent/sweep.yaml"], "sweep", "/nonexistent/sweep.yaml", "not found"),
    (["sweep", "run", SWEEP, "--parallel", "many"], "sweep", "--parallel", "int"),
    (["sweep", "run", SWEEP, "--parallel", "0"], "sweep", "--parallel", "at least 1"),
    (["sweep", "run", SWEEP, "--dryrun"], "sweep", "--dryrun", "--dry_run?"),
    (["sweep", "run"], "sweep", "spec", "required"),
    (["sweep", "lr-rule", "r.jsonl", "--refine", "cubic"], "sweep", "--refine", "parabola"),
    # plan
    (["plan", "--preset", "llama-7b", "--world_size", "x"], "plan", "--world_size", "int"),
    (["plan", "--config", "/nonexistent/train.yaml"], "plan", "--config", "does not exist"),
    (["plan", "--config", QUICKSTART, "--override", "model.config.n_layerz=2"], "plan", "--override model.config.n_layerz", "n_layers"),
    (["plan", "--preset", "llama-7b", "--strategy", "fsdp9"], "plan", "--strategy", "fsdp"),
    (["plan", "--preset", "llama-7b", "--device-memory", "eighty"], "plan", "--device_memory", "eighty"),
    (["plan", "--preset", "llama-7b", "--reserve", "2"], "plan", "--reserve", "[0, 1)"),
    # export
    (["export", "--out", "o"], "export", "--ckpt", "--from_hf"),
    (["export", "--ckpt", "x", "--format", "onnx", "--out", "o"], "export", "--format", "invalid choice"),
    (["export", "--ckpt", "/nonexistent/x.ckpt", "--out", "OUT"], "export", "--ckpt", "does not exist"),
    (["export", "--ckpt", "x"], "export", "--out", "required"),
    (["export", "--ckpt", "x", "--out", "o", "--dtype", "float8"], "export", "--dtype", "bfloat16"),
    # eval
    (["eval", "--ckpt", "/nonexistent/x.ckpt", "--tasks", "arc_easy"], "eval", "--ckpt", "does not exist"),
    (["eval", "--ckpt", "x"], "eval", "--tasks", "required"),
    (["eval", "--ckpt", "x", "--tasks", "arc_easy", "--batch_size", "big"], "eval", "--batch_size", "int"),
    (["eval", "--ckpt", "x", "--tasks", "arc_easy", "--limt", "3"], "eval", "--limt", "--limit?"),
    (["eval", "perplexity", "--ckpt", "x"], "eval", "--config", "--text"),
    (["eval", "perplexity", "--ckpt", "x", "--config", "/nonexistent/e.yaml"], "eval", "--config", "does not exist"),
    (["eval", "tasks", "--all"], "eval", "--all", "unknown option"),
    (["eval", "compare", "--judge", "nope"], "eval compare", "--judge", "reward-model"),
    (["eval", "compare", "--port", "99999"], "eval compare", "--port", "65535"),
    (["eval", "compare", "--level", "high"], "eval compare", "--level", "float"),
    (["eval", "compare", "--judge", "jsonl", "--judgments", "/nonexistent/j.jsonl"], "eval compare", "--judgments", "does not exist"),
    # tokenizer
    (["tokenizer", "train", "--config", "/nonexistent/e.yaml"], "tokenizer", "--config", "does not exist"),
    (["tokenizer", "train"], "tokenizer", "--config", "required"),
    (["tokenizer", "train", "--config", QUICKSTART, "--vocab_size", "big"], "tokenizer", "--vocab_size", "int"),
    (["tokenizer", "info"], "tokenizer", "tokenizer", "required"),
    # data
    (["data", "prepare", "--config", "/nonexistent/p.yaml"], "data", "--config", "does not exist"),
    (["data", "prepare", "--config", PREPARE, "--max-documents", "0"], "data", "--max_documents", ">= 1"),
    (["data", "prepare", "--config", PREPARE, "--engine", "spark"], "data", "--engine", "datatrove"),
    (["data", "prepare", "--config", PREPARE, "--num_proc", "two"], "data", "--num_proc", "int"),
    (["data", "extract-eval", "--html", "a"], "data", "--gold", "required"),
    (["data", "agreement", "--config", PREPARE], "data", "--data_dir", "required"),
    (["data", "agreement", "--config", PREPARE, "--data_dir", "/nonexistent/d"], "data", "--data_dir", "does not exist"),
    (["data", "agreement", "--data_dir", "d"], "data", "--config", "required"),
    (["data"], "data", "command", "prepare"),
]


@pytest.mark.parametrize("argv, verb, field, words", BAD, ids=[" ".join(b[0])[:60] for b in BAD])
def test_bad_input_is_one_line_naming_the_field(argv, verb, field, words, capsys, tmp_path):
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    rc, out, err = run(capsys, *argv)
    lines = err.strip().splitlines()
    assert rc == 2 and out == "" and len(lines) == 1, err
    assert lines[0].startswith(f"lmlab {verb}: error: {field}: "), lines[0]
    assert words in lines[0] and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "content, field, words",
    [
        ({"compute": 1e21, "mfuu": 0.3}, "mfuu", "did you mean mfu?"),
        ({"compute": 1e21, "mfu": "lots"}, "--mfu", "float"),
        ("[1, 2", "--config", "YAML"),
        ({"mfu": 0.3}, "--compute", "required"),
    ],
)
def test_bad_settings_file_is_one_line(content, field, words, capsys, tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    rc, out, err = run(capsys, "scaling", "plan", "--config", str(path))
    lines = err.strip().splitlines()
    assert rc == 2 and out == "" and len(lines) == 1, err
    assert lines[0].startswith(f"lmlab scaling: error: {field}: ") and words in lines[0]


def test_hyphenated_and_bare_flags_keep_working(capsys):
    rc, out, _ = run(capsys, "plan", "--preset", "llama-7b", "--world-size", "8", "--micro-batch", "2",
                     "--activation-checkpointing", "--json")
    inp = json.loads(out)["memory"]["input"]
    assert rc in (0, 1) and inp["world_size"] == 8 and inp["micro_batch"] == 2 and inp["activation_checkpointing"] is True
    settings = yaml.safe_load(_print_config(capsys, "sweep", "run", SWEEP, "--no-progress", "--retry-failed"))
    assert settings["progress"] is False and settings["retry_failed"] is True


@pytest.mark.parametrize(
    "extra, field, words",
    [
        ({"model": {"class_path": "lmlab.modules.PretrainModule", "init_args": {"config": {"n_layerz": 3}}}},
         "--config model.config.n_layerz", "did you mean model.config.n_layers?"),
        ({"model": {"class_path": "lmlab.modules.PretrainModule", "init_args": {"settings": {"optimizer": {"lr": "fast"}}}}},
         "--config model.settings.optimizer.lr", "float"),
        ({"trainer": {"max_steps": "many"}}, "--config trainer.max_steps", "int"),
    ],
)
def test_training_yaml_mistakes_name_the_nested_key(extra, field, words, capsys, tmp_path):
    path = tmp_path / "extra.yaml"
    path.write_text(yaml.safe_dump(extra))
    rc, out, err = run(capsys, "plan", "--config", QUICKSTART, "--config", str(path))
    lines = err.strip().splitlines()
    assert rc == 2 and out == "" and len(lines) == 1, err
    assert lines[0].startswith(f"lmlab plan: error: {field}: ") and words in lines[0]


# -- the mechanism itself: nested dataclass settings --------------------------------------------------


@dataclasses.dataclass
class _Engine:
    """Where work runs.

    Args:
        tasks: Tasks per stage.
        kind: Executor.
    """

    tasks: int = 4
    kind: Literal["local", "slurm"] = "local"


def _toy(name: str, engine: _Engine = _Engine(), repeat: int = 1) -> int:  # noqa: B008 - read, never mutated
    """A toy verb.

    Args:
        name: What to print.
        engine: Engine settings.
        repeat: How often.
    """
    print(json.dumps({"name": name, "tasks": engine.tasks, "kind": engine.kind, "repeat": repeat}))
    return 0


def test_nested_dataclass_settings_take_dotted_flags_and_files(capsys, tmp_path):
    from lmlab.verbs import run as run_verb

    assert run_verb("lmlab toy", _toy, ["--name", "x", "--engine.tasks", "7", "--engine.kind", "slurm"]) == 0
    assert json.loads(capsys.readouterr().out) == {"name": "x", "tasks": 7, "kind": "slurm", "repeat": 1}
    assert run_verb("lmlab toy", _toy, ["--name", "x", "--engine.tasks", "7", "--print_config"]) == 0
    printed = capsys.readouterr().out
    assert yaml.safe_load(printed)["engine"] == {"tasks": 7, "kind": "local"}
    (tmp_path / "toy.yaml").write_text(printed)
    assert run_verb("lmlab toy", _toy, ["--config", str(tmp_path / "toy.yaml"), "--engine.kind", "slurm"]) == 0
    assert json.loads(capsys.readouterr().out) == {"name": "x", "tasks": 7, "kind": "slurm", "repeat": 1}

    for argv, field, words in [
        (["--name", "x", "--engine.taskz", "3"], "--engine.taskz", "--engine.tasks?"),
        (["--name", "x", "--engine.tasks", "many"], "--engine.tasks", "int"),
        (["--name", "x", "--engine.kind", "k8s"], "--engine.kind", "local, slurm"),
        (["--engine.tasks", "3"], "--name", "required"),
    ]:
        assert run_verb("lmlab toy", _toy, argv) == 2
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert captured.out == "" and len(lines) == 1, captured.err
        assert lines[0].startswith(f"lmlab toy: error: {field}: ") and words in lines[0]
