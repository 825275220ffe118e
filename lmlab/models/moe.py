"""Mixture-of-experts feed-forward: top-k token-choice routing over SwiGLU experts.

A :class:`MoEFeedForward` replaces the dense MLP of the blocks that
:func:`is_moe_layer` selects (``TransformerConfig.moe_*``). Per token:

1. router logits ``z = W_r x`` (E experts), probabilities ``p = softmax(z)``
   in float32, the top-k experts by ``p``; with ``moe_renormalize`` their
   weights are divided by their sum (Mixtral; Qwen2-MoE's ``norm_topk_prob``);
2. each chosen expert i computes ``down_i(silu(gate_i x) * up_i x)`` and the
   outputs are summed with the top-k weights;
3. optional shared experts (always active) are one SwiGLU of width
   ``moe_shared_experts * expert width``, scaled by ``sigmoid(w_s . x)``
   (the Qwen2-MoE form, so such models export to ``Qwen2MoeForCausalLM``).

The expert computation groups the (token, expert) assignments by expert with
one stable sort and runs two grouped matmuls over stacked expert weights
(``torch._grouped_mm`` on bf16 Hopper GPUs; elsewhere, CPU included, one
padded buffer and two ``bmm``), so there is no per-token or per-expert Python loop; stacked
weights also mean every expert owns a gradient (zeros when it got no token),
which keeps DDP's reducer and FSDP2's sharding on their ordinary paths.

Capacity (``moe_capacity_factor``): in training each expert takes at most
``ceil(cf * tokens * k / E)`` assignments in token order; the rest are
dropped (that expert contributes nothing to the token; the residual carries
it) and counted. Evaluation and generation always route dropless, so scores
and exports do not depend on which other tokens share a batch.

Auxiliary losses, recorded by every training forward (grad enabled) and
collected once per micro-batch by the stage template
(:meth:`lmlab.modules.base.LMModuleBase.optimization_step`, via
:func:`collect_router_losses`):

- load balancing (Switch Transformer eq. 4, GShard): ``E * sum_i f_i P_i``
  with ``f_i`` the fraction of the k * tokens assignments sent to expert i
  (before dropping) and ``P_i`` the mean router probability of expert i; it is
  1 at uniform load;
- router z-loss (ST-MoE eq. 5): ``mean_tokens(logsumexp(z)^2)``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def is_moe_layer(config, layer: int) -> bool:
    """Whether block ``layer`` uses experts: ``moe_experts > 0``, past the first
    ``moe_dense_layers`` blocks, and ``(layer + 1) % moe_every == 0`` (Qwen2-MoE's
    ``decoder_sparse_step`` convention: ``moe_every=2`` gives blocks 1, 3, 5, ...)."""
    return config.moe_experts > 0 and layer >= config.moe_dense_layers and (layer + 1) % config.moe_every == 0


def moe_layers(config) -> list[int]:
    """Indices of the blocks that use experts."""
    return [i for i in range(config.n_layers) if is_moe_layer(config, i)]


def _grouped_mm_works(x: torch.Tensor) -> bool:
    # torch._grouped_mm runs on CPU in torch 2.13 but loops over groups internally: measured 2.3x slower
    # than one padded bmm there (benchmarks/moe_step.py), so it is used only on Hopper GPUs in bf16
    return (hasattr(torch, "_grouped_mm") and x.device.type == "cuda" and x.dtype == torch.bfloat16
            and torch.cuda.get_device_capability(x.device)[0] >= 9)


class _TakeRows(torch.autograd.Function):
    """``src[index]`` for an index without repeats (except rows whose gradient is discarded).

    Its backward writes the gradient rows back with ``index_copy`` instead of the
    ``scatter_add`` that ``index_select`` uses, which is several times slower on CPU.
    """

    @staticmethod
    def forward(ctx, src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.rows = src.shape[0]
        return src.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        return grad.new_zeros(ctx.rows, grad.shape[1]).index_copy(0, index, grad), None


class _Dispatch(torch.autograd.Function):
    """Tokens (N, d) into the expert-major buffer (E * width, d): row r holds token ``source[r]``
    (``N``: an empty row, zeros). The backward gathers each token's k assignment gradients
    (``place``) and sums them, with no scatter."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, source: torch.Tensor, place: torch.Tensor, k: int) -> torch.Tensor:
        ctx.save_for_backward(place)
        ctx.k = k
        return torch.cat([x, x.new_zeros(1, x.shape[1])]).index_select(0, source)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (place,) = ctx.saved_tensors
        # dropped assignments point one past the buffer: they read a zero gradient row
        grad = torch.cat([grad, grad.new_zeros(1, grad.shape[1])])
        return grad.index_select(0, place).view(-1, ctx.k, grad.shape[1]).sum(dim=1), None, None, None


