"""Agreement of the filters and the quality score with human keep/drop judgements.

Data: the DCLM human-annotation files (``{"text", "label"}``, 1 = keep).
``dclm_quality_majority_data.jsonl`` (499 pages, majority vote) is for tuning;
``dclm_quality_agreement_data.jsonl`` (281 pages on which the annotators agreed)
is **held out**. Every page of the agreement file also occurs in the majority
file, with the same label, so tuning on the whole majority file would tune on
the held-out pages. :func:`agreement_report` therefore fits weights, thresholds,
the perplexity calibration and the logistic model on the majority pages that are
*not* in the agreement file (218 pages), reads the agreement file's texts only
to exclude them, and evaluates on all three sets.

The score measured is the one ``lmlab data prepare`` applies for a given
prepare config (:func:`pipeline_scoring`): the pages are normalised with the
config's ``normalize`` settings and run through the filter stack of the source
quality selection applies to (``--source``); the reference perplexity comes
from the config's ``quality`` section, i.e. a bigram model fitted on the
config's ``reference_sources`` as collected by prepare (the same cached
``collect`` stage under ``OUT/stages``) or its ``reference_model`` checkpoint;
weights, ``diversity_window``, ``max_unsafe_rate`` and ``perplexity_range``
are the config's. As in prepare, an unset ``perplexity_range`` is calibrated on
the documents being scored (here: the tuning pages), and a page is scored on
the text the filters leave (C4 removes lines).

Metrics: accuracy of keep/drop decisions and ROC AUC of a score (the
probability that a random "keep" document outscores a random "drop" one, ties
counting half). For the filter stack the binary decision is itself a score
(its AUC equals balanced accuracy); the "soft" score is the number of filters
passed.

Run ``lmlab data agreement --config experiments/data/shared_mix.yaml --data_dir DIR``
for the table (DIR holds ``web/dclm_quality_*.jsonl``).
"""

from __future__ import annotations

import itertools
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from scipy.optimize import minimize
from scipy.stats import rankdata

from lmlab.data.prepare.filters import FilterStack, default_stack
from lmlab.data.prepare.quality import QualityScorer, QualityWeights
from lmlab.errors import ConfigError

TUNING_FILE = "web/dclm_quality_majority_data.jsonl"
HELDOUT_FILE = "web/dclm_quality_agreement_data.jsonl"


def load_labeled(path: str | Path) -> tuple[list[str], np.ndarray]:
    """Texts and 0/1 labels of a ``{"text", "label"}`` JSONL file."""
    texts, labels = [], []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            row = json.loads(line)
            if "text" not in row or row.get("label") not in (0, 1):
                raise ConfigError(
                    str(path), f"line {i + 1} lacks 'text' or a 0/1 'label'", 'use {"text": ..., "label": 0|1} rows'
                )
            texts.append(row["text"])
            labels.append(int(row["label"]))
    return texts, np.array(labels, dtype=np.int64)


def accuracy(pred: Sequence[bool] | np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.asarray(pred, dtype=np.int64) == labels))


