"""``lmlab export``: checkpoints to transformers (or lmlab safetensors) directories, and back.

::

    lmlab export --ckpt runs/x/last.ckpt --format hf --out exports/x      # LlamaForCausalLM / GPT2LMHeadModel
    lmlab export --ckpt runs/x/last.ckpt --format lmlab --out exports/x   # lmlab names, for --model.init_from
    lmlab export --from-hf some/llama-dir --out llama.ckpt                # for --model.init_from

An HF export holds ``config.json``, ``generation_config.json``,
``model.safetensors``, ``lmlab_config.json`` and the tokenizer (with its chat
template), so ``AutoModelForCausalLM.from_pretrained(dir)``,
``AutoTokenizer.from_pretrained(dir)`` and ``lm_eval --model hf
--model_args pretrained=dir`` work on it. The tokenizer comes from
``--tokenizer``, else from beside the checkpoint, else from the run's saved
``config.yaml`` (``data.init_args.tokenizer``).

Everything is written to a temporary directory (or file) next to the target
and renamed into place, so a failed export leaves nothing half-written.
This module also holds the loaders the evaluation tools share:
:func:`load_causal_lm` and :func:`resolve_tokenizer`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import torch
import yaml

from lmlab.atomic import atomic_path, staged_dir
from lmlab.errors import ConfigError
from lmlab.models.config import TransformerConfig
from lmlab.models.heads import CausalLM

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
_RUN_CONFIG_DEPTH = 4


class OneLineParser(argparse.ArgumentParser):
    """``argparse`` whose usage errors are one line (``prog: error: ...``) with exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def run_main(prog: str, body, argv: list[str]) -> int:
    """Run ``body(argv)``; a :class:`ConfigError` or usage error becomes one line on stderr and exit 2."""
    try:
        return int(body(argv) or 0)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2, already printed)
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    except ConfigError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2


def parse_dtype(name: Optional[str], field: str = "--dtype") -> Optional[torch.dtype]:
    """``float32``/``bfloat16``/``float16`` (or None) as a torch dtype."""
    if name is None:
        return None
    if name not in DTYPES:
        raise ConfigError(field, f"unknown dtype {name!r}", f"use one of {', '.join(DTYPES)}")
    return DTYPES[name]


# --- loading ---------------------------------------------------------------------------------


def load_causal_lm(
    path: str | os.PathLike,
    *,
    field: str = "--ckpt",
    device: Optional[torch.device | str] = None,
    dtype: Optional[torch.dtype] = None,
) -> CausalLM:
    """A :class:`CausalLM` from a Lightning ``.ckpt`` (read with ``weights_only=True``), an lmlab
    safetensors export directory, or a transformers LLaMA / GPT-2 directory; in eval mode."""
    from lmlab.models.checkpoint import load_model_state
    from lmlab.models.hf import build_causal_lm, is_hf_dir, load_hf_state

    p = Path(os.path.expanduser(str(path)))
    if not p.exists():
        raise ConfigError(field, f"checkpoint {p} does not exist", "check the path (a .ckpt file or an export directory)")
    if is_hf_dir(p):
        config, state = load_hf_state(p)
    else:
        cfg, state = load_model_state(p, field=field)
        if cfg is None:
            raise ConfigError(field, f"{p} carries no model config", "use a checkpoint written by an lmlab module or export")
        config = TransformerConfig.from_dict(cfg)
    model = build_causal_lm(config, state, str(p), dtype)
    return model.to(device) if device is not None else model


def _has_tokenizer(d: Path) -> bool:
    return d.is_dir() and any((d / f).is_file() for f in _TOKENIZER_FILES)


def _run_config_tokenizer(config_file: Path) -> Optional[Path]:
    """The tokenizer path named in a saved LightningCLI ``config.yaml``, resolved to an existing directory."""
    try:
        cfg = yaml.safe_load(config_file.read_text())
    except (OSError, yaml.YAMLError):
        return None
    data = (cfg or {}).get("data") if isinstance(cfg, dict) else None
    if not isinstance(data, dict):
        return None
    spec = (data.get("init_args") or data).get("tokenizer")
    if not isinstance(spec, str):
        return None
    raw = Path(os.path.expanduser(spec))
    if raw.is_absolute():
        return raw if raw.exists() else None
    # relative paths are relative to where training ran: try the cwd, then the run's ancestors
    for base in [Path.cwd(), *config_file.resolve().parents]:
        if (base / raw).exists():
            return base / raw
    return None


