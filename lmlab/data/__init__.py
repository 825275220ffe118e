"""Sources, tokenizer, packing, mixture sampling and DataModules."""

from lmlab.data.datamodule import PretrainDataModule
from lmlab.data.sources import SourceConfig
from lmlab.data.tokenizer import TokenizerTrainConfig

__all__ = ["PretrainDataModule", "SourceConfig", "TokenizerTrainConfig"]
