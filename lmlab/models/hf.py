"""Conversion between lmlab's :class:`CausalLM` and transformers' ``LlamaForCausalLM`` / ``GPT2LMHeadModel``.

Two architectures map exactly onto a transformers class:

* LLaMA-style (``rmsnorm`` + ``rope`` + ``swiglu``, any GQA, biases via
  ``attention_bias``/``mlp_bias``) -> ``LlamaForCausalLM``. lmlab fuses the
  attention input projections into one ``qkv`` matrix (rows ``[q; k; v]``) and
  the SwiGLU gate and up projections into one ``fc`` matrix (rows
  ``[gate; up]``); they are split row-wise. The rotary embedding already uses
  the rotate-half layout of transformers' LLaMA, so no permutation is needed.
* GPT-2-style (``layernorm`` + ``learned`` positions + ``gelu``, no GQA) ->
  ``GPT2LMHeadModel``, whose ``Conv1D`` layers store weights transposed
  (``in x out``). GPT-2 always has biases; a bias-free lmlab model exports
  with zero biases, which computes the same function.

Only the real ``vocab_size`` rows of the (padded) embedding and LM head are
exported, so transformers' logits equal lmlab's ``logits[..., :vocab_size]``
and ``generate`` can never pick a padding row. Importing pads them back with
zero rows (or, for a checkpoint without ``lmlab_config.json``, picks
``pad_vocab_to`` so that no padding is needed and training losses match).

Weights are read from safetensors (or ``pytorch_model.bin`` with
``weights_only=True``); nothing is unpickled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import torch

from lmlab.errors import ConfigError
from lmlab.models.config import TransformerConfig
from lmlab.models.heads import CausalLM

HF_CONFIG = "config.json"
LMLAB_CONFIG = "lmlab_config.json"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
SUPPORTED_MODEL_TYPES = ("llama", "gpt2", "mistral", "mixtral", "qwen2_moe")

_LLAMA_NEEDS = {"norm_type": "rmsnorm", "position": "rope", "ffn_type": "swiglu", "qk_norm": False}
_GPT2_NEEDS = {"norm_type": "layernorm", "position": "learned", "ffn_type": "gelu", "qk_norm": False}


# --- which transformers class ----------------------------------------------------------------


def hf_architecture(config: TransformerConfig, field: str = "model.config") -> str:
    """``"llama"`` or ``"gpt2"``: the transformers architecture computing exactly this model.

    Raises :class:`ConfigError` listing the fields that rule out each one. Sliding-window
    attention maps to ``"mistral"`` (the LLaMA block with Mistral's window mask).
    """
    if config.attention != "full":
        return _variant_architecture(config, field)
    llama_off = [f"{k}={getattr(config, k)!r} (needs {v!r})" for k, v in _LLAMA_NEEDS.items() if getattr(config, k) != v]
    if config.moe_experts:
        return moe_architecture(config, llama_off, field)
    if not llama_off:
        return "llama"
    gpt2_off = [f"{k}={getattr(config, k)!r} (needs {v!r})" for k, v in _GPT2_NEEDS.items() if getattr(config, k) != v]
    if config.kv_heads != config.n_heads:
        gpt2_off.append(f"n_kv_heads={config.n_kv_heads} (GPT-2 has no grouped-query attention)")
    if not gpt2_off:
        return "gpt2"
    raise ConfigError(
        field,
        "this architecture has no exact transformers equivalent: "
        f"LlamaForCausalLM is ruled out by {', '.join(llama_off)}; GPT2LMHeadModel by {', '.join(gpt2_off)}",
        "export a model with norm_type=rmsnorm, position=rope, ffn_type=swiglu, qk_norm=false (LLaMA) "
        "or norm_type=layernorm, position=learned, ffn_type=gelu, no GQA (GPT-2)",
    )


def _variant_architecture(config: TransformerConfig, field: str) -> str:
    if config.attention == "linear":
        raise ConfigError(field, "linear attention has no transformers class", "export it with --format lmlab")
    if config.moe_experts:
        raise ConfigError(field, "sliding-window attention with experts has no exported transformers class",
                          "export it with --format lmlab")
    off = [f"{k}={getattr(config, k)!r} (needs {v!r})" for k, v in _LLAMA_NEEDS.items() if getattr(config, k) != v]
    if config.bias:
        off.append("bias=True (Mistral has no biases)")
    if off:
        raise ConfigError(field, f"a sliding-window model exports to MistralForCausalLM, ruled out by {', '.join(off)}",
                          "export with --format lmlab, or train with norm_type=rmsnorm, position=rope, "
                          "ffn_type=swiglu, qk_norm=false, bias=false")
    return "mistral"


def moe_architecture(config: TransformerConfig, llama_off: list[str], field: str = "model.config") -> str:
    """``"mixtral"`` (no shared experts, experts in every block, renormalised top-k) or ``"qwen2_moe"``
    (shared experts; any placement of expert blocks); :class:`ConfigError` in one line otherwise."""
    if llama_off:
        raise ConfigError(field, f"mixture-of-experts export needs a LLaMA-style backbone; ruled out by "
                          f"{', '.join(llama_off)}", "use norm_type=rmsnorm, position=rope, qk_norm=false")
    if config.moe_shared_experts:
        return "qwen2_moe"
    every_block = config.moe_every == 1 and config.moe_dense_layers == 0
    if every_block and config.moe_renormalize:
        return "mixtral"
    why = "dense blocks between expert blocks" if not every_block else "moe_renormalize=false"
    raise ConfigError(field, f"no transformers class computes experts without shared experts and with {why} "
                      "(MixtralForCausalLM needs experts in every block and renormalised top-k weights)",
                      "use moe_every=1, moe_dense_layers=0, moe_renormalize=true, or add moe_shared_experts "
                      "(Qwen2MoeForCausalLM)")


# --- configs -----------------------------------------------------------------------------------


def to_hf_config(
    config: TransformerConfig,
    *,
    bos_token_id: Optional[int] = None,
    eos_token_id: Optional[int] = None,
    pad_token_id: Optional[int] = None,
    dtype: Optional[torch.dtype] = None,
):
    """A transformers config (``LlamaConfig`` or ``GPT2Config``) for ``config``, with the real vocab size."""
    arch = hf_architecture(config)
    ids = dict(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    if arch in ("mixtral", "qwen2_moe"):
        hf = _moe_hf_config(config, arch, ids)
    elif arch == "mistral":
        hf = _mistral_config(config, ids)
    elif arch == "llama":
        from transformers import LlamaConfig

        hf = LlamaConfig(**_llama_fields(config), attention_bias=config.bias, mlp_bias=config.bias, **ids)
        hf.architectures = ["LlamaForCausalLM"]
    else:
        from transformers import GPT2Config

        hf = GPT2Config(
            vocab_size=config.vocab_size,
            n_positions=config.max_seq_len,
            n_embd=config.d_model,
            n_layer=config.n_layers,
            n_head=config.n_heads,
            n_inner=config.hidden_dim,
            activation_function="gelu_new",  # the tanh approximation lmlab uses
            resid_pdrop=config.dropout,
            embd_pdrop=config.dropout,
            attn_pdrop=config.dropout,
            layer_norm_epsilon=config.norm_eps,
            initializer_range=config.init_std,
            tie_word_embeddings=config.tie_embeddings,
            scale_attn_weights=True,
            scale_attn_by_inverse_layer_idx=False,
            reorder_and_upcast_attn=False,
            **ids,
        )
        hf.architectures = ["GPT2LMHeadModel"]
    if dtype is not None:
        import transformers

        # transformers >= 5 names it dtype; older versions torch_dtype
        setattr(hf, "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype", dtype)
    return hf


def _llama_fields(config: TransformerConfig) -> dict:
    """The config fields LLaMA-family classes (Llama, Mistral) share, from lmlab's config."""
    return dict(
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        intermediate_size=config.hidden_dim,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.kv_heads,
        head_dim=config.head_dim,
        hidden_act="silu",
        max_position_embeddings=config.max_seq_len,
        rms_norm_eps=config.norm_eps,
        rope_theta=config.rope_theta,
        attention_dropout=config.dropout,
        tie_word_embeddings=config.tie_embeddings,
        initializer_range=config.init_std,
    )


def _mistral_config(config: TransformerConfig, ids: dict):
    from transformers import MistralConfig

    hf = MistralConfig(**_llama_fields(config), sliding_window=config.sliding_window, **ids)
    hf.architectures = ["MistralForCausalLM"]
    return hf


def _moe_hf_config(config: TransformerConfig, arch: str, ids: dict):
    common = dict(
        vocab_size=config.vocab_size, hidden_size=config.d_model, num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads, num_key_value_heads=config.kv_heads, hidden_act="silu",
        max_position_embeddings=config.max_seq_len, rms_norm_eps=config.norm_eps, rope_theta=config.rope_theta,
        attention_dropout=config.dropout, tie_word_embeddings=config.tie_embeddings,
        initializer_range=config.init_std, num_experts_per_tok=config.moe_top_k,
        router_aux_loss_coef=config.moe_aux_loss_coef, **ids,
    )
    if arch == "mixtral":
        from transformers import MixtralConfig

        hf = MixtralConfig(intermediate_size=config.expert_hidden_dim, num_local_experts=config.moe_experts,
                           head_dim=config.head_dim, sliding_window=None, router_jitter_noise=0.0, **common)
        hf.architectures = ["MixtralForCausalLM"]
        return hf
    from transformers import Qwen2MoeConfig

    from lmlab.models.moe import is_moe_layer

    hf = Qwen2MoeConfig(
        intermediate_size=config.hidden_dim, moe_intermediate_size=config.expert_hidden_dim,
        shared_expert_intermediate_size=config.moe_shared_experts * config.expert_hidden_dim,
        num_experts=config.moe_experts, norm_topk_prob=config.moe_renormalize, decoder_sparse_step=1,
        mlp_only_layers=[i for i in range(config.n_layers) if not is_moe_layer(config, i)],
        qkv_bias=False, use_sliding_window=False, **common,
    )
    hf.architectures = ["Qwen2MoeForCausalLM"]
    return hf


def _rope_theta(hf: dict) -> float:
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    for p in (params, scaling):
        kind = p.get("rope_type", p.get("type", "default"))
        if kind not in (None, "default"):
            raise ConfigError(
                "rope_scaling", f"RoPE type {kind!r} is not supported by lmlab", "use a model with plain RoPE"
            )
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def from_hf_config(hf: dict, pad_vocab_to: Optional[int] = None) -> TransformerConfig:
    """The :class:`TransformerConfig` of a transformers ``config.json`` (LLaMA or GPT-2).

    ``pad_vocab_to`` defaults to 64 when the vocabulary is a multiple of 64 and
    to 1 otherwise, so the imported model needs no padding rows.
    """
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            "config.json", f"model_type {model_type!r} is not supported",
            f"lmlab imports {', '.join(SUPPORTED_MODEL_TYPES)} checkpoints",
        )
    vocab = int(hf["vocab_size"])
    pad = pad_vocab_to if pad_vocab_to is not None else (64 if vocab % 64 == 0 else 1)
    if model_type in ("mixtral", "qwen2_moe"):
        base = from_hf_config({**hf, "model_type": "llama", "mlp_bias": bool(hf.get("qkv_bias", False)),
                               "attention_bias": bool(hf.get("qkv_bias", False))}, pad)
        return TransformerConfig.from_dict({**base.to_dict(), **_moe_fields(hf, base.n_layers)})
    if model_type in ("llama", "mistral"):
        d, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        head_dim = hf.get("head_dim") or d // heads
        if head_dim * heads != d:
            raise ConfigError("config.json.head_dim", f"{head_dim} x {heads} heads != hidden_size {d}",
                              "lmlab needs head_dim = hidden_size / num_attention_heads")
        if hf.get("hidden_act", "silu") != "silu":
            raise ConfigError("config.json.hidden_act", f"{hf['hidden_act']!r} is not supported", "lmlab's SwiGLU uses silu")
        if bool(hf.get("attention_bias", False)) != bool(hf.get("mlp_bias", False)):
            raise ConfigError("config.json.attention_bias", "attention_bias and mlp_bias differ",
                              "lmlab's bias switch covers both")
        kv = int(hf.get("num_key_value_heads") or heads)
        return TransformerConfig(
            vocab_size=vocab, d_model=d, n_layers=int(hf["num_hidden_layers"]), n_heads=heads,
            n_kv_heads=None if kv == heads else kv, ffn_type="swiglu", ffn_hidden=int(hf["intermediate_size"]),
            norm_type="rmsnorm", norm_eps=float(hf.get("rms_norm_eps", 1e-6)), bias=bool(hf.get("attention_bias", False)),
            position="rope", rope_theta=_rope_theta(hf), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_seq_len=int(hf.get("max_position_embeddings", 2048)), pad_vocab_to=pad,
            init_std=float(hf.get("initializer_range", 0.02)), **_window_fields(hf),
        )
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ConfigError("config.json.activation_function", f"{hf['activation_function']!r} is not supported",
                          "lmlab's GELU is the tanh approximation (gelu_new)")
    if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
        raise ConfigError("config.json.scale_attn_weights", "non-standard attention scaling is not supported",
                          "lmlab scales attention by 1/sqrt(head_dim)")
    d = int(hf.get("n_embd", 768))
    return TransformerConfig(
        vocab_size=vocab, d_model=d, n_layers=int(hf.get("n_layer", 12)), n_heads=int(hf.get("n_head", 12)),
        ffn_type="gelu", ffn_hidden=int(hf.get("n_inner") or 4 * d), norm_type="layernorm",
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)), bias=True, position="learned",
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)), max_seq_len=int(hf.get("n_positions", 1024)),
        pad_vocab_to=pad, init_std=float(hf.get("initializer_range", 0.02)),
    )


