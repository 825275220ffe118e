"""The one configuration dataclass of the lmlab transformer backbone.

Every training stage (pretraining, SFT, reward modeling, PPO, DPO) builds its
network from a :class:`TransformerConfig`. Named presets span toy models with
tens of thousands of parameters up to GPT-3 175B; see :data:`PRESETS`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal, Optional

from lmlab.errors import ConfigError


@dataclass
class TransformerConfig:
    """Shape and options of the decoder-only transformer.

    Args:
        preset: Optional name from :data:`PRESETS`. The preset fills every field
            still at its default value, so ``preset: gpt2-small`` plus
            ``n_layers: 6`` gives GPT-2 small with six layers.
        vocab_size: Embedding rows. Padded up to a multiple of ``pad_vocab_to``
            so the LM-head matmul stays aligned; the tokenizer's vocabulary must
            not exceed it.
        d_model: Residual stream width.
        n_layers: Number of transformer blocks.
        n_heads: Query heads; ``d_model`` must be divisible by it.
        n_kv_heads: Key/value heads for grouped-query attention (GQA);
            ``None`` means ``n_heads`` (multi-head attention), 1 is multi-query.
        ffn_type: ``swiglu`` (LLaMA) or ``gelu`` (GPT-2).
        ffn_hidden: FFN inner width; ``None`` picks 4*d_model for GELU and
            the parameter-matched 8/3*d_model (rounded up to 64) for SwiGLU.
        norm_type: ``rmsnorm`` or ``layernorm``.
        norm_eps: Epsilon of the normalisation layers.
        bias: Biases in linear layers (GPT-2 style).
        position: ``rope`` (rotary, relative) or ``learned`` (absolute table).
        rope_theta: RoPE base frequency.
        tie_embeddings: Share the token embedding with the LM head.
        dropout: Dropout on attention weights and residual branches.
        qk_norm: Normalise queries and keys per head before attention
            (stabilises large learning rates).
        max_seq_len: Longest sequence the model accepts.
        cross_document_attention: When ``False``, packed sequences carry
            document ids and attention never crosses an end-of-document;
            positions restart at each document. ``True`` is the GPT/nanoGPT
            convention (cheaper: keeps the fused causal kernel).
        init_std: Standard deviation of weight init.
        scaled_residual_init: Divide the init std of each residual output
            projection by sqrt(2 * n_layers) (GPT-2 / Megatron depth scaling).
        activation_checkpointing: Recompute each block's activations in the
            backward pass instead of storing them.
        pad_vocab_to: Round ``vocab_size`` up to a multiple of this.
        attention: ``full`` (softmax over every earlier token), ``sliding_window``
            (each query sees itself and the ``sliding_window - 1`` tokens before
            it, Mistral's definition) or ``linear`` (chunked gated linear
            attention with a constant-size recurrent state); see
            :mod:`lmlab.models.attention`.
        sliding_window: Keys each query attends to with ``attention: sliding_window``.
        linear_chunk_size: Chunk length of the parallel form of ``attention: linear``.
        moe_experts: Routed experts per mixture-of-experts feed-forward; 0 keeps
            every block dense (see :mod:`lmlab.models.moe`).
        moe_top_k: Experts each token is sent to.
        moe_expert_hidden: SwiGLU width of one expert; ``None`` is ``hidden_dim``.
            Equal active parameters to a dense width H at top-k: H / k.
        moe_shared_experts: Always-active experts of the same width (one gated
            SwiGLU of the summed width, the Qwen2-MoE form).
        moe_every: Blocks with ``(layer + 1) % moe_every == 0`` use experts.
        moe_dense_layers: The first this many blocks stay dense.
        moe_capacity_factor: Training-time expert capacity as a multiple of the
            even share (``ceil(cf * tokens * k / E)``); overflow is dropped and
            counted. ``None`` routes dropless.
        moe_renormalize: Divide the top-k router weights by their sum (Mixtral;
            Qwen2-MoE ``norm_topk_prob``).
        moe_aux_loss_coef: Weight of the Switch/GShard load-balancing loss.
        moe_z_loss_coef: Weight of the router z-loss (ST-MoE).
    """

    preset: Optional[str] = None
    vocab_size: int = 32000
    d_model: int = 512
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: Optional[int] = None
    ffn_type: Literal["swiglu", "gelu"] = "swiglu"
    ffn_hidden: Optional[int] = None
    norm_type: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    norm_eps: float = 1e-5
    bias: bool = False
    position: Literal["rope", "learned"] = "rope"
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    dropout: float = 0.0
    qk_norm: bool = False
    max_seq_len: int = 2048
    cross_document_attention: bool = True
    init_std: float = 0.02
    scaled_residual_init: bool = True
    activation_checkpointing: bool = False
    pad_vocab_to: int = 64
    attention: Literal["full", "sliding_window", "linear"] = "full"
    sliding_window: Optional[int] = None
    linear_chunk_size: int = 64
    moe_experts: int = 0
    moe_top_k: int = 2
    moe_expert_hidden: Optional[int] = None
    moe_shared_experts: int = 0
    moe_every: int = 1
    moe_dense_layers: int = 0
    moe_capacity_factor: Optional[float] = None
    moe_renormalize: bool = True
    moe_aux_loss_coef: float = 0.01
    moe_z_loss_coef: float = 0.001

    def __post_init__(self) -> None:
        if self.preset is not None:
            if self.preset not in PRESETS:
                raise ConfigError(
                    "model.config.preset",
                    f"unknown preset {self.preset!r}",
                    f"choose one of {', '.join(sorted(PRESETS))}",
                )
            defaults = {f.name: f.default for f in dataclasses.fields(TransformerConfig)}
            for key, value in PRESETS[self.preset].items():
                if getattr(self, key) == defaults[key]:
                    setattr(self, key, value)
        self.validate()

    # -- derived sizes -----------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def padded_vocab_size(self) -> int:
        m = max(1, self.pad_vocab_to)
        return int(math.ceil(self.vocab_size / m) * m)

    @property
    def hidden_dim(self) -> int:
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        if self.ffn_type == "gelu":
            return 4 * self.d_model
        # SwiGLU has three matrices; 2/3 of 4*d keeps the parameter count of a 4*d GELU MLP.
        return int(math.ceil(8 * self.d_model / 3 / 64) * 64)

    @property
    def expert_hidden_dim(self) -> int:
        return self.moe_expert_hidden if self.moe_expert_hidden is not None else self.hidden_dim

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the field for an impossible shape."""
        prefix = "model.config"
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{prefix}.{name}", f"must be positive, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"{prefix}.n_heads",
                f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}",
                "pick n_heads dividing d_model",
            )
        if self.n_heads % self.kv_heads:
            raise ConfigError(
                f"{prefix}.n_kv_heads",
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.kv_heads}",
                "pick n_kv_heads dividing n_heads",
            )
        if self.position == "rope" and self.head_dim % 2:
            raise ConfigError(f"{prefix}.n_heads", f"RoPE needs an even head_dim, got {self.head_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{prefix}.dropout", f"must be in [0, 1), got {self.dropout}")
        self._validate_attention(prefix)
        if self.moe_experts:
            self._validate_moe(prefix)

    def _validate_attention(self, prefix: str) -> None:
        if self.attention not in ("full", "sliding_window", "linear"):
            raise ConfigError(f"{prefix}.attention", f"unknown attention {self.attention!r}",
                              "choose full, sliding_window or linear")
        if self.attention == "sliding_window":
            if self.sliding_window is None or self.sliding_window < 1:
                raise ConfigError(f"{prefix}.sliding_window", f"must be a positive int with attention=sliding_window, "
                                  f"got {self.sliding_window}", "set e.g. sliding_window: 256")
        elif self.sliding_window is not None:
            raise ConfigError(f"{prefix}.sliding_window", f"is set but attention={self.attention!r}",
                              "set attention: sliding_window or remove sliding_window")
        if self.linear_chunk_size < 1:
            raise ConfigError(f"{prefix}.linear_chunk_size", f"must be positive, got {self.linear_chunk_size}")

    def _validate_moe(self, prefix: str) -> None:
        if self.moe_experts < 0:
            raise ConfigError(f"{prefix}.moe_experts", f"must be >= 0, got {self.moe_experts}")
        if not 1 <= self.moe_top_k <= self.moe_experts:
            raise ConfigError(f"{prefix}.moe_top_k", f"must be in [1, moe_experts={self.moe_experts}], got {self.moe_top_k}")
        if self.ffn_type != "swiglu" or self.bias:
            raise ConfigError(f"{prefix}.moe_experts", "experts are bias-free SwiGLU networks",
                              "set ffn_type=swiglu and bias=false, or moe_experts=0")
        for name in ("moe_every", "expert_hidden_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{prefix}.{name.replace('expert_hidden_dim', 'moe_expert_hidden')}",
                                  f"must be >= 1, got {getattr(self, name)}")
        if self.moe_shared_experts < 0 or self.moe_dense_layers < 0:
            raise ConfigError(f"{prefix}.moe_shared_experts", "moe_shared_experts and moe_dense_layers must be >= 0")
        if self.moe_capacity_factor is not None and self.moe_capacity_factor <= 0:
            raise ConfigError(f"{prefix}.moe_capacity_factor", f"must be > 0, got {self.moe_capacity_factor}",
                              "or null for dropless routing")
        if self.moe_aux_loss_coef < 0 or self.moe_z_loss_coef < 0:
            raise ConfigError(f"{prefix}.moe_aux_loss_coef", "auxiliary loss coefficients must be >= 0")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TransformerConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError("model.config", f"unknown fields {sorted(unknown)}", "remove them or fix their spelling")
        return cls(**data)


