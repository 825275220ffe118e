"""Peak dense FLOP/s of common accelerators, for MFU.

Values are the vendors' dense (no sparsity) tensor-core peaks for bf16/fp16;
``float32`` uses the TF32 tensor-core peak on NVIDIA parts. Override with
``model.settings.peak_flops_per_device`` for anything not listed or for a CPU.
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


#: name fragment (lower case) -> device memory in GiB (the largest common variant)
DEVICE_MEMORY_GIB: dict[str, float] = {
    "h200": 141, "h100 pcie": 80, "h100": 80, "gh200": 96, "b200": 180, "a100": 80, "a10g": 24, "l40s": 48,
    "l4": 24, "v100": 32, "t4": 16, "rtx 4090": 24, "rtx 3090": 24, "mi300x": 192, "mi250x": 128,
}

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


def lookup_device_memory(device_name: str) -> Optional[float]:
    """Device memory in bytes for a name such as ``H100``; None if unknown."""
    name = device_name.lower()
    for key, gib in DEVICE_MEMORY_GIB.items():
        if key in name:
            return gib * 1024**3
    return None


def parse_bytes(text: str | float | int) -> float:
    """``80GiB``, ``40 GB``, ``512MiB`` or a plain number of bytes -> bytes."""
    if isinstance(text, (int, float)):
        return float(text)
    s = str(text).strip().lower().replace(" ", "")
    i = len(s)
    while i > 0 and s[i - 1].isalpha():
        i -= 1
    number, unit = s[:i], s[i:]
    if unit not in _UNITS or not number:
        raise ValueError(f"cannot read {text!r} as a size; write e.g. 80GiB, 40GB or 512MiB")
    return float(number) * _UNITS[unit]