def roc_auc(scores: Sequence[float] | np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC via the Mann-Whitney U statistic (ties count half)."""
    labels = np.asarray(labels)
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(np.asarray(scores, dtype=float))
    return float((ranks[labels == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def best_threshold(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Threshold maximising accuracy of ``score >= t`` (midpoints between sorted scores)."""
    s = np.unique(scores)
    cands = np.concatenate(([s[0] - 1e-9], (s[1:] + s[:-1]) / 2, [s[-1] + 1e-9])) if len(s) > 1 else np.array([s[0]])
    accs = np.array([np.mean((scores >= t) == labels) for t in cands])
    i = int(np.argmax(accs))
    return float(cands[i]), float(accs[i])


@dataclass
class AgreementResult:
    """Accuracy and AUC of one method on one labelled file."""

    method: str
    file: str
    n: int
    accuracy: float
    roc_auc: float
    kept_fraction: float


def stack_outputs(
    texts: Sequence[str], stack_factory: Callable[[], FilterStack] = default_stack
) -> tuple[np.ndarray, np.ndarray]:
    """Per document: stack decision (bool) and per-filter pass matrix (n_docs x n_filters)."""
    stack = stack_factory()
    keep = np.zeros(len(texts), dtype=bool)
    passes = np.zeros((len(texts), len(stack.filters)), dtype=np.float64)
    for i, text in enumerate(texts):
        verdicts = stack.explain({"text": text})
        passes[i] = [v[0] for v in verdicts.values()]
        keep[i] = bool(passes[i].all())
    return keep, passes


def tune_weights_grid(terms: np.ndarray, labels: np.ndarray, step: float = 0.05) -> tuple[QualityWeights, float, float]:
    """Non-negative weights summing to 1 (grid of ``step``) and threshold maximising accuracy.

    Ties in accuracy are broken by AUC. Returns ``(weights, threshold, accuracy)``.
    """
    k = int(round(1 / step))
    best: tuple[float, float, tuple[float, float, float], float] | None = None
    for a, b in itertools.product(range(k + 1), repeat=2):
        if a + b > k:
            continue
        w = np.array([a, b, k - a - b], dtype=float) / k
        s = terms @ w
        t, acc = best_threshold(s, labels)
        key = (acc, roc_auc(s, labels))
        if best is None or key > best[:2]:
            best = (key[0], key[1], tuple(float(x) for x in w), t)
    assert best is not None
    return QualityWeights(*best[2]), best[3], best[0]


@dataclass
class LogisticModel:
    """L2-regularised logistic regression on standardised features."""

    coef: np.ndarray
    intercept: float
    mean: np.ndarray
    std: np.ndarray

    def decision(self, X: np.ndarray) -> np.ndarray:
        return ((X - self.mean) / self.std) @ self.coef + self.intercept

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-self.decision(X)))


def fit_logistic(X: np.ndarray, y: np.ndarray, l2: float = 1.0) -> LogisticModel:
    """Fit by L-BFGS on the mean log loss plus ``l2 / n * |w|^2 / 2`` (intercept not penalised)."""
    mean = X.mean(axis=0)
    std = X.std(axis=0)
    std[std == 0] = 1.0
    Z = (X - mean) / std
    n, d = Z.shape

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = theta[:d], theta[d]
        z = Z @ w + b
        # log(1 + e^z) - y z, computed stably
        val = np.mean(np.logaddexp(0.0, z) - y * z) + 0.5 * l2 / n * (w @ w)
        p = 1.0 / (1.0 + np.exp(-z))
        g = np.concatenate((Z.T @ (p - y) / n + l2 / n * w, [np.mean(p - y)]))
        return val, g

    res = minimize(loss, np.zeros(d + 1), jac=True, method="L-BFGS-B")
    return LogisticModel(res.x[:d], float(res.x[d]), mean, std)


def _result(method: str, file: str, pred: np.ndarray, score: np.ndarray, y: np.ndarray) -> AgreementResult:
    return AgreementResult(method, file, len(y), accuracy(pred, y), roc_auc(score, y), float(np.mean(pred)))


@dataclass
class PipelineScoring:
    """What ``lmlab data prepare`` applies to one source: normaliser, filter stack and quality scorer."""

    source: str
    normalize: Callable[[dict], dict]
    stack_factory: Callable[[], FilterStack]
    scorer: QualityScorer
    reference: str
    calibrate: bool

    def prepare_texts(self, texts: Sequence[str]) -> tuple[list[str], np.ndarray, np.ndarray]:
        """Normalised, filtered texts (the text prepare would score), stack decisions and per-filter passes."""
        stack = self.stack_factory()
        out: list[str] = []
        keep = np.zeros(len(texts), dtype=bool)
        passes = np.zeros((len(texts), len(stack.filters)), dtype=np.float64)
        for i, text in enumerate(texts):
            doc = self.normalize({"text": text})
            verdicts = stack.explain(doc)
            passes[i] = [v[0] for v in verdicts.values()]
            keep[i] = bool(passes[i].all())
            if keep[i]:
                stack(doc)  # applies the text rewrites (C4 line removal) the kept document gets
            out.append(doc["text"])
        return out, keep, passes


