"""Loading model weights across stages without unpickling arbitrary objects.

Accepts a Lightning checkpoint written by an lmlab module (``.ckpt``, read
with ``torch.load(weights_only=True)``) or a safetensors file / directory
written by ``lmlab export``. Returns the model config stored with it and the
state dict with the ``model.`` prefix of the LightningModule removed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch

from lmlab.errors import ConfigError
from lmlab.models.config import TransformerConfig


def load_model_state(path: str | os.PathLike, field: str = "model.init_from") -> tuple[Optional[dict], dict]:
    """(model config dict or None, state dict) from a checkpoint file or export directory."""
    p = Path(os.path.expanduser(str(path)))
    if p.is_dir():
        if (p / "config.json").is_file():
            # a transformers checkpoint (an `lmlab export --format hf` directory or any matching HF model)
            from lmlab.models.hf import load_hf_state

            config, state = load_hf_state(p)
            return {**config.to_dict(), "preset": None}, state
        st = p / "model.safetensors"
        cfg = p / "lmlab_config.json"
        if not st.exists():
            raise ConfigError(field, f"{p} has no model.safetensors", "point it at a .ckpt file or an lmlab export")
        from safetensors.torch import load_file

        config = json.loads(cfg.read_text()) if cfg.exists() else None
        return config, load_file(str(st))
    if not p.exists():
        raise ConfigError(field, f"checkpoint {p} does not exist", "check the path")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return None, load_file(str(p))
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(field, f"cannot read checkpoint {p}: {str(e).splitlines()[0]}") from None
    meta = ckpt.get("lmlab", {})
    state = ckpt.get("state_dict", ckpt)
    state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    return meta.get("model_config"), state


def config_from_checkpoint(path: str | os.PathLike, field: str = "model.init_from") -> TransformerConfig:
    cfg, _ = load_model_state(path, field)
    if cfg is None:
        raise ConfigError(field, f"{path} carries no model config", "set model.config explicitly")
    return TransformerConfig.from_dict(cfg)


def load_backbone_weights(model: torch.nn.Module, state: dict, strict_backbone: bool = True) -> list[str]:
    """Load every tensor whose name matches; the backbone must match completely.

    Returns the names of the model's parameters that were not in ``state``
    (for example a fresh reward head on a pretrained backbone).
    """
    own = model.state_dict()
    matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing_backbone = [k for k in own if k.startswith("backbone.") and k not in matched]
    if strict_backbone and missing_backbone:
        raise ConfigError(
            "model.init_from",
            f"checkpoint does not match the backbone ({len(missing_backbone)} tensors missing or reshaped, e.g. {missing_backbone[0]})",
            "use a checkpoint of the same model.config",
        )
    model.load_state_dict(matched, strict=False)
    return [k for k in own if k not in matched]
