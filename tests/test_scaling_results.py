"""Loading and validating scaling-results tables (lmlab.scaling.results)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lmlab.errors import ConfigError
from lmlab.scaling.chinchilla import fit_approach2
from lmlab.scaling.parametric import fit_approach3
from lmlab.scaling.results import from_frame, group_near_equal, load_results


def _write(tmp_path, frame: pd.DataFrame, name: str = "runs.csv"):
    path = tmp_path / name
    frame.to_csv(path, index=False)
    return path


def _clean_frame(n: int = 8) -> pd.DataFrame:
    N = np.logspace(7, 9, n)
    D = 20 * N
    return pd.DataFrame({"N": N, "D": D, "loss": 2.0 + 400 / N**0.34 + 400 / D**0.28})


def test_bad_rows_are_reported_and_excluded(tmp_path):
    frame = _clean_frame()
    frame.loc[1, "loss"] = np.nan
    frame.loc[3, "N"] = -5.0
    frame.loc[4, "D"] = np.inf
    frame.loc[6, "loss"] = 0.0
    path = _write(tmp_path, frame)
    with pytest.warns(UserWarning, match="excluded 4 row"):
        data = load_results(path)
    assert [e.row for e in data.excluded] == [1, 3, 4, 6]
    reasons = dict(data.excluded)
    assert "NaN" in reasons[1] and "loss" in reasons[1]
    assert "not positive" in reasons[3] and reasons[3].startswith("N")
    assert "infinite" in reasons[4]
    assert "not positive" in reasons[6]
    assert list(data.rows) == [0, 2, 5, 7]
    np.testing.assert_allclose(data.N, frame.loc[[0, 2, 5, 7], "N"].to_numpy())
    assert np.all(np.isfinite(data.loss)) and np.all(data.loss > 0)


def test_duplicates_keep_first_or_min(tmp_path):
    frame = _clean_frame()
    dup = frame.iloc[[2]].copy()
    dup["loss"] = dup["loss"] - 0.5  # a better run of the same (N, D), later in the file
    frame = pd.concat([frame, dup], ignore_index=True)
    with pytest.warns(UserWarning, match="duplicate"):
        first = from_frame(frame)
    assert len(first) == len(frame) - 1
    assert first.excluded == [(8, "duplicate run of row 2 (same N and D, kept the first)")]
    assert first.loss[list(first.rows).index(2)] == pytest.approx(frame.loc[2, "loss"])
    with pytest.warns(UserWarning, match="duplicate"):
        best = from_frame(frame, duplicates="min")
    assert [e.row for e in best.excluded] == [2]
    assert best.loss[list(best.rows).index(8)] == pytest.approx(frame.loc[8, "loss"])


def test_compute_is_6nd_without_a_compute_column(tmp_path):
    frame = _clean_frame()
    data = load_results(_write(tmp_path, frame))
    np.testing.assert_allclose(data.C, 6 * frame["N"] * frame["D"], rtol=1e-12)
    assert data.compute_derived and data.excluded == []


def test_tokens_derived_from_compute_column(tmp_path):
    frame = _clean_frame().rename(columns={"N": "Model Size"})
    frame["FLOP"] = 6 * frame["Model Size"] * frame["D"] * 1.01
    frame = frame.drop(columns=["D"])
    data = load_results(_write(tmp_path, frame), n_col="Model Size", compute_col="FLOP")
    np.testing.assert_allclose(data.D, frame["FLOP"] / (6 * frame["Model Size"]), rtol=1e-12)
    np.testing.assert_allclose(data.C, frame["FLOP"], rtol=1e-12)
    assert not data.compute_derived


def test_too_few_points_for_the_method():
    data = from_frame(_clean_frame(4))
    with pytest.raises(ConfigError) as err:
        fit_approach3(data)
    msg = str(err.value)
    assert err.value.field == "approach3"
    assert "4 usable points" in msg and "5 parameters" in msg and "at least 5" in msg
    assert "\n" not in msg


def test_too_few_isoflop_budgets():
    frame = pd.DataFrame({"N": [1e7, 2e7, 4e7, 8e7], "C": [1e18] * 4})
    frame["D"] = frame["C"] / (6 * frame["N"])
    frame["loss"] = [3.2, 3.1, 3.15, 3.3]
    with pytest.raises(ConfigError, match="IsoFLOP budgets"):
        fit_approach2(from_frame(frame, budget_col="C"))


def test_missing_column_and_file_are_config_errors(tmp_path):
    path = _write(tmp_path, _clean_frame())
    with pytest.raises(ConfigError) as err:
        load_results(path, loss_col="val_loss")
    assert err.value.field == "--loss_col" and "val_loss" in str(err.value) and "columns are: N, D, loss" in str(err.value)
    with pytest.raises(ConfigError, match="not found"):
        load_results(tmp_path / "nope.csv")


def test_group_near_equal_is_anchored_not_chained():
    # A chain of <5% steps must not merge into one group at a 10% tolerance.
    values = np.array([1.0, 1.05, 1.09, 1.14, 2.0, 2.01])
    labels = group_near_equal(values, rel_tol=0.1)
    assert len(np.unique(labels)) == 3
    assert labels[0] == labels[1] == labels[2] != labels[3]
    assert labels[4] == labels[5] == pytest.approx(np.sqrt(2.0 * 2.01))
