"""Load and validate a table of training-run results for scaling-law fits.

Every fitter in :mod:`lmlab.scaling` consumes a :class:`ScalingData`: parallel
arrays of parameters ``N``, tokens ``D``, training compute ``C`` and final
``loss`` (plus an optional IsoFLOP ``budget`` label). Rows that cannot be
fitted (NaN, inf, non-positive values) and duplicate runs (same N and D) are
*reported* (returned as ``(row, reason)`` pairs and raised as one
``warnings.warn``) and excluded; they are never silently fitted.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

if TYPE_CHECKING:  # pandas is imported where a frame is made or read: `lmlab fit` imports this module at start-up
    import pandas as pd

from lmlab.errors import ConfigError

#: FLOPs per parameter per token for a training step (forward + backward), C = 6 N D.
FLOPS_PER_PARAM_TOKEN = 6.0


class Excluded(NamedTuple):
    """A data row left out of the fit. ``row`` is the 0-based data-row index (CSV line = row + 2)."""

    row: int
    reason: str


@dataclass(frozen=True)
class ScalingData:
    """Clean, fit-ready scaling results; all arrays have one entry per kept run."""

    N: np.ndarray
    D: np.ndarray
    C: np.ndarray
    loss: np.ndarray
    rows: np.ndarray
    budget: np.ndarray | None = None
    excluded: list[Excluded] = field(default_factory=list)
    source: str = "<frame>"
    compute_derived: bool = True

    def __len__(self) -> int:
        return int(self.N.shape[0])

    @property
    def n_points(self) -> int:
        """Number of runs that will be fitted."""
        return len(self)

    def frame(self) -> pd.DataFrame:
        """The kept runs as a DataFrame (columns N, D, C, loss[, budget]), indexed by source row."""
        cols = {"N": self.N, "D": self.D, "C": self.C, "loss": self.loss}
        if self.budget is not None:
            cols["budget"] = self.budget
        import pandas as pd

        return pd.DataFrame(cols, index=pd.Index(self.rows, name="row"))

    def subset(self, index: np.ndarray) -> ScalingData:
        """Rows ``index`` (positions, repeats allowed, e.g. a bootstrap resample) as a new table."""
        index = np.asarray(index)
        return ScalingData(
            N=self.N[index],
            D=self.D[index],
            C=self.C[index],
            loss=self.loss[index],
            rows=self.rows[index],
            budget=None if self.budget is None else self.budget[index],
            excluded=list(self.excluded),
            source=self.source,
            compute_derived=self.compute_derived,
        )


def _require_column(frame: pd.DataFrame, name: str, flag: str, source: str) -> pd.Series:
    if name not in frame.columns:
        have = ", ".join(map(str, frame.columns[:12]))
        raise ConfigError(
            flag,
            f"column {name!r} not found in {source}",
            f"pass the right column name with {flag}; columns are: {have}",
        )
    import pandas as pd

    return pd.to_numeric(frame[name], errors="coerce")


def group_near_equal(values: np.ndarray, rel_tol: float = 0.1) -> np.ndarray:
    """Label positive ``values`` so that values within ``rel_tol`` of a group's smallest member share a label.

    Groups are anchored on their smallest member (not chained pairwise) so that a
    slowly increasing sequence cannot merge two distinct budgets. Labels are the
    geometric mean of each group, which keeps them meaningful as FLOP budgets.
    """
    values = np.asarray(values, dtype=float)
    order = np.argsort(values)
    labels = np.empty_like(values)
    start = 0
    while start < len(order):
        anchor = values[order[start]]
        stop = start + 1
        while stop < len(order) and values[order[stop]] <= anchor * (1.0 + rel_tol):
            stop += 1
        members = order[start:stop]
        labels[members] = float(np.exp(np.mean(np.log(values[members]))))
        start = stop
    return labels


def from_frame(
    frame: pd.DataFrame,
    *,
    n_col: str = "N",
    d_col: str | None = "D",
    loss_col: str = "loss",
    compute_col: str | None = None,
    budget_col: str | None = None,
    duplicates: str = "first",
    source: str = "<frame>",
    warn: bool = True,
) -> ScalingData:
    """Validate a DataFrame of runs and return the clean :class:`ScalingData`.

    ``d_col`` may be ``None`` (or absent from the frame) when ``compute_col`` is
    given: then D = C / (6 N), Epoch AI's convention for the Chinchilla data.
    Without a compute column C = 6 N D. ``budget_col`` labels IsoFLOP budgets
    for approach 2. ``duplicates`` decides which run of a duplicate (N, D) pair
    is kept: ``"first"`` (file order) or ``"min"`` (lowest loss, e.g. the best of
    a learning-rate sweep); the others are excluded and reported either way.
    """
    if duplicates not in ("first", "min"):
        raise ConfigError("duplicates", f"unknown policy {duplicates!r}", "use 'first' or 'min'")
    frame = frame.reset_index(drop=True)
    n = _require_column(frame, n_col, "--n_col", source).to_numpy(dtype=float)
    loss = _require_column(frame, loss_col, "--loss_col", source).to_numpy(dtype=float)
    compute = None
    if compute_col is not None:
        compute = _require_column(frame, compute_col, "--compute_col", source).to_numpy(dtype=float)
    if d_col is not None and (d_col in frame.columns or compute is None):
        d = _require_column(frame, d_col, "--d_col", source).to_numpy(dtype=float)
    else:
        if compute is None:
            raise ConfigError("--d_col", "no token column and no compute column", "pass --d_col or --compute_col")
        with np.errstate(divide="ignore", invalid="ignore"):
            d = compute / (FLOPS_PER_PARAM_TOKEN * n)
    budget = None
    if budget_col is not None:
        budget = _require_column(frame, budget_col, "--budget_col", source).to_numpy(dtype=float)

    excluded: list[Excluded] = []
    keep = np.ones(len(frame), dtype=bool)
    checks = [("N", n), ("D", d), ("loss", loss)]
    if compute is not None:
        checks.append(("compute", compute))
    if budget is not None:
        checks.append(("budget", budget))
    for i in range(len(frame)):
        for name, arr in checks:
            v = arr[i]
            if not np.isfinite(v):
                excluded.append(Excluded(i, f"{name} is {'NaN' if np.isnan(v) else 'infinite'}"))
                keep[i] = False
                break
            if v <= 0:
                excluded.append(Excluded(i, f"{name} is not positive ({v:g})"))
                keep[i] = False
                break

    # Duplicate runs would double-weight one configuration; compare in log space
    # with rounding so that float noise from CSV round-trips still matches.
    key_n = np.round(np.log(np.where(keep, n, 1.0)), 9)
    key_d = np.round(np.log(np.where(keep, d, 1.0)), 9)
    seen: dict[tuple[float, float], int] = {}
    for i in np.flatnonzero(keep):
        key = (float(key_n[i]), float(key_d[i]))
        if key not in seen:
            seen[key] = int(i)
            continue
        first = seen[key]
        if duplicates == "min" and loss[i] < loss[first]:
            excluded.append(Excluded(first, f"duplicate run of row {i} (same N and D, higher loss)"))
            keep[first] = False
            seen[key] = int(i)
        else:
            why = "higher loss" if duplicates == "min" else "kept the first"
            excluded.append(Excluded(int(i), f"duplicate run of row {first} (same N and D, {why})"))
            keep[i] = False
    excluded.sort(key=lambda e: e.row)

    if warn and excluded:
        shown = "; ".join(f"row {e.row}: {e.reason}" for e in excluded[:5])
        more = f" (+{len(excluded) - 5} more)" if len(excluded) > 5 else ""
        warnings.warn(f"{source}: excluded {len(excluded)} row(s) from the fit: {shown}{more}", stacklevel=2)

    idx = np.flatnonzero(keep)
    n, d, loss = n[idx], d[idx], loss[idx]
    c = compute[idx] if compute is not None else FLOPS_PER_PARAM_TOKEN * n * d
    return ScalingData(
        N=n,
        D=d,
        C=c,
        loss=loss,
        rows=idx,
        budget=None if budget is None else budget[idx],
        excluded=excluded,
        source=source,
        compute_derived=compute is None,
    )


def load_results(
    path: str | Path,
    *,
    n_col: str = "N",
    d_col: str | None = "D",
    loss_col: str = "loss",
    compute_col: str | None = None,
    budget_col: str | None = None,
    duplicates: str = "first",
    warn: bool = True,
) -> ScalingData:
    """Read a results CSV and validate it with :func:`from_frame` (same keyword arguments)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), "results file not found", "check the path to the CSV")
    import pandas as pd

    try:
        frame = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), f"cannot parse as CSV: {str(exc).splitlines()[0]}", "pass a comma-separated file with a header row") from None
    return from_frame(
        frame,
        n_col=n_col,
        d_col=d_col,
        loss_col=loss_col,
        compute_col=compute_col,
        budget_col=budget_col,
        duplicates=duplicates,
        source=str(path),
        warn=warn,
    )


def require_points(n_points: int, n_params: int, method: str, what: str = "points") -> None:
    """Raise :class:`ConfigError` when ``n_points`` is too few to identify ``n_params`` parameters."""
    if n_points < n_params:
        raise ConfigError(
            method,
            f"{n_points} usable {what} but the fit has {n_params} parameters",
            f"provide at least {n_params} valid {what}",
        )


def require_distinct(values: np.ndarray, need: int, method: str, what: str, fix: str) -> None:
    """Raise :class:`ConfigError` when ``values`` takes fewer than ``need`` distinct values (a degenerate design)."""
    distinct = np.unique(np.asarray(values, dtype=float))
    if distinct.size < need:
        shown = ", ".join(f"{v:.3g}" for v in distinct[:3])
        raise ConfigError(method, f"{what} take {distinct.size} distinct value(s) ({shown}), "
                          f"so the fit cannot identify its parameters", fix)


def budgets_for(data: ScalingData, rel_tol: float = 0.1) -> np.ndarray:
    """IsoFLOP budget label per run: the explicit budget column, else near-equal compute values grouped."""
    if data.budget is not None:
        return data.budget
    return group_near_equal(data.C, rel_tol)
