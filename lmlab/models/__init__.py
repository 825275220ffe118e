"""The transformer backbone, its heads, generation and FLOP/parameter counts."""

from lmlab.models.config import PRESETS, TransformerConfig, preset
from lmlab.models.counting import ParamCounts, count_params, flops_per_token, training_flops
from lmlab.models.generation import GenerationOutput, generate, left_pad
from lmlab.models.heads import CausalLM, ScalarModel
from lmlab.models.transformer import KVCache, Transformer

__all__ = [
    "PRESETS",
    "TransformerConfig",
    "preset",
    "ParamCounts",
    "count_params",
    "flops_per_token",
    "training_flops",
    "GenerationOutput",
    "generate",
    "left_pad",
    "CausalLM",
    "ScalarModel",
    "KVCache",
    "Transformer",
]
