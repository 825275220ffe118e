"""int8 weights for CPU serving."""

from __future__ import annotations

import torch


def quantize_int8(model: torch.nn.Module) -> torch.nn.Module:
    """Dynamic int8 quantization of every ``nn.Linear`` (weights stored as int8, activations quantized per
    batch at run time) with torch's own ``quantize_dynamic``; the model keeps its ``config``."""
    import warnings

    from torch.ao.quantization import quantize_dynamic

    config = model.config
    with warnings.catch_warnings():  # torch marks torch.ao quantization deprecated (torchao succeeds it); it still runs
        warnings.simplefilter("ignore")
        q = quantize_dynamic(model.float().eval(), {torch.nn.Linear}, dtype=torch.qint8)
    q.config = config
    return q
