"""First-use tokenizer training + packing: lmlab vs plain ``tokenizers`` on the same files.

    python benchmarks/tokenize_pack.py [--data DIR] [--sources books,web] [--vocab 8192] [--steps 3] [--threads 1]

Both sides start from the same files of ``shared/data`` (``books``: the five
plain-text books, one document each; ``web``: the two DCLM JSON-lines files,
one document per record) and each run starts from nothing (fresh folders):

* lmlab: the calls ``PretrainDataModule.prepare_data`` makes on a first run:
  ``train_tokenizer_on_mixture`` (byte-level BPE on a sample of every source,
  here large enough to hold all of it, saved and reloaded as a transformers
  tokenizer) and ``build_or_load_cache`` (source fingerprints, EOS after every
  document, a 1% validation split, the cache folder written atomically), both
  reading through one ``SharedDocuments``, so each document is read once;
* plain ``tokenizers``: read the files (``open`` + ``json.loads``), train the
  same BPE (same model, pre-tokenizer, trainer settings and special tokens) on
  all documents, save ``tokenizer.json``, ``encode_batch_fast`` all documents,
  append EOS, one ``numpy`` array written to one file.

Sides alternate run by run (``--steps`` timed runs each after one warm-up run)
with threads pinned (torch, BLAS, and the ``tokenizers`` thread pool through
``RAYON_NUM_THREADS``); medians of wall-clock and of CPU time are compared. The output states what differs
between the sides and whether they learned the same merges. The ratio printed
is plain time / lmlab time (>1: lmlab faster); the target "within 1.2x" means
at least 0.83. ``--fail lmlab|plain`` makes that side raise (to check that no
ratio is printed then).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(REPO))

from harness import Side, alternate, pin_threads, report_ratio  # noqa: E402

SOURCES = {
    "books": ("books/*.txt", None),
    "web": ("web/dclm_quality_*.jsonl", "text"),
}


class InjectedFailure(RuntimeError):
    """Raised by the side named in ``--fail``."""


def source_files(data: Path, names: list[str]) -> dict[str, list[Path]]:
    out = {}
    for name in names:
        if name not in SOURCES:
            raise SystemExit(f"--sources: unknown source {name!r} (choose from {sorted(SOURCES)})")
        files = sorted(data.glob(SOURCES[name][0]))
        if not files:
            raise SystemExit(f"--data: no files match {data / SOURCES[name][0]}")
        out[name] = files
    return out


def lmlab_run(files: dict[str, list[Path]], vocab: int, work: Path, phases: dict) -> dict:
    from lmlab.data.pretrain.datamodule import train_tokenizer_on_mixture
    from lmlab.data.pretrain.packing import build_or_load_cache
    from lmlab.data.pretrain.reading import SharedDocuments
    from lmlab.data.pretrain.sources import SourceConfig
    from lmlab.data.tokenizer import TokenizerTrainConfig

    # max_chars=None: no document is cut, so both sides train on and pack the same text
    sources = [SourceConfig(name, path=str(fs[0].parent / SOURCES[name][0].split("/")[-1]), max_chars=None)
               for name, fs in files.items()]
    cfg = TokenizerTrainConfig(vocab_size=vocab, sample_chars=10**12)
    documents = SharedDocuments(sources)
    t0 = time.perf_counter()
    tok = train_tokenizer_on_mixture(sources, str(work / "tok"), cfg, documents=documents)
    t1 = time.perf_counter()
    path, streams = build_or_load_cache(sources, tok, work / "cache", val_fraction=0.01, seed=0, documents=documents)
    phases.setdefault("train", []).append(t1 - t0)
    phases.setdefault("pack", []).append(time.perf_counter() - t1)
    return {"tokens": sum(len(s.train) + len(s.val) for s in streams.values()),
            "merges": json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]}


def plain_run(files: dict[str, list[Path]], vocab: int, work: Path, phases: dict) -> dict:
    import numpy as np
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from lmlab.data.tokenizer import SPECIAL_TOKENS

    t0 = time.perf_counter()
    docs = []
    for name, fs in files.items():
        for f in fs:
            if SOURCES[name][1] is None:
                docs.append(f.read_text(encoding="utf-8"))
            else:
                with open(f, encoding="utf-8") as lines:
                    docs.extend(json.loads(line)[SOURCES[name][1]] for line in lines if line.strip())
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(docs, trainer=trainer)
    tok.save(str(work / "tokenizer.json"))
    t1 = time.perf_counter()
    eos = tok.token_to_id(SPECIAL_TOKENS[1])
    ids = np.concatenate([np.asarray(e.ids + [eos], dtype=np.uint16)
                          for e in tok.encode_batch_fast(docs, add_special_tokens=False)])
    ids.tofile(work / "tokens.bin")
    phases.setdefault("train", []).append(t1 - t0)
    phases.setdefault("pack", []).append(time.perf_counter() - t1)
    return {"tokens": len(ids), "merges": json.loads(tok.to_str())["model"]["merges"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--sources", default="books,web")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=3, help="timed runs of each side (after one warm-up run each)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fail", choices=("lmlab", "plain"), default=None, help="make this side raise (tests)")
    args = ap.parse_args(argv)
    pin_threads(args.threads)
    # the tokenizers library parallelises (RAYON_NUM_THREADS threads) only when this allows it; both sides share it
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if args.threads > 1 else "false"
    files = source_files(args.data, args.sources.split(","))
    mb = sum(f.stat().st_size for fs in files.values() for f in fs) / 1e6

    root = Path(tempfile.mkdtemp(prefix="lmlab-bench-tokpack-"))
    phases: dict[str, dict] = {"lmlab": {}, "plain": {}}
    results: dict[str, dict] = {}

    def step_of(name: str, run):
        count = [0]

        def step():
            count[0] += 1
            if args.fail == name:
                raise InjectedFailure(f"--fail {name}")
            work = root / f"{name}{count[0]}"
            work.mkdir()
            c0 = time.process_time()
            try:
                results[name] = run(files, args.vocab, work, phases[name])
            finally:
                shutil.rmtree(work, ignore_errors=True)
            phases[name].setdefault("cpu", []).append(time.process_time() - c0)

        return step

    sides = [Side("lmlab", step_of("lmlab", lmlab_run)), Side("plain tokenizers", step_of("plain", plain_run))]
    try:
        alternate(sides, steps=args.steps, warmup=1)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(f"first-use tokenizer training (byte-level BPE, vocab {args.vocab}) + packing of {args.sources} "
          f"({mb:.2f} MB in {sum(map(len, files.values()))} files); {args.threads} thread(s); "
          f"median of {args.steps} alternated runs after 1 warm-up each")
    print("| side | train s | pack s | total s | total CPU s | tokens |")
    print("|---|---|---|---|---|---|")
    for side, key in zip(sides, ("lmlab", "plain")):
        if side.error is not None:
            print(f"| {side.name} | failed: {side.error} | | | | |")
            continue
        p = phases[key]
        n = len(side.times)  # the timed runs are the last n of each phase list
        train, pack, cpu = (statistics.median(p[k][-n:]) for k in ("train", "pack", "cpu"))
        print(f"| {side.name} | {train:.2f} | {pack:.2f} | {side.median:.2f} | {cpu:.2f} | {results[key]['tokens']:,} |")
    if all(s.error is None for s in sides):
        same = results["lmlab"]["merges"] == results["plain"]["merges"]
        print(f"same BPE merges learned by both sides: {'yes' if same else 'no'}")
    differs = ("lmlab reads with its own readers (invalid UTF-8 replaced, BOM and newline handling, source "
               "fingerprints), saves and reloads the tokenizer through transformers, holds out 1% of documents "
               "for validation and writes the cache folder atomically; plain tokenizers reads with open/json, "
               "keeps everything in memory and writes one array; same BPE settings, same encode_batch_fast")
    failed = None if sides[0].error is None and sides[1].error is None else \
        "; ".join(f"{s.name} side failed: {s.error}" for s in sides if s.error)
    cpu = {k: statistics.median(phases[k]["cpu"][-len(side.times):]) if side.times and side.error is None else None
           for side, k in zip(sides, ("lmlab", "plain"))}
    report_ratio("speed lmlab / plain tokenizers, wall clock (plain time / lmlab time; >1 = lmlab faster, "
                 "target >= 0.83)", sides[0].median, sides[1].median, differences=differs, higher_is_better=False,
                 failed=failed)
    report_ratio("speed lmlab / plain tokenizers, CPU time (one thread, so CPU time is the work done)",
                 cpu["lmlab"], cpu["plain"], higher_is_better=False, failed=failed)
    return 0 if all(s.error is None for s in sides) else 1


if __name__ == "__main__":
    raise SystemExit(main())
