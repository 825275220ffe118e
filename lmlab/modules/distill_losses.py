"""Divergences between a teacher's and a student's next-token distributions (logit distillation).

Every function works on the last dimension of ``(..., V)`` logits and returns
one value per position (nats, in float32, or float64 for float64 input). Both sides are divided by the
temperature ``T`` before the softmax; the ``T**2`` factor that keeps gradient
magnitudes comparable across temperatures (Hinton et al. 2015) is applied by
the caller, not here.

With p = softmax(teacher / T) and q = softmax(student / T):

- ``forward_kl``: KL(p || q) = sum p (log p - log q), mean-seeking (classic KD).
- ``reverse_kl``: KL(q || p) = sum q (log q - log p), mode-seeking.
- ``jsd``: the generalized Jensen-Shannon divergence of GKD (Agarwal et al.
  2024, as TRL's ``GKDTrainer`` defines it): with the mixture
  m = beta p + (1 - beta) q, JSD_beta = beta KL(p || m) + (1 - beta) KL(q || m).
  That expression vanishes at both ends, so (as in TRL) ``beta = 0`` is taken
  to mean forward KL and ``beta = 1`` reverse KL; 0.5 is the symmetric JSD.

Top-k support (a teacher cache keeps only its k largest logits per position):
:func:`topk_support` gathers the student's logits at the teacher's top-k token
ids, and the divergences above are then taken over those k tokens with both
distributions renormalised on them. This is an approximation of the
full-vocabulary divergence: it ignores the teacher mass outside the top k
(small when k covers most of it) and is blind to student mass placed there,
so it constrains the *shape* of the student's distribution on the teacher's
likely tokens, while the cross-entropy term keeps the overall level honest.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

__all__ = ["DIVERGENCES", "forward_kl", "reverse_kl", "jsd", "divergence", "topk_support"]

Divergence = Literal["forward_kl", "reverse_kl", "jsd"]
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def _log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    # float32 at least (bf16 logits lose the small differences KL is made of); float64 stays float64
    x = logits if logits.dtype == torch.float64 else logits.float()
    return F.log_softmax(x / temperature, dim=-1)


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) per position from log-probabilities; 0 log 0 counts as 0."""
    a = log_a.exp()
    return torch.where(a > 0, a * (log_a - log_b), torch.zeros_like(a)).sum(-1)


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) per position."""
    return _kl(_log_probs(teacher_logits, temperature), _log_probs(student_logits, temperature))


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(student || teacher) per position."""
    return _kl(_log_probs(student_logits, temperature), _log_probs(teacher_logits, temperature))


def jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 0.5, temperature: float = 1.0) -> torch.Tensor:
    """Generalized JSD with teacher weight ``beta`` in the mixture (see the module docstring for the ends)."""
    if beta <= 0.0:
        return forward_kl(student_logits, teacher_logits, temperature)
    if beta >= 1.0:
        return reverse_kl(student_logits, teacher_logits, temperature)
    log_p = _log_probs(teacher_logits, temperature)
    log_q = _log_probs(student_logits, temperature)
    log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log(1.0 - beta)]), dim=0)
    return beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)


def divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: Divergence = "forward_kl",
               beta: float = 0.5, temperature: float = 1.0) -> torch.Tensor:
    """The divergence ``kind`` (``forward_kl``, ``reverse_kl`` or ``jsd`` with ``beta``) per position."""
    if kind == "forward_kl":
        return forward_kl(student_logits, teacher_logits, temperature)
    if kind == "reverse_kl":
        return reverse_kl(student_logits, teacher_logits, temperature)
    if kind == "jsd":
        return jsd(student_logits, teacher_logits, beta, temperature)
    raise ValueError(f"unknown divergence {kind!r}; expected one of {DIVERGENCES}")


def topk_support(teacher_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's ``k`` largest logits per position and their token ids, ``(values, indices)``."""
    logits = teacher_logits if teacher_logits.dtype == torch.float64 else teacher_logits.float()
    values, indices = torch.topk(logits, min(k, teacher_logits.shape[-1]), dim=-1)
    return values, indices
