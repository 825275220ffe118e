"""Sweep command macros expand exactly as ``wandb agent`` expands them."""

from __future__ import annotations

import json

import pytest

from lmlab.sweeps.macros import DEFAULT_COMMAND, command_args, expand_command, expand_envvars

PARAMS = {
    "budget.params": {"value": 1.0e6},
    "model.settings.optimizer.lr": {"value": 0.001},
    "steps": {"value": 300},
    "as_string": {"value": "1e6"},
    "flag_on": {"value": True},
    "flag_off": {"value": False},
    "nothing": {"value": None},
    "betas": {"value": [0.9, 0.95]},
}


def test_argument_formats_match_the_installed_wandb_agent():
    utils = pytest.importorskip("wandb.sdk.launch.sweeps.utils")
    theirs = utils.create_sweep_command_args({"args": PARAMS})
    ours = command_args(PARAMS)
    assert set(theirs) <= set(ours)
    for key in theirs:
        assert ours[key] == theirs[key], key


def test_argument_formats_on_examples():
    out = command_args(PARAMS)
    assert out["args"] == [
        "--budget.params=1000000.0",
        "--model.settings.optimizer.lr=0.001",
        "--steps=300",
        "--as_string=1e6",
        "--flag_on=True",
        "--flag_off=False",
        "--nothing=None",
        "--betas=[0.9, 0.95]",
    ]
    assert out["args_no_hyphens"][0] == "budget.params=1000000.0"
    # booleans: True becomes a bare flag, False disappears, everything else keeps its value
    assert "--flag_on" in out["args_no_boolean_flags"]
    assert not any(a.startswith("--flag_off") for a in out["args_no_boolean_flags"])
    assert "--steps=300" in out["args_no_boolean_flags"]
    assert out["args_no_equals"][:4] == ["--budget.params", "1000000.0", "--model.settings.optimizer.lr", "0.001"]
    assert json.loads(out["args_json"][0])["betas"] == [0.9, 0.95]
    assert out["args_append_hydra"][2] == "+steps=300" and out["args_override_hydra"][2] == "++steps=300"


def test_command_expansion_as_the_agent_runs_it():
    command = ["${env}", "${interpreter}", "-m", "lmlab", "fit", "--config", "experiments/scaling/base.yaml", "${args}"]
    params = {"budget.params": {"value": 2.5e5}, "budget.tokens": {"value": 5e6}}
    argv = expand_command(command, params, windows=False)
    assert argv == [
        "/usr/bin/env",
        "python",
        "-m",
        "lmlab",
        "fit",
        "--config",
        "experiments/scaling/base.yaml",
        "--budget.params=250000.0",
        "--budget.tokens=5000000.0",
    ]
    # no ${env} on Windows
    assert expand_command(command, params, windows=True)[0] == "python"


def test_default_command_program_json_file_and_unknown_macros():
    params = {"x": {"value": 1}}
    assert expand_command(None, params, program="train.py", windows=False) == ["/usr/bin/env", "python", "train.py", "--x=1"]
    assert expand_command([], params, program="train.py", windows=False) == expand_command(list(DEFAULT_COMMAND), params, program="train.py", windows=False)
    argv = expand_command(["${interpreter}", "t.py", "${args_json_file}", "${args_json}", "${no_such_macro}", "${args_no_hyphens}"], params, args_json_file="/tmp/c.json")
    assert argv == ["python", "t.py", "/tmp/c.json", '{"x": 1}', "x=1"]
    # a macro inside a longer token is not a macro token: left as written
    assert expand_command(["--a=${args}"], params) == ["--a=${args}"]
    # the dict format, used as a token, contributes its keys (the agent's list += dict)
    assert expand_command(["${args_dict}"], {"a": {"value": 1}, "b": {"value": 2}}) == ["a", "b"]


def test_envvar_macros_match_the_installed_wandb_agent(monkeypatch):
    utils = pytest.importorskip("wandb.sdk.launch.sweeps.utils")
    monkeypatch.setenv("LMLAB_TEST_DIR", "/data/x")
    monkeypatch.delenv("LMLAB_UNSET_VAR", raising=False)
    command = ["run", "--dir=${envvar:LMLAB_TEST_DIR}/out", "${envvar:LMLAB_UNSET_VAR}", "${envvar:LMLAB_TEST_DIR}${envvar:LMLAB_TEST_DIR}"]
    theirs = utils.create_sweep_command(list(command))
    ours = [expand_envvars(t) for t in command]
    assert ours == theirs == ["run", "--dir=/data/x/out", "LMLAB_UNSET_VAR", "/data/x/data/x"]
    argv = expand_command(["${interpreter}", "--root=${envvar:LMLAB_TEST_DIR}", "${args}"], {"k": {"value": "v"}})
    assert argv == ["python", "--root=/data/x", "--k=v"]


def test_missing_value_is_an_error():
    with pytest.raises(ValueError, match="value"):
        command_args({"x": {"values": [1, 2]}})
