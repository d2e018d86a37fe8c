"""Statistics of a comparison: mean ± sample std, difference to the baseline, Welch p-value.

Small, honest and explicit about small samples: with fewer than two runs the
standard deviation and the p-value are NaN (undefined), never 0.

References:
    Welch, "The generalization of Student's problem when several different
    population variances are involved", Biometrika 1947.
    Yong et al., ECCV 2020, Tables 1-9 (mean ± std over runs).

"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as _scipy_stats


@dataclass(frozen=True)
class Summary:
    """Mean and sample standard deviation of one metric over runs.

    Attributes:
        n: number of finite values.
        mean: their mean (NaN when n == 0).
        std: sample standard deviation, ddof=1 (NaN when n < 2).

    """

    n: int
    mean: float
    std: float


def _finite(values: Sequence[float]) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64)
    return a[np.isfinite(a)]


def summarize(values: Sequence[float]) -> Summary:
    """Mean and sample std (ddof=1) of the finite values.

    Args:
        values: one number per run (NaN / inf entries are ignored).

    Returns:
        A :class:`Summary`.

    Example:
        >>> summarize([1.0, 2.0, 3.0])
        Summary(n=3, mean=2.0, std=1.0)

    References:
        Yong et al., ECCV 2020, Tables 1-9 (mean ± std).

    """
    a = _finite(values)
    mean = float(a.mean()) if a.size else math.nan
    std = float(a.std(ddof=1)) if a.size >= 2 else math.nan
    return Summary(int(a.size), mean, std)


def welch_p(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided Welch t-test p-value (unequal variances) between two samples.

    Args:
        a: the per-run values of one variant.
        b: the per-run values of the other.

    Returns:
        The p-value from ``scipy.stats.ttest_ind(a, b, equal_var=False)``; NaN
        when either sample has fewer than 2 values or both have zero variance
        (the test is undefined, and reporting p = 0 or 1 would be a claim).

    References:
        Welch, Biometrika 1947.

    """
    x, y = _finite(a), _finite(b)
    if x.size < 2 or y.size < 2:
        return math.nan
    if x.var(ddof=1) == 0 and y.var(ddof=1) == 0:
        return math.nan
    with warnings.catch_warnings():
        # One sample with identical values is common (accuracy on a small test
        # set is discrete); scipy then warns about precision, the test stays valid.
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(_scipy_stats.ttest_ind(x, y, equal_var=False).pvalue)


@dataclass(frozen=True)
class Comparison:
    """A variant against the reference variant, for one metric.

    Attributes:
        summary: the variant's mean ± std.
        diff: variant mean minus reference mean (NaN without data).
        p: Welch p-value (NaN when undefined, or for the reference itself).

    """

    summary: Summary
    diff: float
    p: float


def compare(
    values: Sequence[float], reference: Sequence[float], is_reference: bool = False
) -> Comparison:
    """Summarize ``values`` and compare them with ``reference``.

    Args:
        values: the variant's per-run values.
        reference: the reference (baseline) variant's per-run values.
        is_reference: the variant is the reference (diff 0, no p-value).

    Returns:
        A :class:`Comparison`.

    References:
        Welch, Biometrika 1947.

    """
    s, r = summarize(values), summarize(reference)
    if is_reference:
        return Comparison(s, 0.0 if s.n else math.nan, math.nan)
    return Comparison(s, s.mean - r.mean, welch_p(values, reference))


def format_pm(s: Summary, digits: int = 2) -> str:
    """``"mean ± std"``; ``"mean"`` alone for one run, ``"-"`` for none."""
    if s.n == 0:
        return "-"
    if s.n == 1 or math.isnan(s.std):
        return f"{s.mean:.{digits}f}"
    return f"{s.mean:.{digits}f} ± {s.std:.{digits}f}"


def format_p(p: float) -> str:
    """A p-value for a table: ``"-"`` when undefined, ``"<1e-4"`` when tiny."""
    if math.isnan(p):
        return "-"
    return "<1e-4" if p < 1e-4 else f"{p:.4f}"
