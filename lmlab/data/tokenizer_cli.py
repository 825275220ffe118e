"""``lmlab tokenizer``: train or inspect a byte-level BPE tokenizer."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Optional

from lmlab.data.pretrain.datamodule import train_tokenizer_on_mixture
from lmlab.data.pretrain.sources import SourceConfig, iter_documents, validate_sources
from lmlab.data.tokenizer import TokenizerTrainConfig, load_tokenizer, token_byte_lengths
from lmlab.errors import ConfigError
from lmlab.verbs import positional, run


def _data_section(path: str) -> dict:
    """The ``data`` arguments of an experiment YAML, read as ``lmlab fit`` reads it."""
    from lmlab.training_config import init_args, load_training_config

    return init_args(load_training_config([path], budget=False).get("data"))


def _train(args) -> int:
    data = _data_section(args.config)
    raw_sources = data.get("sources")
    if not raw_sources:
        raise ConfigError("data.sources", f"{args.config} defines no sources", "add a data.sources list")
    sources = [SourceConfig(**s) for s in raw_sources]
    validate_sources(sources)
    train_cfg = TokenizerTrainConfig(**(data.get("tokenizer_train") or {}))
    if args.vocab_size:
        train_cfg.vocab_size = args.vocab_size
    if args.sample_chars:
        train_cfg.sample_chars = args.sample_chars
    out = args.out or data.get("tokenizer")
    if not out:
        raise ConfigError("--out", "no output directory", "pass --out or set data.tokenizer in the YAML")
    t0 = time.time()
    tok = train_tokenizer_on_mixture(sources, out, train_cfg)
    print(f"trained {len(tok)}-token byte-level BPE on {train_cfg.sample_chars:,} sampled chars in {time.time() - t0:.1f}s")
    print(f"saved to {out} (load with transformers.AutoTokenizer.from_pretrained({str(out)!r}))")
    return 0


def _info(args) -> int:
    tok = load_tokenizer(args.tokenizer, field="tokenizer")
    nbytes = token_byte_lengths(tok)
    print(f"tokenizer: {args.tokenizer}")
    print(f"vocab size: {len(tok)}")
    print(f"special tokens: {', '.join(tok.all_special_tokens)}")
    if args.config:
        data = _data_section(args.config)
        for s in data.get("sources") or []:
            src = SourceConfig(**s)
            text = "".join(d for _, d in zip(range(20), iter_documents(src)))
            ids = tok(text, add_special_tokens=False)["input_ids"]
            print(f"  {src.name:<12} {len(text.encode()) / max(1, len(ids)):.2f} bytes/token")
    return 0


def train(config: str, out: Optional[str] = None, vocab_size: Optional[int] = None, sample_chars: Optional[int] = None) -> int:
    """Train a byte-level BPE on a weighted sample of an experiment's mixture.

    Args:
        config: Experiment YAML whose data.sources to sample.
        out: Output directory (default: data.tokenizer of the YAML).
        vocab_size: Vocabulary size, special tokens included (default: data.tokenizer_train of the YAML).
        sample_chars: Characters sampled from the mixture (default: data.tokenizer_train of the YAML).
    """
    return _train(argparse.Namespace(**locals()))


@positional("tokenizer")
def info(tokenizer: str, config: Optional[str] = None) -> int:
    """Vocabulary, special tokens and bytes per token of a tokenizer.

    Args:
        tokenizer: Tokenizer directory.
        config: Measure bytes/token on this experiment YAML's sources.
    """
    return _info(argparse.Namespace(**locals()))


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of ``lmlab tokenizer``: train a tokenizer on an experiment's mixture, or describe one."""
    return run("lmlab tokenizer", {"_help": __doc__, "train": train, "info": info}, argv)


if __name__ == "__main__":
    sys.exit(main())
