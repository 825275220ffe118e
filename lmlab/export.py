"""``lmlab export``: checkpoints to transformers (or lmlab safetensors) directories, and back.

::

    lmlab export --ckpt runs/x/last.ckpt --format hf --out exports/x      # LlamaForCausalLM / GPT2LMHeadModel
    lmlab export --ckpt runs/x/last.ckpt --format lmlab --out exports/x   # lmlab names, for --model.init_from
    lmlab export --from_hf some/llama-dir --out llama.ckpt                # for --model.init_from
    lmlab export --ckpt runs/x/last.ckpt --format gguf --out x.gguf       # llama.cpp (lmlab/models/gguf.py)

The verb only reads its flags and reports; what is written, and how, is
:mod:`lmlab.models.export`.
"""

from __future__ import annotations

import json
from typing import Literal, Optional

from lmlab.errors import ConfigError
from lmlab.models.export import Dtype, export_hf, export_lmlab, import_hf, parse_dtype


def export(
    out: str,
    ckpt: Optional[str] = None,
    from_hf: Optional[str] = None,
    format: Literal["hf", "lmlab", "gguf"] = "hf",
    tokenizer: Optional[str] = None,
    dtype: Optional[Dtype] = None,
    force: bool = False,
) -> int:
    """Export a checkpoint to a transformers (or lmlab safetensors) directory, or import a transformers one.

    Args:
        out: Output directory (export) or .ckpt file (--from_hf).
        ckpt: Lightning .ckpt or lmlab export directory to export.
        from_hf: Transformers LLaMA/GPT-2 directory to import instead (writes a .ckpt for --model.init_from).
        format: Export layout: hf (LlamaForCausalLM / GPT2LMHeadModel), lmlab (lmlab tensor names) or gguf
            (one llama.cpp file, LLaMA-shaped models; --out names the .gguf file).
        tokenizer: Tokenizer directory (default: found beside the checkpoint or in its run config).
        dtype: Cast floating-point weights (default: as stored).
        force: Replace --out if it exists.
    """
    if (ckpt is None) == (from_hf is None):
        raise ConfigError("--ckpt", "give exactly one of --ckpt and --from_hf", "--ckpt to export, --from_hf to import")
    torch_dtype = parse_dtype(dtype)
    if from_hf:
        path = import_hf(from_hf, out, dtype=torch_dtype, overwrite=force)
        print(f"wrote {path} (use it as --model.init_from {path})")
        return 0
    if format == "gguf":
        from lmlab.models.gguf import export_gguf

        path = export_gguf(ckpt, out, tokenizer=tokenizer, dtype=torch_dtype, overwrite=force)
        print(f"wrote GGUF to {path} (llama.cpp: llama-cli -m {path})")
        return 0
    fn = export_hf if format == "hf" else export_lmlab
    path = fn(ckpt, out, tokenizer=tokenizer, dtype=torch_dtype, overwrite=force)
    if format == "hf":
        arch = json.loads((path / "config.json").read_text())["architectures"][0]
        print(f"wrote {arch} to {path}")
        print(f"  evaluate: lm_eval --model hf --model_args pretrained={path} --tasks hellaswag")
    else:
        print(f"wrote lmlab safetensors to {path} (use it as --model.init_from {path})")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of ``lmlab export``."""
    from lmlab.verbs import run

    return run("lmlab export", export, argv)


if __name__ == "__main__":
    raise SystemExit(main())
