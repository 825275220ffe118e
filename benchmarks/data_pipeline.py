"""Throughput (MB/s per core) of the document pipeline, side by side with datatrove.

Corpus: ``shared/data/web`` (DCLM human-labelled pages, Dolma CC samples, the
article-extraction benchmark's gold article bodies) and ``shared/data/books``
(four Project Gutenberg novels and Tiny Shakespeare). Every document is first
normalised (timed as its own row); all stacks then see the same normalised text.

Rows:
- ``normalize``: :class:`lmlab.data.prepare.Normalizer`;
- ``filters (lmlab)``: Gopher repetition + Gopher quality + C4 + FineWeb
  (:func:`lmlab.data.prepare.default_stack`);
- ``filters (datatrove)``: datatrove's ``GopherRepetitionFilter``,
  ``GopherQualityFilter``, ``C4QualityFilter`` and ``FineWebQualityFilter`` with
  their default settings, in the same order (as in datatrove's FineWeb
  pipeline), on the same normalised text. What differs between the two sides:
  the word splitter above all (lmlab computes datatrove's definitions with its
  own regex word splitter and shared per-document statistics; datatrove splits
  words with spaCy's English tokenizer, cached per text), so a second row,
  ``filters (datatrove, lmlab splitter)``, runs datatrove's filters with
  lmlab's word splitter in place of spaCy's: the ratio against it is the part
  of the speed-up that does not come from the splitter. The per-document
  keep/drop decisions of the sides are compared and printed. If datatrove or
  its English tokenizer (spaCy) cannot run, or raises on any document, that
  side is skipped with a message, no throughput ratio is printed and the exit
  status is 1. ``--baseline naive`` replaces datatrove
  by the same rule sets written the straightforward way (each filter re-splits
  the text, Python loops over words and n-grams, no shared statistics): a
  stand-in for a typical first implementation, not datatrove, and labelled so;
- ``dedup exact`` and ``dedup minhash``: :func:`exact_dedup` and
  :func:`near_dedup` (112 permutations, 14 bands x 8 rows) over all documents;
- ``decontaminate 13-gram``: lookup of every document in a 13-gram index of
  ``shared/data/eval`` (index build time printed separately).

MB/s per core = UTF-8 input megabytes / CPU seconds of this process, pinned to
one core with one thread in torch and every BLAS/OpenMP pool
(``harness.pin_threads``); CPU time (``time.process_time``) rather than wall time,
so other load on the cores does not skew it; wall seconds are shown too.
Accuracy columns: agreement of each filter stack's keep/drop decision with the
human labels of the two DCLM files (nothing is tuned here). The ratios are
printed by ``harness.report_ratio`` with what differs between the sides, and
only when both sides ran.

Usage: ``python benchmarks/data_pipeline.py [--data DIR] [--sources web,books] [--max-mb N]``
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

from harness import pin_threads, report_ratio  # noqa: E402

if __name__ == "__main__":
    pin_threads(1)  # before numpy/torch-heavy imports, whose thread pools read the environment once

from lmlab.data.prepare import (  # noqa: E402
    ContaminationIndex,
    Normalizer,
    decontaminate,
    default_stack,
    exact_dedup,
    near_dedup,
)

DCLM_FILES = {"majority": "dclm_quality_majority_data.jsonl", "agreement": "dclm_quality_agreement_data.jsonl"}


def load_corpus(data: Path, sources: set[str]) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    web = data / "web"
    if "web" in sources:
        for split, name in DCLM_FILES.items():
            for i, line in enumerate(open(web / name, encoding="utf-8")):
                row = json.loads(line)
                docs.append(
                    {
                        "id": f"dclm-{split}-{i}",
                        "source": "web",
                        "text": row["text"],
                        "label": row["label"],
                        "split": split,
                    }
                )
        for name in ("dolma_cc_en_head-0091.jsonl", "dolma_cc_en_head-0174.jsonl"):
            for i, line in enumerate(open(web / name, encoding="utf-8")):
                docs.append({"id": f"{name}-{i}", "source": "web", "text": json.loads(line)["text"]})
        with gzip.open(web / "dolma_provided_documents_000.json.gz", "rt", encoding="utf-8") as f:
            for i, line in enumerate(f):
                docs.append({"id": f"dolma-provided-{i}", "source": "web", "text": json.loads(line)["text"]})
        for key, row in sorted(json.loads((web / "aeb_ground_truth.json").read_text(encoding="utf-8")).items()):
            if row.get("articleBody"):
                docs.append({"id": f"aeb-{key[:12]}", "source": "web", "text": row["articleBody"]})
    if "books" in sources:
        for path in sorted((data / "books").glob("*.txt")):
            docs.append({"id": path.stem, "source": "books", "text": path.read_bytes()})
    return docs


def mb(docs: list[dict[str, Any]]) -> float:
    return sum(len(d["text"].encode("utf-8")) for d in docs) / 1e6


def timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.process_time() - c0, time.perf_counter() - w0


# ------------------------------------------------------------------ stacks


def lmlab_runner() -> Callable[[str], bool]:
    stack = default_stack()
    return lambda text: stack({"text": text})[0]


class BaselineFailed(RuntimeError):
    """The datatrove side could not run; no ratio may be printed."""


class _LmlabWordSplitter:
    """datatrove's spaCy tokenizer with lmlab's word splitter for words (sentence spans stay spaCy's)."""

    def __init__(self, spacy_tokenizer):
        self._spacy = spacy_tokenizer

    def word_tokenize(self, text: str) -> list[str]:
        from lmlab.data.prepare.filters.words import words

        return words(text)

    def __getattr__(self, name: str):
        return getattr(self._spacy, name)


def datatrove_runner(splitter: str = "spacy") -> tuple[Callable[[str], bool], str]:
    """datatrove's four filters in FineWeb's order, and a description of that side.

    ``splitter="lmlab"``: datatrove's filters count the words of lmlab's word
    splitter instead of spaCy's (every filter gets its words through
    ``datatrove.utils.word_tokenizers.load_word_tokenizer``).
    Raises :class:`BaselineFailed` when datatrove or its English word tokenizer
    cannot be loaded; the runner raises it when a filter raises on a document.
    """
    if splitter == "lmlab":
        run, desc = datatrove_runner("spacy")
        import datatrove.utils.word_tokenizers as dt_words

        real = dt_words.load_word_tokenizer
        splitter = _LmlabWordSplitter(real("en"))

        def run_lmlab_words(text: str) -> bool:
            # datatrove's split_into_words imports load_word_tokenizer from this module at each call
            dt_words.load_word_tokenizer = lambda language: splitter
            try:
                return run(text)
            finally:
                dt_words.load_word_tokenizer = real

        return run_lmlab_words, desc.rsplit(",", 1)[0] + ", lmlab's word splitter instead of spaCy's for words (C4's sentence spans still spaCy's)"
    try:
        from datatrove.data import Document
        from datatrove.pipeline.filters import (
            C4QualityFilter,
            FineWebQualityFilter,
            GopherQualityFilter,
            GopherRepetitionFilter,
        )
        from datatrove.utils.word_tokenizers import load_word_tokenizer

        load_word_tokenizer("en").word_tokenize("Load the English tokenizer before timing.")
    except Exception as err:  # noqa: BLE001 - any problem means the reference side cannot run
        raise BaselineFailed(f"datatrove cannot run: {type(err).__name__}: {err}") from None
    try:
        import spacy

        tokenizer = f"spaCy {spacy.__version__} English tokenizer"
    except ImportError:  # pragma: no cover - load_word_tokenizer above needs it
        tokenizer = "its English tokenizer"
    filters = [GopherRepetitionFilter(), GopherQualityFilter(), C4QualityFilter(), FineWebQualityFilter()]

    def run(text: str) -> bool:
        doc = Document(text=text, id="x")
        for f in filters:
            try:
                r = f.filter(doc)
            except Exception as err:  # noqa: BLE001 - a failing reference invalidates the comparison
                raise BaselineFailed(f"datatrove's {type(f).__name__} raised {type(err).__name__}: {err}") from None
            if r is not True:
                return False
        return True

    from importlib.metadata import version

    return run, f"datatrove {version('datatrove')} filters, default settings, {tokenizer}"


def naive_runner() -> Callable[[str], bool]:
    """The four rule sets written plainly: per-filter splitting, Python loops, no sharing."""
    stop = {"the", "be", "to", "of", "and", "that", "have", "with"}
    punct = set("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~…")

    def gopher_quality(text: str) -> bool:
        words = text.split()
        content = [w for w in words if any(c not in punct for c in w)]
        if not 50 <= len(content) <= 100_000:
            return False
        mean = sum(len(w) for w in content) / len(content)
        if not 3 <= mean <= 10:
            return False
        if text.count("#") / len(words) > 0.1 or (text.count("...") + text.count("…")) / len(words) > 0.1:
            return False
        lines = [ln for ln in text.split("\n") if ln.strip()]
        if sum(ln.lstrip().startswith(("•", "-")) for ln in lines) / len(lines) > 0.9:
            return False
        if sum(ln.rstrip().endswith(("...", "…")) for ln in lines) / len(lines) > 0.3:
            return False
        if sum(any(c.isalpha() for c in w) for w in words) / len(words) < 0.8:
            return False
        return len(stop & {w.lower().strip(".,;:!?\"'()") for w in words}) >= 2

    def gopher_repetition(text: str) -> bool:
        def dups(items: list[str]) -> tuple[int, int]:
            seen: set[str] = set()
            n = c = 0
            for x in items:
                if x in seen:
                    n += 1
                    c += len(x)
                seen.add(x)
            return n, c

        paras = [p for p in text.split("\n\n") if p.strip()] or [""]
        n, c = dups(paras)
        if n / len(paras) > 0.3 or c / max(1, len(text)) > 0.2:
            return False
        lines = [ln for ln in text.split("\n") if ln] or [""]
        n, c = dups(lines)
        if n / len(lines) > 0.3 or c / max(1, len(text)) > 0.2:
            return False
        words = text.split()
        for k, frac in ((2, 0.2), (3, 0.18), (4, 0.16)):
            grams = Counter(" ".join(words[i : i + k]) for i in range(len(words) - k + 1))
            if grams:
                g, cnt = grams.most_common(1)[0]
                if cnt > 1 and cnt * len(g) / len(text) > frac:
                    return False
        for k, frac in ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10)):
            seen: set[str] = set()
            i = rep = 0
            while i < len(words) - k + 1:
                g = " ".join(words[i : i + k])
                if g in seen:
                    rep += len(g)
                    i += k
                else:
                    seen.add(g)
                    i += 1
            if rep / max(1, len(text)) > frac:
                return False
        return True

    def c4(text: str) -> str | None:
        kept, sentences = [], 0
        for line in text.split("\n"):
            line = line.strip()
            words = line.split()
            if not line.endswith((".", "?", "!", '"')) or line.endswith("...") or len(words) < 3:
                continue
            low = line.lower()
            if "lorem ipsum" in low or "{" in line:
                return None
            if "javascript" in low or any(p in low for p in ("terms of use", "privacy policy", "cookie")):
                continue
            sentences += max(1, sum(line.count(p) for p in (". ", "? ", "! ")) + 1)
            kept.append(line)
        return "\n".join(kept) if sentences >= 5 else None

    def fineweb(text: str) -> bool:
        lines = [ln for ln in text.split("\n") if ln.strip()]
        if not lines:
            return False
        if sum(ln.endswith((".", "!", "?")) for ln in lines) / len(lines) < 0.12:
            return False
        if sum(len(ln) <= 30 for ln in lines) / len(lines) > 0.67:
            return False
        seen: set[str] = set()
        dup = 0
        for ln in lines:
            if ln in seen:
                dup += len(ln)
            seen.add(ln)
        return dup / max(1, len(text.replace("\n", ""))) <= 0.1

    def run(text: str) -> bool:
        if not gopher_repetition(text) or not gopher_quality(text):
            return False
        cleaned = c4(text)
        return cleaned is not None and fineweb(cleaned)

    return run


