"""Global batch size over training, including the batch-size ramp.

With a ramp, the global batch at optimizer step t is
``base * 2 ** floor(t / interval)``, capped at ``cap``. The extra sequences
are taken as more gradient-accumulation micro-batches, so the micro-batch (and
memory) stays fixed, each optimizer step still sees one global batch, and the
LR schedule, which is a function of the optimizer step, needs no correction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from lmlab.errors import ConfigError


@dataclass
class BatchSchedule:
    """Global batch (in sequences) per optimizer step.

    Args:
        base: Global batch at step 0.
        ramp_interval: Double the batch every this many steps (0: no ramp).
        cap: Largest global batch the ramp reaches (``None``: no cap).
    """

    base: int
    ramp_interval: int = 0
    cap: Optional[int] = None

    def __post_init__(self) -> None:
        if self.base <= 0:
            raise ConfigError("data.batch_size", f"must be positive, got {self.base}")
        if self.ramp_interval < 0:
            raise ConfigError("data.batch_ramp_interval", f"must be >= 0, got {self.ramp_interval}")
        if self.cap is not None and self.cap < self.base:
            raise ConfigError("data.batch_ramp_cap", f"cap {self.cap} is below the base batch {self.base}")

    def at(self, step: int) -> int:
        """Global batch at optimizer step ``step``."""
        if self.ramp_interval <= 0:
            return self.base
        size = self.base * 2 ** (step // self.ramp_interval)
        return min(size, self.cap) if self.cap is not None else size

    def samples_before(self, step: int) -> int:
        """Sequences consumed by steps 0 .. step-1 (closed form per doubling segment)."""
        if self.ramp_interval <= 0:
            return self.base * step
        total, t = 0, 0
        while t < step:
            seg_end = min(step, (t // self.ramp_interval + 1) * self.ramp_interval)
            size = self.at(t)
            if self.cap is not None and size >= self.cap:
                return total + size * (step - t)
            total += size * (seg_end - t)
            t = seg_end
        return total

    def check_divisible(self, micro_batch_size: int, world_size: int, max_steps: int | None = None) -> None:
        unit = micro_batch_size * world_size
        sizes = {self.base} | ({self.cap} if self.cap else set())
        if self.ramp_interval and max_steps:
            sizes |= {self.at(t) for t in range(0, max_steps, self.ramp_interval)}
        for size in sorted(sizes):
            if size % unit:
                raise ConfigError(
                    "data.batch_size",
                    f"global batch {size} is not divisible by micro_batch_size {micro_batch_size} x world size {world_size}",
                    f"use a global batch that is a multiple of {unit}",
                )
