"""``lmlab export``: checkpoints to transformers (or lmlab safetensors) directories, and back.

::

    lmlab export --ckpt runs/x/last.ckpt --format hf --out exports/x      # LlamaForCausalLM / GPT2LMHeadModel
    lmlab export --ckpt runs/x/last.ckpt --format lmlab --out exports/x   # lmlab names, for --model.init_from
    lmlab export --from_hf some/llama-dir --out llama.ckpt                # for --model.init_from
    lmlab export --ckpt runs/x/last.ckpt --format gguf --out x.gguf       # llama.cpp (lmlab/export_gguf.py)

An HF export holds ``config.json``, ``generation_config.json``,
``model.safetensors``, ``lmlab_config.json`` and the tokenizer (with its chat
template), so ``AutoModelForCausalLM.from_pretrained(dir)``,
``AutoTokenizer.from_pretrained(dir)`` and ``lm_eval --model hf
--model_args pretrained=dir`` work on it. The tokenizer comes from
``--tokenizer``, else the one the run recorded in the checkpoint, else (older
checkpoints) from beside the checkpoint or the run's saved ``config.yaml``;
see :meth:`lmlab.models.checkpoint.Checkpoint.tokenizer`.

Everything is written to a temporary directory (or file) next to the target
and renamed into place, so a failed export leaves nothing half-written.
Checkpoints are opened with :func:`lmlab.models.checkpoint.open_checkpoint`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, Optional

import torch

from lmlab.errors import ConfigError
from lmlab.models.checkpoint import open_checkpoint, tokenizer_record

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: Optional[str], field: str = "--dtype") -> Optional[torch.dtype]:
    """``float32``/``bfloat16``/``float16`` (or None) as a torch dtype."""
    if name is None:
        return None
    if name not in DTYPES:
        raise ConfigError(field, f"unknown dtype {name!r}", f"use one of {', '.join(DTYPES)}")
    return DTYPES[name]


# --- atomic outputs ------------------------------------------------------------------------------


@contextmanager
def atomic_dir(out: Path, overwrite: bool, field: str = "--out") -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``out``; on success it replaces ``out``."""
    if out.exists() and not overwrite:
        raise ConfigError(field, f"{out} already exists", "choose another --out or pass --force")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# --- export / import -----------------------------------------------------------------------------


def export_hf(
    ckpt: str | os.PathLike,
    out: str | os.PathLike,
    *,
    tokenizer: Any = None,
    dtype: Optional[torch.dtype] = None,
    overwrite: bool = False,
) -> Path:
    """Write ``ckpt`` as a transformers directory at ``out`` (see the module docstring); returns ``out``."""
    from lmlab.models.hf import hf_architecture, save_hf

    out = Path(out)
    source = open_checkpoint(ckpt, "--ckpt")
    model = source.causal_lm()
    hf_architecture(model.config, field="--format hf")  # fail before anything is written
    tok = source.tokenizer(tokenizer)
    with atomic_dir(out, overwrite) as tmp:
        save_hf(model, tmp, tokenizer=tok, dtype=dtype)
    return out


def export_lmlab(
    ckpt: str | os.PathLike,
    out: str | os.PathLike,
    *,
    tokenizer: Any = None,
    dtype: Optional[torch.dtype] = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model.safetensors`` (lmlab tensor names), ``lmlab_config.json`` and, when one is given
    or found, the tokenizer to ``out``.

    This is the layout :func:`lmlab.models.checkpoint.open_checkpoint` reads, so
    ``--model.init_from DIR`` accepts it; any architecture exports this way.
    """
    from safetensors.torch import save_file

    out = Path(out)
    source = open_checkpoint(ckpt, "--ckpt")
    model = source.causal_lm()
    state = dict(model.state_dict())
    if model.config.tie_embeddings:
        state.pop("lm_head.weight")  # safetensors refuses shared tensors; the loader re-ties
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous() for k, v in state.items()}
    tok = source.tokenizer(tokenizer) if tokenizer is not None or source.has_tokenizer() else None
    with atomic_dir(out, overwrite) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        cfg = {**model.config.to_dict(), "preset": None}
        (tmp / "lmlab_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        if tok is not None:
            tok.save_pretrained(tmp)
    return out


def import_hf(
    hf_dir: str | os.PathLike, out: str | os.PathLike, *, dtype: Optional[torch.dtype] = None, overwrite: bool = False
) -> Path:
    """Convert a transformers LLaMA / GPT-2 directory into an lmlab ``.ckpt`` for ``--model.init_from``.

    The file holds ``state_dict`` (``model.``-prefixed, as a LightningModule
    saves it) and ``lmlab.model_config``; it loads with ``weights_only=True``.
    """
    from lmlab.models.hf import load_hf_state

    src = Path(os.path.expanduser(str(hf_dir)))
    if not src.exists():
        raise ConfigError("--from_hf", f"{src} does not exist", "give a transformers model directory")
    config, state = load_hf_state(src)
    source = open_checkpoint(src, "--from_hf")
    tok_record = tokenizer_record(source.tokenizer(field="--from_hf")) if source.has_tokenizer() else {}
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    out = Path(out)
    if out.exists() and not overwrite:
        raise ConfigError("--out", f"{out} already exists", "choose another --out or pass --force")
    ckpt = {
        "state_dict": {f"model.{k}": v for k, v in state.items()},
        "lmlab": {"stage": "import", "model_config": {**config.to_dict(), "preset": None}, "source": str(src), **tok_record},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        torch.save(ckpt, tmp)
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return out


# --- CLI -------------------------------------------------------------------------------------------


Dtype = Literal["float32", "bfloat16", "float16"]


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
        from lmlab.export_gguf import export_gguf

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
