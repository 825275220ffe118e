"""Tokenize sources into flat on-disk token arrays, cached by content key.

Each source becomes one train and one validation stream of token ids with EOS
after every document (uint16 when the vocabulary fits, else uint32). Training
windows are cut from these streams at read time, so one cache serves any
sequence length.

The cache directory is named by a key over the sources' fingerprints, the
tokenizer and the split settings: a second run with the same inputs starts at
once. It is built in a temporary directory and renamed into place, so an
interrupted build never looks complete.
"""

from __future__ import annotations

import hashlib
import math
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np
from tqdm.auto import tqdm

from lmlab.atomic import staged_dir
from lmlab.data.pretrain.reading import SharedDocuments
from lmlab.data.pretrain.sources import SourceConfig, iter_documents
from lmlab.data.tokenizer import ids_encoder
from lmlab.errors import ConfigError

CACHE_VERSION = 1
_MIN_DOCS_FOR_DOC_SPLIT = 20


@dataclass
class SourceStreams:
    name: str
    train: np.ndarray
    val: np.ndarray
    documents: int
    val_documents: int


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


def tokenizer_fingerprint(tokenizer) -> str:
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:16]


def cache_key(sources: list[SourceConfig], tokenizer, val_fraction: float, seed: int) -> str:
    parts = [f"v{CACHE_VERSION}", tokenizer_fingerprint(tokenizer), f"{val_fraction:.6f}", str(seed)]
    parts += [s.fingerprint() for s in sorted(sources, key=lambda s: s.name)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:20]


def _is_val_doc(seed: int, index: int, val_fraction: float) -> bool:
    """Evenly spaced held-out documents: exactly ceil-ish(n * f) of n, the first always among them.

    A stride rule rather than a per-document coin flip, so small sources still
    get a validation split and its size does not depend on luck.
    """
    if val_fraction <= 0:
        return False
    return _val_rule(seed, val_fraction)(index)


def _val_rule(seed: int, val_fraction: float) -> Callable[[int], bool]:
    """:func:`_is_val_doc` for one seed and fraction, with the seed's hash computed once."""
    if val_fraction <= 0:
        return lambda index: False
    r = (int.from_bytes(hashlib.blake2b(str(seed).encode(), digest_size=8).digest(), "little") + 1) / 2**64
    u = 1.0 - val_fraction * r
    return lambda index: math.floor((index + 1) * val_fraction + u) > math.floor(index * val_fraction + u)


def _batched(it: Iterable[str], n: int):
    batch = []
    for x in it:
        batch.append(x)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


# Documents per encode call: large batches keep the Python work per document small.
_ENCODE_DOCS = 1024
# Tokens gathered per split before one write (8 MiB of uint16).
_BLOCK_TOKENS = 1 << 22


class _BlockWriter:
    """Token ids of one split: gathered per encode batch, converted once per batch, written once per block."""

    def __init__(self, f, dtype: np.dtype):
        self.f, self.dtype = f, dtype
        self.ids: list[int] = []
        self.arrays: list[np.ndarray] = []
        self.size = 0

    def add(self, ids: list[int]) -> None:
        self.ids.extend(ids)

    def end_batch(self) -> None:
        if self.ids:
            self.arrays.append(np.asarray(self.ids, dtype=self.dtype))
            self.size += len(self.ids)
            self.ids = []
        if self.size >= _BLOCK_TOKENS:
            self._write()

    def flush(self) -> None:
        self.end_batch()
        self._write()

    def _write(self) -> None:
        if self.arrays:
            (self.arrays[0] if len(self.arrays) == 1 else np.concatenate(self.arrays)).tofile(self.f)
            self.arrays, self.size = [], 0