def _window_fields(hf: dict) -> dict:
    # a Mistral without a window (sliding_window: null) is a LLaMA
    window = hf.get("sliding_window") if hf.get("model_type") == "mistral" else None
    return dict(attention="sliding_window", sliding_window=int(window)) if window else {}


def _moe_fields(hf: dict, n_layers: int) -> dict:
    """lmlab ``moe_*`` fields of a Mixtral or Qwen2-MoE ``config.json``."""
    if hf["model_type"] == "mixtral":
        if float(hf.get("router_jitter_noise") or 0.0) or hf.get("sliding_window"):
            raise ConfigError("config.json.sliding_window", "router jitter and sliding windows are not supported",
                              "import a Mixtral without them")
        h = int(hf["intermediate_size"])
        return dict(moe_experts=int(hf["num_local_experts"]), moe_top_k=int(hf["num_experts_per_tok"]),
                    moe_expert_hidden=h, ffn_hidden=h, moe_renormalize=True)
    if hf.get("qkv_bias", True) or hf.get("use_sliding_window"):
        raise ConfigError("config.json.qkv_bias", "attention biases and sliding windows are not supported",
                          "import a Qwen2-MoE with qkv_bias=false")
    h, shared = int(hf["moe_intermediate_size"]), int(hf.get("shared_expert_intermediate_size") or 0)
    step = int(hf.get("decoder_sparse_step", 1))
    dense = sorted(set(hf.get("mlp_only_layers") or []) | {i for i in range(n_layers) if (i + 1) % step})
    n_first = next((i for i in range(n_layers) if i not in dense), n_layers)
    if not shared or shared % h or any(i >= n_first and (i + 1) % step == 0 for i in dense):
        raise ConfigError("config.json.mlp_only_layers", "lmlab needs shared experts of a multiple of the expert width "
                          "and dense blocks that are the first ones or every decoder_sparse_step-th",
                          "import a checkpoint of that layout")
    return dict(moe_experts=int(hf["num_experts"]), moe_top_k=int(hf["num_experts_per_tok"]), moe_expert_hidden=h,
                moe_shared_experts=shared // h, moe_every=step, moe_dense_layers=n_first,
                moe_renormalize=bool(hf.get("norm_topk_prob", False)), ffn_hidden=int(hf["intermediate_size"]))