def expert_swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, counts: torch.Tensor,
                  place: torch.Tensor, width: int, k: int) -> torch.Tensor:
    """``down_i(silu(gate_i x) * up_i x)`` of every (token, slot) assignment, in assignment order (N * k, d).

    x: (N, d) tokens; gate_up: (E, d, 2h); down: (E, h, d); ``place[a]`` is the
    row of assignment a = token * k + slot in the expert-major (E, width) layout
    (``E * width`` for a dropped assignment, whose output is zero); ``counts[i]``
    assignments go to expert i. Two grouped matmuls (``torch._grouped_mm``)
    where they are fast, else two batched matmuls over the (E, width, d) buffer.
    """
    E, d = gate_up.shape[0], x.shape[1]
    token = torch.arange(place.numel(), device=x.device) // k
    if _grouped_mm_works(x):
        offs = torch.cumsum(counts, 0).to(torch.int32)
        order = torch.argsort(place)[: int(counts.sum())]
        gate, up = torch._grouped_mm(x.index_select(0, token[order]), gate_up, offs=offs).chunk(2, dim=-1)
        ys = torch._grouped_mm(F.silu(gate) * up, down, offs=offs)
        return ys.new_zeros(place.numel(), d).index_copy(0, order, ys)
    source = torch.full((E * width + 1,), x.shape[0], dtype=torch.long, device=x.device)
    source = source.index_copy(0, place, token)[:-1]
    buf = _Dispatch.apply(x, source, place, k)
    gate, up = torch.bmm(buf.view(E, width, d), gate_up).chunk(2, dim=-1)
    y = torch.bmm(F.silu(gate) * up, down).view(E * width, d)
    if bool((place == E * width).any()):
        y = torch.cat([y, y.new_zeros(1, d)])  # the row dropped assignments read
    return _TakeRows.apply(y, place)


