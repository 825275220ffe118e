"""Hyperparameter and scaling sweeps: W&B sweep YAMLs, run online or offline.

The same YAML (``sweeps/*.yaml``) runs through W&B (``wandb sweep`` then
``wandb agent``) or locally with ``lmlab sweep run``, which drives W&B's
open-source sweep engine and launches the runs as subprocesses
(:class:`~lmlab.sweeps.runner.SweepRunner`). :mod:`lmlab.sweeps.macros`
expands commands exactly as the agent does; :mod:`lmlab.sweeps.spec`
validates the YAML; :mod:`lmlab.sweeps.preflight` dry-parses the command;
:mod:`lmlab.sweeps.state` makes interrupted sweeps resumable.
"""

from __future__ import annotations

from lmlab.sweeps.macros import DEFAULT_COMMAND, command_args, expand_command
from lmlab.sweeps.spec import SweepSpec, load_spec, validate_config

__all__ = ["DEFAULT_COMMAND", "SweepSpec", "command_args", "expand_command", "load_spec", "validate_config"]
