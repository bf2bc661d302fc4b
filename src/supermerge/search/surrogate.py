"""Quadratic surrogates and the designs they are fitted on (MAP, arXiv 2406.07529).

A task's metric as a function of the D searched numbers ``x`` is approximated by a full
quadratic ``f(x) = c + b . x + sum_{i <= j} a_ij x_i x_j`` ((D + 1)(D + 2) / 2 terms),
fitted by least squares on measured points of the unit cube.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations_with_replacement

import numpy as np

from supermerge.search.errors import SearchError


def quadratic_terms(dimensions: int) -> int:
    """Return the number of coefficients of a full quadratic in ``dimensions`` variables."""
    return (dimensions + 1) * (dimensions + 2) // 2


def quadratic_features(x: np.ndarray) -> np.ndarray:
    """Return [N, terms] features: 1, every x_i, every x_i x_j with i <= j (in that order)."""
    x = np.atleast_2d(np.asarray(x, dtype=float))
    pairs = combinations_with_replacement(range(x.shape[1]), 2)
    columns = [np.ones(len(x)), *x.T, *(x[:, i] * x[:, j] for i, j in pairs)]
    return np.stack(columns, axis=1)


@dataclass(frozen=True)
class QuadraticSurrogate:
    """A fitted quadratic: ``coefficients`` over :func:`quadratic_features`, its fit's R²."""

    coefficients: np.ndarray
    r2: float

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray) -> QuadraticSurrogate:
        """Least-squares fit on points ``x`` [N, D] with values ``y`` [N]; returns it.

        Raises SearchError with fewer points than terms or a design that cannot
        determine every term (e.g. points all on one line). Costs one [N, terms] solve.
        """
        features = quadratic_features(x)
        terms = features.shape[1]
        if len(features) < terms:
            raise SearchError(f"{len(features)} points cannot fit a quadratic in "
                              f"{x.shape[1]} variables ({terms} terms)",
                              fix=f"measure at least {terms} points")
        coefficients, _, rank, _ = np.linalg.lstsq(features, y, rcond=None)
        if rank < terms:
            raise SearchError(f"the design determines only {rank} of {terms} quadratic terms",
                              fix="use points that vary every dimension on 3 or more levels")
        residual = y - features @ coefficients
        spread = float(np.sum((y - np.mean(y)) ** 2))
        r2 = 1.0 - float(np.sum(residual**2)) / spread if spread > 0 else 1.0
        return cls(coefficients, r2)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Return the predicted values at points ``x`` [N, D]."""
        return quadratic_features(x) @ self.coefficients


def design(dimensions: int, *, points: int | None = None, seed: int = 0) -> np.ndarray:
    """Return the design points of the unit cube at which the tasks are measured.

    Up to 3 dimensions: the full factorial on 3 levels (0, 0.5, 1; 5 levels for one
    dimension), which determines every quadratic term. Beyond: a seeded Latin hypercube of
    ``points`` points (default twice the number of terms) plus the centre. Returns [N, D].
    """
    if dimensions <= 3 and points is None:
        levels = 5 if dimensions == 1 else 3
        axes = np.meshgrid(*[np.linspace(0.0, 1.0, levels)] * dimensions, indexing="ij")
        return np.stack([a.ravel() for a in axes], axis=1)
    n = points or 2 * quadratic_terms(dimensions)
    rng = np.random.default_rng(seed)
    strata = np.stack([rng.permutation(n) for _ in range(dimensions)], axis=1)
    hypercube = (strata + rng.random((n, dimensions))) / n
    return np.vstack([np.full((1, dimensions), 0.5), hypercube])
