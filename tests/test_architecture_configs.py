"""The architecture overlays in experiments/architecture/ compose with the quickstart as the README says."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lmlab.cli import main
from lmlab.errors import ConfigError
from lmlab.models import CausalLM, TransformerConfig
from lmlab.models.counting import count_params
from lmlab.models.hf import hf_architecture

REPO = Path(__file__).resolve().parents[1]
OVERLAYS = sorted((REPO / "experiments" / "architecture").glob("*.yaml"))


def composed_config(overlay: Path, capsys, monkeypatch) -> dict:
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", "experiments/quickstart.yaml", "--config", str(overlay), "--print_config"])
    assert e.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_there_are_overlays():
    assert {p.stem for p in OVERLAYS} >= {"moe", "sliding_window", "linear_attention"}


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.stem)
def test_overlay_changes_only_what_it_names(overlay, capsys, monkeypatch):
    printed = composed_config(overlay, capsys, monkeypatch)
    wanted = yaml.safe_load(overlay.read_text())
    config = printed["model"]["init_args"]["config"]
    for key, value in wanted["model"]["init_args"]["config"].items():
        assert config[key] == value, key
    # the quickstart's shape and data are kept; the run gets its own folder
    assert (config["d_model"], config["n_layers"], config["vocab_size"]) == (128, 4, 2048)
    assert printed["trainer"]["max_steps"] == 300
    assert printed["trainer"]["default_root_dir"] == wanted["trainer"]["default_root_dir"] != "runs/quickstart"


def test_moe_overlay_keeps_the_quickstarts_active_parameters(capsys, monkeypatch):
    dense = TransformerConfig(**{k: v for k, v in yaml.safe_load((REPO / "experiments/quickstart.yaml").read_text())
                                 ["model"]["init_args"]["config"].items()})
    printed = composed_config(REPO / "experiments/architecture/moe.yaml", capsys, monkeypatch)
    moe = TransformerConfig(**printed["model"]["init_args"]["config"])
    d, m = count_params(dense), count_params(moe)
    assert m.active_non_embedding == pytest.approx(d.non_embedding, rel=0.02)  # only the router is extra
    assert m.non_embedding > 3 * d.non_embedding  # 8 experts of half width: 4x the FFN weights
    assert hf_architecture(moe) == "mixtral"
    assert sum(p.numel() for p in CausalLM(moe).parameters()) == m.total


def test_attention_overlays_export_as_documented(capsys, monkeypatch):
    swa = composed_config(REPO / "experiments/architecture/sliding_window.yaml", capsys, monkeypatch)
    assert hf_architecture(TransformerConfig(**swa["model"]["init_args"]["config"])) == "mistral"
    lin = composed_config(REPO / "experiments/architecture/linear_attention.yaml", capsys, monkeypatch)
    with pytest.raises(ConfigError, match="linear attention has no transformers class"):
        hf_architecture(TransformerConfig(**lin["model"]["init_args"]["config"]))
