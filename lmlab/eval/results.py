"""Writing results: atomic JSON / JSONL files and JSON-safe conversion."""

from __future__ import annotations

import dataclasses
import enum
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lmlab.atomic import atomic_write_text


def to_jsonable(obj: Any) -> Any:
    """Convert numpy scalars/arrays, enums, paths, tuples and dataclasses to JSON types."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "tolist"):  # numpy scalar or array
        return obj.tolist()
    return obj


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Atomically write ``obj`` as indented JSON."""
    return atomic_write_text(path, json.dumps(to_jsonable(obj), indent=2, ensure_ascii=False) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, rows: Iterable[Any]) -> Path:
    """Atomically write one JSON object per line."""
    text = "".join(json.dumps(to_jsonable(r), ensure_ascii=False) + "\n" for r in rows)
    return atomic_write_text(path, text)
