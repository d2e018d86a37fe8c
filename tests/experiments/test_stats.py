import math

import numpy as np
import pytest
from scipy import stats as sps

from gradcent.experiments.stats import (
    Summary,
    compare,
    format_p,
    format_pm,
    summarize,
    welch_p,
)


def test_summarize_hand_values():
    assert summarize([1.0, 2.0, 3.0]) == Summary(3, 2.0, 1.0)
    # mean 5, deviations -3,-1,1,3 -> sum sq 20, /3
    s = summarize([2.0, 4.0, 6.0, 8.0])
    assert s.n == 4 and s.mean == 5.0 and s.std == pytest.approx(math.sqrt(20 / 3), rel=1e-15)


def test_summarize_matches_numpy_ddof1_and_ignores_nan():
    rng = np.random.default_rng(0)
    x = rng.normal(3, 2, size=7)
    s = summarize(list(x) + [math.nan, math.inf])
    assert s.n == 7
    assert s.mean == pytest.approx(x.mean(), rel=1e-12)
    assert s.std == pytest.approx(x.std(ddof=1), rel=1e-12)


def test_summarize_guards_small_samples():
    one = summarize([4.2])
    assert one.n == 1 and one.mean == 4.2 and math.isnan(one.std)
    none = summarize([])
    assert none.n == 0 and math.isnan(none.mean) and math.isnan(none.std)


def test_welch_against_scipy_and_hand_formula():
    a = [97.1, 97.5, 96.8, 97.9, 97.3]
    b = [98.0, 98.4, 97.6, 98.9]
    p = welch_p(a, b)
    assert p == pytest.approx(sps.ttest_ind(a, b, equal_var=False).pvalue, rel=1e-12)
    # Welch's t and Welch-Satterthwaite degrees of freedom, by hand
    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    t = (np.mean(a) - np.mean(b)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    assert p == pytest.approx(2 * sps.t.sf(abs(t), df), rel=1e-9)
    assert 0.001 < p < 0.05  # these samples differ clearly but not absurdly


def test_welch_guards():
    assert math.isnan(welch_p([1.0], [1.0, 2.0]))
    assert math.isnan(welch_p([1.0, 1.0], [2.0, 2.0]))  # both constant: undefined
    # one constant sample and one varying sample is a valid Welch test
    assert welch_p([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) == pytest.approx(
        sps.ttest_ind([1, 1, 1], [1, 2, 3], equal_var=False).pvalue
    )


def test_compare_diff_and_reference():
    c = compare([3.0, 5.0], [1.0, 2.0])
    assert c.diff == pytest.approx(2.5)
    assert c.p == pytest.approx(sps.ttest_ind([3, 5], [1, 2], equal_var=False).pvalue)
    ref = compare([1.0, 2.0], [1.0, 2.0], is_reference=True)
    assert ref.diff == 0.0 and math.isnan(ref.p) and ref.summary.mean == 1.5


def test_formatting():
    assert format_pm(Summary(3, 97.123, 0.456)) == "97.12 ± 0.46"
    assert format_pm(Summary(1, 97.123, math.nan)) == "97.12"
    assert format_pm(Summary(0, math.nan, math.nan)) == "-"
    assert format_p(math.nan) == "-"
    assert format_p(1e-7) == "<1e-4"
    assert format_p(0.01234) == "0.0123"
