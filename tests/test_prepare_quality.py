"""Quality score terms, selection, and agreement metrics/tuning."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import yaml

from lmlab.data.prepare.agreement import (
    accuracy,
    best_threshold,
    fit_logistic,
    load_labeled,
    roc_auc,
    stack_outputs,
    tune_weights_grid,
)
from lmlab.data.prepare.filters import FilterStack
from lmlab.data.prepare.quality import (
    BigramReferenceModel,
    LogPerplexityNorm,
    QualityFilter,
    QualityScorer,
    QualityWeights,
    diversity_term,
    read_wikitext,
    scorer_from_config,
    select_by_threshold,
    select_top_fraction,
    unsafe_fraction,
)
from lmlab.data.prepare.stats import word_tokens
from lmlab.errors import ConfigError

REFERENCE = [
    "The river flows through the valley and the town is built on both of its banks.",
    "In the spring the water rises and the farmers move their animals to higher ground.",
    "The town has a market square, a church and a school for the children of the valley.",
    "Many of the people who live in the town work on the farms or in the small shops.",
    "The history of the valley is told in the museum next to the old bridge over the river.",
] * 3
IN_DOMAIN = "The farmers of the valley work on the farms and the children go to the school in the town."
GIBBERISH = "zxq vlorp quixby frandle wug blick snarf glorp trindle vosk mib"


@pytest.fixture(scope="module")
def model() -> BigramReferenceModel:
    return BigramReferenceModel.fit(REFERENCE, min_count=1)


def test_reference_model_prefers_in_domain_text(model):
    shuffled = " ".join(reversed(IN_DOMAIN.split()))
    p_in, p_shuf, p_gib = model(IN_DOMAIN), model(shuffled), model(GIBBERISH)
    assert p_in < p_shuf < p_gib
    assert model("") == math.inf
    lp = model.token_log_probs(word_tokens(IN_DOMAIN))
    assert lp.shape == (len(word_tokens(IN_DOMAIN)),) and np.all(lp < 0)


def test_unknown_words_share_the_rare_mass():
    m = BigramReferenceModel.fit(REFERENCE + ["a once seen word list: alpha beta gamma delta"], min_count=2)
    # every unknown word is individually less likely than the rarest known word
    lp_unknown = m.token_log_probs(["zzzz"])[0]
    lp_known = m.token_log_probs(["school"])[0]
    assert lp_unknown < lp_known


def test_reference_model_config_errors():
    with pytest.raises(ConfigError, match="min_count"):
        BigramReferenceModel.fit(REFERENCE, min_count=0)
    with pytest.raises(ConfigError, match="reference_model.texts"):
        BigramReferenceModel.fit(["!!! ???"])


def test_perplexity_norm_is_monotone_and_clipped():
    norm = LogPerplexityNorm(100.0, 10_000.0)
    assert norm(50) == 1.0 and norm(100) == 1.0
    assert norm(1000) == pytest.approx(0.5)
    assert norm(10_000) == 0.0 and norm(math.inf) == 0.0
    vals = [norm(p) for p in (120, 500, 2000, 8000)]
    assert vals == sorted(vals, reverse=True)
    fitted = LogPerplexityNorm.fit([10, 20, 40, 80, 160, 320], q_lo=0.0, q_hi=1.0)
    assert (fitted.lo, fitted.hi) == (10, 320)
    with pytest.raises(ConfigError, match="perplexity_range"):
        LogPerplexityNorm(500, 100)


def test_diversity_term():
    varied = word_tokens(" ".join(REFERENCE[:5]))
    repeated = word_tokens("buy cheap shoes now " * 40)
    assert 0.0 <= diversity_term(repeated) < 0.2 < 0.7 < diversity_term(varied) <= 1.0
    assert diversity_term([]) == 0.0


def test_safety_term_word_list_and_classifier_plug(model):
    scorer = QualityScorer(model)
    clean = scorer.terms(IN_DOMAIN)
    spam = scorer.terms(IN_DOMAIN + " casino casino viagra")
    assert clean.safety == 1.0
    assert spam.safety == 0.0  # 3 unsafe tokens of 23 is far above the 1% cap
    assert unsafe_fraction(["casino", "river"]) == 0.5
    plugged = QualityScorer(model, safety_fn=lambda text: 0.25)
    assert plugged.terms(IN_DOMAIN).safety == pytest.approx(0.75)


def test_score_is_the_weighted_sum(model):
    scorer = QualityScorer(model, weights=QualityWeights(1.0, 2.0, 3.0)).calibrate(REFERENCE + [GIBBERISH, IN_DOMAIN])
    t = scorer.terms(IN_DOMAIN)
    assert scorer.score(IN_DOMAIN) == pytest.approx(t.perplexity + 2 * t.diversity + 3 * t.safety)
    assert scorer.terms(IN_DOMAIN).perplexity > scorer.terms(GIBBERISH).perplexity
    assert np.allclose(scorer.score_many([IN_DOMAIN, GIBBERISH]), [scorer.score(IN_DOMAIN), scorer.score(GIBBERISH)])


def test_scorer_config(model):
    s = scorer_from_config(
        {"weights": {"perplexity": 1.0, "diversity": 0.0, "safety": 0.0}, "perplexity_range": [10, 1000]}, model
    )
    assert s.weights.perplexity == 1.0 and s.norm.hi == 1000
    with pytest.raises(ConfigError, match="quality.weights.fluency"):
        scorer_from_config({"weights": {"fluency": 1.0}}, model)
    with pytest.raises(ConfigError, match="quality.perplexity_fn"):
        QualityScorer("not a model")  # type: ignore[arg-type]


def test_selection():
    scores = [0.2, 0.9, 0.5, 0.9, 0.1]
    assert select_by_threshold(scores, 0.5).tolist() == [False, True, True, True, False]
    assert select_top_fraction(scores, 0.4).tolist() == [False, True, False, True, False]
    # ties broken by position: the earlier 0.9 wins
    assert select_top_fraction(scores, 0.2).tolist() == [False, True, False, False, False]
    assert not select_top_fraction(scores, 0.0).any()
    with pytest.raises(ConfigError, match="keep_fraction"):
        select_top_fraction(scores, 1.5)


def test_quality_filter_in_a_stack(model):
    scorer = QualityScorer(model, weights=QualityWeights(1.0, 0.0, 0.0)).calibrate(REFERENCE + [GIBBERISH])
    qf = QualityFilter(scorer, threshold=0.25)  # in-domain text scores ~0.49, gibberish 0
    d = {"id": 1, "text": IN_DOMAIN}
    assert qf(d) == (True, None) and "quality" in d["metadata"]
    stack = FilterStack([qf])
    assert stack({"text": GIBBERISH}) == (False, "quality:low_quality")


# -------------------------------------------------------------------- agreement


def test_metrics():
    y = np.array([0, 0, 1, 1])
    assert roc_auc([0.1, 0.2, 0.8, 0.9], y) == 1.0
    assert roc_auc([0.9, 0.8, 0.2, 0.1], y) == 0.0
    assert roc_auc([0.5, 0.5, 0.5, 0.5], y) == 0.5
    assert accuracy([False, True, True, True], y) == 0.75
    t, acc = best_threshold(np.array([0.1, 0.2, 0.8, 0.9]), y)
    assert acc == 1.0 and 0.2 < t < 0.8


def test_tuning_finds_the_informative_term():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    terms = np.column_stack([rng.random(300), 0.6 * y + 0.4 * rng.random(300), rng.random(300)])
    w, t, acc = tune_weights_grid(terms, y, step=0.1)
    assert acc == 1.0 and w.diversity >= 0.5  # the informative term dominates
    model = fit_logistic(terms, y)
    assert accuracy(model.predict_proba(terms) >= 0.5, y) == 1.0
    assert abs(model.coef[1]) > 5 * max(abs(model.coef[0]), abs(model.coef[2]))


def test_load_labeled_rejects_bad_rows(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": 3}\n')
    with pytest.raises(ConfigError, match="line 2"):
        load_labeled(p)


@pytest.mark.shared_data
def test_quality_and_stack_agree_with_human_labels(shared_data):
    texts, y = load_labeled(shared_data / "web" / "dclm_quality_majority_data.jsonl")
    ref = read_wikitext(shared_data / "reference" / "wikitext2_valid_tokenized.txt")
    scorer = QualityScorer(BigramReferenceModel.fit(ref)).calibrate(texts)
    terms = scorer.terms_matrix(texts)
    assert roc_auc(terms[:, 0], y) > 0.75  # lower perplexity under Wikipedia: more "keep"
    keep, passes = stack_outputs(texts)
    assert passes.shape == (len(texts), 4)
    assert accuracy(keep, y) >= 0.70
    assert roc_auc(passes.sum(axis=1), y) > 0.7


def _labelled_dir(shared_data, tmp_path):
    d = tmp_path / "labels" / "web"
    d.mkdir(parents=True)
    for name in ("dclm_quality_majority_data.jsonl", "dclm_quality_agreement_data.jsonl"):
        (d / name).symlink_to(shared_data / "web" / name)
    return d.parent


def _small_prepare_config(shared_data, tmp_path, n_web: int = 40) -> str:
    d = shared_data
    cfg = {
        "seed": 1,
        "shard_docs": 16,
        "val_fraction": 0.05,
        "tokenizer_train": {"vocab_size": 300, "sample_chars": 100_000},
        "sources": [
            {"name": "web", "weight": 0.7, "path": f"{d}/web/dclm_quality_majority_data.jsonl", "max_documents": n_web},
            {"name": "reference", "weight": 0.3, "path": f"{d}/reference/wikitext2_valid_tokenized.txt",
             "split_pattern": "^ = [^=].* = $", "max_documents": 20, "filters": []},
        ],
        "quality": {"keep_fraction": 0.8, "apply_to": ["web"], "reference_sources": ["reference"],
                    "weights": {"perplexity": 0.6, "diversity": 0.3, "safety": 0.1}, "perplexity_range": [200, 20000],
                    "diversity_window": 50},
        "dedup": {"exact": False, "near": False},
        "decontaminate": {"enabled": False},
        "report": {"wandb": False},
    }
    path = tmp_path / "mix.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.mark.shared_data
def test_agreement_scores_pages_as_prepare_does(shared_data, tmp_path):
    """The agreement tool's score of a page is the score `lmlab data prepare` gives the same page."""
    from lmlab.data.prepare.agreement import pipeline_scoring
    from lmlab.data.prepare.prepare import prepare

    config = _small_prepare_config(shared_data, tmp_path)
    out = tmp_path / "out"
    prepare(config, out=out, num_proc=1, progress=False)
    qdir = next(p.parent for p in (out / "stages" / "quality").rglob("scores.npy") if "web" in p.parts)
    prep_scores = dict(zip(np.load(qdir / "n.npy").tolist(), np.load(qdir / "scores.npy").tolist()))
    assert len(prep_scores) >= 10

    scoring = pipeline_scoring(config, out=str(out))
    assert scoring.source == "web" and not scoring.calibrate
    assert scoring.scorer.weights.as_array().tolist() == [0.6, 0.3, 0.1] and scoring.scorer.diversity_window == 50
    texts, _ = load_labeled(shared_data / "web" / "dclm_quality_majority_data.jsonl")
    filtered, keep, _ = scoring.prepare_texts(texts[:40])
    assert sorted(np.flatnonzero(keep).tolist()) == sorted(prep_scores)  # same filter decisions
    for n, score in prep_scores.items():
        assert scoring.scorer.score(filtered[n]) == pytest.approx(score, rel=1e-9, abs=1e-12)