# --- state dicts -------------------------------------------------------------------------------


def to_hf_state(config: TransformerConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers tensor names and layouts for an lmlab ``CausalLM`` state dict (real vocab rows only)."""
    arch = hf_architecture(config)
    V = config.vocab_size
    out: dict[str, torch.Tensor] = {}

    def get(name: str) -> torch.Tensor:
        if name not in state:
            raise ConfigError("--ckpt", f"checkpoint lacks tensor {name!r}", "export a CausalLM checkpoint of this config")
        return state[name]

    q_rows, kv_rows = config.n_heads * config.head_dim, config.kv_heads * config.head_dim
    if arch in ("llama", "mistral", "mixtral", "qwen2_moe"):
        from lmlab.models.moe import is_moe_layer

        out["model.embed_tokens.weight"] = get("backbone.tok_emb.weight")[:V]
        for i in range(config.n_layers):
            src, dst = f"backbone.blocks.{i}.", f"model.layers.{i}."
            out[dst + "input_layernorm.weight"] = get(src + "norm1.weight")
            out[dst + "post_attention_layernorm.weight"] = get(src + "norm2.weight")
            for kind in ("weight", "bias") if config.bias else ("weight",):
                q, k, v = get(src + f"attn.qkv.{kind}").split([q_rows, kv_rows, kv_rows], dim=0)
                out[dst + f"self_attn.q_proj.{kind}"] = q
                out[dst + f"self_attn.k_proj.{kind}"] = k
                out[dst + f"self_attn.v_proj.{kind}"] = v
                out[dst + f"self_attn.o_proj.{kind}"] = get(src + f"attn.proj.{kind}")
                if is_moe_layer(config, i):
                    out.update(_experts_to_hf(config, get, src + "mlp.", dst, arch))
                    continue
                gate, up = get(src + f"mlp.fc.{kind}").chunk(2, dim=0)
                out[dst + f"mlp.gate_proj.{kind}"] = gate
                out[dst + f"mlp.up_proj.{kind}"] = up
                out[dst + f"mlp.down_proj.{kind}"] = get(src + f"mlp.proj.{kind}")
        out["model.norm.weight"] = get("backbone.norm.weight")
        if not config.tie_embeddings:
            out["lm_head.weight"] = get("lm_head.weight")[:V]
    else:
        def bias_or_zeros(name: str, n: int, like: torch.Tensor) -> torch.Tensor:
            return state[name] if name in state else torch.zeros(n, dtype=like.dtype)

        out["transformer.wte.weight"] = get("backbone.tok_emb.weight")[:V]
        out["transformer.wpe.weight"] = get("backbone.pos_emb.weight")
        for i in range(config.n_layers):
            src, dst = f"backbone.blocks.{i}.", f"transformer.h.{i}."
            for s, d in (("norm1", "ln_1"), ("norm2", "ln_2")):
                w = get(src + f"{s}.weight")
                out[dst + f"{d}.weight"] = w
                out[dst + f"{d}.bias"] = bias_or_zeros(src + f"{s}.bias", w.shape[0], w)
            for s, d in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"), ("mlp.fc", "mlp.c_fc"),
                         ("mlp.proj", "mlp.c_proj")):
                w = get(src + f"{s}.weight")
                out[dst + f"{d}.weight"] = w.t()  # Conv1D stores (in, out)
                out[dst + f"{d}.bias"] = bias_or_zeros(src + f"{s}.bias", w.shape[0], w)
        out["transformer.ln_f.weight"] = get("backbone.norm.weight")
        out["transformer.ln_f.bias"] = bias_or_zeros("backbone.norm.bias", config.d_model, out["transformer.ln_f.weight"])
        if not config.tie_embeddings:
            out["lm_head.weight"] = get("lm_head.weight")[:V]
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def _experts_to_hf(config: TransformerConfig, get, src: str, dst: str, arch: str) -> dict[str, torch.Tensor]:
    """One expert block in the per-expert layout transformers saves (and converts to its fused one on load)."""
    h, out = config.expert_hidden_dim, {}
    moe = dst + ("block_sparse_moe." if arch == "mixtral" else "mlp.")
    names = ("w1", "w3", "w2") if arch == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    out[moe + "gate.weight"] = get(src + "router.weight")
    gate_up, down = get(src + "gate_up"), get(src + "down")
    for j in range(config.moe_experts):
        e = moe + f"experts.{j}."
        out[e + f"{names[0]}.weight"] = gate_up[j, :, :h].t()
        out[e + f"{names[1]}.weight"] = gate_up[j, :, h:].t()
        out[e + f"{names[2]}.weight"] = down[j].t()
    if config.moe_shared_experts:
        gate, up = get(src + "shared_fc.weight").chunk(2, dim=0)
        out[moe + "shared_expert.gate_proj.weight"] = gate
        out[moe + "shared_expert.up_proj.weight"] = up
        out[moe + "shared_expert.down_proj.weight"] = get(src + "shared_proj.weight")
        out[moe + "shared_expert_gate.weight"] = get(src + "shared_gate.weight")
    return out


def _experts_from_hf(config: TransformerConfig, get, src: str, dst: str, model_type: str) -> dict[str, torch.Tensor]:
    moe = src + ("block_sparse_moe." if model_type == "mixtral" else "mlp.")
    names = ("w1", "w3", "w2") if model_type == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    out = {dst + "router.weight": get(moe + "gate.weight")}
    experts = [moe + f"experts.{j}." for j in range(config.moe_experts)]
    out[dst + "gate_up"] = torch.stack(
        [torch.cat([get(e + f"{names[0]}.weight"), get(e + f"{names[1]}.weight")], dim=0).t() for e in experts])
    out[dst + "down"] = torch.stack([get(e + f"{names[2]}.weight").t() for e in experts])
    if config.moe_shared_experts:
        s = moe + "shared_expert."
        out[dst + "shared_fc.weight"] = torch.cat([get(s + "gate_proj.weight"), get(s + "up_proj.weight")], dim=0)
        out[dst + "shared_proj.weight"] = get(s + "down_proj.weight")
        out[dst + "shared_gate.weight"] = get(moe + "shared_expert_gate.weight")
    return out


def from_hf_state(config: TransformerConfig, hf_state: dict[str, torch.Tensor], model_type: str) -> dict[str, torch.Tensor]:
    """lmlab ``CausalLM`` tensors from transformers tensors; vocab rows padded with zeros."""
    V, Vp = config.vocab_size, config.padded_vocab_size

    def get(name: str) -> torch.Tensor:
        if name not in hf_state:
            raise ConfigError("model weights", f"missing tensor {name!r}", "give a complete checkpoint of this architecture")
        return hf_state[name]

    def pad_rows(t: torch.Tensor) -> torch.Tensor:
        if t.shape[0] != V:
            raise ConfigError("model weights", f"embedding has {t.shape[0]} rows, config vocab_size is {V}",
                              "check config.json against the weights")
        if Vp == V:
            return t
        return torch.cat([t, torch.zeros(Vp - V, *t.shape[1:], dtype=t.dtype)], dim=0)

    out: dict[str, torch.Tensor] = {}
    if model_type in ("llama", "mistral", "mixtral", "qwen2_moe"):
        from lmlab.models.moe import is_moe_layer

        out["backbone.tok_emb.weight"] = pad_rows(get("model.embed_tokens.weight"))
        for i in range(config.n_layers):
            src, dst = f"model.layers.{i}.", f"backbone.blocks.{i}."
            out[dst + "norm1.weight"] = get(src + "input_layernorm.weight")
            out[dst + "norm2.weight"] = get(src + "post_attention_layernorm.weight")
            for kind in ("weight", "bias") if config.bias else ("weight",):
                a = src + "self_attn."
                out[dst + f"attn.qkv.{kind}"] = torch.cat(
                    [get(a + f"q_proj.{kind}"), get(a + f"k_proj.{kind}"), get(a + f"v_proj.{kind}")], dim=0
                )
                out[dst + f"attn.proj.{kind}"] = get(a + f"o_proj.{kind}")
                if is_moe_layer(config, i):
                    out.update(_experts_from_hf(config, get, src, dst + "mlp.", model_type))
                    continue
                m = src + "mlp."
                out[dst + f"mlp.fc.{kind}"] = torch.cat([get(m + f"gate_proj.{kind}"), get(m + f"up_proj.{kind}")], dim=0)
                out[dst + f"mlp.proj.{kind}"] = get(m + f"down_proj.{kind}")
        out["backbone.norm.weight"] = get("model.norm.weight")
        head = "model.embed_tokens.weight" if config.tie_embeddings else "lm_head.weight"
    else:
        out["backbone.tok_emb.weight"] = pad_rows(get("transformer.wte.weight"))
        out["backbone.pos_emb.weight"] = get("transformer.wpe.weight")
        for i in range(config.n_layers):
            src, dst = f"transformer.h.{i}.", f"backbone.blocks.{i}."
            for d, s in (("norm1", "ln_1"), ("norm2", "ln_2")):
                out[dst + f"{d}.weight"] = get(src + f"{s}.weight")
                out[dst + f"{d}.bias"] = get(src + f"{s}.bias")
            for d, s in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"), ("mlp.fc", "mlp.c_fc"),
                         ("mlp.proj", "mlp.c_proj")):
                out[dst + f"{d}.weight"] = get(src + f"{s}.weight").t()
                out[dst + f"{d}.bias"] = get(src + f"{s}.bias")
        out["backbone.norm.weight"] = get("transformer.ln_f.weight")
        out["backbone.norm.bias"] = get("transformer.ln_f.bias")
        head = "transformer.wte.weight" if config.tie_embeddings else "lm_head.weight"
    out["lm_head.weight"] = out["backbone.tok_emb.weight"] if config.tie_embeddings else pad_rows(get(head))
    if not config.bias:
        # a bias-free lmlab model exported to GPT-2 carries zero biases; anything else cannot be represented
        for name in [k for k in out if k.endswith(".bias")]:
            if out[name].abs().max() > 0:
                raise ConfigError("model weights", f"non-zero {name} in a bias-free config", "import with bias=true")
            del out[name]
    return {k: v.contiguous() for k, v in out.items()}


# --- files ---------------------------------------------------------------------------------------


def is_hf_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory holding a transformers ``config.json``."""
    p = Path(path)
    return p.is_dir() and (p / HF_CONFIG).is_file()


def read_hf_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a transformers model directory (single or sharded safetensors, or a .bin)."""
    from safetensors.torch import load_file

    p = Path(path)
    if (p / WEIGHTS).is_file():
        return load_file(str(p / WEIGHTS))
    if (p / WEIGHTS_INDEX).is_file():
        index = json.loads((p / WEIGHTS_INDEX).read_text())
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(index["weight_map"].values())):
            state.update(load_file(str(p / shard)))
        return state
    if (p / "pytorch_model.bin").is_file():
        return torch.load(p / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise ConfigError(str(p), "no model.safetensors (or index, or pytorch_model.bin) found", "point at a model directory")


def load_hf_state(path: str | os.PathLike) -> tuple[TransformerConfig, dict[str, torch.Tensor]]:
    """(lmlab config, lmlab state dict) of a transformers LLaMA / GPT-2 directory (config: :func:`hf_dir_config`)."""
    p = Path(path)
    config = hf_dir_config(p)
    hf = json.loads((p / HF_CONFIG).read_text())
    return config, from_hf_state(config, read_hf_weights(p), hf["model_type"])


def hf_dir_config(path: str | os.PathLike) -> TransformerConfig:
    """The lmlab config of a transformers LLaMA / GPT-2 directory, without reading its weights.

    An ``lmlab_config.json`` beside the weights (written by ``lmlab export``)
    restores the exact lmlab config (vocab padding, init settings); it must
    agree with ``config.json``.
    """
    p = Path(path)
    if not is_hf_dir(p):
        raise ConfigError(str(p), "not a transformers model directory (no config.json)", "point at an HF model directory")
    config = from_hf_config(json.loads((p / HF_CONFIG).read_text()))
    if (p / LMLAB_CONFIG).is_file():
        own = TransformerConfig.from_dict(json.loads((p / LMLAB_CONFIG).read_text()))
        keys = ["vocab_size", "d_model", "n_layers", "n_heads", "kv_heads", "hidden_dim", "tie_embeddings", "sliding_window"]
        if own.moe_experts:
            from lmlab.models.moe import moe_layers

            keys += ["moe_experts", "moe_top_k", "expert_hidden_dim", "moe_shared_experts"]
            if len(moe_layers(own)) == own.n_layers:
                keys.remove("hidden_dim")  # no dense block: config.json has no dense width
        for key in keys:
            if getattr(own, key) != getattr(config, key):
                raise ConfigError(f"{p / LMLAB_CONFIG}", f"{key}={getattr(own, key)} disagrees with config.json "
                                  f"({getattr(config, key)})", "delete the stale lmlab_config.json")
        config = own
    return config


def load_hf_model(path: str | os.PathLike, dtype: Optional[torch.dtype] = None) -> CausalLM:
    """An lmlab :class:`CausalLM` with the weights of a transformers LLaMA / GPT-2 directory."""
    config, state = load_hf_state(path)
    return build_causal_lm(config, state, str(path), dtype)


def build_causal_lm(
    config: TransformerConfig, state: dict[str, torch.Tensor], source: str, dtype: Optional[torch.dtype] = None,
    field: str = "--ckpt",
) -> CausalLM:
    """A :class:`CausalLM` of ``config`` holding exactly ``state`` (every tensor present and shaped right)."""
    with torch.device("meta"):
        model = CausalLM(config)
    own = model.state_dict()
    if config.tie_embeddings and "lm_head.weight" not in state and "backbone.tok_emb.weight" in state:
        state = {**state, "lm_head.weight": state["backbone.tok_emb.weight"]}  # native exports store it once
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        detail = (f"missing {missing[:2]}" if missing else f"unexpected {unexpected[:2]}" if unexpected
                  else f"{wrong[0]} is {tuple(state[wrong[0]].shape)}, expected {tuple(own[wrong[0]].shape)}")
        raise ConfigError(field, f"{source} does not hold a CausalLM of its config ({detail})",
                          "give a language-model checkpoint (pretrain/SFT/DPO) or an lmlab export")
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.backbone.tok_emb.weight
    # non-persistent buffers (RoPE tables) were created on meta: rebuild them for real
    if model.backbone.rotary is not None:
        from lmlab.models.transformer import RotaryEmbedding

        model.backbone.rotary = RotaryEmbedding(config.head_dim, config.max_seq_len, config.rope_theta)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def save_hf(
    model: CausalLM,
    out_dir: str | os.PathLike,
    *,
    tokenizer: Any = None,
    dtype: Optional[torch.dtype] = None,
) -> Path:
    """Write ``model`` as a transformers model directory into ``out_dir`` (created if needed).

    Files: ``config.json``, ``generation_config.json``, ``model.safetensors``,
    ``lmlab_config.json`` and, with ``tokenizer``, the tokenizer files
    (including its chat template). Callers wanting atomic replacement write
    to a temporary directory and rename it (see :func:`lmlab.models.export.export_hf`).
    """
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    config: TransformerConfig = model.config
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = to_hf_state(config, model.state_dict())
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    weight_dtype = next(iter(state.values())).dtype
    ids: dict[str, Any] = {}
    stop: list[int] = []
    if tokenizer is not None:
        if len(tokenizer) > config.vocab_size:
            raise ConfigError("--tokenizer", f"has {len(tokenizer)} tokens but the model only {config.vocab_size}",
                              "give the tokenizer the model was trained with")
        ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
        from lmlab.data.posttrain.chat import END

        end = tokenizer.convert_tokens_to_ids(END) if END in tokenizer.get_vocab() else None
        stop = [i for i in (tokenizer.eos_token_id, end) if i is not None]
    hf_config = to_hf_config(config, dtype=weight_dtype, **ids)
    hf_config.save_pretrained(out)
    _add_legacy_rope_theta(out / HF_CONFIG, config)
    gen = GenerationConfig(
        bos_token_id=ids.get("bos_token_id"),
        eos_token_id=(stop if len(stop) > 1 else (stop[0] if stop else None)),
        pad_token_id=ids.get("pad_token_id"),
    )
    gen.save_pretrained(out)
    save_file(state, str(out / WEIGHTS), metadata={"format": "pt"})
    lmlab_cfg = {**config.to_dict(), "preset": None}  # values are already resolved
    (out / LMLAB_CONFIG).write_text(json.dumps(lmlab_cfg, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def _add_legacy_rope_theta(path: Path, config: TransformerConfig) -> None:
    # transformers < 5 reads a top-level rope_theta; >= 5 reads rope_parameters. Write both.
    if config.position != "rope":
        return
    data = json.loads(path.read_text())
    data.setdefault("rope_theta", config.rope_theta)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
