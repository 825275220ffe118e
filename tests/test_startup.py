"""What `lmlab fit` does before its first step: only the work that run needs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def test_fit_start_up_modules_do_not_import_pandas():
    # pandas (about 0.3 s) is only needed where a results table is read or made
    code = ("import sys, lmlab.cli, lmlab.scaling, lmlab.scaling.budget, lmlab.scaling.run_summary; "
            "print('pandas' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ), timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


def test_results_are_still_read_into_a_frame(tmp_path):
    from lmlab.scaling.results import load_results

    path = tmp_path / "runs.csv"
    path.write_text("N,D,loss\n1e6,2e7,3.5\n2e6,4e7,3.2\n")
    data = load_results(path)
    assert list(data.frame().columns) == ["N", "D", "C", "loss"]
    assert data.frame()["C"].tolist() == pytest.approx([6 * 1e6 * 2e7, 6 * 2e6 * 4e7])


@pytest.mark.parametrize("verb", ["fit", "validate", "test", "predict"])
def test_the_cli_builds_the_parser_of_the_named_verb_only(verb):
    from lightning.pytorch.cli import LightningCLI

    from lmlab.cli import _lightning_cli_class

    every = LightningCLI.subcommands()
    assert _lightning_cli_class(verb).subcommands() == {verb: every[verb]}
    assert _lightning_cli_class(None).subcommands() == every  # e.g. `lmlab --print_config`
    assert _lightning_cli_class("--help").subcommands() == every