@pytest.mark.shared_data
def test_data_agreement_verb_runs(shared_data, tmp_path, capsys):
    from lmlab.cli import main

    config = _small_prepare_config(shared_data, tmp_path)
    labels = _labelled_dir(shared_data, tmp_path)
    argv = ["data", "agreement", "--config", config, "--data_dir", str(labels), "--out", str(tmp_path / "out"), "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["source"] == "web" and report["filters"] == ["gopher_repetition", "gopher_quality", "c4", "fineweb"]
    assert report["reference"].startswith("bigram model of reference")
    assert report["config_weights"] == {"perplexity": 0.6, "diversity": 0.3, "safety": 0.1}
    assert report["perplexity_range"] == [200, 20000] and not report["perplexity_range_calibrated"]
    rows = {(r["method"], r["file"]): r for r in report["results"]}
    held = rows[("filter stack (binary)", "agreement, held out (281)")]
    assert held["n"] == 281 and 0.7 <= held["accuracy"] <= 0.95
    assert rows[("quality, config weights", "majority-only, tuning (218)")]["roc_auc"] > 0.5
    # an unknown source is a one-line error naming --source
    rc = main(["data", "agreement", "--config", config, "--data_dir", str(labels), "--source", "nope"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("lmlab data: error: --source: ")
