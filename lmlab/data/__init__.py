"""Sources, tokenizer, packing, mixture sampling and DataModules.

Exports are resolved lazily so light users (chat formatting, readers) do not
pay for importing Lightning.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "PretrainDataModule": "lmlab.data.pretrain.datamodule",
    "SourceConfig": "lmlab.data.pretrain.sources",
    "TokenizerTrainConfig": "lmlab.data.tokenizer",
    "SFTDataModule": "lmlab.data.posttrain.datamodules",
    "PreferenceDataModule": "lmlab.data.posttrain.datamodules",
    "PromptDataModule": "lmlab.data.posttrain.datamodules",
    "VerifiableData": "lmlab.data.posttrain.datamodules",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lmlab.data' has no attribute {name!r}")
