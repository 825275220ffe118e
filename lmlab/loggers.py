"""Experiment loggers.

:class:`CSVLogger` is Lightning's CSV logger whose ``save_dir`` may be left
out: ``lmlab fit`` then writes into the run folder, ``trainer.default_root_dir``
(Lightning's own CSV and TensorBoard loggers require the folder).

:class:`WandbLogger` is Lightning's W&B logger that goes offline by itself when
there is no way to reach a server (no API key, or ``WANDB_MODE=offline``), so
the same YAML runs on a laptop, in CI and on a cluster. Offline runs are
written under ``save_dir/wandb`` and uploaded later with ``wandb sync``.
"""

from __future__ import annotations

import netrc
import os
from typing import Any, Optional

from lightning.pytorch.loggers import CSVLogger as _LightningCSVLogger
from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger
from lightning.pytorch.utilities import rank_zero_info


def wandb_credentials_available() -> bool:
    """True when an API key is set in the environment or in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        rc = netrc.netrc()
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    return rc.authenticators(host) is not None


class CSVLogger(_LightningCSVLogger):
    """Lightning's ``CSVLogger`` (``<save_dir>/<name>/version_N/metrics.csv``) with an optional ``save_dir``.

    Args:
        save_dir: The folder above ``name``; unset, ``lmlab fit`` uses the run
            folder (``trainer.default_root_dir``), elsewhere the current folder.
        name, version, prefix, flush_logs_every_n_steps: As in Lightning.
    """

    def __init__(self, save_dir: Optional[str] = None, name: Optional[str] = "csv", version: Optional[int | str] = None,
                 prefix: str = "", flush_logs_every_n_steps: int = 100):
        super().__init__(save_dir=save_dir or ".", name=name, version=version, prefix=prefix,
                         flush_logs_every_n_steps=flush_logs_every_n_steps)


class WandbLogger(_LightningWandbLogger):
    """W&B logger that is offline automatically when no server can be used.

    Args:
        offline: ``None`` decides from the environment: offline when
            ``WANDB_MODE`` is ``offline``/``disabled`` or no API key is found.
        **kwargs: Everything Lightning's ``WandbLogger`` takes (project, name,
            group, tags, log_model, ...).
        save_dir: Where the offline run is written; unset, ``lmlab fit``
            uses the run folder (``trainer.default_root_dir``).
    """

    def __init__(self, offline: Optional[bool] = None, save_dir: Optional[str] = None, **kwargs: Any):
        mode = os.environ.get("WANDB_MODE", "").lower()
        if offline is None:
            offline = mode in ("offline", "dryrun", "disabled") or not wandb_credentials_available()
        if offline:
            os.environ.setdefault("WANDB_MODE", "offline")
        save_dir = save_dir or "."  # `lmlab fit` fills in the run folder (trainer.default_root_dir)
        os.makedirs(save_dir, exist_ok=True)
        super().__init__(offline=offline, save_dir=save_dir, **kwargs)
        if self._wandb_init.get("anonymous") is None:
            # Lightning always passes anonymous=None, and current wandb warns that the setting has no effect
            self._wandb_init.pop("anonymous", None)
        self._lmlab_offline = offline

    def finalize(self, status: str) -> None:
        super().finalize(status)
        if self._lmlab_offline and self._experiment is not None:
            run_dir = getattr(self._experiment, "dir", None)
            if run_dir:
                rank_zero_info(f"W&B ran offline; upload with: wandb sync {os.path.dirname(run_dir)}")