def pipeline_scoring(
    config: Any,
    source: str | None = None,
    out: str | None = None,
    num_proc: int | None = None,
    log: Callable[[str], None] | None = None,
) -> PipelineScoring:
    """The normaliser, filter stack and quality scorer ``lmlab data prepare`` uses for ``source``.

    ``config`` is a prepare YAML path or a :class:`PrepareConfig`. ``source``
    defaults to the first source quality selection applies to. The bigram
    reference model is fitted on the config's reference sources as prepare's
    ``collect`` stage leaves them (that stage is run, or reused from its cache
    under ``OUT/stages``).
    """
    from lmlab.data.prepare.config import PrepareConfig, load_config
    from lmlab.data.prepare.engine import StageStore, run_stage
    from lmlab.data.prepare.normalize import Normalizer
    from lmlab.data.prepare.prepare import _out_lock
    from lmlab.data.prepare.quality import scorer_from_config
    from lmlab.data.prepare.stages import CollectStage, ReferenceSpec

    cfg = config if isinstance(config, PrepareConfig) else load_config(config)
    q = cfg.quality
    if not q.enabled:
        raise ConfigError("quality.enabled", "is false: prepare applies no quality score", "enable quality scoring in the config")
    names = [s.name for s in cfg.sources]
    if source is None:
        applies = [s for s in cfg.sources if cfg.quality_applies(s)]
        if not applies:
            raise ConfigError("--source", "quality selection applies to no source of the config", "name a source with --source")
        src = applies[0]
    elif source not in names:
        raise ConfigError("--source", f"no source {source!r} in the config", f"use one of: {', '.join(names)}")
    else:
        src = cfg.sources[names.index(source)]
    if cfg.filter_stack(src) is None:
        raise ConfigError(f"sources[{names.index(src.name)}].filters", "the source has no filters", "compare a source with filters")
    stack_factory = lambda: cfg.filter_stack(src)  # noqa: E731

    collected = {}
    if not q.reference_model:
        refs = [(i, s) for i, s in enumerate(cfg.sources) if s.name in (q.reference_sources or [])]
        if not refs:
            raise ConfigError(
                "quality.reference_sources", "names no source of the config", "name the clean sources the bigram model is fitted on"
            )
        out_dir = Path(os.path.expanduser(str(out or cfg.out or ".lmlab_cache/prepared/mix")))
        nproc = int(num_proc or cfg.num_proc or min(4, os.cpu_count() or 1))
        with _out_lock(out_dir):
            store = StageStore(out_dir / "stages")
            for i, s in refs:
                collected[s.name] = run_stage(store, CollectStage(cfg, s, i).as_run(), nproc, progress=False)
                if log:
                    log(f"reference source {s.name}: {collected[s.name].path}")
    reference = ReferenceSpec.from_config(cfg, collected)
    settings = {"weights": q.weights, "diversity_window": q.diversity_window, "max_unsafe_rate": q.max_unsafe_rate}
    if q.perplexity_range is not None:
        settings["perplexity_range"] = q.perplexity_range
    scorer = scorer_from_config(settings, reference.perplexity_fn())
    described = (
        f"checkpoint {q.reference_model}"
        if q.reference_model
        else f"bigram model of {', '.join(collected)} (max {q.reference_max_chars:,} chars)"
    )
    return PipelineScoring(
        source=src.name,
        normalize=Normalizer(cfg.normalize),
        stack_factory=stack_factory,
        scorer=scorer,
        reference=described,
        calibrate=q.perplexity_range is None,
    )


