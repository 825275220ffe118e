"""The Chinchilla parametric loss law L(N, D) = E + A / N^alpha + B / D^beta and its compute-optimal frontier."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from lmlab.scaling.results import FLOPS_PER_PARAM_TOKEN


@dataclass(frozen=True)
class ChinchillaLaw:
    """Parameters of L(N, D) = E + A / N^alpha + B / D^beta (N parameters, D tokens)."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, N: np.ndarray | float, D: np.ndarray | float) -> np.ndarray | float:
        """Predicted loss for N parameters trained on D tokens."""
        return self.E + self.A / np.power(N, self.alpha) + self.B / np.power(D, self.beta)

    @property
    def a(self) -> float:
        """Exponent of N_opt ~ C^a, a = beta / (alpha + beta)."""
        return self.beta / (self.alpha + self.beta)

    @property
    def b(self) -> float:
        """Exponent of D_opt ~ C^b, b = alpha / (alpha + beta)."""
        return self.alpha / (self.alpha + self.beta)

    @property
    def G(self) -> float:
        """G = (alpha A / (beta B))^(1 / (alpha + beta)); N_opt = G (C/6)^a, D_opt = (C/6)^b / G."""
        ratio = self.alpha * self.A / (self.beta * self.B)
        if not ratio > 0 or not self.alpha + self.beta > 0:
            # a term that does not fall with N or D (e.g. a bootstrap resample with alpha < 0): no interior optimum
            return float("nan")
        return float(ratio ** (1.0 / (self.alpha + self.beta)))

    def optimal(self, C: np.ndarray | float) -> tuple[np.ndarray | float, np.ndarray | float]:
        """(N_opt, D_opt) minimising the law subject to C = 6 N D (Hoffmann et al. 2022, eq. 4)."""
        base = np.asarray(C, dtype=float) / FLOPS_PER_PARAM_TOKEN
        n_opt = self.G * base**self.a
        d_opt = base**self.b / self.G
        if np.ndim(C) == 0:
            return float(n_opt), float(d_opt)
        return n_opt, d_opt

    def optimal_loss(self, C: np.ndarray | float) -> np.ndarray | float:
        """Loss on the compute-optimal frontier at compute C."""
        n_opt, d_opt = self.optimal(C)
        return self.loss(n_opt, d_opt)

    def as_dict(self) -> dict[str, float]:
        """E, A, B, alpha, beta plus the implied a, b and G."""
        out = {k: float(v) for k, v in asdict(self).items()}
        out.update(a=self.a, b=self.b, G=self.G)
        return out


#: Besiroglu et al. 2024 ("Chinchilla Scaling: A replication attempt") headline approach-3 fit.
EPOCH_2024 = ChinchillaLaw(E=1.82, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658)

#: Hoffmann et al. 2022 approach-3 values as printed in the paper text.
HOFFMANN_2022 = ChinchillaLaw(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
