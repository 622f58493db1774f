"""Uncertainty for before/after tables: percentile bootstrap CIs of a mean and a paired sign-flip test.

Every function is seeded (numpy Generator) so a table is reproducible. The bootstrap draws one index
matrix `rng.integers(0, n, size=(n_boot, n))`; with the same seed and n, the before, after and delta
CIs of a row resample the same items, so the delta CI is the bootstrap of the paired differences.
The permutation test flips the signs of the differences after - before: exactly (all 2^n sign
vectors) when 2^n <= n_perm, else n_perm random sign vectors with p = (1 + hits) / (1 + n_perm).
"""

from __future__ import annotations

import numpy as np


class StatsError(ValueError):
    """Values that a bootstrap or permutation test cannot use (empty, not 1-D, NaN, unpaired)."""


def _vector(values, what: str = "values") -> np.ndarray:
    """A finite 1-D float64 array, or a StatsError saying what was wrong."""
    try:
        x = np.asarray(values.detach().cpu() if hasattr(values, "detach") else values, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise StatsError(f"The {what} must be numbers (a list, array or tensor), got {type(values).__name__}.") from e
    if x.ndim != 1 or x.size == 0:
        raise StatsError(f"The {what} must be a non-empty 1-D sequence of per-item numbers; got shape "
                         f"{list(x.shape)}. Give one value per prompt / fact / window.")
    if not np.isfinite(x).all():
        raise StatsError(f"The {what} contain {int((~np.isfinite(x)).sum())} NaN or infinite value(s); a mean "
                         "and its CI are undefined. Drop or fix those items before measuring.")
    return x


def _check_level(level: float, n_boot: int) -> None:
    if not 0 < level < 1:
        raise StatsError(f"level is a coverage probability strictly between 0 and 1 (e.g. 0.95), got {level}.")
    if n_boot < 1:
        raise StatsError(f"n_boot must be a positive number of bootstrap resamples, got {n_boot}.")


def bootstrap_means(values, seed: int = 0, n_boot: int = 2000) -> np.ndarray:
    """The n_boot means of resamples (with replacement) of `values`; the same seed and n give the same resamples."""
    x = _vector(values)
    if n_boot < 1:
        raise StatsError(f"n_boot must be a positive number of bootstrap resamples, got {n_boot}.")
    idx = np.random.default_rng(seed).integers(0, x.size, size=(n_boot, x.size))
    return x[idx].mean(axis=1)


def interval(means: np.ndarray, center: float, level: float = 0.95) -> dict:
    """{mean, lo, hi}: `center` with the percentile interval of bootstrap `means` (numpy linear quantiles)."""
    a = (1 - level) / 2
    lo, hi = np.quantile(means, [a, 1 - a])
    return {"mean": float(center), "lo": float(lo), "hi": float(hi)}


def bootstrap_ci(values, seed: int = 0, n_boot: int = 2000, level: float = 0.95) -> dict:
    """{mean, lo, hi}: the mean of `values` with its percentile-bootstrap confidence interval."""
    _check_level(level, n_boot)
    x = _vector(values)
    return interval(bootstrap_means(x, seed, n_boot), x.mean(), level)


def paired_ci(before, after, seed: int = 0, n_boot: int = 2000, level: float = 0.95) -> dict:
    """{"before", "after", "delta"}: bootstrap CIs over the same resampled items; delta = after - before."""
    b, a = _paired(before, after)
    return {"before": bootstrap_ci(b, seed, n_boot, level), "after": bootstrap_ci(a, seed, n_boot, level),
            "delta": bootstrap_ci(a - b, seed, n_boot, level)}


def _paired(before, after) -> tuple[np.ndarray, np.ndarray]:
    b, a = _vector(before, "before values"), _vector(after, "after values")
    if a.shape != b.shape:
        raise StatsError(f"Paired values need one before and one after value per item; got {b.size} before and "
                         f"{a.size} after. Measure the same items with the change off and on.")
    return b, a


def paired_test(before, after, seed: int = 0, n_perm: int = 10000) -> float:
    """Two-sided p-value of a paired sign-flip permutation test of mean(after - before) = 0 (1.0 when all differences are 0)."""
    b, a = _paired(before, after)
    if n_perm < 1:
        raise StatsError(f"n_perm must be a positive number of random sign flips, got {n_perm}.")
    d = a - b
    if not np.any(d != 0):
        return 1.0
    n = d.size
    observed = abs(d.sum())
    tol = 1e-12 * np.abs(d).sum()   # sums of the same numbers in another order may differ in the last bits
    if 2 ** n <= n_perm:
        bits = (np.arange(2 ** n)[:, None] >> np.arange(n)[None, :]) & 1
        stats = np.abs(((1 - 2 * bits) * d).sum(axis=1))
        return float(np.mean(stats >= observed - tol))
    signs = np.random.default_rng(seed).choice(np.array([-1.0, 1.0]), size=(n_perm, n))
    hits = int(np.sum(np.abs(signs @ d) >= observed - tol))
    return (1 + hits) / (1 + n_perm)


def one_sided(means: np.ndarray, alpha: float = 0.05) -> dict:
    """{lo, hi}: the one-sided (1 - alpha) lower and upper bounds of bootstrap `means` (for non-inferiority)."""
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return {"lo": float(lo), "hi": float(hi)}


def min_detectable(before, after, level: float = 0.95, power: float = 0.8) -> float:
    """Smallest change of the mean a paired test at `level` detects with `power`: (z_(1-a/2) + z_power) sd(d) / sqrt(n).

    sd(d) is the observed standard deviation of the paired differences (0 when nothing moved: then the
    row's items are unchanged and any systematic change would show).
    """
    from statistics import NormalDist

    b, a = _paired(before, after)
    if b.size < 2:
        return float("inf")
    z = NormalDist().inv_cdf(1 - (1 - level) / 2) + NormalDist().inv_cdf(power)
    return float(z * (a - b).std(ddof=1) / np.sqrt(b.size))

