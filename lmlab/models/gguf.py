"""``lmlab export --format gguf``: one GGUF file (llama.cpp's format) for a LLaMA-shaped checkpoint.

Tensors take llama.cpp's names (``token_embd``, ``blk.N.attn_q``, ...). lmlab
applies rotary embeddings to the two halves of each head (as transformers'
Llama does) while llama.cpp's ``llama`` architecture rotates adjacent pairs,
so the rows of the query and key projections are reordered within each head,
as llama.cpp's own converter does for transformers checkpoints. The
byte-level BPE tokenizer goes in as ``gpt2`` vocabulary and merges, with its
special tokens and chat template. Norm weights stay float32; matrices are
float32 or float16 (``--dtype``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import torch

from lmlab.atomic import atomic_path
from lmlab.errors import ConfigError


def permute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q/k projection from half-split rotary order to interleaved pairs, per head."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_tensors(config, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """llama.cpp tensor names for an lmlab ``CausalLM`` state dict (LLaMA architecture only)."""
    from lmlab.models.hf import to_hf_state

    hf = to_hf_state(config, state)
    out = {"token_embd.weight": hf["model.embed_tokens.weight"], "output_norm.weight": hf["model.norm.weight"]}
    if "lm_head.weight" in hf:
        out["output.weight"] = hf["lm_head.weight"]
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(config.n_layers):
        for src, dst in names.items():
            for kind in ("weight", "bias"):
                t = hf.get(f"model.layers.{i}.{src}.{kind}")
                if t is None:
                    continue
                if dst in ("attn_q", "attn_k"):
                    t = permute_rotary(t, config.n_heads if dst == "attn_q" else config.kv_heads)
                out[f"blk.{i}.{dst}.{kind}"] = t
    return out


def _tokenizer_fields(writer: Any, tokenizer: Any) -> None:
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise ConfigError("--format gguf", f"the tokenizer is {model.get('type')}, not byte-level BPE", "use --format hf")
    vocab = tokenizer.get_vocab()
    tokens = [""] * len(vocab)
    for tok, i in vocab.items():
        tokens[i] = tok
    special = set(tokenizer.all_special_ids)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i in special else 1 for i in range(len(tokens))])  # 3: control, 1: normal
    writer.add_token_merges(merges)
    for name in ("bos", "eos", "pad"):
        tid = getattr(tokenizer, f"{name}_token_id")
        if tid is not None:
            getattr(writer, f"add_{name}_token_id")(int(tid))
    writer.add_add_bos_token(False)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


def export_gguf(ckpt: str | os.PathLike, out: str | os.PathLike, *, tokenizer: Any = None,
                dtype: Optional[torch.dtype] = None, overwrite: bool = False) -> Path:
    """Write ``ckpt`` as one ``.gguf`` file at ``out`` (atomically); returns ``out``."""
    import gguf

    from lmlab.models.checkpoint import open_checkpoint
    from lmlab.models.hf import hf_architecture

    out = Path(out)
    if out.exists() and not overwrite:
        raise ConfigError("--out", f"{out} already exists", "choose another --out or pass --force")
    if dtype not in (None, torch.float32, torch.float16):
        raise ConfigError("--dtype", "GGUF export writes float32 or float16", "use --dtype float16 or leave it out")
    source = open_checkpoint(ckpt, "--ckpt")
    model = source.causal_lm()
    cfg = model.config
    arch = hf_architecture(cfg, field="--format gguf")
    if arch != "llama":
        what = {"gpt2": "GPT-2-shaped", "mistral": "sliding-window", "mixtral": "mixture-of-experts",
                "qwen2_moe": "mixture-of-experts"}.get(arch, arch)
        raise ConfigError("--format gguf", f"only dense LLaMA-shaped models export to GGUF; this one is {what}",
                          "use --format hf")
    tok = source.tokenizer(tokenizer)
    tensors = gguf_tensors(cfg, model.state_dict())
    with atomic_path(out) as tmp:
        w = gguf.GGUFWriter(str(tmp), "llama")
        w.add_name(out.stem)
        w.add_context_length(cfg.max_seq_len)
        w.add_embedding_length(cfg.d_model)
        w.add_block_count(cfg.n_layers)
        w.add_feed_forward_length(cfg.hidden_dim)
        w.add_head_count(cfg.n_heads)
        w.add_head_count_kv(cfg.kv_heads)
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_rope_freq_base(float(cfg.rope_theta))
        w.add_layer_norm_rms_eps(float(cfg.norm_eps))
        w.add_vocab_size(cfg.vocab_size)
        half = dtype == torch.float16
        w.add_file_type(1 if half else 0)  # 1: mostly F16, 0: all F32
        _tokenizer_fields(w, tok)
        for name, t in tensors.items():
            keep_f32 = t.ndim == 1 or not half  # norms and biases stay float32
            w.add_tensor(name, t.detach().to(torch.float32 if keep_f32 else torch.float16).numpy())
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return out
