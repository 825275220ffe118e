"""One way to open a model checkpoint: :func:`open_checkpoint`.

A checkpoint is any of

* a Lightning ``.ckpt`` written by an lmlab module (or ``lmlab export --from_hf``),
  read with ``torch.load(weights_only=True, mmap=True)``, so no arbitrary
  object is ever unpickled and tensors are paged in only when used;
* an ``lmlab export --format lmlab`` directory (``model.safetensors`` +
  ``lmlab_config.json``, optionally the tokenizer);
* a transformers LLaMA / GPT-2 directory (``config.json``), including an
  ``lmlab export --format hf`` one;
* a bare ``.safetensors`` file.

The :class:`Checkpoint` it returns exposes the model config, the weights (the
LightningModule's ``model.`` prefix removed), the run metadata that lmlab
modules record under ``checkpoint["lmlab"]`` (stage, tokens seen, the
tokenizer itself as plain text) and the tokenizer, and builds the models the
stages need (:meth:`Checkpoint.causal_lm`, :meth:`Checkpoint.scalar_model`,
:meth:`Checkpoint.load_into`). Every tool that reads a checkpoint goes
through it, so all of them accept the same paths and fail with the same
one-line errors.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any, Optional

import torch

from lmlab.errors import ConfigError
from lmlab.models.config import TransformerConfig

__all__ = [
    "Checkpoint",
    "open_checkpoint",
    "load_backbone_weights",
    "tokenizer_record",
    "find_tokenizer",
]

EXPORT_WEIGHTS = "model.safetensors"
EXPORT_CONFIG = "lmlab_config.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
_RUN_CONFIG_DEPTH = 4


class Checkpoint:
    """An opened checkpoint; see the module docstring for the kinds of paths.

    Attributes:
        path: The path as opened.
        field: The config field or flag that named it (used in error messages).
        kind: ``lightning``, ``export``, ``hf`` or ``safetensors``.
        config: The stored model config, or None (see :meth:`require_config`).
        meta: The ``lmlab`` run metadata of a Lightning checkpoint (``{}`` for other kinds).
    """

    def __init__(self, path: Path, field: str, kind: str, config: Optional[TransformerConfig], meta: dict[str, Any],
                 weights_loader, mapped: bool = False):
        self.path = path
        self.field = field
        self.kind = kind
        self.config = config
        self.meta = meta
        self._weights_loader = weights_loader
        self._weights: Optional[dict[str, torch.Tensor]] = None
        self._mapped = mapped
        self._tokenizer_info: Optional[dict[str, Any]] = None

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, kind={self.kind!r}, stage={self.stage!r})"

    # -- config and metadata ----------------------------------------------------------
    def require_config(self) -> TransformerConfig:
        """The stored model config; a ``ConfigError`` (the one "carries no model config") when there is none."""
        if self.config is None:
            raise ConfigError(self.field, f"{self.path} carries no model config",
                              "use a checkpoint written by lmlab (fit or export), or set model.config explicitly")
        return self.config

    @property
    def stage(self) -> Optional[str]:
        """The lmlab stage that wrote it (``pretrain``, ``sft``, ``reward``, ``ppo``, ``dpo``, ``import``) or None."""
        return self.meta.get("stage")

    @property
    def tokens_seen(self) -> int:
        return int(self.meta.get("tokens_seen", 0))

    @property
    def tokenizer_info(self) -> Optional[dict[str, Any]]:
        """``{"vocab_size", "fingerprint"}`` of the tokenizer it was trained with, or None when unknown."""
        if self.meta.get("tokenizer"):
            return dict(self.meta["tokenizer"])
        if self._tokenizer_info is None and self.path.is_dir() and _has_tokenizer(self.path):
            from lmlab.data.posttrain.datamodules import tokenizer_info

            try:
                self._tokenizer_info = tokenizer_info(self.tokenizer())
            except ConfigError:
                return None
        return self._tokenizer_info

    # -- weights ------------------------------------------------------------------------
    @property
    def weights(self) -> dict[str, torch.Tensor]:
        """Every model tensor (backbone and heads), named as in ``CausalLM`` / ``ScalarModel``."""
        if self._weights is None:
            self._weights = self._weights_loader()
        return self._weights

    def load_into(self, model: torch.nn.Module, strict_backbone: bool = True) -> list[str]:
        """Copy the matching tensors into ``model`` (see :func:`load_backbone_weights`); returns what it lacked."""
        return load_backbone_weights(model, self.weights, strict_backbone, field=self.field)

    def causal_lm(self, device: Optional[torch.device | str] = None, dtype: Optional[torch.dtype] = None):
        """A :class:`~lmlab.models.CausalLM` holding exactly these weights (LM head included), in eval mode."""
        from lmlab.models.hf import build_causal_lm

        state = self.weights
        if self._mapped:  # the model keeps these tensors: own them rather than pages of a file that may be replaced
            state = {k: v.clone() for k, v in state.items()}
        model = build_causal_lm(self.require_config(), state, str(self.path), dtype, field=self.field)
        return model.to(device) if device is not None else model

    def scalar_model(self, head: bool = True, zero_init_head: bool = False):
        """A :class:`~lmlab.models.ScalarModel`; with ``head`` its score head must be stored (a reward model),
        without it only the backbone is taken and the head keeps its fresh initialisation."""
        from lmlab.models.heads import ScalarModel

        model = ScalarModel(self.require_config(), zero_init_head=zero_init_head)
        state = self.weights if head else {k: v for k, v in self.weights.items() if k.startswith("backbone.")}
        missing = load_backbone_weights(model, state, field=self.field)
        if head and any(k.startswith("score.") for k in missing):
            raise ConfigError(self.field, f"{self.path} holds no score head (the reward head of a reward model)",
                              "point it at a reward-model checkpoint (lmlab fit with RewardModule)")
        return model

    # -- tokenizer ------------------------------------------------------------------------
    def has_tokenizer(self) -> bool:
        """Whether :meth:`tokenizer` finds one without being told (recorded, beside it, or in its run's config)."""
        return bool(self.meta.get("tokenizer_files")) or find_tokenizer(self.path) is not None

    def tokenizer(self, spec: Any = None, *, fallback: Any = None, field: str = "--tokenizer") -> Any:
        """The tokenizer to use with these weights.

        ``spec`` (a loaded tokenizer or its path) wins; else the tokenizer the run
        recorded in the checkpoint; else one beside it (an export directory, a
        ``tokenizer/`` folder) or named by its run's saved ``config.yaml``
        (checkpoints written before runs recorded their tokenizer); else ``fallback``.
        """
        from lmlab.data.tokenizer import load_tokenizer, tokenizer_from_files

        if spec is not None and not isinstance(spec, (str, os.PathLike)):
            return spec
        if spec is not None:
            return load_tokenizer(os.fspath(spec), field=field)
        if self.meta.get("tokenizer_files"):
            return tokenizer_from_files(self.meta["tokenizer_files"], field=field)
        found = find_tokenizer(self.path)
        if found is None and fallback is not None:
            return self.tokenizer(fallback, field=field)
        if found is None:
            raise ConfigError(field, f"{self.path} records no tokenizer and none was found beside it or in its run's config.yaml",
                              "pass --tokenizer DIR")
        return load_tokenizer(os.fspath(found), field=field)


def open_checkpoint(path: str | os.PathLike | Checkpoint, field: str = "model.init_from") -> Checkpoint:
    """Open ``path`` (see the module docstring) once; errors are one-line ``ConfigError``\\ s naming ``field``."""
    if isinstance(path, Checkpoint):
        return path
    p = Path(os.path.expanduser(str(path)))
    if not p.exists():
        raise ConfigError(field, f"checkpoint {p} does not exist", "check the path (a .ckpt file or an export directory)")
    if p.is_dir():
        from lmlab.models.hf import hf_dir_config, is_hf_dir, load_hf_state

        if is_hf_dir(p):
            return Checkpoint(p, field, "hf", hf_dir_config(p), {}, lambda: load_hf_state(p)[1])
        if not (p / EXPORT_WEIGHTS).is_file():
            raise ConfigError(field, f"{p} has no {EXPORT_WEIGHTS} or config.json",
                              "point it at a .ckpt file, an lmlab export or a transformers model directory")
        return Checkpoint(p, field, "export", _export_config(p / EXPORT_CONFIG, field), {},
                          lambda: _read_safetensors(p / EXPORT_WEIGHTS, field))
    if p.suffix == ".safetensors":
        return Checkpoint(p, field, "safetensors", _export_config(p.parent / EXPORT_CONFIG, field), {},
                          lambda: _read_safetensors(p, field))
    ckpt, mapped = _torch_load(p, field)
    if not isinstance(ckpt, dict):
        raise ConfigError(field, f"{p} holds a {type(ckpt).__name__}, not a checkpoint", "point it at a .ckpt written by lmlab")
    meta = ckpt.get("lmlab") if isinstance(ckpt.get("lmlab"), dict) else {}
    state = ckpt.get("state_dict", ckpt)
    if not isinstance(state, dict):
        raise ConfigError(field, f"{p} has no state_dict", "point it at a .ckpt written by lmlab")
    weights = {k[len("model."):]: v for k, v in state.items() if isinstance(k, str) and k.startswith("model.")}
    cfg = meta.get("model_config")
    config = TransformerConfig.from_dict(cfg) if isinstance(cfg, dict) else None
    return Checkpoint(p, field, "lightning", config, dict(meta), lambda: weights, mapped=mapped)


def _torch_load(p: Path, field: str) -> tuple[Any, bool]:
    """(loaded object, memory-mapped?) with ``weights_only=True``; every failure is one ConfigError line."""
    try:
        return torch.load(p, map_location="cpu", weights_only=True, mmap=True), True
    except pickle.UnpicklingError:
        raise ConfigError(field, f"{p} holds pickled Python objects other than tensors and plain data, which lmlab "
                                 "never loads (loading them could run code)",
                          "save weights and plain metadata only, e.g. with lmlab fit or lmlab export") from None
    except Exception:
        pass  # a file in the pre-zip format cannot be memory-mapped: read it whole
    try:
        return torch.load(p, map_location="cpu", weights_only=True), False
    except pickle.UnpicklingError:
        raise ConfigError(field, f"{p} holds pickled Python objects other than tensors and plain data, which lmlab "
                                 "never loads (loading them could run code)",
                          "save weights and plain metadata only, e.g. with lmlab fit or lmlab export") from None
    except Exception as e:
        raise ConfigError(field, f"cannot read checkpoint {p}: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
                          "check that the file is a complete checkpoint (a copy or save may have been cut short)") from None


def _export_config(cfg: Path, field: str) -> Optional[TransformerConfig]:
    if not cfg.is_file():
        return None
    try:
        return TransformerConfig.from_dict(json.loads(cfg.read_text()))
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(field, f"{cfg} is not a valid model config ({str(e).splitlines()[0]})", "re-export the checkpoint") from None


def _read_safetensors(p: Path, field: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(p))
    except Exception as e:
        raise ConfigError(field, f"cannot read {p}: {str(e).splitlines()[0]}",
                          "check that the file is complete (a copy or save may have been cut short)") from None


def load_backbone_weights(model: torch.nn.Module, state: dict, strict_backbone: bool = True,
                          field: str = "model.init_from") -> list[str]:
    """Load every tensor whose name and shape match; the backbone must match completely.

    Returns the names of the model's tensors that were not in ``state``
    (for example a fresh reward head on a pretrained backbone).
    """
    own = model.state_dict()
    matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing_backbone = [k for k in own if k.startswith("backbone.") and k not in matched]
    if strict_backbone and missing_backbone:
        raise ConfigError(
            field,
            f"checkpoint does not match the backbone ({len(missing_backbone)} tensors missing or reshaped, e.g. {missing_backbone[0]})",
            "use a checkpoint of the same model.config",
        )
    model.load_state_dict(matched, strict=False)
    return [k for k in own if k not in matched]


# --- the tokenizer a run records ------------------------------------------------------------------


def tokenizer_record(tokenizer: Any) -> dict[str, Any]:
    """What a checkpoint's ``lmlab`` metadata holds about its tokenizer, as plain data.

    ``tokenizer``: ``{"vocab_size", "fingerprint"}``, checked against the data
    of a later stage; ``tokenizer_files``: the saved tokenizer itself
    (``{file name: text}``, special tokens and chat template included), so
    eval, export and ``init_from`` need no ``--tokenizer`` wherever the file goes.
    """
    from lmlab.data.posttrain.datamodules import tokenizer_info
    from lmlab.data.tokenizer import tokenizer_files

    record: dict[str, Any] = {"tokenizer": tokenizer_info(tokenizer)}
    files = tokenizer_files(tokenizer)
    if files is not None:
        record["tokenizer_files"] = files
    return record


def _has_tokenizer(d: Path) -> bool:
    return d.is_dir() and any((d / f).is_file() for f in _TOKENIZER_FILES)


def _run_config_tokenizer(config_file: Path) -> Optional[Path]:
    """The tokenizer path named in a saved LightningCLI ``config.yaml``, resolved to an existing directory."""
    import yaml

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


def _run_configs(d: Path) -> list[Path]:
    """Saved run configs in ``d``: its own ``config.yaml`` and its loggers' (``<logger>/version_N/config.yaml``)."""
    found = [d / name for name in ("config.yaml", "config.yml") if (d / name).is_file()]
    found += sorted(d.glob("*/version_*/config.yaml"), reverse=True)
    return found


def find_tokenizer(ckpt: str | os.PathLike) -> Optional[Path]:
    """Where the tokenizer of ``ckpt`` lives on disk, or None: the export directory itself, a ``tokenizer/``
    beside the checkpoint, or the ``data.tokenizer`` of its run's saved ``config.yaml`` (up to 4 levels up)."""
    p = Path(os.path.expanduser(str(ckpt)))
    start = p if p.is_dir() else p.parent
    if _has_tokenizer(start):
        return start
    if _has_tokenizer(start / "tokenizer"):
        return start / "tokenizer"
    for d in [start, *list(start.parents)[:_RUN_CONFIG_DEPTH]]:
        for config_file in _run_configs(d):
            found = _run_config_tokenizer(config_file)
            if found is not None:
                return found
    return None
