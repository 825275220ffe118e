"""Write the selected documents as the token arrays ``PretrainDataModule(prepared_dir=...)`` reads.

Output: ``OUT/tokens/`` with ``meta.json`` and ``<source>.train.bin`` /
``<source>.val.bin`` (flat token ids, EOS after each document; the format of
:mod:`lmlab.data.pretrain.packing`, read by :func:`~lmlab.data.pretrain.packing.load_cache`).

- **Shuffle**: each source's documents are ordered by a 64-bit hash of
  ``(seed, source, n)``, so the order is fixed by the seed, spreads every input
  file over the whole stream, and does not depend on the number of processes,
  on the sharding or on the other sources.
- **Validation**: evenly spaced documents of the shuffled order are held out
  (``val_fraction``, the stride rule of :mod:`lmlab.data.pretrain.packing`); a source
  with fewer than 20 documents (a few books) holds out the tail of its token
  stream instead, so it still gets a validation split.
- **Atomicity**: everything is written to ``OUT/tokens.tmp-*`` and renamed into
  place; ``meta.json`` records a key over all inputs, and a run whose key
  matches reuses the directory untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from lmlab.atomic import staged_dir
from lmlab.data.pretrain.packing import _MIN_DOCS_FOR_DOC_SPLIT, CACHE_VERSION, _is_val_doc
from lmlab.data.prepare._hashing import mix64
from lmlab.data.prepare.config import PrepareConfig
from lmlab.data.prepare.engine import StageResult, stable_hash
from lmlab.data.prepare.selection import SourceSelection
from lmlab.data.prepare.stages import load_token_index


def shuffle_order(n: np.ndarray, seed: int, source: str) -> np.ndarray:
    """Permutation of ``n`` (document positions) by a seeded hash; ties cannot depend on input order."""
    salt = int.from_bytes(hashlib.blake2b(f"{seed}:{source}".encode(), digest_size=8).digest(), "little")
    h = mix64(n.astype(np.uint64) ^ np.uint64(salt))
    return np.lexsort((n, h))


def pack_key(cfg: PrepareConfig, tokenized: dict[str, StageResult], selection: dict[str, SourceSelection]) -> str:
    kept = {
        s.name: hashlib.sha256(np.ascontiguousarray(selection[s.name].n[selection[s.name].final]).tobytes()).hexdigest()
        for s in cfg.sources
    }
    return stable_hash("pack", CACHE_VERSION, [(s.name, tokenized[s.name].key) for s in cfg.sources], kept, cfg.seed, cfg.val_fraction)


def pack(
    cfg: PrepareConfig,
    out: Path,
    tokenized: dict[str, StageResult],
    selection: dict[str, SourceSelection],
    tokenizer_path: str,
    dtype: str,
    force: bool = False,
) -> tuple[Path, dict, bool]:
    """Write (or reuse) ``OUT/tokens``; returns ``(path, meta, computed)``."""
    final = out / "tokens"
    key = pack_key(cfg, tokenized, selection)
    if not force:
        try:
            meta = json.loads((final / "meta.json").read_text())
            if meta.get("prepare_key") == key:
                return final, meta, False
        except (OSError, ValueError):
            pass
    with staged_dir(final) as tmp:
        meta = {
            "version": CACHE_VERSION,
            "dtype": np.dtype(dtype).name,
            "sources": {},
            "prepare_key": key,
            "tokenizer": tokenizer_path,
            "seed": cfg.seed,
            "val_fraction": cfg.val_fraction,
            "weights": cfg.weights,
        }
        for s in cfg.sources:
            meta["sources"][s.name] = _write_source(cfg, s.name, tokenized[s.name], selection[s.name], tmp, dtype)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return final, meta, True


def _write_source(cfg: PrepareConfig, name: str, tok: StageResult, sel: SourceSelection, out: Path, dtype: str) -> dict:
    keep = set(sel.n[sel.final].tolist())
    # (n, shard, start, length) of every kept document
    rows = []
    shards = load_token_index(tok)
    for si, (index, _) in enumerate(shards):
        starts = np.concatenate(([0], np.cumsum(index["length"])[:-1])) if len(index) else np.zeros(0, dtype=np.int64)
        for (n, length), start in zip(index.tolist(), starts.tolist()):
            if n in keep:
                rows.append((n, si, start, length))
    if len(rows) != len(keep):
        raise RuntimeError(f"pack: {name} has {len(keep)} selected documents but {len(rows)} tokenized")
    table = np.array(rows, dtype=np.int64).reshape(-1, 4)
    order = shuffle_order(table[:, 0], cfg.seed, name)
    table = table[order]
    train_path, val_path = out / f"{name}.train.bin", out / f"{name}.val.bin"
    n_docs, n_val = len(table), 0
    with open(train_path, "wb") as ftrain, open(val_path, "wb") as fval:
        if n_docs >= _MIN_DOCS_FOR_DOC_SPLIT or cfg.val_fraction <= 0:
            for pos, (_, si, start, length) in enumerate(table.tolist()):
                arr = np.asarray(shards[si][1][start : start + length], dtype=dtype)
                if cfg.val_fraction > 0 and _is_val_doc(cfg.seed, pos, cfg.val_fraction):
                    arr.tofile(fval)
                    n_val += 1
                else:
                    arr.tofile(ftrain)
        else:
            # few long documents (books): hold out the tail of the stream, not whole books
            stream = np.concatenate([np.asarray(shards[si][1][st : st + ln], dtype=dtype) for _, si, st, ln in table.tolist()])
            cut = int(len(stream) * (1 - cfg.val_fraction))
            stream[:cut].tofile(ftrain)
            stream[cut:].tofile(fval)
    itemsize = np.dtype(dtype).itemsize
    return {
        "documents": int(n_docs),
        "val_documents": int(n_val),
        "train_tokens": os.path.getsize(train_path) // itemsize,
        "val_tokens": os.path.getsize(val_path) // itemsize,
        "train_bytes": os.path.getsize(train_path),
        "val_bytes": os.path.getsize(val_path),
    }
