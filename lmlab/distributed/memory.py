"""Bytes of a training step on one device: model states and activations of lmlab's backbone.

Model states (parameters, gradients, optimizer) follow Rajbhandari et al. 2020
(ZeRO): Adam holds two moments per parameter, and DeepSpeed's mixed precision
keeps bf16 weights and gradients plus an fp32 master copy (2 + 2 + 12 bytes per
parameter). Lightning's ``bf16-mixed`` is different: the fp32 parameters *are*
the master weights and autocast makes bf16 copies for the matmuls (4 + 4 + 8,
plus 2 bytes per matmul weight cached by autocast for the step).

Activations are the tensors autograd saves for the backward pass, enumerated
for lmlab's actual block (pre-norm, fused qkv, RoPE, SDPA, SwiGLU or GELU);
:func:`activation_terms` lists them by name so the closed form in
docs/distributed.md can be checked term by term. SDPA's fused kernels (flash,
memory-efficient, and CPU flash) keep the log-sum-exp, never the
``T x T`` attention matrix. For the common case (RMSNorm, RoPE, multi-head
attention, SwiGLU with hidden width f, no dropout, no TP) the bytes saved per
layer per token, with r the residual-stream bytes, c the compute bytes
(2 for bf16) and n the norm bytes, are::

    CUDA (fused RMSNorm):  2r d + 8c d + 4c f + 4(2 + n_heads)
    CPU (composite norm):  2r d + 8c d + 4c f + 4 n_heads + 2n (d + 1)

(the block input and the attention residual, saved by the two norms: 2r d;
norm outputs fed to qkv and fc: 2c d; q and k after RoPE: 2c d; the fused qkv
output, kept alive because v is a view of it: 3c d; the attention output, also
the proj input: c d; the SwiGLU fc output, silu(gate) and their product: 4c f;
RMSNorm and log-sum-exp statistics in fp32; the CPU's composite RMSNorm also
keeps x * rstd.) With TP the
attention and MLP terms divide by the TP degree, the norm and residual terms
do not (no sequence parallelism). With activation checkpointing each layer
keeps only its input (r d per token) and one layer is live again during its
recomputation.

Outside the blocks: the final norm and LM-head input, RoPE tables, token ids,
and the fp32 log-softmax over the padded vocabulary (4 V bytes per token);
the backward of the loss briefly needs two more fp32 vocabulary-sized buffers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lmlab.models.config import TransformerConfig
from lmlab.models.counting import count_params, moe_ffn_params
from lmlab.models.moe import moe_layers


def _final_norm(config: TransformerConfig) -> int:
    return 2 * config.d_model if config.norm_type == "layernorm" and config.bias else config.d_model

Device = Literal["cuda", "cpu"]


@dataclass(frozen=True)
class ActDtypes:
    """Bytes per element of the saved tensors.

    Args:
        residual: the residual stream (block inputs, attention residual).
        compute: matmul inputs and outputs (bf16 under autocast).
        norm: normalisation internals (autocast runs norms in fp32).
        rope: RoPE cos/sin tables (follow the residual dtype).
    """

    residual: int = 4
    compute: int = 4
    norm: int = 4
    rope: int = 4


def act_dtypes(precision: str, params_in_compute_dtype: bool = False) -> ActDtypes:
    """Activation byte widths for a Lightning precision string.

    ``params_in_compute_dtype``: the weights themselves are bf16/fp16 during
    compute (FSDP with a low-precision ``param_dtype``, DeepSpeed): the
    embedding output, hence the residual stream, is then 16-bit too.
    """
    p = str(precision)
    if p in ("32", "32-true", "fp32", "64", "64-true"):
        return ActDtypes(4, 4, 4, 4)
    if "true" in p:  # bf16-true / 16-true: everything in 16 bits
        return ActDtypes(2, 2, 2, 2)
    if params_in_compute_dtype:
        return ActDtypes(residual=2, compute=2, norm=4, rope=2)
    return ActDtypes(residual=4, compute=2, norm=4, rope=4)


@dataclass(frozen=True)
class Term:
    """One saved tensor (or family of tensors): bytes for micro-batch b and sequence s."""

    name: str
    bytes: float
    per_layer: bool
    tp_sharded: bool = False


def _norm_terms(config: TransformerConfig, n_tok: int, dims: int, dt: ActDtypes, device: Device, tag: str,
                input_bytes: int) -> list[Term]:
    terms = [Term(f"{tag} input", input_bytes * n_tok * dims, True)]
    if config.norm_type == "layernorm":
        terms.append(Term(f"{tag} mean+rstd", 2 * 4 * n_tok, True))
    elif device == "cuda":
        terms.append(Term(f"{tag} rstd", 4 * n_tok, True))
    else:
        # composite RMSNorm (CPU): keeps rstd and x * rstd in the norm dtype
        terms.append(Term(f"{tag} rstd", dt.norm * n_tok, True))
        terms.append(Term(f"{tag} normalized", dt.norm * n_tok * dims, True))
    return terms


def activation_terms(
    config: TransformerConfig,
    micro_batch: int,
    seq_len: int,
    dtypes: ActDtypes = ActDtypes(),
    device: Device = "cuda",
) -> list[Term]:
    """Every tensor saved for backward in one training forward, per layer or once."""
    b, s = micro_batch, seq_len
    n = b * s
    d, h, kv, hd = config.d_model, config.n_heads, config.kv_heads, config.head_dim
    f = config.hidden_dim
    r, c = dtypes.residual, dtypes.compute
    gqa = kv != h
    rope = config.position == "rope"
    qk = config.qk_norm
    terms: list[Term] = []

    # -- one block -------------------------------------------------------------------
    terms += _norm_terms(config, n, d, dtypes, device, "attn norm", r)
    terms.append(Term("qkv input", c * n * d, True))
    # autocast runs the q/k norms in fp32 on a copy, so the norm keeps that copy, not a view of qkv
    qk_cast = qk and dtypes.norm != dtypes.compute
    if qk:
        for name, heads in (("q", h), ("k", kv)):
            if qk_cast:
                terms.append(Term(f"{name}-norm input copy", dtypes.norm * n * heads * hd, True, True))
            if device == "cuda" and config.norm_type == "rmsnorm":
                terms.append(Term(f"{name}-norm rstd", 4 * n * heads, True, True))
            else:
                terms.append(Term(f"{name}-norm rstd", dtypes.norm * n * heads, True, True))
                terms.append(Term(f"{name}-norm normalized", dtypes.norm * n * heads * hd, True, True))
    new_q = rope or qk  # q is a fresh tensor, not a view of the qkv output
    keeps_qkv = (not gqa) or (qk and not qk_cast) or not new_q  # a view of the fused output is saved
    if keeps_qkv:
        terms.append(Term("qkv output (viewed by v)", c * n * (h + 2 * kv) * hd, True, True))
    if new_q:
        terms.append(Term("q", c * n * h * hd, True, True))
    if gqa:
        terms.append(Term("k, v repeated to n_heads", 2 * c * n * h * hd, True, True))
    elif new_q:
        terms.append(Term("k", c * n * kv * hd, True, True))
    terms.append(Term("attention log-sum-exp", 4 * n * h, True, True))
    terms.append(Term("attention output", c * n * h * hd, True, True))
    if qk and device == "cpu":
        # the CPU kernel returns heads-major output after qk-norm, so the reshape for proj copies
        terms.append(Term("proj input copy", c * n * h * hd, True, True))
    if config.attention != "full":
        terms = _variant_attention_terms(terms, config, b, s, dtypes)
    if config.dropout > 0:
        terms.append(Term("residual dropout masks", 2 * n * d, True))
    terms += _norm_terms(config, n, d, dtypes, device, "mlp norm", r)
    n_moe = len(moe_layers(config))
    if n_moe:
        # expert blocks differ from dense ones; per-layer terms are their mean over the blocks
        share = n_moe / config.n_layers
        k, he, E = config.moe_top_k, config.expert_hidden_dim, config.moe_experts
        hs = config.moe_shared_experts * he
        moe_terms = [("router input", c * n * d), ("router probabilities (fp32)", 4 * n * E),
                     ("tokens gathered by expert", c * k * n * d), ("expert gate|up output", c * k * n * 2 * he),
                     ("expert silu(gate), silu(gate)*up", 2 * c * k * n * he),
                     ("expert outputs by slot", c * k * n * d)]
        if hs:
            moe_terms += [("shared expert gate|up, silu, product", 4 * c * n * hs), ("shared expert gate", 4 * c * n)]
        terms += [Term(f"{name} (x{share:.2f} of blocks)", share * b_, True) for name, b_ in moe_terms]
        f_dense = 1.0 - share
    else:
        f_dense = 1.0
    terms.append(Term("fc input", c * n * d * f_dense, True))
    f = f * f_dense  # dense blocks only
    if config.ffn_type == "swiglu":
        terms.append(Term("fc output (gate|up)", c * n * 2 * f, True, True))
        terms.append(Term("silu(gate)", c * n * f, True, True))
        terms.append(Term("silu(gate)*up", c * n * f, True, True))
    else:
        terms.append(Term("fc output", c * n * f, True, True))
        terms.append(Term("gelu output", c * n * f, True, True))

    # -- once per forward ------------------------------------------------------------
    V = config.padded_vocab_size
    terms.append(Term("token ids", 8 * b * (s + 1), False))
    if rope:
        terms.append(Term("rope cos+sin", 2 * dtypes.rope * n * hd, False))
    else:
        terms.append(Term("position ids", 8 * s, False))
    if config.dropout > 0:
        terms.append(Term("embedding dropout mask", n * d, False))
    terms += [Term(t.name.replace("mlp norm", "final norm"), t.bytes, False) for t in
              _norm_terms(config, n, d, dtypes, device, "mlp norm", r)]
    terms.append(Term("lm-head input", c * n * d, False))
    terms.append(Term("log-softmax (fp32, padded vocab)", 4 * n * V, False))
    terms.append(Term("targets", 8 * n + 4, False))
    return terms


# what full attention saves between the qkv projection and the output projection
_FULL_ATTENTION_TERMS = {"qkv output (viewed by v)", "q", "k", "k, v repeated to n_heads", "attention log-sum-exp",
                         "attention output", "proj input copy"}


def _variant_attention_terms(terms: list[Term], config: TransformerConfig, b: int, s: int, dt: ActDtypes) -> list[Term]:
    """Swap full attention's saved tensors for those of a sliding-window (block-local) or linear layer.

    Sliding window with s <= W runs the plain causal kernel, so nothing changes. Longer
    sequences pad to whole blocks of W and save the folded queries, the keys and values of
    each block with its predecessor (2x), the additive window mask (2W per query) and the
    kernel's output and log-sum-exp. Linear attention computes in fp32: eight q/k/v-sized
    matmul operands, three chunk x chunk tensors per query (decay, q.k, their product), two
    copies of the per-chunk states (head_dim^2 per head per chunk), and the output RMSNorm.
    """
    h, hd, c = config.n_heads, config.head_dim, dt.compute
    n = b * s
    if config.attention == "sliding_window":
        W = config.sliding_window
        if s <= W:
            return terms
        npad = b * (-(-s // W)) * W
        new = [Term("window q blocks", c * npad * h * hd, True, True),
               Term("window k, v blocks (previous + own)", 4 * c * npad * h * hd, True, True),
               Term("window mask (additive)", c * npad * 2 * W, True, False),
               Term("attention log-sum-exp", 4 * npad * h, True, True),
               Term("attention output", c * npad * h * hd, True, True)]
        if npad != n:  # the padded output is sliced, so the proj input is a copy
            new.append(Term("proj input copy", c * n * h * hd, True, True))
    else:
        C = min(config.linear_chunk_size, s)
        npad = b * (-(-s // C)) * C
        new = [Term("linear q, k, v operands (fp32)", 8 * 4 * npad * h * hd, True, True),
               Term("linear chunk decay, q.k and product (fp32)", 3 * 4 * npad * h * C, True, True),
               Term("linear chunk states (two copies)", 2 * 4 * (npad // C) * h * hd * hd, True, True),
               Term("linear gates, decays, masks", (c + 4 * 7 + 2) * npad * h + 4 * npad * h // C, True, True),
               Term("linear output, its norm and proj input", (2 * c + dt.norm) * n * h * hd + 4 * n * h, True, True)]
    return [t for t in terms if t.name not in _FULL_ATTENTION_TERMS] + new


@dataclass(frozen=True)
class Activations:
    """Saved-activation bytes for one micro-batch on one device."""

    per_layer: float  # one block, already divided by the TP degree where sharded
    once: float
    n_layers: int
    checkpointed: bool
    checkpoint_input: float  # what a checkpointed layer keeps (its input)
    loss_transient: float  # extra live bytes at the peak of the loss backward

    @property
    def saved(self) -> float:
        """Bytes saved for backward at the end of the forward pass."""
        if self.checkpointed:
            return self.n_layers * self.checkpoint_input + self.once
        return self.n_layers * self.per_layer + self.once

    @property
    def peak(self) -> float:
        """Live activation bytes at the worst moment of the backward pass."""
        recompute = self.per_layer if self.checkpointed else 0.0
        return self.saved + max(self.loss_transient, recompute)


def activations(
    config: TransformerConfig,
    micro_batch: int,
    seq_len: int,
    dtypes: ActDtypes = ActDtypes(),
    device: Device = "cuda",
    tp: int = 1,
    checkpointing: bool = False,
) -> Activations:
    """Saved activations per device for the given shape, precision and TP degree."""
    terms = activation_terms(config, micro_batch, seq_len, dtypes, device)
    per_layer = sum(t.bytes / (tp if t.tp_sharded else 1) for t in terms if t.per_layer)
    once = sum(t.bytes for t in terms if not t.per_layer)
    n = micro_batch * seq_len
    # loss backward: grad of the log-probs and of the logits, both fp32 over the padded vocabulary
    loss_transient = 2 * 4 * n * config.padded_vocab_size
    return Activations(
        per_layer=per_layer,
        once=once,
        n_layers=config.n_layers,
        checkpointed=checkpointing,
        checkpoint_input=dtypes.residual * n * config.d_model,
        loss_transient=loss_transient,
    )


# -- parameters -------------------------------------------------------------------------
@dataclass(frozen=True)
class ParamSplit:
    """Parameter counts of the built model, split by how tensor parallelism treats them."""

    total: int  # unique parameters
    tp_sharded: int  # qkv, attention proj, fc, mlp proj weights (+ qkv/fc biases)
    block: int  # one block
    root: int  # embeddings, final norm, LM head: FSDP's root unit
    matmul_weights: int  # Linear weights (what autocast casts)
    n_tensors: int  # parameter tensors (AdamW keeps a step counter per tensor)


def param_split(config: TransformerConfig) -> ParamSplit:
    """Exact counts for :class:`~lmlab.models.heads.CausalLM` (see :func:`count_params`)."""
    pc = count_params(config)
    d, hd, h, kv, f = config.d_model, config.head_dim, config.n_heads, config.kv_heads, config.hidden_dim
    bias = int(config.bias)
    qkv_out = (h + 2 * kv) * hd
    fc_out = 2 * f if config.ffn_type == "swiglu" else f
    matmul_block = d * qkv_out + h * hd * d + d * fc_out + f * d
    tp_block = matmul_block + bias * (qkv_out + fc_out)  # row-parallel biases stay replicated
    V = config.padded_vocab_size
    head = V * d
    layer_norm_bias = config.norm_type == "layernorm" and config.bias
    per_norm = 2 if layer_norm_bias else 1
    block_tensors = 4 + 4 * bias + 2 * per_norm + (2 if config.qk_norm else 0)
    gate = 0
    if config.attention == "linear":  # the gate's weight and bias and the output norm
        block_tensors += 3
        gate = config.n_layers * d * h
    root_tensors = 1 + (1 if config.position == "learned" else 0) + per_norm + (0 if config.tie_embeddings else 1)
    n_moe = len(moe_layers(config))
    if n_moe:
        # expert weights and their optimizer states: every expert is held, not only the active ones
        moe_all, _ = moe_ffn_params(config)
        dense_mlp = d * fc_out + f * d
        expert_block = pc.per_block - dense_mlp + moe_all
        matmul_block_moe = matmul_block - dense_mlp + moe_all
        extra_tensors = 3 + (3 if config.moe_shared_experts else 0) - 2
        return ParamSplit(
            total=pc.total, tp_sharded=0, block=expert_block if n_moe == config.n_layers else max(pc.per_block, expert_block), root=pc.total - pc.non_embedding
            + _final_norm(config), matmul_weights=(config.n_layers - n_moe) * matmul_block + n_moe * matmul_block_moe
            + head, n_tensors=config.n_layers * block_tensors + n_moe * extra_tensors + root_tensors,
        )
    return ParamSplit(
        total=pc.total,
        tp_sharded=config.n_layers * tp_block,
        block=pc.per_block,
        root=pc.total - config.n_layers * pc.per_block,
        matmul_weights=config.n_layers * matmul_block + head + gate,
        n_tensors=config.n_layers * block_tensors + root_tensors,
    )


@dataclass(frozen=True)
class StateBytes:
    """Bytes per parameter of the model states, by who holds them."""

    weights: int  # the parameters as stored
    grads: int
    optimizer: int  # Adam moments (+ fp32 master copy when weights are 16-bit)
    compute_weights: int  # dtype the matmuls read the weights in


def state_bytes(precision: str, deepspeed: bool = False) -> StateBytes:
    """Model-state bytes per parameter for AdamW under ``precision``."""
    p = str(precision)
    low = "16" in p and p not in ("32", "32-true")
    if not low:
        # DeepSpeed's ZeRO optimizers keep their own fp32 master partition even when the module
        # is fp32 (a clone, not the parameters), hence 12 optimizer bytes as in mixed precision.
        # (ZeRO-3 means to reuse fp32 partitions, but its check compares a torch.device with a
        # string, never equal in recent torch, so it clones too; measured in
        # tests/test_state_probe_sharded.py)
        return StateBytes(4, 4, 12 if deepspeed else 8, 4)
    if "true" in p:
        # pure bf16/fp16: weights, grads and Adam moments all 16-bit, no master copy
        return StateBytes(2, 2, 4, 2)
    if deepspeed:
        # ZeRO's mixed precision: 16-bit weights and grads, fp32 master + moments
        return StateBytes(2, 2, 12, 2)
    return StateBytes(4, 4, 8, 2)