# ------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--sources", default="web,books")
    ap.add_argument("--max-mb", type=float, default=None, help="stop adding documents after this many MB")
    ap.add_argument("--baseline", choices=("datatrove", "naive"), default="datatrove")
    args = ap.parse_args(argv)
    pin_threads(1)
    if hasattr(os, "sched_setaffinity"):
        try:
            os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core, explicitly
        except OSError:
            pass

    raw = load_corpus(args.data, set(args.sources.split(",")))
    norm = Normalizer()
    docs, cpu, wall = timed(lambda: [norm(d) for d in raw])
    if args.max_mb is not None:
        out, total = [], 0.0
        for d in docs:
            total += len(d["text"].encode("utf-8")) / 1e6
            if total > args.max_mb:
                break
            out.append(d)
        docs = out
    size = mb(docs)
    rows: list[tuple[str, int, float, float, float, str, dict[str, float]]] = []
    rows.append(("normalize", len(docs), size, cpu, wall, "-", {}))

    per_source: dict[str, dict[str, float]] = {}

    def run_stack(name: str, runner: Callable[[str], bool], decisions_by_side: dict[str, list[bool]]) -> float:
        cpu_by_source: Counter = Counter()

        def run_all() -> list[bool]:
            out = []
            for d in docs:
                c0 = time.process_time()
                out.append(runner(d["text"]))
                cpu_by_source[d["source"]] += time.process_time() - c0
            return out

        decisions, cpu, wall = timed(run_all)
        decisions_by_side[name] = decisions
        per_source[name] = {
            src: sum(len(d["text"].encode("utf-8")) for d in docs if d["source"] == src) / 1e6 / max(c, 1e-9)
            for src, c in cpu_by_source.items()
        }
        acc = {}
        for split in DCLM_FILES:
            pairs = [(k, d["label"]) for k, d in zip(decisions, docs) if d.get("split") == split]
            if pairs:
                acc[split] = sum(int(k) == y for k, y in pairs) / len(pairs)
        rows.append((name, len(docs), size, cpu, wall, f"{sum(decisions)}", acc))
        return size / cpu

    decisions: dict[str, list[bool]] = {}
    ours = run_stack("filters (lmlab)", lmlab_runner(), decisions)
    same_splitter = None
    if args.baseline == "datatrove":
        try:
            baseline_runner, base_desc = datatrove_runner()
            base = run_stack("filters (datatrove)", baseline_runner, decisions)
            same_runner, same_desc = datatrove_runner("lmlab")
            same_splitter = run_stack("filters (datatrove, lmlab splitter)", same_runner, decisions)
        except BaselineFailed as err:
            print(f"error: {err}; no throughput ratio (install datatrove and spacy, or pass --baseline naive)", file=sys.stderr)
            report_ratio("throughput lmlab / datatrove", ours, None, failed=f"datatrove side skipped: {err}")
            return 1
        base_name = "filters (datatrove)"
    else:
        base_desc = "the same rule sets written plainly in Python (not datatrove)"
        base_name = "filters (naive)"
        base = run_stack(base_name, naive_runner(), decisions)
    ex, cpu, wall = timed(lambda: exact_dedup(docs))
    rows.append(("dedup exact", len(docs), size, cpu, wall, f"{len(ex.kept_ids)}", {}))
    nd, cpu, wall = timed(lambda: near_dedup(docs))
    rows.append(("dedup minhash 14x8", len(docs), size, cpu, wall, f"{len(nd.kept_ids)}", {}))
    index, index_cpu, _ = timed(lambda: ContaminationIndex.from_eval_dir(args.data / "eval"))
    (kept_docs, contamination), cpu, wall = timed(lambda: decontaminate([dict(d) for d in docs], index))
    rows.append(("decontaminate 13-gram", len(docs), size, cpu, wall, f"{len(kept_docs)}", {}))

    print(f"corpus: {len(docs)} documents, {size:.2f} MB ({args.sources}); single process pinned to one core")
    header = f"{'stage':36s} {'docs':>6s} {'MB':>7s} {'cpu s':>8s} {'wall s':>8s} {'MB/s/core':>10s} {'kept':>6s} {'acc maj':>8s} {'acc agr':>8s}"
    print(header)
    print("-" * len(header))
    for name, n, size_mb, c, w, kept, acc in rows:
        a1 = f"{acc['majority']:.3f}" if "majority" in acc else "-"
        a2 = f"{acc['agreement']:.3f}" if "agreement" in acc else "-"
        print(f"{name:36s} {n:6d} {size_mb:7.2f} {c:8.2f} {w:8.2f} {size_mb / c:10.2f} {kept:>6s} {a1:>8s} {a2:>8s}")
    for name, by_src in per_source.items():
        print(f"{name}: MB/s/core by source: " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(by_src.items())))
    same = sum(a == b for a, b in zip(decisions["filters (lmlab)"], decisions[base_name]))
    print(f"sides: lmlab default_stack() (datatrove's definitions, lmlab word tokenizer, shared statistics) vs {base_desc}; "
          f"same order, same normalised text; keep/drop decisions identical on {same} of {len(docs)} documents")
    print(
        f"near-duplicate clusters: {len(nd.clusters)} ({nd.n_candidate_pairs} LSH candidate pairs, {nd.n_verified_pairs} verified)"
    )
    for c in nd.clusters[:5]:
        print("  cluster:", c)
    print(f"exact-duplicate clusters: {len(ex.clusters)}")
    print(
        f"contamination index: {index.n_ngrams} n-grams from {sum(index.items_per_task.values())} eval items, built in {index_cpu:.1f} cpu s"
    )
    print(
        f"contaminated documents by source: {dict(contamination.contaminated_by_source)}; by task: {dict(contamination.contaminated_by_task)}"
    )
    if same_splitter is not None:
        same_words = sum(a == b for a, b in zip(decisions["filters (lmlab)"], decisions["filters (datatrove, lmlab splitter)"]))
        report_ratio("throughput lmlab / datatrove, both with lmlab's word splitter (CPU time, same documents)",
                     ours, same_splitter, differences=f"implementation only ({same_desc}); "
                     f"decisions identical on {same_words} of {len(docs)} documents")
    differs = ("word splitter: lmlab's regex splitter vs " + base_desc if args.baseline == "datatrove"
               else base_desc) + "; shared per-document statistics in lmlab"
    ratio = report_ratio(f"throughput lmlab / {base_name.split('(')[1].rstrip(')')} (CPU time, same documents)",
                         ours, base, differences=differs)
    return 0 if ratio is not None else 1


if __name__ == "__main__":
    raise SystemExit(main())
