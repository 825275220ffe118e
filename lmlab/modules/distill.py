"""``DistillModule``: logit distillation of a frozen teacher into a (smaller) student."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F

from lmlab.data.posttrain.chat import IGNORE_INDEX
from lmlab.errors import ConfigError
from lmlab.models.checkpoint import open_checkpoint
from lmlab.models.config import TransformerConfig
from lmlab.models.generation import generate
from lmlab.models.losses import token_nll
from lmlab.models.transformer import documents_from_eos
from lmlab.modules.base import LMModuleBase, StepResult, add_up
from lmlab.modules.data_contract import PretrainData, SequenceData, StageData, provides, require
from lmlab.modules.distill_cache import TopKLogitCache, batch_key
from lmlab.modules.distill_losses import DIVERGENCES, divergence, topk_support
from lmlab.modules.optim import TrainingSettings
from lmlab.modules.posttrain_base import resolve_config
from lmlab.modules.pretrain import LN2, PretrainModule

__all__ = ["DistillModule", "OnPolicyConfig", "check_same_vocabulary"]


@dataclass
class OnPolicyConfig:
    """On-policy distillation (GKD): the divergence on continuations the student samples itself.

    Args:
        lmbda: Probability that a step distils on student samples instead of
            the data (GKD's lambda, TRL's ``lmbda``; 0: never).
        prompt_tokens: Tokens of each training window kept as the prompt
            (default: half the window).
        max_new_tokens: Tokens the student samples after the prompt (default:
            the rest of the window).
        temperature: Sampling temperature.
        top_k: Sample from the top-k tokens only (0: the whole vocabulary).
        seed: With the step number, fixes whether a step is on-policy and what
            is sampled, so a resumed run samples exactly as an uninterrupted one.
    """

    lmbda: float = 0.0
    prompt_tokens: Optional[int] = None
    max_new_tokens: Optional[int] = None
    temperature: float = 1.0
    top_k: int = 0
    seed: int = 1337


def check_same_vocabulary(data_tokenizer: Any, teacher_tokenizer: Any, field: str = "model.teacher") -> None:
    """``ConfigError`` unless both tokenizers map the same strings to the same ids.

    Distillation compares the two next-token distributions id by id, so equal
    sizes are not enough: the token behind every id must be the same.
    """
    ours, theirs = data_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if ours == theirs:
        return
    if len(ours) != len(theirs):
        problem = f"the teacher's tokenizer has {len(theirs)} tokens, the data's {len(ours)}"
    else:
        by_id_ours = {i: t for t, i in ours.items()}
        by_id_theirs = {i: t for t, i in theirs.items()}
        i = min(j for j in set(by_id_ours) | set(by_id_theirs) if by_id_ours.get(j) != by_id_theirs.get(j))
        problem = (f"the teacher's tokenizer differs from the data's: id {i} is {by_id_theirs.get(i)!r} "
                   f"for the teacher and {by_id_ours.get(i)!r} for the data")
    raise ConfigError(field, problem, "use the teacher's tokenizer as data.tokenizer, or a teacher trained with the data's tokenizer")


class DistillModule(PretrainModule):
    """Trains a student :class:`~lmlab.models.heads.CausalLM` to match a frozen teacher's next-token distributions.

    L = alpha * CE(labels) + (1 - alpha) * T^2 * D(p_T || q_T), where p_T and
    q_T are the teacher's and student's softmax at temperature T, D is
    ``divergence`` (see :mod:`lmlab.modules.distill_losses`: forward KL,
    reverse KL or GKD's generalized JSD with ``beta``), averaged over the
    target positions. The CE term is the pretraining loss, so ``alpha = 1``
    reproduces :class:`~lmlab.modules.PretrainModule` step for step.
    Divergences cover the real vocabulary only: rows of the padded LM head
    beyond the tokenizer's size never enter either distribution.

    Teacher: any checkpoint :func:`~lmlab.models.checkpoint.open_checkpoint`
    opens (a ``.ckpt``, an ``lmlab export`` or a transformers directory),
    frozen in eval mode, run without gradients on the student's device and
    dtype; its tokenizer must have the very vocabulary of the data's. It is
    kept out of the student's checkpoints, which chain on through
    ``model.init_from`` like any pretraining checkpoint.

    Teacher logits: with ``top_k = 0`` the full distribution, computed on the
    fly; with ``top_k > 0`` only the teacher's k largest logits per position,
    the divergence taken on that support with both sides renormalised (an
    approximation, see :mod:`lmlab.modules.distill_losses`); with
    ``teacher_cache`` as well, those top-k logits are read from (or written to)
    a disk cache (:class:`~lmlab.modules.distill_cache.TopKLogitCache`), so
    later runs on the same tokens skip the teacher.

    On-policy (``on_policy.lmbda > 0``, GKD): with that probability a step's
    divergence is taken on continuations the student samples (KV-cache
    generation) from the first ``prompt_tokens`` of each window, the CE term
    still on the data; such steps always run the teacher.

    Data: the pretraining mixture (:class:`~lmlab.data.PretrainDataModule`;
    validation logs bits per byte per source like pretraining) or an SFT
    DataModule (divergence and CE on the response tokens; off-policy only).

    Logs ``train/loss``, ``train/ce``, ``train/divergence`` (D without the
    T^2), ``train/on_policy`` (1 on student-sampled steps), ``train/bpb`` and
    the pretraining validation metrics.

    Args:
        config: Student shape; omit to take it from ``init_from``.
        settings: Optimizer, schedule, clipping, compile and peak FLOP/s.
        init_from: Start the student from these weights.
        teacher: The teacher checkpoint, export or transformers directory.
        alpha: Weight of the cross-entropy term, in [0, 1] (0: distillation only).
        temperature: Softmax temperature of both distributions (> 0).
        divergence: ``forward_kl`` (default), ``reverse_kl`` or ``jsd``.
        beta: Teacher weight in the JSD mixture, in [0, 1] (0: forward KL, 1: reverse KL).
        top_k: Keep the teacher's top-k logits per position (0: all).
        teacher_cache: Directory of the top-k logit cache (needs ``top_k > 0``).
        on_policy: On-policy (GKD) sampling settings.
        flop_convention: How FLOPs are counted (see :mod:`lmlab.models.counting`).
    """

    stage = "distill"
    eval_modules_expected = True
    data_protocol = StageData

    def __init__(
        self,
        config: Optional[TransformerConfig] = None,
        settings: Optional[TrainingSettings] = None,
        init_from: Optional[str] = None,
        teacher: Optional[str] = None,
        alpha: float = 0.5,
        temperature: float = 1.0,
        divergence: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl",
        beta: float = 0.5,
        top_k: int = 0,
        teacher_cache: Optional[str] = None,
        on_policy: Optional[OnPolicyConfig] = None,
        flop_convention: Literal["6n", "kaplan", "palm"] = "palm",
    ):
        on_policy = on_policy or OnPolicyConfig()
        _check_settings(teacher, alpha, temperature, divergence, beta, top_k, teacher_cache, on_policy)
        self.teacher_ckpt = open_checkpoint(teacher, "model.teacher")
        self.teacher_config = self.teacher_ckpt.require_config()
        super().__init__(resolve_config(config, init_from), settings, init_from, flop_convention)
        self.teacher_path = str(teacher)
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        self.divergence = divergence
        self.beta = float(beta)
        self.top_k = int(top_k)
        self.on_policy = on_policy
        self.cache = (TopKLogitCache(teacher_cache, top_k, {"path": str(self.teacher_ckpt.path.resolve()),
                                                            "config": self.teacher_config.to_dict()})
                      if teacher_cache else None)
        self.real_vocab = min(self.config.vocab_size, self.teacher_config.vocab_size)
        self.sequence_data = False  # SFT-style batches (input_ids/labels) instead of token windows
        self.pad_id = 0
        #: the teacher, kept in a list so it is no submodule: out of the state dict, the optimizer and .train()
        self._teacher: list[torch.nn.Module] = []
        self._cache_hits = 0

    # -- data ------------------------------------------------------------------------------
    def attach_data(self, dm: StageData) -> None:
        if provides(dm, PretrainData):
            super().attach_data(dm)
        else:
            require(dm, SequenceData)
            if self.on_policy.lmbda > 0:
                raise ConfigError("model.on_policy.lmbda", "on-policy distillation samples from pretraining windows",
                                  "use a PretrainDataModule, or set model.on_policy.lmbda: 0 for SFT data")
            LMModuleBase.attach_data(self, dm)
            self.seq_len_field = "data.max_length"
            self.check_seq_len(dm.seq_len)
            self.seq_len = dm.seq_len
            self.pad_id = dm.pad_id
            self.sequence_data = True
        self._check_teacher_tokenizer(dm.tokenizer)
        if self.teacher_config.vocab_size < dm.vocab_size:
            raise ConfigError("model.teacher", f"the teacher has {self.teacher_config.vocab_size} vocabulary rows, "
                              f"the tokenizer {dm.vocab_size} tokens", "use a teacher trained with this tokenizer")
        self.real_vocab = int(dm.vocab_size)

    def _check_teacher_tokenizer(self, data_tokenizer: Any) -> None:
        try:
            teacher_tok = self.teacher_ckpt.tokenizer(field="model.teacher")
        except ConfigError:
            raise ConfigError("model.teacher", f"{self.teacher_ckpt.path} records no tokenizer to compare with the data's",
                              "use a checkpoint written by lmlab fit, or an export/transformers directory with its tokenizer") from None
        check_same_vocabulary(data_tokenizer, teacher_tok)

    def _announce(self, dm) -> None:
        if provides(dm, PretrainData):
            super()._announce(dm)

    # -- teacher ---------------------------------------------------------------------------
    def teacher(self) -> torch.nn.Module:
        """The frozen teacher on the student's device and dtype (built on first use)."""
        param = next(self.model.parameters())
        if not self._teacher:
            model = self.teacher_ckpt.causal_lm()
            model.requires_grad_(False)
            self._teacher.append(model.eval())
        model = self._teacher[0]
        ref = next(model.parameters())
        if ref.device != param.device or ref.dtype != param.dtype:
            self._teacher[0] = model.to(device=param.device, dtype=param.dtype)
        return self._teacher[0]

    @torch.no_grad()
    def teacher_logits(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                       doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The teacher's logits over the real vocabulary (float32)."""
        teacher = self.teacher()
        if doc_ids is None and not self.teacher_config.cross_document_attention and self.eos_id is not None:
            doc_ids = documents_from_eos(input_ids, self.eos_id)
        return teacher(input_ids, position_ids=position_ids, doc_ids=doc_ids)[..., : self.real_vocab].float()

    def teacher_topk(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                     doc_ids: Optional[torch.Tensor] = None, cached: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values, indices)`` of the teacher's top-k logits, from the cache when it holds them."""
        key = None
        if cached and self.cache is not None:
            key = batch_key(torch.cat([t for t in (input_ids, position_ids, doc_ids) if t is not None], dim=1))
            hit = self.cache.get(key)
            if hit is not None:
                self._cache_hits += 1
                return hit[0].to(input_ids.device), hit[1].to(input_ids.device)
        values, indices = topk_support(self.teacher_logits(input_ids, position_ids, doc_ids), self.top_k)
        if key is not None:
            self.cache.put(key, values, indices)
        return values, indices

    def distill_divergence(self, student_logits: torch.Tensor, input_ids: torch.Tensor, position_ids=None,
                           doc_ids=None, cached: bool = True) -> torch.Tensor:
        """Per-position divergence between the teacher on ``input_ids`` and ``student_logits`` (B, T, V')."""
        student = student_logits[..., : self.real_vocab].float()
        if self.top_k:
            values, indices = self.teacher_topk(input_ids, position_ids, doc_ids, cached)
            return divergence(student.gather(-1, indices), values, self.divergence, self.beta, self.temperature)
        teacher = self.teacher_logits(input_ids, position_ids, doc_ids)
        return divergence(student, teacher, self.divergence, self.beta, self.temperature)

    # -- batches ----------------------------------------------------------------------------
    def _inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """``(inputs, targets, position_ids, doc_ids)``; targets are ``-100`` where nothing is predicted."""
        if self.sequence_data:
            labels = batch["labels"]
            targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1)
            return batch["input_ids"], targets, batch.get("position_ids"), batch.get("doc_ids")
        tokens = batch["tokens"]
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        doc_ids = None
        if not self.config.cross_document_attention and self.eos_id is not None:
            doc_ids = documents_from_eos(inputs, self.eos_id)
        return inputs, targets, None, doc_ids

    def on_policy_step(self, step: int) -> bool:
        """Whether ``step`` distils on student samples (a fixed draw per step and seed)."""
        lmbda = self.on_policy.lmbda
        return lmbda > 0 and random.Random(f"{self.on_policy.seed}:{step}").random() < lmbda

    def sample_continuations(self, batch: dict, step: int) -> dict:
        """The batch with ``policy_ids`` (prompt + student sample) and ``policy_mask`` (positions predicting a sample)."""
        inputs = batch["tokens"][:, :-1]
        window = inputs.shape[1]
        prompt = self.on_policy.prompt_tokens or max(1, window // 2)
        new = self.on_policy.max_new_tokens or max(1, window - prompt)
        gen = torch.Generator(device=inputs.device).manual_seed(self.on_policy.seed * 1_000_003 + step)
        out = generate(self.model, inputs[:, :prompt], max_new_tokens=new, temperature=self.on_policy.temperature,
                       top_k=self.on_policy.top_k, generator=gen)
        seq = out.sequences
        mask = torch.zeros(seq.shape[0], seq.shape[1] - 1, dtype=torch.float32, device=seq.device)
        mask[:, prompt - 1:] = out.response_mask.float()
        return {**batch, "policy_ids": seq, "policy_mask": mask}

    def training_step(self, batch: Any, batch_idx: int):
        if self.on_policy_step(self.global_step):
            batch = self.sample_continuations(batch, self.global_step)
        return super().training_step(batch, batch_idx)

    # -- loss -------------------------------------------------------------------------------
    def batch_normaliser(self, batch: dict) -> Optional[dict]:
        _, targets, _, _ = self._inputs(batch)
        n_ce = int((targets != IGNORE_INDEX).sum())
        if n_ce == 0:
            return None
        n_div = int(batch["policy_mask"].sum()) if "policy_mask" in batch else n_ce
        return {"ce": n_ce, "div": max(n_div, 1)}

    def micro_batch_loss(self, micro_batch: dict, normaliser: dict):
        inputs, targets, position_ids, doc_ids = self._inputs(micro_batch)
        logits = self.net(inputs, position_ids=position_ids, doc_ids=doc_ids)
        # pretraining's loss, so alpha = 1 is pretraining bit for bit
        nll = token_nll(logits, targets, ignore_index=IGNORE_INDEX)
        ce = nll.sum()
        valid = targets != IGNORE_INDEX
        out = {"nll": ce.detach(), "bytes": self._bytes(targets[valid]).float() if not self.sequence_data else torch.zeros(())}
        loss = ce / normaliser["ce"] if self.alpha == 1.0 else self.alpha * ce / normaliser["ce"]
        if self.alpha < 1.0:
            if "policy_ids" in micro_batch:
                seq = micro_batch["policy_ids"][:, :-1]
                div = self.distill_divergence(self.net(seq), seq, cached=False)
                mask = micro_batch["policy_mask"]
            else:
                div = self.distill_divergence(logits, inputs, position_ids, doc_ids)
                mask = valid.float()
            div_sum = (div * mask).sum()
            loss = loss + (1.0 - self.alpha) * self.temperature**2 * div_sum / normaliser["div"]
            out["div"] = div_sum.detach()
        return loss, out

    def training_metrics(self, batch: dict, outputs: list, normaliser: dict) -> StepResult:
        sums = add_up(outputs)
        ce = sums["nll"] / normaliser["ce"]
        div = sums["div"] / normaliser["div"] if "div" in sums else torch.zeros_like(ce)
        loss = self.alpha * ce + (1.0 - self.alpha) * self.temperature**2 * div if self.alpha < 1.0 else ce
        if self.trainer.world_size > 1:
            loss = self.trainer.strategy.reduce(loss, reduce_op="mean")
        metrics = {"train/ce": ce, "train/divergence": div, "train/ppl": torch.exp(ce.clamp(max=50)),
                   "train/on_policy": float("policy_ids" in batch)}
        if not self.sequence_data:
            metrics["train/bpb"] = sums["nll"] / (LN2 * sums["bytes"].clamp(min=1))
        if self.cache is not None:
            metrics["train/teacher_cache_hits"] = float(self._cache_hits)
        return StepResult(loss, metrics, normaliser["ce"])

    # -- validation on SFT batches (token windows use pretraining's) ------------------------------
    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if not self.sequence_data:
            return super().validation_step(batch, batch_idx, dataloader_idx)
        inputs, targets, position_ids, doc_ids = self._inputs(batch)
        logits = self.net(inputs, position_ids=position_ids, doc_ids=doc_ids)
        nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum", ignore_index=IGNORE_INDEX)
        n = (targets != IGNORE_INDEX).sum()
        sums = torch.stack([nll.double(), n.double(), torch.zeros((), dtype=torch.float64, device=nll.device)])
        self._val_sums[0] = self._val_sums.get(0, torch.zeros(3, dtype=torch.float64, device=self.device)) + sums

    def on_validation_epoch_end(self) -> None:
        if not self.sequence_data:
            return super().on_validation_epoch_end()
        sums = self._val_sums.get(0)
        if sums is None:
            return
        if self.trainer.world_size > 1:
            sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        nll, n, _ = sums.tolist()
        if n > 0:
            self.record_validation({"val/loss": nll / n, "val/ppl": math.exp(min(nll / n, 50))})

    # -- checkpoints --------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["lmlab"]["teacher"] = self.teacher_path


def _check_settings(teacher, alpha, temperature, kind, beta, top_k, teacher_cache, on_policy: OnPolicyConfig) -> None:
    """One-line ``ConfigError`` for every out-of-range distillation setting."""
    if not teacher:
        raise ConfigError("model.teacher", "no teacher given",
                          "set model.teacher to an lmlab checkpoint, an lmlab export or a transformers model directory")
    if not (0.0 <= alpha <= 1.0):
        raise ConfigError("model.alpha", f"must be in [0, 1], got {alpha}", "0 distils only, 1 trains on cross-entropy only")
    if not (temperature > 0.0 and math.isfinite(temperature)):
        raise ConfigError("model.temperature", f"must be a positive number, got {temperature}", "use e.g. 1.0 or 2.0")
    if kind not in DIVERGENCES:
        raise ConfigError("model.divergence", f"unknown divergence {kind!r}", f"use one of {', '.join(DIVERGENCES)}")
    if not (0.0 <= beta <= 1.0):
        raise ConfigError("model.beta", f"must be in [0, 1], got {beta}", "0 is forward KL, 1 reverse KL, 0.5 the symmetric JSD")
    if top_k < 0:
        raise ConfigError("model.top_k", f"must be >= 0, got {top_k}", "0 keeps the teacher's whole distribution")
    if teacher_cache and top_k == 0:
        raise ConfigError("model.teacher_cache", "caching keeps only top-k logits but model.top_k is 0", "set model.top_k, e.g. 32")
    if not (0.0 <= on_policy.lmbda <= 1.0):
        raise ConfigError("model.on_policy.lmbda", f"must be in [0, 1], got {on_policy.lmbda}", "0 never samples, 1 always")
    if not on_policy.temperature > 0.0:
        raise ConfigError("model.on_policy.temperature", f"must be positive, got {on_policy.temperature}", "use e.g. 1.0")