def find_tokenizer(ckpt: str | os.PathLike) -> Optional[Path]:
    """Where the tokenizer of ``ckpt`` lives, or None: the export directory itself, a ``tokenizer/``
    beside the checkpoint, or the ``data.tokenizer`` of the run's ``config.yaml`` (up to 4 levels up)."""
    p = Path(os.path.expanduser(str(ckpt)))
    start = p if p.is_dir() else p.parent
    if _has_tokenizer(start):
        return start
    if _has_tokenizer(start / "tokenizer"):
        return start / "tokenizer"
    for d in [start, *list(start.parents)[: _RUN_CONFIG_DEPTH]]:
        for name in ("config.yaml", "config.yml"):
            if (d / name).is_file():
                found = _run_config_tokenizer(d / name)
                if found is not None:
                    return found
    return None


def resolve_tokenizer(ckpt: str | os.PathLike, tokenizer: Any = None, field: str = "--tokenizer") -> Any:
    """A loaded tokenizer: ``tokenizer`` itself if already loaded, its path, or the one found beside ``ckpt``."""
    from lmlab.data.tokenizer import load_tokenizer

    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    spec = tokenizer if tokenizer is not None else find_tokenizer(ckpt)
    if spec is None:
        raise ConfigError(
            field, f"no tokenizer found beside {ckpt} or in its run's config.yaml", "pass --tokenizer DIR"
        )
    return load_tokenizer(os.fspath(spec), field=field)


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
    model = load_causal_lm(ckpt)
    hf_architecture(model.config, field="--format hf")  # fail before anything is written
    tok = resolve_tokenizer(ckpt, tokenizer)
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

    This is the layout :func:`lmlab.models.checkpoint.load_model_state` reads, so
    ``--model.init_from DIR`` accepts it; any architecture exports this way.
    """
    from safetensors.torch import save_file

    out = Path(out)
    model = load_causal_lm(ckpt)
    state = dict(model.state_dict())
    if model.config.tie_embeddings:
        state.pop("lm_head.weight")  # safetensors refuses shared tensors; the loader re-ties
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous() for k, v in state.items()}
    tok = None
    if tokenizer is not None or find_tokenizer(ckpt) is not None:
        tok = resolve_tokenizer(ckpt, tokenizer)
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
        raise ConfigError("--from-hf", f"{src} does not exist", "give a transformers model directory")
    config, state = load_hf_state(src)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    out = Path(out)
    if out.exists() and not overwrite:
        raise ConfigError("--out", f"{out} already exists", "choose another --out or pass --force")
    ckpt = {
        "state_dict": {f"model.{k}": v for k, v in state.items()},
        "lmlab": {"stage": "import", "model_config": {**config.to_dict(), "preset": None}, "source": str(src)},
    }
    with atomic_path(out) as tmp:
        torch.save(ckpt, tmp)
    return out


# --- CLI -------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="lmlab export", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="Lightning .ckpt or lmlab export directory to export")
    src.add_argument("--from-hf", dest="from_hf", metavar="DIR", help="transformers LLaMA/GPT-2 directory to import")
    p.add_argument("--format", choices=("hf", "lmlab"), default="hf", help="export layout (default: hf)")
    p.add_argument("--out", required=True, help="output directory (export) or .ckpt file (--from-hf)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: found beside the checkpoint or in its run config)")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="cast floating-point weights (default: as stored)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    return p


def _main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    dtype = parse_dtype(args.dtype)
    if args.from_hf:
        out = import_hf(args.from_hf, args.out, dtype=dtype, overwrite=args.force)
        print(f"wrote {out} (use it as --model.init_from {out})")
        return 0
    fn = export_hf if args.format == "hf" else export_lmlab
    out = fn(args.ckpt, args.out, tokenizer=args.tokenizer, dtype=dtype, overwrite=args.force)
    if args.format == "hf":
        arch = json.loads((out / "config.json").read_text())["architectures"][0]
        print(f"wrote {arch} to {out}")
        print(f"  evaluate: lm_eval --model hf --model_args pretrained={out} --tasks hellaswag")
    else:
        print(f"wrote lmlab safetensors to {out} (use it as --model.init_from {out})")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of ``lmlab export``."""
    return run_main("lmlab export", _main, list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    raise SystemExit(main())