def _tokenize_source(
    src: SourceConfig, idx: int, tokenizer, dtype: np.dtype, val_fraction: float, seed: int, out: Path,
    documents: Optional[Iterable[str]] = None, encode: Optional[Callable[[list[str]], list[list[int]]]] = None,
) -> dict:
    eos = tokenizer.eos_token_id
    encode = encode or ids_encoder(tokenizer)
    is_val = _val_rule(seed, val_fraction)
    train_path, val_path = out / f"{src.name}.train.bin", out / f"{src.name}.val.bin"
    # The first few documents are held back to decide how to split: few long documents (books) split their
    # stream's tail, many documents split by document.
    head: list[np.ndarray] = []
    n_docs = n_val = 0
    bar = tqdm(desc=f"tokenize {src.name}", unit="doc", leave=False, disable=None)
    docs = iter_documents(src, idx) if documents is None else documents
    with open(train_path, "wb") as ftrain, open(val_path, "wb") as fval:
        train, val = _BlockWriter(ftrain, dtype), _BlockWriter(fval, dtype)

        def emit(i: int, ids: list[int]) -> int:
            if is_val(i):
                val.add(ids)
                return 1
            train.add(ids)
            return 0

        for batch in _batched(docs, _ENCODE_DOCS):
            for ids in encode(batch):
                ids.append(eos)
                if n_docs < _MIN_DOCS_FOR_DOC_SPLIT:
                    head.append(np.asarray(ids, dtype=dtype))
                    if len(head) == _MIN_DOCS_FOR_DOC_SPLIT:
                        for j, a in enumerate(head):
                            n_val += emit(j, a.tolist())
                else:
                    n_val += emit(n_docs, ids)
                n_docs += 1
            train.end_batch()
            val.end_batch()
            bar.update(len(batch))
        bar.close()
        if n_docs == 0:
            raise ConfigError(
                f"data.sources[{idx}]",
                f"source {src.name!r} yielded no documents",
                "check its path, text_field and filters, or remove it from the mixture",
            )
        if n_docs < _MIN_DOCS_FOR_DOC_SPLIT:
            # Few long documents (books): hold out the tail of the stream instead of whole books.
            stream = np.concatenate(head)
            cut = len(stream) if val_fraction <= 0 else int(len(stream) * (1 - val_fraction))
            stream[:cut].tofile(ftrain)
            stream[cut:].tofile(fval)
        train.flush()
        val.flush()
    itemsize = dtype.itemsize
    return {
        "documents": n_docs,
        "val_documents": n_val,
        "train_tokens": os.path.getsize(train_path) // itemsize,
        "val_tokens": os.path.getsize(val_path) // itemsize,
        "train_bytes": os.path.getsize(train_path),
        "val_bytes": os.path.getsize(val_path),
    }


def build_or_load_cache(
    sources: list[SourceConfig],
    tokenizer,
    cache_dir: str | os.PathLike,
    val_fraction: float = 0.01,
    seed: int = 0,
    documents: Optional[SharedDocuments] = None,
) -> tuple[Path, dict[str, SourceStreams]]:
    """Return (cache path, streams per source), building the cache when missing.

    ``documents``: the prepare's shared reader, so sources that tokenizer
    training already read are not read again (None: read each source here).
    """
    dtype = token_dtype(len(tokenizer))
    key = cache_key(sources, tokenizer, val_fraction, seed)
    root = Path(os.path.expanduser(cache_dir))
    final = root / key
    if not (final / "meta.json").exists():
        # replace=False: another process that finished the same cache first keeps its copy (same bytes)
        with staged_dir(final, replace=False) as tmp:
            meta = {"version": CACHE_VERSION, "dtype": dtype.name, "sources": {}}
            encode = ids_encoder(tokenizer)
            for i, src in enumerate(sources):
                docs = documents.whole(i) if documents is not None else None
                meta["sources"][src.name] = _tokenize_source(src, i, tokenizer, dtype, val_fraction, seed, tmp, docs, encode)
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    return final, load_cache(final, [s.name for s in sources])


def load_cache(path: Path, names: list[str]) -> dict[str, SourceStreams]:
    """Memory-map a built cache, checking it against its manifest."""
    fix = f"delete {path} to rebuild it"
    try:
        meta = json.loads((path / "meta.json").read_text())
        dtype = np.dtype(meta["dtype"])
        out = {}
        for name in names:
            m = meta["sources"][name]
            arrays = []
            for split in ("train", "val"):
                f = path / f"{name}.{split}.bin"
                if os.path.getsize(f) != m[f"{split}_bytes"] or m[f"{split}_bytes"] != m[f"{split}_tokens"] * dtype.itemsize:
                    raise ValueError(f"{f.name} has the wrong size")
                arrays.append(np.memmap(f, dtype=dtype, mode="r") if m[f"{split}_tokens"] else np.zeros(0, dtype=dtype))
            out[name] = SourceStreams(name, arrays[0], arrays[1], m["documents"], m["val_documents"])
        return out
    except (OSError, KeyError, ValueError, json.JSONDecodeError) as e:
        raise ConfigError("data.cache_dir", f"token cache {path} is corrupt ({e})", fix) from None


def num_windows(stream: np.ndarray, seq_len: int) -> int:
    """Windows of seq_len + 1 tokens (inputs and shifted targets) with stride seq_len."""
    return max(0, (len(stream) - 1) // seq_len)


def window(stream: np.ndarray, i: int, seq_len: int) -> np.ndarray:
    start = i * seq_len
    return np.asarray(stream[start : start + seq_len + 1], dtype=np.int64)
