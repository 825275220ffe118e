"""A disk cache of a teacher's top-k logits, so a distillation run need not re-run the teacher.

One safetensors file per micro-batch, named by a hash of its input token ids
(content-addressed: any run that feeds the teacher the same tokens hits it,
whatever the step, seed or student), holding ``values`` (the k largest
logits per position, float32, before temperature) and ``indices`` (their token
ids, int32). ``cache.json`` records the teacher and ``k``; opening the cache
with another teacher or ``k`` is a ``ConfigError`` rather than silently mixed
logits. Files are written to a temporary name and renamed
(:mod:`lmlab.atomic`), so a crash never leaves a half-written entry.

Size: ``B * T * k * 8`` bytes per micro-batch (k = 32: 256 bytes per token,
against ``4 * V`` for full float32 logits).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

import torch

from lmlab.atomic import atomic_path, atomic_write_json
from lmlab.errors import ConfigError

__all__ = ["TopKLogitCache", "batch_key"]

CACHE_META = "cache.json"


def batch_key(input_ids: torch.Tensor) -> str:
    """A name for the teacher logits of ``input_ids`` (shape and contents)."""
    ids = input_ids.detach().to("cpu", torch.int64).contiguous()
    h = hashlib.sha256(str(tuple(ids.shape)).encode())
    h.update(ids.numpy().tobytes())
    return h.hexdigest()[:32]


class TopKLogitCache:
    """Top-k teacher logits on disk (see the module docstring).

    Args:
        root: Cache directory (created when missing).
        top_k: Logits kept per position.
        teacher: What identifies the teacher (its path and stored config); a
            cache written for another teacher is refused.
        field: The config field named in errors.
    """

    def __init__(self, root: str | os.PathLike, top_k: int, teacher: dict, field: str = "model.teacher_cache"):
        self.root = Path(os.path.expanduser(str(root)))
        self.top_k = int(top_k)
        self.field = field
        meta = {"top_k": self.top_k, "teacher": teacher}
        meta_file = self.root / CACHE_META
        if meta_file.is_file():
            found = json.loads(meta_file.read_text())
            if found != json.loads(json.dumps(meta)):
                raise ConfigError(field, f"{self.root} holds logits of another teacher or top_k ({found.get('top_k')} kept, "
                                         f"teacher {found.get('teacher', {}).get('path')})",
                                  "point it at a fresh directory for this teacher and top_k")
        else:
            self.root.mkdir(parents=True, exist_ok=True)
            atomic_write_json(meta_file, meta)

    def path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def get(self, key: str) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """``(values float32, indices int64)`` stored under ``key``, or None."""
        from safetensors.torch import load_file

        p = self.path(key)
        if not p.is_file():
            return None
        try:
            entry = load_file(str(p))
        except Exception as e:
            raise ConfigError(self.field, f"cannot read cached teacher logits {p}: {str(e).splitlines()[0]}",
                              "delete the file; it is rebuilt on the next step") from None
        return entry["values"], entry["indices"].long()

    def put(self, key: str, values: torch.Tensor, indices: torch.Tensor) -> None:
        from safetensors.torch import save_file

        tensors = {"values": values.detach().to("cpu", torch.float32).contiguous(),
                   "indices": indices.detach().to("cpu", torch.int32).contiguous()}
        with atomic_path(self.path(key)) as tmp:
            save_file(tensors, str(tmp))

    def __len__(self) -> int:
        return sum(1 for _ in self.root.glob("*.safetensors"))
