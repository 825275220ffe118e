"""Load and validate a W&B sweep YAML.

The file is a standard W&B sweep configuration (``method``, ``metric``,
``parameters``, ``program``/``command``, ``run_cap``, ...), so the same file
works with ``wandb sweep`` online and ``lmlab sweep run`` offline. Checks, all
before any run starts:

* the YAML parses to a mapping;
* every top-level key is one W&B knows (a typo such as ``paramters`` is named,
  with the closest valid key);
* the W&B sweep schema (the ``sweeps`` package) accepts it: method, parameter
  distributions, metric goal;
* what the offline runner needs: a ``metric.name``, a ``program`` when the
  command uses ``${program}``, a method it can run (grid, random, bayes).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from lmlab.errors import ConfigError
from lmlab.sweeps.macros import uses_macro

#: Top-level keys of a W&B sweep configuration (the ``sweeps`` package schema).
TOP_LEVEL_KEYS: tuple[str, ...] = (
    "apiVersion",
    "kind",
    "controller",
    "description",
    "program",
    "job",
    "image_uri",
    "entity",
    "project",
    "method",
    "command",
    "name",
    "run_cap",
    "metric",
    "metrics",
    "scheduler",
    "early_terminate",
    "parameters",
)
LOCAL_METHODS = ("grid", "random", "bayes")


def import_sweeps():
    """The W&B sweep engine (PyPI ``sweeps``), imported quietly; a ConfigError names the install line."""
    try:
        with warnings.catch_warnings():
            # the engine's pydantic models use v1-style config keys; harmless noise on import
            warnings.simplefilter("ignore")
            import sweeps  # noqa: F401
            from sweeps import bayes_search  # noqa: F401  (next_run imports it; it needs scikit-learn)
    except ImportError as exc:
        raise ConfigError(
            "lmlab sweep",
            f"the W&B sweep engine is not importable ({exc})",
            "pip install --no-deps sweeps && pip install jsonref scikit-learn",
        ) from None
    return sweeps


@dataclass(frozen=True)
class SweepSpec:
    """A validated sweep configuration and where it came from."""

    path: str
    config: dict[str, Any]
    name: str
    method: str
    metric: str
    goal: str
    command: Optional[list[Any]]
    program: Optional[str]
    parameters: dict[str, Any] = field(repr=False, default_factory=dict)
    run_cap: Optional[int] = None

    @property
    def digest(self) -> str:
        """Short hash of the configuration: a state directory belongs to exactly one sweep."""
        blob = json.dumps(self.config, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    @property
    def sweep_id(self) -> str:
        """Offline sweep id (WANDB_SWEEP_ID of the runs): ``local-<name>-<digest>``."""
        slug = re.sub(r"[^A-Za-z0-9_-]+", "-", self.name).strip("-") or "sweep"
        return f"local-{slug}-{self.digest[:8]}"

    def parameter_names(self) -> list[str]:
        """Top-level parameter names (nested groups count once)."""
        return list(self.parameters)

    def minimize(self) -> bool:
        """Whether smaller metric values are better."""
        return self.goal == "minimize"


def _schema_field(message: str, config: dict[str, Any]) -> str:
    """Best guess at the key a schema message is about."""
    m = re.search(r"invalid hyperparameter configuration: (\S+)", message)
    if m:
        return f"parameters.{m.group(1)}"
    for key in config.get("parameters", {}) or {}:
        if repr(key) in message or f"'{key}'" in message:
            return f"parameters.{key}"
    for key in ("method", "metric", "command", "early_terminate", "run_cap", "program", "parameters"):
        if key in message:
            return key
    m = re.search(r"'(\w+)'", message)
    if m and m.group(1) in TOP_LEVEL_KEYS:
        return m.group(1)
    return "sweep"


def validate_config(config: Any, source: str = "<sweep>") -> SweepSpec:
    """Check a parsed sweep config; raise :class:`ConfigError` naming the offending key."""
    if not isinstance(config, dict):
        raise ConfigError(source, f"a sweep must be a YAML mapping, got {type(config).__name__}", "see sweeps/chinchilla_grid.yaml")
    for key in config:
        if key not in TOP_LEVEL_KEYS:
            close = difflib.get_close_matches(str(key), TOP_LEVEL_KEYS, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(TOP_LEVEL_KEYS)}"
            raise ConfigError(str(key), f"unknown top-level key in {source}", hint)
    method = config.get("method")
    if method is None:
        raise ConfigError("method", f"missing in {source}", "set method: grid, random or bayes")
    sweeps = import_sweeps()
    from sweeps.config.schema import validator

    errors = sorted(validator.iter_errors(config), key=lambda e: len(e.absolute_path), reverse=True)
    if errors:
        # the deepest error is the most specific; its path names the key (parameters.lr, metric, ...)
        err = errors[0]
        path = ".".join(str(p) for p in err.absolute_path)
        field_name = path if path else _schema_field(err.message, config)
        more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
        raise ConfigError(field_name, f"{err.message}{more}", f"fix {source} against the W&B sweep schema")
    violations = sweeps.schema_violations_from_proposed_config(config)
    if violations:
        first = violations[0]
        more = f" (+{len(violations) - 1} more)" if len(violations) > 1 else ""
        raise ConfigError(_schema_field(first, config), f"{first}{more}", f"fix {source} against the W&B sweep schema")
    if method not in LOCAL_METHODS:
        raise ConfigError("method", f"{method!r} cannot run offline", f"use one of {', '.join(LOCAL_METHODS)}")
    metric = config.get("metric") or {}
    if not metric.get("name"):
        raise ConfigError("metric", f"{source} has no metric.name", "add metric: {name: val/loss, goal: minimize}")
    goal = metric.get("goal", "minimize")
    command = config.get("command")
    if command is not None and (not isinstance(command, list) or not all(isinstance(t, (str, int, float)) for t in command)):
        raise ConfigError("command", "must be a list of strings", "e.g. [${env}, ${interpreter}, -m, lmlab, fit, ..., ${args}]")
    program = config.get("program")
    if uses_macro(command, "program") and not program:
        raise ConfigError("program", "the command uses ${program} but no program is set", "add program: or drop ${program}")
    run_cap = config.get("run_cap")
    name = str(config.get("name") or Path(source).stem)
    return SweepSpec(
        path=source,
        config=config,
        name=name,
        method=method,
        metric=str(metric["name"]),
        goal=goal,
        command=list(command) if command is not None else None,
        program=program,
        parameters=dict(config.get("parameters") or {}),
        run_cap=int(run_cap) if run_cap is not None else None,
    )


def load_spec(path: str | Path) -> SweepSpec:
    """Read a sweep YAML and :func:`validate_config` it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), "sweep file not found", "pass a sweep YAML such as sweeps/chinchilla_grid.yaml")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), f"not valid YAML: {str(exc).splitlines()[0]}", "fix the YAML syntax") from None
    return validate_config(config, str(path))
