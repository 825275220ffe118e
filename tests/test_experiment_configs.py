"""Every YAML under experiments/data/ is a valid prepare config (training YAMLs are covered by test_cli)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lmlab.data.prepare.config import load_config

REPO = Path(__file__).resolve().parents[1]
PREPARE_YAMLS = [
    p for p in sorted((REPO / "experiments" / "data").glob("*.yaml"))
    if "trainer" not in (yaml.safe_load(p.read_text()) or {})
]


@pytest.mark.parametrize("path", PREPARE_YAMLS, ids=lambda p: p.name)
def test_prepare_yaml_loads_with_its_sources(path, monkeypatch, shared_data):
    monkeypatch.chdir(REPO)
    raw = yaml.safe_load(path.read_text())
    cfg = load_config(path)
    names = [s.name for s in cfg.sources]
    assert names == [s["name"] for s in raw["sources"]]
    weights = [s.weight for s in cfg.sources]
    assert all(w >= 0 for w in weights) and sum(weights) > 0


def test_shared_mix_follows_the_documented_proportions(monkeypatch, shared_data):
    monkeypatch.chdir(REPO)
    cfg = load_config(REPO / "experiments" / "data" / "shared_mix.yaml")
    total = sum(s.weight for s in cfg.sources)
    share = {s.name: s.weight / total for s in cfg.sources}
    assert 0.60 <= share["web"] <= 0.70 and 0.15 <= share["books"] <= 0.20
    assert 0.05 <= share["papers"] <= 0.10 and 0.05 <= share["code"] <= 0.10 and 0.03 <= share["reference"] <= 0.05


def test_chinchilla_mixture_follows_the_documented_proportions():
    cfg = yaml.safe_load((REPO / "experiments" / "chinchilla.yaml").read_text())
    sources = cfg["data"]["init_args"]["sources"]
    total = sum(s["weight"] for s in sources)
    share = {s["name"]: s["weight"] / total for s in sources}
    assert 0.60 <= share["web"] <= 0.70 and 0.15 <= share["books"] <= 0.20
    assert 0.05 <= share["papers"] <= 0.10 and 0.05 <= share["code"] <= 0.10 and 0.03 <= share["reference"] <= 0.05
    assert cfg["budget"]["tokens_per_param"] == 20
