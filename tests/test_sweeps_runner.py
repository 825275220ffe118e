"""``lmlab sweep run``: the engine's run set, launching, recording, resuming, failures, one real sweep."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from helpers import write_corpus
from lmlab.errors import ConfigError
from lmlab.sweeps.cli import main as sweep_main
from lmlab.sweeps.runner import RunnerOptions, SweepRunner
from lmlab.sweeps.spec import import_sweeps, validate_config
from lmlab.sweeps.state import STATE_FILE

try:
    import_sweeps()
except ConfigError as _missing:  # the engine pins numpy<2, so it is installed apart (README)
    pytest.skip(f"W&B sweep engine not installed: {_missing}", allow_module_level=True)

FAKE_RUN = r'''
import json, os, sys
args = dict(a[2:].split("=", 1) for a in sys.argv[1:])
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps(args) + "\n")
if args.get("x") == os.environ.get("FAKE_FAIL_X"):
    sys.exit(3)
loss = float(args["x"]) * float(args["y"])
record = {"metrics": {"val/loss": loss}, "N": float(args["x"]), "D": float(args["y"]), "loss": loss,
          "group": os.environ["WANDB_RUN_GROUP"], "sweep_id": os.environ["WANDB_SWEEP_ID"],
          "run_name": os.environ["WANDB_RUN_ID"], "mode": os.environ["WANDB_MODE"],
          "param_file": open(os.environ["WANDB_SWEEP_PARAM_PATH"]).read()}
with open(os.environ["LMLAB_RUN_RESULT"], "w") as f:
    json.dump(record, f)
'''
GRID = {"x": {"values": [1, 2, 3]}, "y": {"values": [0.5, 1.5]}}


@pytest.fixture
def fake(tmp_path):
    script = tmp_path / "fake_run.py"
    script.write_text(FAKE_RUN)
    return script


def make_spec(script: Path, method: str = "grid", parameters=None, **extra):
    config = {
        "name": "fake-sweep",
        "method": method,
        "metric": {"name": "val/loss", "goal": "minimize"},
        "program": str(script),
        "parameters": parameters or GRID,
        **extra,
    }
    return validate_config(config, "fake.yaml")


def launched(log: Path) -> list[tuple[str, str]]:
    if not log.exists():
        return []
    return [(d["x"], d["y"]) for d in map(json.loads, log.read_text().splitlines())]


def runner(spec, state: Path, log: Path, **kw) -> SweepRunner:
    env = {"FAKE_LOG": str(log), **kw.pop("env", {})}
    return SweepRunner(spec, RunnerOptions(state_dir=state, env=env, progress=False, poll_seconds=0.02, **kw))


def all_combos():
    return {(str(x), str(y)) for x, y in itertools.product([1, 2, 3], [0.5, 1.5])}


def test_grid_plan_is_the_engines_full_product(fake):
    spec = make_spec(fake)
    plan = SweepRunner(spec, RunnerOptions(progress=False)).plan()
    got = [(p["x"]["value"], p["y"]["value"]) for p in plan]
    assert sorted(got) == sorted(itertools.product([1, 2, 3], [0.5, 1.5]))
    assert len(set(got)) == 6
    # and the engine itself says the grid is exhausted once every combination has a run
    sweeps = import_sweeps()
    runs = [sweeps.SweepRun(name=str(i), state="finished", config=p, summary_metrics={"val/loss": 1.0}) for i, p in enumerate(plan)]
    assert sweeps.next_run(spec.config, runs) is None


def test_grid_sweep_runs_every_combination_in_parallel_and_collects_results(fake, tmp_path):
    log = tmp_path / "log.jsonl"
    state = runner(make_spec(fake), tmp_path / "state", log, parallel=2).run()
    assert sorted(launched(log)) == sorted(all_combos())
    assert [r.state for r in state.runs] == ["finished"] * 6
    for r in state.runs:
        v = r.values()
        assert r.metric == pytest.approx(v["x"] * v["y"])
        record = json.loads((Path(r.run_dir) / "result.json").read_text())
        assert record["mode"] == "offline" and record["group"] == "fake-sweep"
        assert record["sweep_id"] == state.sweep_id and record["run_name"] == r.id
        # the parameter file has the agent's layout
        params = yaml.safe_load(record["param_file"])
        assert params["wandb_version"] == 1 and params["x"] == {"value": v["x"]}
    best = state.best()
    assert best.values() == {"x": 1, "y": 0.5}
    table = pd.read_csv(tmp_path / "state" / "results.csv")
    assert len(table) == 6
    assert sorted(table["metric"]) == sorted(x * y for x, y in itertools.product([1, 2, 3], [0.5, 1.5]))
    assert list(table["param:x"] * table["param:y"]) == pytest.approx(list(table["metric"]))
    saved = json.loads((tmp_path / "state" / STATE_FILE).read_text())
    assert len(saved["runs"]) == 6 and not list((tmp_path / "state").glob("*.tmp"))


def test_interrupted_sweep_resumes_without_redoing_finished_runs(fake, tmp_path):
    log = tmp_path / "log.jsonl"
    spec = make_spec(fake)
    first = runner(spec, tmp_path / "state", log, count=2).run()
    assert [r.state for r in first.runs] == ["finished", "finished"]
    done = set(launched(log))
    assert len(done) == 2

    # simulate a runner killed while a third run was in flight
    path = tmp_path / "state" / STATE_FILE
    data = json.loads(path.read_text())
    sweeps = import_sweeps()
    taken = [sweeps.SweepRun(name=r["id"], state="finished", config=r["params"]) for r in data["runs"]]
    third = sweeps.next_run(spec.config, taken).config
    data["runs"].append({"id": "deadbeef", "index": 2, "params": third, "state": "running", "attempts": 1})
    path.write_text(json.dumps(data))
    log.write_text("")

    state = runner(spec, tmp_path / "state", log).run()
    relaunched = launched(log)
    assert not done & set(relaunched), "a finished run ran again"
    assert sorted(relaunched) == sorted(all_combos() - done)
    assert (str(third["x"]["value"]), str(third["y"]["value"])) in relaunched
    assert len(state.runs) == 6 and all(r.state == "finished" for r in state.runs)
    assert state.runs[2].id != "deadbeef" and state.runs[2].attempts == 2
    # a finished sweep started again has nothing left to do
    log.write_text("")
    runner(spec, tmp_path / "state", log).run()
    assert launched(log) == []


def test_failed_runs_are_recorded_and_retried_only_when_asked(fake, tmp_path):
    log = tmp_path / "log.jsonl"
    spec = make_spec(fake)
    state = runner(spec, tmp_path / "state", log, env={"FAKE_FAIL_X": "2"}).run()
    failed = state.by_state("failed")
    assert len(failed) == 2 and {r.values()["x"] for r in failed} == {2}
    assert all(r.returncode == 3 and r.error.startswith("exit code 3") for r in failed)
    assert len(state.by_state("finished")) == 4
    assert len(pd.read_csv(tmp_path / "state" / "results.csv")) == 4

    log.write_text("")
    runner(spec, tmp_path / "state", log).run()
    assert launched(log) == []  # failed runs stay failed
    state = runner(spec, tmp_path / "state", log, retry_failed=True).run()
    assert sorted(launched(log)) == [("2", "0.5"), ("2", "1.5")]
    assert all(r.state == "finished" for r in state.runs)


def test_sigterm_stops_the_runs_and_marks_them_interrupted_for_the_resume(tmp_path):
    import os
    import signal
    import threading

    spec = validate_config(
        {"method": "grid", "metric": {"name": "val/loss"}, "parameters": {"a": {"values": [1, 2]}},
         "command": ["${interpreter}", "-c", "import time; time.sleep(60)", "${args}"]},
        "slow.yaml",
    )
    options = RunnerOptions(state_dir=tmp_path / "s", parallel=2, serial_first=False, progress=False, poll_seconds=0.05)
    before = signal.getsignal(signal.SIGTERM)
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        SweepRunner(spec, options).run()
    timer.join()
    saved = json.loads((tmp_path / "s" / STATE_FILE).read_text())
    assert [r["state"] for r in saved["runs"]] == ["interrupted", "interrupted"]
    assert signal.getsignal(signal.SIGTERM) == before  # the runner put the previous handler back


def test_a_run_that_writes_no_result_fails(tmp_path):
    spec = validate_config(
        {"method": "grid", "metric": {"name": "val/loss"}, "parameters": {"a": {"value": 1}},
         "command": ["${interpreter}", "-c", "print('no result')"]},
        "noresult.yaml",
    )
    state = SweepRunner(spec, RunnerOptions(state_dir=tmp_path / "s", progress=False, poll_seconds=0.02)).run()
    (run,) = state.runs
    assert run.state == "failed" and run.returncode == 0 and "result" in run.error


def test_random_sweep_needs_a_count_and_is_reproducible(fake, tmp_path):
    params = {"x": {"distribution": "log_uniform_values", "min": 1.0, "max": 100.0}, "y": {"values": [0.5, 1.5]}}
    spec = make_spec(fake, method="random", parameters=params)
    with pytest.raises(ConfigError) as e:
        runner(spec, tmp_path / "a", tmp_path / "log").run()
    assert e.value.field == "--count"
    a = runner(spec, tmp_path / "a", tmp_path / "log", count=3, seed=5).run()
    b = runner(spec, tmp_path / "b", tmp_path / "log", count=3, seed=5).run()
    assert [r.values() for r in a.runs] == [r.values() for r in b.runs]
    assert len({r.values()["x"] for r in a.runs}) == 3 and all(1 <= r.values()["x"] <= 100 for r in a.runs)
    c = runner(spec, tmp_path / "c", tmp_path / "log", count=3, seed=6).run()
    assert [r.values() for r in c.runs] != [r.values() for r in a.runs]


def test_args_json_file_macro_and_cli(tmp_path, capsys):
    reader = tmp_path / "read_json.py"
    reader.write_text(
        "import json, os, sys\n"
        "cfg = json.load(open(sys.argv[1]))\n"
        "json.dump({'metrics': {'score': cfg['lr'] * 10}}, open(os.environ['LMLAB_RUN_RESULT'], 'w'))\n"
    )
    spec_path = tmp_path / "json_sweep.yaml"
    spec_path.write_text(yaml.safe_dump({
        "name": "jsonfile", "method": "grid", "metric": {"name": "score", "goal": "maximize"},
        "parameters": {"lr": {"values": [0.1, 0.2]}},
        "command": ["${interpreter}", str(reader), "${args_json_file}"],
    }))
    state = tmp_path / "st"
    assert sweep_main(["run", str(spec_path), "--state", str(state), "--no_progress"]) == 0
    out = capsys.readouterr().out
    assert "2 finished, 0 failed" in out and "best score = 2" in out
    files = sorted(state.glob("runs/*/config-*.json"))
    assert [json.loads(f.read_text()) for f in files] == [{"lr": 0.1}, {"lr": 0.2}]
    assert sweep_main(["status", str(state)]) == 0
    assert out.count("finished") <= capsys.readouterr().out.count("finished") + 1
    # --dry_run prints the commands and creates nothing
    assert sweep_main(["run", str(spec_path), "--state", str(tmp_path / "dry"), "--dry_run"]) == 0
    printed = capsys.readouterr().out
    assert "2 run(s)" in printed and str(reader) in printed and not (tmp_path / "dry").exists()


def test_a_real_tiny_sweep_end_to_end(tmp_path):
    """Two real training runs through the runner: RunSummary writes each run's result, the runner collects it."""
    corpus = write_corpus(tmp_path / "corpus")
    results = tmp_path / "all_results.jsonl"
    config = {
        "seed_everything": 3,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": 4, "logger": False, "enable_checkpointing": False,
            "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
            "val_check_interval": 5, "check_val_every_n_epoch": None, "default_root_dir": str(tmp_path / "runs"),
            "callbacks": [{"class_path": "lmlab.scaling.run_summary.RunSummary", "init_args": {"results_file": str(results)}}],
        },
        "model": {
            "class_path": "lmlab.modules.PretrainModule",
            "init_args": {"config": {"vocab_size": 320, "d_model": 32, "n_layers": 2, "n_heads": 4, "max_seq_len": 64},
                          "settings": {"optimizer": {"lr": 3e-3}, "schedule": {"name": "cosine", "warmup_steps": 2}}},
        },
        "data": {
            "class_path": "lmlab.data.PretrainDataModule",
            "init_args": {
                "sources": [{"name": "web", "weight": 0.6, "path": str(corpus / "web.jsonl")},
                            {"name": "books", "weight": 0.4, "path": str(corpus / "books")}],
                "tokenizer": str(tmp_path / "tok"), "tokenizer_train": {"vocab_size": 320, "sample_chars": 100000},
                "seq_len": 32, "batch_size": 8, "val_fraction": 0.05, "val_max_windows": 4, "cache_dir": str(tmp_path / "cache"),
            },
        },
    }
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    spec = validate_config(
        {
            "name": "tiny", "method": "grid", "metric": {"name": "val/loss", "goal": "minimize"},
            "parameters": {"budget.tokens": {"values": [1536, 2560]}},
            "command": ["${env}", "${interpreter}", "-m", "lmlab", "fit", "--config", str(cfg_path), "${args}"],
        },
        "tiny_sweep.yaml",
    )
    # build the tokenizer and token cache here, so both runs can start at once (no serial first run)
    from jsonargparse import ArgumentParser

    from lmlab.data import PretrainDataModule

    parser = ArgumentParser()
    parser.add_class_arguments(PretrainDataModule, "data")
    data = parser.instantiate_classes(parser.parse_object({"data": config["data"]["init_args"]})).data
    data.prepare_data()
    options = RunnerOptions(state_dir=tmp_path / "state", parallel=2, progress=False, serial_first=False, env={"OMP_NUM_THREADS": "1"})
    sweep = SweepRunner(spec, options)
    state = sweep.run()
    assert [r.state for r in state.runs] == ["finished", "finished"], [r.error for r in state.runs]
    from lmlab.models.config import TransformerConfig
    from lmlab.models.counting import count_params

    n = count_params(TransformerConfig(vocab_size=320, d_model=32, n_layers=2, n_heads=4, max_seq_len=64)).non_embedding
    table = pd.read_csv(tmp_path / "state" / "results.csv").sort_values("D")
    # budget.tokens -> max_steps = tokens / (8 x 32): 6 and 10 steps; D counts what was trained on
    assert list(table["steps"]) == [6, 10] and list(table["D"]) == [6 * 256, 10 * 256]
    assert list(table["N"]) == [n, n]
    assert list(table["final_val_step"]) == [6, 10]  # validated at the last step though val_check_interval is 5
    assert list(table["metric"]) == pytest.approx(list(table["loss"]))
    assert set(table["group"]) == {"tiny"}
    # the run's own results file got the same records
    assert len(results.read_text().splitlines()) == 2
    from lmlab.scaling import load_results

    data = load_results(tmp_path / "state" / "results.csv", warn=False)
    assert data.n_points == 2 and sorted(data.D) == [1536, 2560]
    assert sys.executable  # the runs used this interpreter's environment (PATH set by the runner)
