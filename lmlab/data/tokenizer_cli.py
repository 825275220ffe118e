"""``lmlab tokenizer``: train or inspect a byte-level BPE tokenizer."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import yaml

from lmlab.data.datamodule import train_tokenizer_on_mixture
from lmlab.data.sources import SourceConfig, iter_documents, validate_sources
from lmlab.data.tokenizer import TokenizerTrainConfig, load_tokenizer, token_byte_lengths
from lmlab.errors import ConfigError


def _data_section(path: str) -> dict:
    try:
        cfg = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError("--config", f"{path} does not exist", "give an experiment YAML") from None
    data = (cfg or {}).get("data") or {}
    return data.get("init_args", data)


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


def main(argv: list[str]) -> int:
    """Train a tokenizer on an experiment's mixture, or describe one."""
    parser = argparse.ArgumentParser(prog="lmlab tokenizer", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train a byte-level BPE on a weighted sample of an experiment's mixture")
    t.add_argument("--config", required=True, help="experiment YAML whose data.sources to sample")
    t.add_argument("--out", help="output directory (default: data.tokenizer of the YAML)")
    t.add_argument("--vocab_size", type=int, help="vocabulary size, special tokens included")
    t.add_argument("--sample_chars", type=int, help="characters sampled from the mixture")
    i = sub.add_parser("info", help="vocabulary, special tokens and bytes per token")
    i.add_argument("tokenizer")
    i.add_argument("--config", help="measure bytes/token on this YAML's sources")
    args = parser.parse_args(argv)
    return _train(args) if args.cmd == "train" else _info(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
