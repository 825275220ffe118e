"""Small builders shared by the training tests."""

from __future__ import annotations

import importlib.util
import json
import random
import socket
from pathlib import Path

import lightning.pytorch as pl
import pytest

WORDS = (
    "the cat sat on a mat while the dog ran in the park and a bird sang over the old tree "
    "near quiet water where fish swim slowly under bright morning light"
).split()


def write_corpus(root: Path, seed: int = 0) -> Path:
    """Three small sources with learnable structure (repeated phrases)."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    phrases = [" ".join(rng.choice(WORDS) for _ in range(6)) for _ in range(30)]
    with open(root / "web.jsonl", "w") as f:
        for _ in range(200):
            f.write(json.dumps({"text": " ".join(rng.choice(phrases) for _ in range(12)) + "."}) + "\n")
    (root / "books").mkdir(exist_ok=True)
    for i in range(2):
        (root / "books" / f"b{i}.txt").write_text("\n".join(" ".join(rng.choice(phrases) for _ in range(5)) for _ in range(300)))
    with open(root / "code.jsonl", "w") as f:
        for i in range(100):
            f.write(json.dumps({"text": f"def add_{i % 7}(a, b):\n    return a + b + {i % 7}\n"}) + "\n")
    return root


def web_texts(corpus: Path) -> list[str]:
    """The documents of the ``web.jsonl`` that :func:`write_corpus` wrote under ``corpus``."""
    return [json.loads(line)["text"] for line in (corpus / "web.jsonl").read_text().splitlines()]


def corpus_sources(root: Path) -> list:
    from lmlab.data import SourceConfig

    return [
        SourceConfig("web", weight=0.6, path=str(root / "web.jsonl")),
        SourceConfig("books", weight=0.3, path=str(root / "books")),
        SourceConfig("code", weight=0.1, path=str(root / "code.jsonl")),
    ]


def small_tokenizer(root: Path, vocab_size: int) -> Path:
    """A byte-level BPE trained on :func:`write_corpus`'s web documents, written under ``root / "tok"``."""
    from lmlab.data.tokenizer import train_bpe

    write_corpus(root / "corpus")
    train_bpe(web_texts(root / "corpus"), vocab_size, root / "tok")
    return root / "tok"


def small_pretrain_dm(root: Path, **kw):
    """The tests' small PretrainDataModule over :func:`write_corpus`'s corpus under ``root / "corpus"``
    (a 320-token tokenizer trained into ``root / "tok"``, 8 windows of 32 tokens); ``kw`` overrides any argument."""
    from lmlab.data import PretrainDataModule, TokenizerTrainConfig

    args = dict(
        sources=corpus_sources(root / "corpus"), tokenizer=str(root / "tok"),
        tokenizer_train=TokenizerTrainConfig(vocab_size=320, sample_chars=200_000), seq_len=32, batch_size=8,
        val_fraction=0.05, val_max_windows=8, cache_dir=str(root / "cache"), seed=7,
    )
    args.update(kw)
    return PretrainDataModule(**args)


def make_trainer(tmp_path, max_steps: int, callbacks=(), **kw) -> pl.Trainer:
    """A quiet single-CPU Trainer for tests: no logger, checkpoints, progress bar or validation unless asked."""
    args = dict(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=str(tmp_path),
        callbacks=list(callbacks),
    )
    args.update(kw)
    return pl.Trainer(**args)


class StopAfter(pl.Callback):
    """Stop the run once ``steps`` optimizer steps are done (keeping ``max_steps``, which the LR schedule reads)."""

    def __init__(self, steps: int):
        self.steps = steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.steps:
            trainer.should_stop = True


class LossRecorder(pl.Callback):
    """Per-step training losses, and optional stop after a given step."""

    def __init__(self, stop_at: int | None = None):
        self.losses: dict[int, float] = {}
        self.stop_at = stop_at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[int(batch["step"])] = float(outputs["loss"])
        if self.stop_at is not None and trainer.global_step >= self.stop_at:
            trainer.should_stop = True


needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")

# CLI flags of a two-process CPU (gloo) run and the two layouts of experiments/strategies/fsdp2_tp.yaml on it
CPU2 = ["--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.precision=32-true"]
FSDP2 = ["--trainer.strategy.init_args.tensor_parallel_size=1", "--trainer.strategy.init_args.data_parallel_size=2",
         "--trainer.strategy.init_args.param_dtype=float32"]
TP2 = ["--trainer.strategy.init_args.tensor_parallel_size=2", "--trainer.strategy.init_args.data_parallel_size=1",
       "--trainer.strategy.init_args.param_dtype=float32"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for process groups and test servers)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_rank(rank: int, world: int, port: int, out_dir: str, body) -> None:
    import os

    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = body(rank, world, out_dir)
    with open(Path(out_dir) / f"rank{rank}.json", "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


def gloo_ranks(body, out_dir: Path, world: int = 2) -> list[dict]:
    """Run ``body(rank, world, out_dir) -> dict`` (a module-level function) in ``world`` spawned CPU processes
    joined in one gloo group, one thread each (``out_dir``: a folder they share); returns the dicts by rank."""
    import torch.multiprocessing as mp

    mp.spawn(_gloo_rank, args=(world, free_port(), str(out_dir), body), nprocs=world, join=True)
    return [json.loads((Path(out_dir) / f"rank{r}.json").read_text()) for r in range(world)]


def digit_reward(prompt: str, response: str) -> float:
    """Share of digits in the reply: a dense reward a random policy gets some of (PPO and GRPO tests)."""
    from lmlab.data.posttrain.chat import END

    text = response.split(END)[0]
    return sum(c.isdigit() for c in text) / max(len(text), 1)


def nan_reward(prompt: str, response: str) -> float:
    return float("nan")
