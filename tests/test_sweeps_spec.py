"""Bad sweep YAMLs fail before any run starts, naming the key; the repo's sweeps are valid."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lmlab.errors import ConfigError
from lmlab.sweeps.cli import main as sweep_main
from lmlab.sweeps.runner import RunnerOptions, SweepRunner
from lmlab.sweeps.spec import load_spec, validate_config

REPO = Path(__file__).resolve().parents[1]
SWEEPS = sorted((REPO / "sweeps").glob("*.yaml"))
LMLAB_COMMAND = ["${env}", "${interpreter}", "-m", "lmlab", "fit", "--config", "experiments/scaling/base.yaml", "${args}"]


def base(**changes):
    config = {
        "name": "t",
        "method": "grid",
        "metric": {"name": "val/loss", "goal": "minimize"},
        "parameters": {"budget.params": {"values": [1e5, 2e5]}},
        "command": list(LMLAB_COMMAND),
    }
    config.update(changes)
    return config


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_repo_sweeps_are_valid_wandb_sweeps(path):
    spec = load_spec(path)
    assert spec.metric == "val/loss" and spec.goal == "minimize" and spec.method == "grid"
    assert spec.command[:5] == ["${env}", "${interpreter}", "-m", "lmlab", "fit"] and spec.command[-1] == "${args}"
    assert "experiments/scaling/base.yaml" in spec.command
    assert any(name.startswith("budget.") for name in spec.parameters)
    for token in spec.command:
        if str(token).endswith(".yaml"):
            assert (REPO / token).is_file(), token


@pytest.mark.parametrize(
    "config, field, words",
    [
        (dict(base(), paramters={"a": {"value": 1}}), "paramters", "parameters"),
        (dict(base(), learning_rate=0.1), "learning_rate", "unknown top-level key"),
        (base(method="grdi"), "method", "grdi"),
        (base(parameters={"budget.params": {"valuez": [1, 2]}}), "parameters.budget.params", "budget.params"),
        (base(metric={"goal": "minimize"}), "metric", "name"),
        (base(command="python train.py"), "command", "array"),
        (base(command=["${interpreter}", "${program}", "${args}"]), "program", "${program}"),
        (base(method="custom"), "method", "offline"),
    ],
)
def test_bad_sweep_configs_name_the_key(config, field, words):
    with pytest.raises(ConfigError) as e:
        validate_config(config, "bad.yaml")
    assert e.value.field == field
    assert words in str(e.value)


def test_grid_with_a_continuous_parameter_is_rejected_before_running(tmp_path):
    spec = validate_config(base(parameters={"model.settings.optimizer.lr": {"min": 1e-4, "max": 1e-2}}), "bad.yaml")
    with pytest.raises(ConfigError) as e:
        SweepRunner(spec, RunnerOptions(state_dir=tmp_path / "s", progress=False)).run()
    assert e.value.field == "parameters" and "model.settings.optimizer.lr" in str(e.value)
    assert not (tmp_path / "s" / "runs").exists()


def test_overrides_lightning_rejects_fail_before_any_run_naming_the_parameter(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    sweep = tmp_path / "typo.yaml"
    params = {
        "budget.params": {"values": [1e5, 2e5]},
        "model.config.n_layerz": {"values": [2, 4]},
        "model.settings.optimizer.lr": {"value": 1e-3},
    }
    sweep.write_text(yaml.safe_dump(base(parameters=params)))
    state = tmp_path / "state"
    assert sweep_main(["run", str(sweep), "--state", str(state), "--no_progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "parameters.model.config.n_layerz" in err and "n_layerz" in err.split(":", 2)[-1]
    assert "budget.params" not in err.split("(")[0].replace("parameters.model.config.n_layerz", "")
    assert not (state / "runs").exists() and not (state / "sweep.json").exists()

    # an ill-typed value is caught the same way
    sweep.write_text(yaml.safe_dump(base(parameters={"model.settings.optimizer.lr": {"values": ["fast"]}})))
    assert sweep_main(["run", str(sweep), "--state", str(state), "--dry_run"]) == 2
    assert "parameters.model.settings.optimizer.lr" in capsys.readouterr().err


def test_cli_bad_file_and_unknown_key_are_one_line(tmp_path, capsys):
    assert sweep_main(["run", str(tmp_path / "missing.yaml")]) == 2
    assert "sweep file not found" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(dict(base(), early_terminat={"type": "hyperband"})))
    assert sweep_main(["run", str(bad), "--state", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmlab sweep: error: early_terminat:") and "early_terminate" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "s").exists()
    assert sweep_main(["run", str(bad), "--parallel", "0"]) == 2
