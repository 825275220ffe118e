"""`lmlab scaling` command line: output contracts and error handling."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from lmlab.scaling.cli import main
from lmlab.scaling.law import EPOCH_2024, ChinchillaLaw
from lmlab.scaling.plan import plan_compute, shape_for_params

LAW = ChinchillaLaw(E=1.9, A=450.0, B=1800.0, alpha=0.35, beta=0.33)


@pytest.fixture(scope="module")
def runs_csv(tmp_path_factory):
    """6 IsoFLOP budgets x 7 sizes from LAW with 0.3% noise; odd column names, one bad row."""
    rng = np.random.default_rng(0)
    rows = []
    for c in np.logspace(18, 21, 6):
        n_opt, _ = LAW.optimal(c)
        for n in n_opt * np.logspace(-0.8, 0.8, 7):
            d = c / (6 * n)
            rows.append((n, d, c, LAW.loss(n, d) * np.exp(0.003 * rng.normal())))
    frame = pd.DataFrame(rows, columns=["params", "tokens", "budget", "val_loss"])
    frame.loc[len(frame)] = [1e9, 1e10, 6e19, np.nan]
    path = tmp_path_factory.mktemp("scaling") / "runs.csv"
    frame.to_csv(path, index=False)
    return path


COLS = ["--n_col", "params", "--d_col", "tokens", "--loss_col", "val_loss"]


def _json(capsys) -> dict:
    out = capsys.readouterr().out
    assert out.count("\n") == 1, out  # exactly one JSON object, one line
    return json.loads(out)


def test_fit_approach3_json_contract(runs_csv, capsys):
    with pytest.warns(UserWarning, match="excluded 1 row"):
        assert main(["fit", str(runs_csv), *COLS, "--grid", "4500", "--json"]) == 0
    obj = _json(capsys)
    for key in ("E", "A", "B", "alpha", "beta", "a", "b", "n_points"):
        assert isinstance(obj[key], (int, float)), key
    assert obj["n_points"] == 42 and obj["n_starts"] == 4500 and obj["converged"] is True
    assert obj["excluded"] == [{"row": 42, "reason": "loss is NaN"}]
    assert obj["alpha"] == pytest.approx(LAW.alpha, rel=0.05)
    assert obj["beta"] == pytest.approx(LAW.beta, rel=0.05)
    assert obj["E"] == pytest.approx(LAW.E, rel=0.02)
    assert obj["a"] == pytest.approx(obj["beta"] / (obj["alpha"] + obj["beta"]), rel=1e-12)
    assert "intervals" not in obj


def test_fit_approach3_bootstrap_intervals(runs_csv, capsys):
    with pytest.warns(UserWarning):
        rc = main(["fit", str(runs_csv), *COLS, "--grid", "4500", "--bootstrap", "100", "--level", "0.8", "--json"])
    assert rc == 0
    obj = _json(capsys)
    assert obj["level"] == 0.8 and obj["n_resamples"] == 100
    assert set(obj["intervals"]) >= {"E", "A", "B", "alpha", "beta", "a", "b"}
    for name, (lo, hi) in obj["intervals"].items():
        assert lo <= obj[name] <= hi, name


def test_fit_approach2_and_kaplan_json(runs_csv, capsys):
    with pytest.warns(UserWarning):
        assert main(["fit", str(runs_csv), *COLS, "--method", "approach2", "--curve", "parabola", "--budget_col", "budget", "--json"]) == 0
    obj = _json(capsys)
    assert obj["method"] == "approach2" and obj["n_optima"] == 6 and obj["n_points"] == 42
    assert obj["a"] == pytest.approx(LAW.a, abs=0.02) and obj["a"] + obj["b"] == pytest.approx(1.0)
    assert len(obj["optima"]) == 6 and {"C", "N_opt", "D_opt", "loss"} <= set(obj["optima"][0])
    with pytest.warns(UserWarning):
        assert main(["fit", str(runs_csv), *COLS, "--method", "kaplan", "--json"]) == 0
    obj = _json(capsys)
    assert obj["method"] == "kaplan" and {"alpha_N", "N_c", "alpha_D", "D_c"} <= set(obj)
    assert obj["alpha_N"] > 0 and obj["alpha_D"] > 0


def test_fit_help_says_what_window_and_curve_do(capsys):
    assert main(["fit", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--window" in out and "lowest-loss run" in out and "decades" in out
    assert "--curve" in out and "Akima" in out and "Porian" in out
    assert "resampled with replacement" in out


def test_fit_table_output_and_plot(runs_csv, capsys, tmp_path):
    png = tmp_path / "fit.png"
    with pytest.warns(UserWarning):
        rc = main(["fit", str(runs_csv), *COLS, "--method", "approach1", "--bootstrap", "50", "--plot", str(png)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "approach1" in out and "95% interval" in out and "excluded 1 row(s)" in out
    assert "95% percentile bootstrap, 50 resamples" in out and "with replacement over all runs" in out
    a_line = next(line for line in out.splitlines() if line.strip().startswith("a "))
    name, value, lo, hi = a_line.split()  # name, value, [lo, hi]
    assert float(lo.strip("[,")) <= float(value) <= float(hi.strip("]"))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "argv, field",
    [
        (["fit", "/nonexistent/runs.csv"], "/nonexistent/runs.csv"),
        (["fit", "RUNS", "--n_col", "nope"], "--n_col"),
        (["fit", "RUNS", *COLS, "--bootstrap", "10", "--level", "95"], "--level"),
        (["fit", "RUNS", "--method", "approach9"], "--method"),
        (["plan", "--compute", "1e21", "--mfu", "2"], "--mfu"),
        (["plan"], "--compute"),
    ],
)
def test_bad_input_exits_2_with_one_line(argv, field, runs_csv, capsys):
    argv = [str(runs_csv) if a == "RUNS" else a for a in argv]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"lmlab scaling: error: {field}: ") and lines[0].endswith(")")


def test_plan_json(capsys):
    assert main(["plan", "--compute", "1e21", "--accelerators", "8", "--peak_flops", "989e12", "--mfu", "0.4", "--json"]) == 0
    obj = _json(capsys)
    expected = plan_compute(1e21, EPOCH_2024, accelerators=8, peak_flops=989e12, mfu=0.4)
    assert obj["N_opt"] == pytest.approx(expected.N_opt) and obj["D_opt"] == pytest.approx(expected.D_opt)
    assert obj["loss"] == pytest.approx(expected.loss)
    assert obj["pf_days"] == pytest.approx(1e21 / 8.64e19)
    assert obj["seconds"] == pytest.approx(1e21 / (8 * 989e12 * 0.4))
    assert obj["rule_D"] == pytest.approx(20 * obj["rule_N"])


def test_plan_table_and_write_config(tmp_path, capsys):
    out_yaml = tmp_path / "cfg" / "plan.yaml"
    rc = main(["plan", "--compute", "1e20", "--batch_tokens", "262144", "--write_config", str(out_yaml)])
    assert rc == 0
    out = capsys.readouterr().out
    for word in ("N_opt", "D_opt", "loss", "PF-days", "days on 1 x"):
        assert word in out
    cfg = yaml.safe_load(out_yaml.read_text())
    plan = plan_compute(1e20)
    shape = shape_for_params(plan.N_opt)
    assert cfg["model"]["config"] == {
        "n_layers": shape.n_layers,
        "d_model": shape.d_model,
        "n_heads": shape.n_heads,
        "n_kv_heads": shape.n_heads,
    }
    assert cfg["trainer"]["max_steps"] == int(np.ceil(plan.D_opt / 262144))
    assert [p.name for p in out_yaml.parent.iterdir()] == ["plan.yaml"]  # no temp file left behind


def test_plan_from_fit_json(tmp_path, capsys):
    fit_json = tmp_path / "fit.json"
    fit_json.write_text(json.dumps({"E": 1.9, "A": 450.0, "B": 1800.0, "alpha": 0.35, "beta": 0.33}))
    assert main(["plan", "--compute", "1e22", "--fit_json", str(fit_json), "--json"]) == 0
    obj = _json(capsys)
    n_opt, _ = LAW.optimal(1e22)
    assert obj["N_opt"] == pytest.approx(n_opt)


def test_fit_logs_parameters_and_plot_to_an_offline_wandb_run(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(0)
    N = np.repeat([1e6, 3e6, 1e7, 3e7], 4)
    D = np.tile([2e7, 6e7, 2e8, 6e8], 4)
    loss = 1.8 + 400 / N**0.34 + 2000 / D**0.36 + rng.normal(0, 0.002, N.size)
    csv = tmp_path / "runs.csv"
    pd.DataFrame({"N": N, "D": D, "loss": loss}).to_csv(csv, index=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    png = tmp_path / "fit.png"
    assert main(["fit", str(csv), "--plot", str(png), "--wandb", "lmlab-test", "--wandb_dir", str(tmp_path)]) == 0
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    images = list(runs[0].rglob("*.png"))
    assert images and images[0].stat().st_size > 0
