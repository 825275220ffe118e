"""Checkpoints to transformers (or lmlab safetensors) directories, and transformers directories back.

The model-level half of ``lmlab export`` (the verb is :mod:`lmlab.export`):

* :func:`export_hf` writes ``config.json``, ``generation_config.json``,
  ``model.safetensors``, ``lmlab_config.json`` and the tokenizer (with its chat
  template), so ``AutoModelForCausalLM.from_pretrained(dir)``,
  ``AutoTokenizer.from_pretrained(dir)`` and ``lm_eval --model hf
  --model_args pretrained=dir`` work on it;
* :func:`export_lmlab` writes lmlab tensor names, the layout
  ``--model.init_from`` and :func:`~lmlab.models.checkpoint.open_checkpoint` read;
* :func:`import_hf` turns a transformers LLaMA / GPT-2 directory into a ``.ckpt``.

The tokenizer comes from the ``tokenizer`` argument, else the one the run
recorded in the checkpoint, else (older checkpoints) from beside the checkpoint
or the run's saved ``config.yaml``; see
:meth:`lmlab.models.checkpoint.Checkpoint.tokenizer`. The state-dict
conversion itself lives in :mod:`lmlab.models.hf`.

Everything is written to a temporary directory (or file) next to the target
and renamed into place, so a failed export leaves nothing half-written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, Optional

import torch

from lmlab.atomic import atomic_path, staged_dir
from lmlab.errors import ConfigError
from lmlab.models.checkpoint import open_checkpoint, tokenizer_record

Dtype = Literal["float32", "bfloat16", "float16"]
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
    with staged_dir(out) as tmp:
        yield tmp


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
    with atomic_path(out) as tmp:
        torch.save(ckpt, tmp)
    return out
