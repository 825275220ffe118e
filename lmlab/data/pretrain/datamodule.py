"""``PretrainDataModule``: the weighted mixed corpus as Lightning data."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Optional

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from lmlab.data.pretrain.batching import BatchSchedule
from lmlab.data.pretrain.mixture import MixtureSampler
from lmlab.data.pretrain.packing import build_or_load_cache, load_cache, num_windows, window
from lmlab.data.pretrain.reading import SharedDocuments
from lmlab.data.pretrain.replay import NEW, OLD, check_replay, new_source_fields, replay_mixture
from lmlab.data.pretrain.sources import SourceConfig, iter_documents, validate_sources
from lmlab.distributed.hooks import data_parallel_rank_and_size
from lmlab.data.tokenizer import TokenizerTrainConfig, load_tokenizer, token_byte_lengths, train_bpe
from lmlab.errors import ConfigError


class MixtureBatches(IterableDataset):
    """Yields one optimizer step's sequences for this rank, step after step.

    Item t is ``{"tokens": (k * micro, seq_len + 1), "step": t}``: this rank's
    slice of the global batch of step t. Data-loader workers take steps
    round-robin, which keeps the order the same for any ``num_workers``.
    """

    def __init__(
        self,
        streams: list[np.ndarray],
        sampler: MixtureSampler,
        schedule: BatchSchedule,
        seq_len: int,
        rank: int,
        world_size: int,
        start_step: int = 0,
        max_steps: Optional[int] = None,
    ):
        self.streams = streams
        self.sampler = sampler
        self.schedule = schedule
        self.seq_len = seq_len
        self.rank = rank
        self.world_size = world_size
        self.start_step = start_step
        self.max_steps = max_steps

    def batch_for_step(self, step: int) -> dict:
        size = self.schedule.at(step)
        per_rank = size // self.world_size
        start = self.schedule.samples_before(step) + self.rank * per_rank
        src, win = self.sampler.draw(start, start + per_rank)
        tokens = np.stack([window(self.streams[s], w, self.seq_len) for s, w in zip(src, win)])
        return {"tokens": torch.from_numpy(tokens), "sources": torch.from_numpy(src), "step": step}

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        step = self.start_step + wid
        while self.max_steps is None or step < self.max_steps:
            yield self.batch_for_step(step)
            step += nw


class WindowDataset(Dataset):
    """Consecutive windows of one validation stream."""

    def __init__(self, stream: np.ndarray, seq_len: int, max_windows: Optional[int]):
        self.stream = stream
        self.seq_len = seq_len
        n = num_windows(stream, seq_len)
        self.n = n if max_windows is None else min(n, max_windows)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(window(self.stream, i, self.seq_len))


class PretrainDataModule(pl.LightningDataModule):
    """Serves a weighted mixture of named text sources for pretraining.

    Documents are tokenized once into a content-keyed on-disk cache, packed
    with EOS between documents, and cut into windows of ``seq_len + 1``
    tokens. Training draws windows by weight (:class:`MixtureSampler`), so the
    realised token share of each source follows its weight; each rank takes a
    distinct slice of every global batch; the stream position is the optimizer
    step, so a resumed run continues the same stream.

    Args:
        sources: The mixture's sources with their weights.
        tokenizer: Tokenizer directory, ``tokenizer.json`` or hub name.
        tokenizer_train: When set and ``tokenizer`` does not exist yet, train a
            byte-level BPE on a weighted sample of the mixture and save it there.
        seq_len: Tokens per training sequence.
        batch_size: Global batch (sequences per optimizer step, all ranks) at step 0.
        micro_batch_size: Sequences per forward/backward on one device
            (default: the whole per-rank batch).
        batch_ramp_interval: Double the global batch every this many steps (0: off).
        batch_ramp_cap: Largest global batch of the ramp.
        val_fraction: Share of each source held out for validation.
        val_max_windows: Validation windows per source (None: all).
        seed: Fixes the validation split and the training order.
        cache_dir: Where token caches live.
        prepared_dir: A token directory written by ``lmlab data prepare``
            (filtered, deduplicated, shuffled); used instead of tokenizing the
            sources, which then only give names and weights.
        num_workers: Data-loader worker processes.
        new_sources: Continual pretraining: the new domain's sources (their
            weights set the proportions inside the new domain). With them,
            ``sources`` is the original mixture that is replayed
            (see :mod:`lmlab.data.pretrain.replay`).
        replay_fraction: Share of training samples drawn from the original
            mixture ``sources`` when ``new_sources`` is set, in [0, 1].
    """

    def __init__(
        self,
        sources: list[SourceConfig],
        tokenizer: str,
        tokenizer_train: Optional[TokenizerTrainConfig] = None,
        seq_len: int = 512,
        batch_size: int = 32,
        micro_batch_size: Optional[int] = None,
        batch_ramp_interval: int = 0,
        batch_ramp_cap: Optional[int] = None,
        val_fraction: float = 0.01,
        val_max_windows: Optional[int] = 64,
        seed: int = 1337,
        cache_dir: str = ".lmlab_cache",
        prepared_dir: Optional[str] = None,
        num_workers: int = 0,
        new_sources: Optional[list[SourceConfig]] = None,
        replay_fraction: Optional[float] = None,
    ):
        super().__init__()
        if seq_len <= 0:
            raise ConfigError("data.seq_len", f"must be positive, got {seq_len}")
        if not 0 <= val_fraction < 1:
            raise ConfigError("data.val_fraction", f"must be in [0, 1), got {val_fraction}")
        self.prepared_dir = prepared_dir
        if prepared_dir is None:
            validate_sources(sources)
        elif not (Path(os.path.expanduser(prepared_dir)) / "meta.json").exists():
            raise ConfigError(
                "data.prepared_dir", f"{prepared_dir} holds no prepared data (no meta.json)", "run `lmlab data prepare` first"
            )
        check_replay(sources, new_sources, replay_fraction, check_files=prepared_dir is None)
        self.sources = sources
        self.new_sources = new_sources
        self.replay_fraction = replay_fraction
        #: what the sampler draws from: ``sources``, or the original and new sources weighted by the replay fraction
        self.mixture = sources if new_sources is None else replay_mixture(sources, new_sources, replay_fraction)
        self.tokenizer_spec = tokenizer
        self.tokenizer_train = tokenizer_train
        self.seq_len = seq_len
        self.schedule = BatchSchedule(batch_size, batch_ramp_interval, batch_ramp_cap)
        self._micro = micro_batch_size
        self.val_fraction = val_fraction
        self.val_max_windows = val_max_windows
        self.seed = seed
        self.cache_dir = cache_dir
        self.num_workers = num_workers
        self.tokenizer = None
        self.streams = None
        self.sampler: Optional[MixtureSampler] = None
        self._resume_step = 0

    # -- preparation ---------------------------------------------------------
    def _ensure_tokenizer(self, documents: Optional[SharedDocuments] = None) -> None:
        if self.tokenizer is not None:
            return
        if self.tokenizer_train is not None and not os.path.exists(os.path.expanduser(self.tokenizer_spec)):
            # ranks on separate nodes sharing one filesystem may both train it: the same seed gives the same
            # tokenizer, and the first one published is kept rather than swapped under a rank that is loading it
            self.tokenizer = train_tokenizer_on_mixture(
                self.mixture, self.tokenizer_spec, self.tokenizer_train, replace=False, documents=documents
            )
        else:
            self.tokenizer = load_tokenizer(self.tokenizer_spec)

    def prepare_data(self) -> None:
        # one reader per source for the whole prepare: packing continues where tokenizer training stopped
        documents = SharedDocuments(self.mixture) if self.prepared_dir is None else None
        self._ensure_tokenizer(documents)
        if self.prepared_dir is None:
            with self._new_source_fields():
                build_or_load_cache(self.mixture, self.tokenizer, self.cache_dir, self.val_fraction, self.seed, documents)

    def setup(self, stage: Optional[str] = None) -> None:
        if self.streams is not None:
            return
        self._ensure_tokenizer()
        if self.prepared_dir is not None:
            self.cache_path = Path(os.path.expanduser(self.prepared_dir))
            self.streams = load_cache(self.cache_path, [s.name for s in self.mixture])
        else:
            with self._new_source_fields():
                self.cache_path, self.streams = build_or_load_cache(
                    self.mixture, self.tokenizer, self.cache_dir, self.val_fraction, self.seed
                )
        sizes = [num_windows(self.streams[s.name].train, self.seq_len) for s in self.mixture]
        with self._new_source_fields():
            self._check_new_domain(sizes)
            self.sampler = MixtureSampler([s.name for s in self.mixture], [s.weight for s in self.mixture], sizes, self.seed)

    def _new_source_fields(self):
        return new_source_fields(len(self.sources), [s.name for s in self.new_sources or []])

    def _check_new_domain(self, sizes: list[int]) -> None:
        # the new domain must train even where the replay fraction is 1 and its weight is 0
        for i, (src, n) in enumerate(zip(self.mixture, sizes)):
            if self.new_sources is not None and i >= len(self.sources) and n <= 0:
                raise ConfigError(
                    f"data.sources[{i}]",
                    f"new-domain source {src.name!r} is empty: no training window of {self.seq_len + 1} tokens",
                    "add data to it or lower data.seq_len",
                )

    # -- properties the module reads -------------------------------------------
    @property
    def vocab_size(self) -> int:
        self._ensure_tokenizer()
        return len(self.tokenizer)

    @property
    def eos_id(self) -> int:
        self._ensure_tokenizer()
        return self.tokenizer.eos_token_id

    def token_bytes(self) -> np.ndarray:
        self._ensure_tokenizer()
        return token_byte_lengths(self.tokenizer)

    @property
    def world_size(self) -> int:
        """Data-parallel replicas (tensor-parallel ranks of one replica read the same data)."""
        return data_parallel_rank_and_size(self.trainer)[1]

    @property
    def rank(self) -> int:
        return data_parallel_rank_and_size(self.trainer)[0]

    @property
    def micro_batch_size(self) -> int:
        return self._micro or self.schedule.base // self.world_size

    @property
    def val_source_names(self) -> list[str]:
        return [s.name for s in self.mixture if self.streams and num_windows(self.streams[s.name].val, self.seq_len) > 0]

    @property
    def val_source_groups(self) -> dict[str, list[str]]:
        """Continual pretraining: validation sources of the original mixture (``old``) and of the new domain (``new``)."""
        if self.new_sources is None:
            return {}
        have = set(self.val_source_names)
        return {
            OLD: [s.name for s in self.sources if s.name in have],
            NEW: [s.name for s in self.new_sources if s.name in have],
        }

    def train_stats(self, steps: int) -> dict:
        """Samples, tokens and epochs per source for the first ``steps`` optimizer steps."""
        self.setup()
        n = self.schedule.samples_before(steps)
        counts = self.sampler.counts(n)
        return {
            "samples": int(n),
            "tokens": int(n * self.seq_len),
            "share": {s: float(c / max(1, n)) for s, c in zip(self.sampler.names, counts)},
            "epochs": self.sampler.epochs(n),
        }

    # -- loaders ----------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        self.setup()
        rank = self.rank
        start = self.trainer.global_step if self.trainer is not None else self._resume_step
        start = max(start, self._resume_step)
        max_steps = None
        if self.trainer is not None and self.trainer.max_steps and self.trainer.max_steps > 0:
            max_steps = self.trainer.max_steps
            self.schedule.check_divisible(self.micro_batch_size, self.world_size, max_steps)
            self._report_repetition(max_steps)
        ds = MixtureBatches(
            [self.streams[s.name].train for s in self.mixture],
            self.sampler,
            self.schedule,
            self.seq_len,
            rank,
            self.world_size,
            start,
            max_steps,
        )
        return DataLoader(ds, batch_size=None, num_workers=self.num_workers, persistent_workers=False)

    def _report_repetition(self, max_steps: int) -> None:
        if self.trainer is not None and self.trainer.global_rank != 0:
            return
        stats = self.train_stats(max_steps)
        repeated = {k: v for k, v in stats["epochs"].items() if v > 1.0}
        if repeated:
            desc = ", ".join(f"{k} x{v:.2f}" for k, v in repeated.items())
            # expected with small local corpora: one line of information, not a warning with a source line
            rank_zero_info(f"lmlab data: sources smaller than their share are repeated over {max_steps} steps: {desc}")

    def val_dataloader(self) -> list[DataLoader]:
        self.setup()
        loaders = []
        for name in self.val_source_names:
            ds = WindowDataset(self.streams[name].val, self.seq_len, self.val_max_windows)
            sampler = None
            if self.world_size > 1:
                from torch.utils.data.distributed import DistributedSampler

                sampler = DistributedSampler(ds, num_replicas=self.world_size, rank=self.rank, shuffle=False, drop_last=False)
            loaders.append(DataLoader(ds, batch_size=self.micro_batch_size, sampler=sampler, shuffle=False))
        return loaders

    def test_dataloader(self) -> list[DataLoader]:
        return self.val_dataloader()

    def predict_dataloader(self) -> list[DataLoader]:
        return self.val_dataloader()

    # -- checkpoint state ----------------------------------------------------------
    def state_dict(self) -> dict:
        step = self.trainer.global_step if self.trainer is not None else self._resume_step
        state = {"step": int(step), "seed": int(self.seed)}
        if self.replay_fraction is not None:
            state["replay_fraction"] = float(self.replay_fraction)
        return state

    def load_state_dict(self, state: dict) -> None:
        if int(state.get("seed", self.seed)) != self.seed:
            warnings.warn("resuming with a different data seed: the data stream will differ", stacklevel=2)
        if state.get("replay_fraction") != (None if self.replay_fraction is None else float(self.replay_fraction)):
            warnings.warn("resuming with a different data.replay_fraction: the data stream will differ", stacklevel=2)
        self._resume_step = int(state.get("step", 0))


def train_tokenizer_on_mixture(
    sources: list[SourceConfig],
    out_dir: str,
    cfg: TokenizerTrainConfig,
    replace: bool = True,
    documents: Optional[SharedDocuments] = None,
):
    """Train a byte-level BPE on a sample of the mixture, each source by its weight (``replace=False`` keeps a
    tokenizer another process saved at ``out_dir`` first; ``documents``: a reader packing will continue)."""
    total_w = sum(s.weight for s in sources)

    def texts():
        for i, src in enumerate(sources):
            budget = int(cfg.sample_chars * src.weight / total_w)
            used = 0
            for doc in (documents.prefix(i) if documents is not None else iter_documents(src, i)):
                if used >= budget:
                    break
                doc = doc[: budget - used]
                used += len(doc)
                yield doc

    return train_bpe(texts(), cfg.vocab_size, out_dir, cfg.min_frequency, replace=replace)
