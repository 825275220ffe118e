"""2-D parallelism for the lmlab backbone: tensor parallel inside blocks, FSDP2 across data-parallel ranks.

:func:`parallelize` is what Lightning's ``ModelParallelStrategy`` expects a
``configure_model()`` hook to apply: a tensor-parallel (TP) plan for each
block over the ``tensor_parallel`` mesh dimension (Megatron-style: the input
projections column-wise, the output projections row-wise, one all-reduce after
attention and one after the MLP), then ``fully_shard`` per block and on the
root over ``data_parallel``. It lives apart from the model code: the model is
plain ``nn.Module`` s and keeps no knowledge of meshes.

Fused projections. lmlab fuses q/k/v into one ``attn.qkv`` Linear (rows
``[Q | K | V]``) and, for SwiGLU, gate/up into one ``mlp.fc`` (rows
``[gate | up]``). Plain column-wise sharding cuts that row range into
contiguous pieces, so with TP=2 rank 0 would get all of Q plus half of K. The
plan here reorders the rows *before* sharding into "rank-major" order (rank
0's share of every segment, then rank 1's, ...), so each rank's shard is
``[Q_r | K_r | V_r]`` (``[gate_r | up_r]``), which is exactly what the
unmodified ``Attention.forward``/``MLP.forward`` split apart once the per-rank
head counts are set. State-dict hooks on those two Linears undo the reordering
when a state dict is taken and redo it when one is loaded, so checkpoints keep
lmlab's canonical layout whatever the TP degree (an export or a resume at
another TP degree sees ordinary weights). Adam moments of the fused
projections are saved in the rank-major layout of the run's TP degree, so a
``--ckpt_path`` resume must keep the TP degree (a weights-only restart with
``init_from`` may change it). Taking a state dict is then a collective
(it gathers the fused weights): every rank must take it, as Lightning and
``torch.distributed.checkpoint`` do.

The vocabulary matrices (token embedding, LM head) are sharded only by FSDP,
not by TP: the loss then needs no vocab-parallel cross-entropy and tied
embeddings keep working.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Optional, Sequence

import torch
from torch import nn

from lmlab.errors import ConfigError

TP_DIM = "tensor_parallel"
DP_DIM = "data_parallel"

_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
           "float32": torch.float32, "fp32": torch.float32}


# -- rank-major layout of fused projections --------------------------------------------
def rank_major_permutation(segments: Sequence[int], tp: int) -> torch.Tensor:
    """Row indices that put each rank's share of every segment next to each other.

    ``weight[perm]`` split into ``tp`` equal contiguous chunks gives rank r the
    rows ``[seg_0 share r | seg_1 share r | ...]``. Every segment must be
    divisible by ``tp``.
    """
    for size in segments:
        if size % tp:
            raise ValueError(f"segment of {size} rows is not divisible by the tensor-parallel degree {tp}")
    offsets = [0]
    for size in segments:
        offsets.append(offsets[-1] + size)
    pieces = []
    for r in range(tp):
        for off, size in zip(offsets, segments):
            share = size // tp
            pieces.append(torch.arange(off + r * share, off + (r + 1) * share))
    return torch.cat(pieces)


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _like(full: torch.Tensor, ref: torch.Tensor, placements=None) -> torch.Tensor:
    """``full`` laid out like ``ref`` (a DTensor on the same mesh, or a plain tensor)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(ref, DTensor):
        return distribute_tensor(full.to(ref.dtype), ref.device_mesh, placements or ref.placements)
    return full.to(ref.dtype)


