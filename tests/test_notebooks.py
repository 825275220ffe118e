"""The scaling notebooks run top to bottom (small bootstrap) and report the right numbers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lmlab.scaling.law import EPOCH_2024

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def run_notebook(name: str, env: dict[str, str], monkeypatch):
    """Execute a notebook as ``jupyter execute`` does (kernel in the notebook's folder); returns the executed book."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    book = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(book, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}})
    return client.execute()


def outputs(book, kind: str) -> list:
    """Every output of the code cells of one kind: a MIME type (``"image/png"``, ``"text/html"``) or a stream name."""
    found = []
    for cell in book.cells:
        for out in cell.get("outputs", []):
            if out.output_type == "stream" and out.name == kind:
                found.append(out.text)
            elif kind in out.get("data", {}):
                found.append(out.data[kind])
    return found


def assert_shows_fits_inline(book, n_images: int, summary: str, parameters: tuple[str, ...]) -> None:
    """The executed notebook shows its figures and its fitted parameters in the notebook itself."""
    assert not [o for c in book.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert len(outputs(book, "image/png")) >= n_images
    assert all(png.strip() for png in outputs(book, "image/png"))
    assert summary in "".join(outputs(book, "stdout"))
    tables = "".join(outputs(book, "text/plain") + outputs(book, "text/html"))
    assert all(name in tables for name in parameters), tables


def synthetic_results(path: Path, seed: int = 0) -> Path:
    """IsoFLOP-style runs (5 budgets x 7 sizes) from a known law with 0.3% log-normal noise, in RunSummary's CSV layout."""
    rng = np.random.default_rng(seed)
    rows = []
    for c in np.logspace(18, 20, 5):
        n_opt, _ = EPOCH_2024.optimal(c)
        for n in n_opt * np.logspace(-1, 1, 7):
            d = c / (6 * n)
            rows.append({"run_name": f"r{len(rows)}", "N": n, "D": d, "C": 6 * n * d, "loss": EPOCH_2024.loss(n, d) * np.exp(0.003 * rng.normal())})
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_scaling_laws_notebook_recovers_a_known_law(tmp_path, monkeypatch):
    results = synthetic_results(tmp_path / "results.csv")
    fit_json = tmp_path / "fits.json"
    env = {
        "LMLAB_SCALING_RESULTS": str(results),
        "LMLAB_BOOTSTRAP": "30",
        "LMLAB_PLOTS_DIR": str(tmp_path / "plots"),
        "LMLAB_FIT_JSON": str(fit_json),
        "LMLAB_WANDB_PROJECT": "",
    }
    book = run_notebook("scaling_laws.ipynb", env, monkeypatch)
    assert_shows_fits_inline(book, 4, "converged: True", ("alpha", "beta", "approach3", "N_opt"))
    fits = json.loads(fit_json.read_text())
    assert fits["approach3"]["a"] == pytest.approx(EPOCH_2024.a, abs=0.03)
    assert fits["approach3"]["alpha"] == pytest.approx(EPOCH_2024.alpha, abs=0.05)
    lo, hi = fits["approach3"]["intervals"]["a"]
    assert lo < hi and fits["approach3"]["n_resamples"] == 30
    assert fits["approach2"]["a"] == pytest.approx(EPOCH_2024.a, abs=0.08)
    assert {"approach1", "approach2", "approach3"} <= set(fits)
    table = fits["compute_optimal"]
    assert len(table) == 6 and table[-1]["extrapolated"] and not table[0]["extrapolated"]
    pngs = {p.name for p in (tmp_path / "plots").glob("*.png")}
    assert {"loss_vs_compute.png", "isoflops.png", "optimal_allocation_approach3.png", "residuals_approach3.png"} <= pngs


def test_chinchilla_reproduction_notebook_matches_the_published_refit(shared_data, tmp_path, monkeypatch):
    if not (shared_data / "scaling" / "epoch_chinchilla_svg_extracted_data.csv").is_file():
        pytest.skip("the Chinchilla data is not in ../shared/data/scaling")
    fit_json = tmp_path / "chinchilla.json"
    env = {
        "LMLAB_SHARED_DATA": str(shared_data),
        "LMLAB_BOOTSTRAP": "30",
        "LMLAB_PLOTS_DIR": str(tmp_path / "plots"),
        "LMLAB_FIT_JSON": str(fit_json),
    }
    book = run_notebook("chinchilla_reproduction.ipynb", env, monkeypatch)
    assert_shows_fits_inline(book, 3, "Huber-sum objective: lmlab 1.01827", ("alpha", "Epoch 2024", "Hoffmann 2022"))
    fit = json.loads(fit_json.read_text())["approach3"]
    # Besiroglu et al.'s grid refit: E=1.8172, alpha=0.3473, beta=0.3672, objective 1.0182740e-3
    assert fit["E"] == pytest.approx(1.8172, rel=2e-3)
    assert fit["alpha"] == pytest.approx(0.3473, rel=5e-3) and fit["beta"] == pytest.approx(0.3672, rel=5e-3)
    assert fit["objective"] == pytest.approx(1.0182740e-3, rel=1e-4)
    assert fit["converged"] and fit["n_points"] == 240
    assert len(list((tmp_path / "plots").glob("chinchilla_*.png"))) == 3


@pytest.mark.parametrize(
    ("name", "n_images", "summary", "parameters"),
    [
        ("scaling_laws.ipynb", 4, "24 runs from ../docs/study/results.csv", ("alpha", "beta", "Kaplan", "approach1")),
        ("chinchilla_reproduction.ipynb", 3, "Huber-sum objective: lmlab 1.0182740e-03", ("alpha", "Epoch 2024")),
    ],
)
def test_committed_notebooks_carry_their_outputs(name, n_images, summary, parameters):
    """The repository's copies were executed top to bottom, quietly, with the default settings."""
    book = nbformat.read(NOTEBOOKS / name, as_version=4)
    code = [c for c in book.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
    assert_shows_fits_inline(book, n_images, summary, parameters)
    assert "converged: True" in "".join(outputs(book, "stdout"))
    assert outputs(book, "stderr") == []  # no stray warnings in the committed outputs
