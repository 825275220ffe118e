"""Learning-rate rule: recovers a planted lr_opt = c N^-k and feeds it back as a config fragment."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from lmlab.errors import ConfigError
from lmlab.scaling.lr_rules import best_lr_per_size, fit_lr_rule
from lmlab.sweeps.cli import main as sweep_main

REPO = Path(__file__).resolve().parents[1]
SIZES = np.array([1e5, 3e5, 1e6, 3e6, 1e7])
LRS = 1e-4 * 2.0 ** (np.arange(16) / 2)  # factor sqrt(2) apart, 1e-4 .. 1.8e-2


def sweep_frame(k: float, coef: float = 0.5, noise: float = 0.002, seed: int = 0) -> pd.DataFrame:
    """A learning-rate x size grid whose loss is a parabola in log lr around coef * N^-k."""
    rng = np.random.default_rng(seed)
    rows = []
    for n in SIZES:
        opt = coef * n**-k
        for lr in LRS:
            loss = 3.0 + 10.0 * n**-0.2 + 0.08 * np.log(lr / opt) ** 2 + noise * rng.normal()
            rows.append({"N": n, "lr": lr, "loss": loss})
    return pd.DataFrame(rows)


def test_planted_exponent_is_recovered_with_an_interval_that_covers_it():
    rule = fit_lr_rule(sweep_frame(k=0.3), refine="parabola", bootstrap=400, seed=1)
    assert rule.k == pytest.approx(0.3, abs=0.02)
    assert rule.coef == pytest.approx(0.5, rel=0.5)  # c trades off against k; lr_opt mid-range is tight
    lo, hi = rule.intervals["k"]
    assert lo <= 0.3 <= hi and hi - lo < 0.15
    assert rule.lr(1e6) == pytest.approx(0.5 * 1e6**-0.3, rel=0.05)
    # plain argmin is quantised to the grid but still close
    coarse = fit_lr_rule(sweep_frame(k=0.3), refine="none", bootstrap=0)
    assert coarse.k == pytest.approx(0.3, abs=0.08) and coarse.intervals is None
    # a size-independent optimum gives k ~ 0, and a steeper one is told apart
    assert abs(fit_lr_rule(sweep_frame(k=0.0, coef=2e-3), refine="parabola", bootstrap=0).k) < 0.02
    assert fit_lr_rule(sweep_frame(k=0.5, coef=1.0), refine="parabola", bootstrap=0).k == pytest.approx(0.5, abs=0.02)


def test_best_lr_per_size_groups_near_equal_sizes_and_flags_edges():
    n = np.array([1.0e5, 1.03e5, 1.0e5, 4e5, 4e5, 4e5])
    lr = np.array([1e-3, 2e-3, 4e-3, 1e-3, 2e-3, 4e-3])
    loss = np.array([3.0, 2.9, 2.95, 2.5, 2.6, 2.7])
    sizes, best, losses, notes = best_lr_per_size(n, lr, loss)
    assert sizes == pytest.approx([1.01e5, 4e5], rel=0.01) and best.tolist() == [2e-3, 1e-3] and losses.tolist() == [2.9, 2.5]
    assert len(notes) == 1 and "edge" in notes[0]
    with pytest.raises(ConfigError):
        fit_lr_rule(pd.DataFrame({"N": [1e5, 1e5], "lr": [1e-3, 2e-3], "loss": [3.0, 2.9]}), bootstrap=0)
    with pytest.raises(ConfigError) as e:
        fit_lr_rule(pd.DataFrame({"N": [1e5], "learning_rate": [1e-3], "loss": [3.0]}))
    assert e.value.field == "--lr_col"


def test_cli_writes_a_fragment_that_composes_with_the_base_config(tmp_path, capsys, monkeypatch):
    results = tmp_path / "results.jsonl"
    with open(results, "w") as f:
        for row in sweep_frame(k=0.3).to_dict("records"):
            f.write(json.dumps({**row, "run_name": "x", "metrics": {"val/loss": row["loss"]}}) + "\n")
    out = tmp_path / "lr_rule.yaml"
    args = ["lr-rule", str(results), "--write", str(out), "--params", "1e6", "--refine", "parabola", "--bootstrap", "200"]
    assert sweep_main(args) == 0
    printed = capsys.readouterr().out
    assert "k = 0.3" in printed and "95%" in printed
    fragment = yaml.safe_load(out.read_text())
    lr = fragment["model"]["init_args"]["settings"]["optimizer"]["lr"]
    assert lr == pytest.approx(0.5 * 1e6**-0.3, rel=0.05)
    assert "lr_opt(N)" in out.read_text()

    assert sweep_main([*args[:2], "--json", "--bootstrap", "0"]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["params"] == pytest.approx(1e7) and obj["lr"] == pytest.approx(obj["coef"] * 1e7 ** -obj["k"])

    from lmlab.cli import main

    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", "experiments/scaling/base.yaml", "--config", str(out), "--print_config"])
    assert e.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["init_args"]["settings"]["optimizer"]["lr"] == lr
    assert printed["model"]["init_args"]["settings"]["optimizer"]["weight_decay"] == 0.1  # the rest of the base config stays
