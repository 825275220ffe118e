"""Byte-level BPE tokenizers: training on a mixture sample, saving, loading.

Trained tokenizers are saved as a directory holding ``tokenizer.json`` and
``tokenizer_config.json`` (with the chat template), so
``transformers.AutoTokenizer.from_pretrained(dir)`` loads them as a
``PreTrainedTokenizerFast``.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np

from lmlab.atomic import staged_dir
from lmlab.errors import ConfigError

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
SPECIAL_TOKENS = [BOS, EOS, PAD, *ROLE_TOKENS]


@dataclass
class TokenizerTrainConfig:
    """How to train a byte-level BPE tokenizer on the mixture.

    Args:
        vocab_size: Final vocabulary size, special tokens included.
        sample_chars: Characters sampled from the mixture (by source weight)
            to train on.
        min_frequency: Minimum pair frequency for a merge.
    """

    vocab_size: int = 8192
    sample_chars: int = 20_000_000
    min_frequency: int = 2


def train_bpe(texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike, min_frequency: int = 2,
              replace: bool = True):
    """Train a byte-level BPE on ``texts`` and save it to ``out_dir`` atomically.

    Returns the loaded ``PreTrainedTokenizerFast``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ConfigError(
            "tokenizer.vocab_size",
            f"{vocab_size} is below the 256 byte symbols plus {len(SPECIAL_TOKENS)} special tokens",
            f"use at least {256 + len(SPECIAL_TOKENS)}",
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return save_tokenizer(tok, out_dir, replace=replace)


def save_tokenizer(tok, out_dir: str | os.PathLike, replace: bool = True):
    """Wrap a ``tokenizers.Tokenizer`` as ``PreTrainedTokenizerFast`` and save it atomically (``replace=False``:
    an ``out_dir`` that another process published meanwhile is kept)."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=ROLE_TOKENS,
    )
    try:
        from lmlab.data.posttrain.chat import install_chat_template

        install_chat_template(fast)
    except ImportError:  # pragma: no cover - chat support is part of the package
        pass
    out_dir = Path(out_dir)
    with staged_dir(out_dir, replace=replace) as tmp:
        fast.save_pretrained(tmp)
    return load_tokenizer(str(out_dir))


def ids_encoder(tokenizer) -> Callable[[list[str]], list[list[int]]]:
    """A function giving ``tokenizer(texts, add_special_tokens=False)["input_ids"]``, straight from the backend.

    It calls the ``tokenizers`` backend's ``encode_batch_fast`` (no character
    offsets, no per-text Python dictionaries), on a copy of the backend set up
    as ``transformers`` sets it for such a call: no truncation, no padding, and
    its ``split_special_tokens`` choice. Tokenizers without a ``tokenizers``
    backend, or whose class changes how a call encodes, go through
    ``tokenizer(...)`` itself.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not _call_is_backend_encode(tokenizer):
        return lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"]
    from tokenizers import Tokenizer

    copy = Tokenizer.from_str(backend.to_str())
    copy.no_truncation()
    copy.no_padding()
    copy.encode_special_tokens = bool(getattr(tokenizer, "split_special_tokens", False))
    encode = getattr(copy, "encode_batch_fast", copy.encode_batch)

    def ids(texts: list[str]) -> list[list[int]]:
        return [e.ids for e in encode(texts, add_special_tokens=False)]

    return ids


def _call_is_backend_encode(tokenizer) -> bool:
    """Whether ``tokenizer(texts)`` is transformers' plain call of its backend's ``encode_batch``."""
    try:
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:  # another transformers layout: keep its own call
        return False
    cls = type(tokenizer)
    return (isinstance(tokenizer, TokenizersBackend) and cls.__call__ is PreTrainedTokenizerBase.__call__
            and cls._encode_plus is TokenizersBackend._encode_plus)


def load_tokenizer(spec: str, field: str = "data.tokenizer"):
    """Load a tokenizer from a local directory, a ``tokenizer.json`` file or a hub name."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(os.path.expanduser(spec))
    try:
        if path.is_file() and path.suffix == ".json":
            tok = PreTrainedTokenizerFast(tokenizer_file=str(path))
        elif path.exists():
            tok = AutoTokenizer.from_pretrained(str(path))
        elif spec.startswith((".", "/", "~")) or os.sep in spec and not _looks_like_hub_name(spec):
            raise ConfigError(field, f"tokenizer path {spec!r} does not exist", "train one with `lmlab tokenizer train`")
        else:
            tok = AutoTokenizer.from_pretrained(spec)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(
            field, f"cannot load tokenizer {spec!r}: {str(e).splitlines()[0]}", "give a local tokenizer directory"
        ) from None
    if tok.eos_token_id is None:
        raise ConfigError(field, f"tokenizer {spec!r} has no EOS token", "add an eos_token to its config")
    return tok


def tokenizer_files(tokenizer) -> Optional[dict[str, str]]:
    """The files ``save_pretrained`` writes for ``tokenizer``, as ``{name: text}``, or None.

    Checkpoints store this plain-text form (no pickled objects, so they still
    load with ``weights_only=True``): a run's tokenizer travels with its
    weights, special tokens and chat template included. None when a file is
    not UTF-8 text (e.g. a sentencepiece model) or there is no ``tokenizer.json``.
    """
    with tempfile.TemporaryDirectory(prefix="lmlab-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        files = {}
        for f in sorted(Path(tmp).iterdir()):
            if not f.is_file():
                continue
            try:
                files[f.name] = f.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                return None
    return files if "tokenizer.json" in files else None


def tokenizer_from_files(files: dict[str, str], field: str = "--tokenizer"):
    """Load a tokenizer from the ``{name: text}`` form of :func:`tokenizer_files`."""
    with tempfile.TemporaryDirectory(prefix="lmlab-tok-") as tmp:
        for name, text in files.items():
            if Path(name).name != name:  # only plain file names: never write outside the folder
                raise ConfigError(field, f"stored tokenizer file name {name!r} is not a plain name", "re-save the checkpoint")
            (Path(tmp) / name).write_text(text, encoding="utf-8")
        return load_tokenizer(tmp, field=field)


def _looks_like_hub_name(spec: str) -> bool:
    return spec.count("/") == 1 and not spec.startswith((".", "/", "~"))


def token_byte_lengths(tokenizer) -> np.ndarray:
    """UTF-8 bytes each token id stands for (0 for special tokens).

    Bits per byte divides summed NLL by these, so it compares across
    tokenizers. For byte-level BPE each symbol of the token string is one byte.
    """
    vocab = tokenizer.get_vocab()
    size = max(len(tokenizer), max(vocab.values()) + 1)
    out = np.zeros(size, dtype=np.int64)
    special = set(tokenizer.all_special_ids)
    byte_level = _is_byte_level(tokenizer)
    for token, idx in vocab.items():
        if idx in special:
            continue
        if byte_level:
            out[idx] = len(token)
        else:
            out[idx] = len(tokenizer.convert_tokens_to_string([token]).encode("utf-8"))
    return out


def _is_byte_level(tokenizer) -> bool:
    try:
        spec = json.loads(tokenizer.backend_tokenizer.to_str())
    except Exception:
        return False
    pre = spec.get("pre_tokenizer") or {}
    kinds = [pre.get("type")] + [p.get("type") for p in pre.get("pretokenizers", []) or []]
    return "ByteLevel" in kinds
