"""Peak dense FLOP/s of common accelerators, for MFU.

Values are the vendors' dense (no sparsity) tensor-core peaks for bf16/fp16;
``float32`` uses the TF32 tensor-core peak on NVIDIA parts. Override with
``model.peak_flops_per_device`` for anything not listed or for a CPU.
"""

from __future__ import annotations

from typing import Optional

import torch

#: name fragment (lower case) -> {precision: FLOP/s}
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "h200": {"bf16": 989e12, "fp16": 989e12, "fp32": 494.5e12},
    "h100 pcie": {"bf16": 756e12, "fp16": 756e12, "fp32": 378e12},
    "h100": {"bf16": 989e12, "fp16": 989e12, "fp32": 494.5e12},
    "gh200": {"bf16": 989e12, "fp16": 989e12, "fp32": 494.5e12},
    "b200": {"bf16": 2250e12, "fp16": 2250e12, "fp32": 1100e12},
    "a100": {"bf16": 312e12, "fp16": 312e12, "fp32": 156e12},
    "a10g": {"bf16": 125e12, "fp16": 125e12, "fp32": 62.5e12},
    "l40s": {"bf16": 362e12, "fp16": 362e12, "fp32": 183e12},
    "l4": {"bf16": 121e12, "fp16": 121e12, "fp32": 60e12},
    "v100": {"bf16": 0.0, "fp16": 125e12, "fp32": 15.7e12},
    "t4": {"bf16": 0.0, "fp16": 65e12, "fp32": 8.1e12},
    "rtx 4090": {"bf16": 165e12, "fp16": 165e12, "fp32": 82.6e12},
    "rtx 3090": {"bf16": 71e12, "fp16": 71e12, "fp32": 35.6e12},
    "mi300x": {"bf16": 1307e12, "fp16": 1307e12, "fp32": 163.4e12},
    "mi250x": {"bf16": 383e12, "fp16": 383e12, "fp32": 95.7e12},
}


def precision_key(precision: str | int | None) -> str:
    p = str(precision or "32")
    if "bf16" in p:
        return "bf16"
    if "16" in p:
        return "fp16"
    return "fp32"


def lookup_peak_flops(device_name: str, precision: str | int | None = "bf16") -> Optional[float]:
    """Peak FLOP/s for a device name such as ``NVIDIA H100 80GB HBM3``; None if unknown."""
    name = device_name.lower()
    for key, table in PEAK_FLOPS.items():
        if key in name:
            value = table[precision_key(precision)]
            return value or None
    return None


def detect_peak_flops(device: torch.device, precision: str | int | None) -> Optional[float]:
    if device.type == "cuda":
        return lookup_peak_flops(torch.cuda.get_device_name(device), precision)
    return None