def _save_canonical(inverse: torch.Tensor, module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    from torch.distributed.tensor import DTensor, Shard

    for name in ("weight", "bias"):
        key = prefix + name
        value = state_dict.get(key)
        if value is None:
            continue
        canon = _full(value).index_select(0, inverse.to(value.device))
        # sharded on dim 0 over every mesh dimension: each rank keeps 1/world of the canonical tensor
        placements = [Shard(0)] * value.device_mesh.ndim if isinstance(value, DTensor) else None
        state_dict[key] = _like(canon, value, placements)


def _load_rank_major(perm: torch.Tensor, module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    for name in ("weight", "bias"):
        key = prefix + name
        param = getattr(module, name, None)
        if key not in state_dict or param is None:
            continue
        full = _full(state_dict[key])
        state_dict[key] = _like(full.index_select(0, perm.to(full.device)), param)


def _fused_colwise(segments: Sequence[int]):
    from torch.distributed.tensor.parallel import ColwiseParallel

    class FusedColwiseParallel(ColwiseParallel):
        """Column-wise TP for a Linear whose output concatenates ``segments``."""

        def _partition_linear_fn(self, name, module, device_mesh):
            perm = rank_major_permutation(segments, device_mesh.size())
            with torch.no_grad():
                for pname, param in list(module.named_parameters(recurse=False)):
                    param.data = param.data.index_select(0, perm.to(param.device))
            super()._partition_linear_fn(name, module, device_mesh)
            module.register_state_dict_post_hook(partial(_save_canonical, torch.argsort(perm)))
            module.register_load_state_dict_pre_hook(partial(_load_rank_major, perm))
            # rows of the global (DTensor) weight are perm of the canonical rows: canonical = global[argsort(perm)]
            module._lmlab_row_perm = perm

    return FusedColwiseParallel()


def fused_row_permutations(model: nn.Module) -> dict:
    """``{parameter: perm}`` for the fused column-wise TP parameters, stored in rank-major row order."""
    out = {}
    for module in model.modules():
        perm = getattr(module, "_lmlab_row_perm", None)
        if perm is None:
            continue
        for name in ("weight", "bias"):
            param = getattr(module, name, None)
            if isinstance(param, nn.Parameter):
                out[param] = perm
    return out


def permute_optimizer_rows(optimizer: torch.optim.Optimizer, perms: dict, to_canonical: bool) -> None:
    """Reorder the row-shaped optimizer state (Adam moments) of the fused TP parameters.

    The state follows its parameter's rank-major rows, which depend on the TP
    degree. Checkpoints hold canonical rows (as the weights' state-dict hooks
    do), so a run resumed at another TP degree, or under plain FSDP2, pairs
    every moment with its own row. Collective (DTensor state): every rank calls
    it, in the same order.
    """
    for param, perm in perms.items():
        state = optimizer.state.get(param)
        if not state:
            continue
        index = torch.argsort(perm) if to_canonical else perm
        for key, value in list(state.items()):
            if torch.is_tensor(value) and value.dim() > 0 and tuple(value.shape) == tuple(param.shape):
                full = _full(value)
                state[key] = _like(full.index_select(0, index.to(full.device)), value)


# -- the plan ---------------------------------------------------------------------------
def check_tp_degree(config, tp: int) -> None:
    """Raise :class:`ConfigError` when ``tp`` cannot split the heads or the MLP evenly."""
    if tp < 1:
        raise ConfigError("trainer.strategy.tensor_parallel_size", f"must be >= 1, got {tp}")
    if tp > 1 and config.moe_experts:
        raise ConfigError("trainer.strategy.tensor_parallel_size", "tensor parallelism does not shard "
                          "mixture-of-experts layers", "use tensor_parallel_size=1 (FSDP2 shards the experts)")
    if config.n_heads % tp or config.kv_heads % tp:
        ok = [t for t in range(1, config.kv_heads + 1) if config.kv_heads % t == 0 and config.n_heads % t == 0]
        raise ConfigError(
            "trainer.strategy.tensor_parallel_size",
            f"TP degree {tp} does not divide n_heads={config.n_heads} and n_kv_heads={config.kv_heads}",
            f"use one of {ok}",
        )
    if tp > 1 and getattr(config, "attention", "full") == "linear":
        raise ConfigError("trainer.strategy.tensor_parallel_size", "tensor parallelism does not split the per-head "
                          "gate of linear attention", "use tensor_parallel_size: 1 (FSDP2 and DDP work)")
    if config.hidden_dim % tp:
        raise ConfigError(
            "trainer.strategy.tensor_parallel_size",
            f"TP degree {tp} does not divide the MLP width {config.hidden_dim}",
            "pick a TP degree dividing model.config.ffn_hidden",
        )


def _backbone(model: nn.Module) -> nn.Module:
    backbone = getattr(model, "backbone", model)
    if not hasattr(backbone, "blocks"):
        raise TypeError(f"{type(model).__name__} has no lmlab backbone (expected .backbone.blocks)")
    return backbone


def apply_tensor_parallel(model: nn.Module, tp_mesh) -> None:
    """Shard every block's attention and MLP over ``tp_mesh`` (1-D), in place."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel, parallelize_module

    backbone = _backbone(model)
    config = backbone.config
    tp = tp_mesh.size()
    check_tp_degree(config, tp)
    hd = config.head_dim
    for block in backbone.blocks:
        attn, mlp = block.attn, block.mlp
        plan = {
            "attn.qkv": _fused_colwise([attn.n_heads * hd, attn.kv_heads * hd, attn.kv_heads * hd]),
            "attn.proj": RowwiseParallel(),
            "mlp.fc": _fused_colwise([config.hidden_dim] * 2) if mlp.ffn_type == "swiglu" else ColwiseParallel(),
            "mlp.proj": RowwiseParallel(),
        }
        if attn.q_norm is not None:
            # per-head q/k norms see only this rank's heads: as replicated DTensors sharded along the head
            # dimension (dim 1 of (B, H, T, hd)) their weight gradients are summed over the TP group
            plan["attn.q_norm"] = SequenceParallel(sequence_dim=1, use_local_output=True)
            plan["attn.k_norm"] = SequenceParallel(sequence_dim=1, use_local_output=True)
        parallelize_module(block, tp_mesh, plan)
        # Attention.forward splits and reshapes by these counts: make them this rank's share.
        attn.n_heads //= tp
        attn.kv_heads //= tp


def apply_fsdp2(
    model: nn.Module,
    dp_mesh,
    param_dtype: Optional[torch.dtype] = None,
    reduce_dtype: Optional[torch.dtype] = torch.float32,
    reshard_after_forward: bool = True,
    cpu_offload: bool = False,
) -> None:
    """``fully_shard`` each block, then the root (embeddings, final norm, head), over ``dp_mesh``."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    kwargs: dict[str, Any] = {
        "mesh": dp_mesh,
        "mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype),
        "offload_policy": CPUOffloadPolicy() if cpu_offload else OffloadPolicy(),
    }
    blocks = list(_backbone(model).blocks)
    for i, block in enumerate(blocks):
        # the last block is resharded by the root right away: keeping it unsharded saves an all-gather
        fully_shard(block, reshard_after_forward=reshard_after_forward and i < len(blocks) - 1, **kwargs)
    fully_shard(model, reshard_after_forward=reshard_after_forward, **kwargs)


def parallelize(
    model: nn.Module,
    device_mesh,
    *,
    tp_dim: str = TP_DIM,
    dp_dim: str = DP_DIM,
    param_dtype: Optional[str | torch.dtype] = None,
    reduce_dtype: Optional[str | torch.dtype] = "float32",
    reshard_after_forward: bool = True,
    cpu_offload: bool = False,
    activation_checkpointing: Optional[bool] = None,
) -> nn.Module:
    """Apply TP then FSDP2 to an lmlab model (``CausalLM``/``ScalarModel``) in place.

    Args:
        model: A model with an lmlab ``backbone``.
        device_mesh: A 2-D mesh named (``dp_dim``, ``tp_dim``) as Lightning's
            ``ModelParallelStrategy`` builds it, or a 1-D mesh (taken as data
            parallel: FSDP2 only).
        param_dtype: FSDP2 compute dtype of the unsharded parameters
            (``"bfloat16"`` gives bf16 matmuls with fp32 sharded master
            weights); ``None`` keeps the parameter dtype.
        reduce_dtype: dtype of the gradient reduce-scatter.
        reshard_after_forward: Free the unsharded parameters after each
            block's forward (ZeRO-3); ``False`` keeps them to the backward
            (ZeRO-2-like, more memory, fewer all-gathers).
        cpu_offload: Keep sharded parameters, gradients and optimizer state on the CPU.
        activation_checkpointing: Recompute each block in the backward pass;
            ``None`` leaves the model config's setting.
    """
    names = tuple(device_mesh.mesh_dim_names or ())
    if device_mesh.ndim == 2:
        tp_mesh, dp_mesh = device_mesh[tp_dim], device_mesh[dp_dim]
    elif device_mesh.ndim == 1:
        tp_mesh = device_mesh if names == (tp_dim,) else None
        dp_mesh = None if names == (tp_dim,) else device_mesh
    else:
        raise ValueError(f"expected a 1-D or 2-D device mesh, got {device_mesh.ndim}-D")
    if tp_mesh is not None and tp_mesh.size() > 1:
        apply_tensor_parallel(model, tp_mesh)
    if activation_checkpointing is not None:
        _backbone(model).activation_checkpointing = bool(activation_checkpointing)
    if dp_mesh is not None:
        apply_fsdp2(
            model,
            dp_mesh,
            param_dtype=_DTYPES[param_dtype] if isinstance(param_dtype, str) else param_dtype,
            reduce_dtype=_DTYPES[reduce_dtype] if isinstance(reduce_dtype, str) else reduce_dtype,
            reshard_after_forward=reshard_after_forward,
            cpu_offload=cpu_offload,
        )
    model._lmlab_parallelized = True
    return model


def maybe_parallelize(module) -> bool:
    """Parallelize ``module.model`` when the trainer runs Lightning's ``ModelParallelStrategy``.

    Meant for ``LightningModule.configure_model``; returns whether it applied
    the plan. Idempotent (Lightning calls ``configure_model`` again for
    validate/test after fit). Options come from the strategy's
    ``parallelize_options`` (see :class:`lmlab.distributed.strategies.ModelParallel`).
    """
    from lightning.pytorch.strategies import ModelParallelStrategy

    trainer = getattr(module, "_trainer", None)
    if trainer is None or not isinstance(trainer.strategy, ModelParallelStrategy):
        return False
    model = module.model
    if getattr(model, "_lmlab_parallelized", False):
        return True
    options = dict(getattr(trainer.strategy, "parallelize_options", {}) or {})
    parallelize(model, module.device_mesh, **options)
    return True