def agreement_report(data_dir: str | Path, scoring: PipelineScoring) -> dict:
    """Tune on majority-minus-agreement pages, evaluate on all sets; see the module docstring."""
    data_dir = Path(data_dir)
    maj_x, maj_y = load_labeled(data_dir / TUNING_FILE)
    test_x, test_y = load_labeled(data_dir / HELDOUT_FILE)
    held_out = set(test_x)
    tune_idx = np.array([i for i, t in enumerate(maj_x) if t not in held_out], dtype=np.int64)
    tune_x, tune_y = [maj_x[i] for i in tune_idx], maj_y[tune_idx]
    files = {
        f"majority, all ({len(maj_x)})": (maj_x, maj_y),
        f"majority-only, tuning ({len(tune_x)})": (tune_x, tune_y),
        f"agreement, held out ({len(test_x)})": (test_x, test_y),
    }
    prepared = {name: scoring.prepare_texts(x) for name, (x, _) in files.items()}
    scorer = scoring.scorer
    if scoring.calibrate:
        scorer.calibrate(prepared[f"majority-only, tuning ({len(tune_x)})"][0])
    feats = {name: (keep, passes, scorer.terms_matrix(texts)) for name, (texts, keep, passes) in prepared.items()}

    _, tp, tt = feats[f"majority-only, tuning ({len(tune_x)})"]
    config_w = scorer.weights.as_array()
    config_t, _ = best_threshold(tt @ config_w, tune_y)
    ppl_t, _ = best_threshold(tt[:, 0], tune_y)
    grid_w, grid_t, _ = tune_weights_grid(tt, tune_y)
    logit = fit_logistic(np.hstack([tt, tp]), tune_y)
    # Like the other rows, the decision threshold maximises tuning accuracy
    # (log-loss fitting alone does not).
    logit_t, _ = best_threshold(logit.predict_proba(np.hstack([tt, tp])), tune_y)

    results: list[AgreementResult] = []
    for name, (_, y) in files.items():
        keep, passes, terms = feats[name]
        results.append(_result("filter stack (binary)", name, keep, keep.astype(float), y))
        results.append(_result("filter stack (soft: filters passed)", name, keep, passes.sum(axis=1), y))
        s = terms @ config_w
        results.append(_result("quality, config weights", name, s >= config_t, s, y))
        s = terms @ grid_w.as_array()
        results.append(_result("quality, grid-tuned weights", name, s >= grid_t, s, y))
        s = terms[:, 0]
        results.append(_result("perplexity term alone", name, s >= ppl_t, s, y))
        p = logit.predict_proba(np.hstack([terms, passes]))
        results.append(_result("logistic(quality terms + filter passes)", name, p >= logit_t, p, y))
    return {
        "results": [asdict(r) for r in results],
        "source": scoring.source,
        "reference": scoring.reference,
        "filters": [f.name for f in scoring.stack_factory().filters],
        "n_tuning": len(tune_x),
        "perplexity_range": [scorer.norm.lo, scorer.norm.hi],
        "perplexity_range_calibrated": scoring.calibrate,
        "config_weights": asdict(scorer.weights),
        "config_threshold": config_t,
        "grid_weights": asdict(grid_w),
        "grid_threshold": grid_t,
        "logistic": {
            "features": ["perplexity", "diversity", "safety"] + [f"pass_{f.name}" for f in scoring.stack_factory().filters],
            "coef_standardised": [round(float(c), 4) for c in logit.coef],
            "intercept": round(logit.intercept, 4),
            "threshold": round(logit_t, 4),
        },
    }


def format_report(report: dict) -> str:
    lines = [
        f"source {report['source']}: filters {', '.join(report['filters'])}; reference perplexity: {report['reference']}",
        f"{'method':42s} {'file':30s} {'n':>4s} {'acc':>6s} {'auc':>6s} {'kept':>6s}",
    ]
    for r in report["results"]:
        lines.append(
            f"{r['method']:42s} {r['file']:30s} {r['n']:4d} {r['accuracy']:6.3f} {r['roc_auc']:6.3f} {r['kept_fraction']:6.3f}"
        )
    how = "calibrated on the tuning pages" if report["perplexity_range_calibrated"] else "from the config"
    lines.append(f"perplexity range (lo, hi): {report['perplexity_range'][0]:.0f}, {report['perplexity_range'][1]:.0f} ({how})")
    lines.append(f"config weights: {report['config_weights']}, threshold {report['config_threshold']:.4f}")
    lines.append(f"grid weights: {report['grid_weights']}, threshold {report['grid_threshold']:.4f}")
    lines.append(f"logistic: {report['logistic']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lmlab.data.prepare.agreement ...`` is ``lmlab data agreement ...``."""
    from lmlab.data.prepare.cli import main as data_main

    return data_main(["agreement", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