def preset(name: str, **overrides) -> TransformerConfig:
    """A :class:`TransformerConfig` from :data:`PRESETS`, with field overrides."""
    return TransformerConfig(preset=name, **overrides)


_LLAMA = dict(ffn_type="swiglu", norm_type="rmsnorm", position="rope", bias=False)
_GPT = dict(ffn_type="gelu", norm_type="layernorm", position="learned", bias=True, tie_embeddings=True)

#: Named shapes. ``nano`` and ``micro`` are for tests and laptops; ``gpt2-*``
#: follow Radford et al. 2019; ``gpt3-*`` follow Brown et al. 2020 Table 2.1;
#: ``llama-*`` follow the LLaMA-2 family (GQA in the 70B).
PRESETS: dict[str, dict] = {
    "nano": dict(vocab_size=256, d_model=32, n_layers=2, n_heads=2, max_seq_len=128, **_LLAMA),
    "micro": dict(vocab_size=2048, d_model=64, n_layers=4, n_heads=4, max_seq_len=256, **_LLAMA),
    "tiny": dict(vocab_size=4096, d_model=128, n_layers=4, n_heads=4, max_seq_len=512, **_LLAMA),
    "small": dict(vocab_size=32000, d_model=384, n_layers=6, n_heads=6, max_seq_len=1024, **_LLAMA),
    "gpt2-small": dict(vocab_size=50257, d_model=768, n_layers=12, n_heads=12, max_seq_len=1024, **_GPT),
    "gpt2-medium": dict(vocab_size=50257, d_model=1024, n_layers=24, n_heads=16, max_seq_len=1024, **_GPT),
    "gpt2-large": dict(vocab_size=50257, d_model=1280, n_layers=36, n_heads=20, max_seq_len=1024, **_GPT),
    "gpt2-xl": dict(vocab_size=50257, d_model=1600, n_layers=48, n_heads=25, max_seq_len=1024, **_GPT),
    "gpt3-125m": dict(vocab_size=50257, d_model=768, n_layers=12, n_heads=12, max_seq_len=2048, **_GPT),
    "gpt3-1.3b": dict(vocab_size=50257, d_model=2048, n_layers=24, n_heads=16, max_seq_len=2048, **_GPT),
    "gpt3-6.7b": dict(vocab_size=50257, d_model=4096, n_layers=32, n_heads=32, max_seq_len=2048, **_GPT),
    "gpt3-175b": dict(vocab_size=50257, d_model=12288, n_layers=96, n_heads=96, max_seq_len=2048, **_GPT),
    "llama-7b": dict(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, ffn_hidden=11008, max_seq_len=4096, **_LLAMA),
    "llama-13b": dict(vocab_size=32000, d_model=5120, n_layers=40, n_heads=40, ffn_hidden=13824, max_seq_len=4096, **_LLAMA),
    "llama-70b": dict(
        vocab_size=32000, d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_hidden=28672, max_seq_len=4096, **_LLAMA
    ),
}