class MoEFeedForward(nn.Module):
    """Top-k routed SwiGLU experts with optional gated shared experts (see the module docstring).

    Parameters: ``router`` (E x d), ``gate_up`` (E, d, 2h) with columns
    ``[gate | up]``, ``down`` (E, h, d) in ``x @ W`` layout, and when
    ``moe_shared_experts > 0`` ``shared_fc``/``shared_proj``/``shared_gate``.
    """

    def __init__(self, config):
        super().__init__()
        d, E, h = config.d_model, config.moe_experts, config.expert_hidden_dim
        self.n_experts, self.top_k, self.hidden = E, config.moe_top_k, h
        self.renormalize = config.moe_renormalize
        self.capacity_factor = config.moe_capacity_factor
        self.aux_loss_coef = config.moe_aux_loss_coef
        self.z_loss_coef = config.moe_z_loss_coef
        self.router = nn.Linear(d, E, bias=False)
        self.gate_up = nn.Parameter(torch.empty(E, d, 2 * h))
        self.down = nn.Parameter(torch.empty(E, h, d))
        if config.moe_shared_experts > 0:
            hs = config.moe_shared_experts * h
            self.shared_fc = nn.Linear(d, 2 * hs, bias=False)
            self.shared_proj = nn.Linear(hs, d, bias=False)
            self.shared_proj.is_residual_output = True
            self.shared_gate = nn.Linear(d, 1, bias=False)
        else:
            self.shared_fc = self.shared_proj = self.shared_gate = None
        #: (weighted aux loss, detached statistics) of each training forward since the last collection
        self.records: list[tuple[torch.Tensor, dict[str, torch.Tensor]]] = []
        self.reset_expert_parameters(config.init_std, config.init_std)

    def reset_expert_parameters(self, std: float, residual_std: float) -> None:
        """Normal init of the stacked expert weights (``init_weights`` covers the ``nn.Linear`` layers)."""
        nn.init.normal_(self.gate_up, std=std)
        nn.init.normal_(self.down, std=residual_std)

    # -- routing --------------------------------------------------------------------------------
    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits, float32 probabilities, top-k weights, top-k expert ids) for tokens x (N, d)."""
        logits = self.router(x)
        probs = torch.softmax(logits.float(), dim=-1)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, probs, weights.to(x.dtype), experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        N, E, k = x.shape[0], self.n_experts, self.top_k
        logits, probs, weights, experts = self.route(x)
        flat = experts.reshape(-1)  # assignment a = token * k + slot
        order = torch.argsort(flat, stable=True)  # assignments grouped by expert, token order inside a group
        counts = torch.bincount(flat, minlength=E)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel(), device=x.device)
        rank = rank - starts[flat]  # position of each assignment in its expert's queue
        kept = counts
        if self.capacity_factor is not None and self.training:
            capacity = math.ceil(self.capacity_factor * N * k / E)
            kept = counts.clamp(max=capacity)
            width = min(capacity, max(int(counts.max()), 1))
        else:
            width = max(int(counts.max()), 1) if N else 1
        place = torch.where(rank < width, flat * width + rank, torch.full_like(rank, E * width))
        y = expert_swiglu(x, self.gate_up, self.down, kept, place, width, k)
        out = (y.view(N, k, -1) * weights.unsqueeze(-1)).sum(dim=1)
        if self.shared_fc is not None:
            s_gate, s_up = self.shared_fc(x).chunk(2, dim=-1)
            out = out + torch.sigmoid(self.shared_gate(x)) * self.shared_proj(F.silu(s_gate) * s_up)
        if self.training and torch.is_grad_enabled():
            self._record(logits, probs, counts, kept)
        return out.view(shape)

    def _record(self, logits: torch.Tensor, probs: torch.Tensor, counts: torch.Tensor, kept: torch.Tensor) -> None:
        E = self.n_experts
        fraction = counts.float() / counts.sum().clamp(min=1)
        balance = E * (fraction * probs.mean(0)).sum()
        z = torch.logsumexp(logits.float(), dim=-1).pow(2).mean()
        loss = self.aux_loss_coef * balance + self.z_loss_coef * z
        # recomputation inside the backward pass (activation checkpointing) repeats the forward: its
        # losses were already taken from the first forward
        if _in_backward():
            return
        stats = {"fraction": fraction.detach(), "dropped": (counts - kept).sum().detach().float(),
                 "assigned": counts.sum().detach().float(), "balance": balance.detach(), "z": z.detach()}
        self.records.append((loss, stats))

    def naive_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The same function (dropless) with a Python loop over experts: the reference for tests and benchmarks."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        _, _, weights, experts = self.route(x)
        out = torch.zeros_like(x)
        for i in range(self.n_experts):
            token, slot = torch.where(experts == i)
            gate, up = (x[token] @ self.gate_up[i]).chunk(2, dim=-1)
            out = out.index_add(0, token, (F.silu(gate) * up @ self.down[i]) * weights[token, slot, None])
        if self.shared_fc is not None:
            s_gate, s_up = self.shared_fc(x).chunk(2, dim=-1)
            out = out + torch.sigmoid(self.shared_gate(x)) * self.shared_proj(F.silu(s_gate) * s_up)
        return out.view(shape)


def _in_backward() -> bool:
    current = getattr(torch._C, "_current_graph_task_id", None)
    return current is not None and current() != -1


def moe_modules(model: nn.Module) -> list[MoEFeedForward]:
    """Every :class:`MoEFeedForward` inside ``model``."""
    return [m for m in model.modules() if isinstance(m, MoEFeedForward)]


def clear_router_records(layers: list[MoEFeedForward]) -> None:
    """Forget recorded router losses (e.g. of a forward whose loss was not trained on)."""
    for layer in layers:
        layer.records.clear()


def collect_router_losses(layers: list[MoEFeedForward]) -> tuple[Optional[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """The weighted auxiliary loss recorded since the last call, and each layer's statistics; clears the records.

    The loss is summed over layers and averaged over the forwards a layer ran
    (a DPO micro-batch may run the policy on chosen and rejected separately).
    ``None`` when no training forward ran through an expert layer.
    """
    total: Optional[torch.Tensor] = None
    per_layer = []
    for layer in layers:
        if not layer.records:
            continue
        losses = [loss for loss, _ in layer.records]
        loss = losses[0] if len(losses) == 1 else torch.stack(losses).mean()
        total = loss if total is None else total + loss
        stats = [s for _, s in layer.records]
        per_layer.append({key: torch.stack([s[key] for s in stats]).sum(0) if key in ("dropped", "assigned")
                          else torch.stack([s[key] for s in stats]).mean(0) for key in stats[0]})
        layer.records.clear()
    return total, per_layer


def load_metrics(per_layer: list[list[dict[str, torch.Tensor]]]) -> dict[str, float]:
    """Logged expert-load metrics of one optimizer step from :func:`collect_router_losses`' statistics.

    ``per_layer`` holds, per micro-batch, the list of layer statistics. Logs the
    token fraction of each expert (mean over layers), the load entropy
    normalised by log(E) (1 = perfectly balanced) overall and per layer, the
    largest expert's load relative to uniform, the dropped fraction of
    assignments, and the unweighted balance and z losses.
    """
    if not per_layer or not per_layer[0]:
        return {}
    n_layers = len(per_layer[0])
    layers = [{key: torch.stack([micro[i][key] for micro in per_layer]) for key in per_layer[0][i]} for i in range(n_layers)]
    out: dict[str, float] = {}
    fractions, entropies = [], []
    dropped = assigned = 0.0
    for i, layer in enumerate(layers):
        f = layer["fraction"].mean(0)
        E = f.numel()
        entropy = float(-(f * torch.log(f.clamp(min=1e-12))).sum() / math.log(E)) if E > 1 else 1.0
        out[f"moe/layer{i}/load_entropy"] = entropy
        fractions.append(f)
        entropies.append(entropy)
        dropped += float(layer["dropped"].sum())
        assigned += float(layer["assigned"].sum())
    mean_f = torch.stack(fractions).mean(0)
    for j, value in enumerate(mean_f.tolist()):
        out[f"moe/expert{j}/fraction"] = value
    out["moe/load_entropy"] = sum(entropies) / n_layers
    out["moe/max_load"] = float(torch.stack(fractions).max(dim=1).values.mean() * mean_f.numel())
    out["moe/dropped_fraction"] = dropped / max(assigned, 1.0)
    out["moe/balance_loss"] = float(torch.stack([layer["balance"].mean() for layer in layers]).mean())
    out["moe/z_loss"] = float(torch.stack([layer["z"].mean() for layer in layers]).mean())
    return out
