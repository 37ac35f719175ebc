"""The statistics helpers (sparsecomm/research/stats.py) against scipy.stats on fixed inputs:
the wrappers add bookkeeping (n, the test's name, the inconclusive rule), never their own formula."""
import math

import pytest

stats = pytest.importorskip("scipy.stats")

from sparsecomm.research import stats as S  # noqa: E402

A = [0.71, 0.64, 0.80, 0.69, 0.75, 0.62, 0.78]
B = [0.70, 0.66, 0.74, 0.65, 0.73, 0.61, 0.70]


def test_paired_matches_ttest_rel():
    d = S.paired(A, B)
    ref = stats.ttest_rel(A, B)
    ci = ref.confidence_interval(0.95)
    diffs = [a - b for a, b in zip(A, B)]
    assert d.test == "paired t" and d.n == 7
    assert d.diff == pytest.approx(sum(diffs) / 7)
    assert d.ci == pytest.approx((ci.low, ci.high)) and d.p == pytest.approx(ref.pvalue)
    assert d.effect == pytest.approx(stats.tmean(diffs) / stats.tstd(diffs))  # Cohen's d_z
    # the interval by hand from the t quantile, as a cross-check of which interval it is
    half = stats.t.ppf(0.975, 6) * stats.tstd(diffs) / math.sqrt(7)
    assert d.ci == pytest.approx((d.diff - half, d.diff + half))
    assert d.direction() == ("above" if ci.low > 0 else "below" if ci.high < 0 else "same")
    assert "n=7" in d.describe() and "paired t" in d.describe()


def test_paired_drops_incomplete_pairs_and_is_inconclusive_below_min_n():
    d = S.paired([1.0, float("nan"), 3.0, 4.0], [0.5, 2.0, 2.0, 3.9])
    assert d.n == 3 and d.direction() == "inconclusive"
    assert S.paired([1.0], [0.5]).direction() == "inconclusive"
    const = S.paired([1, 2, 3, 4, 5], [0.5, 1.5, 2.5, 3.5, 4.5])  # every pair +0.5: a point interval
    assert const.ci == (0.5, 0.5) and const.direction() == "above"


def test_welch_matches_ttest_ind():
    d = S.welch(A, B[:5])
    ref = stats.ttest_ind(A, B[:5], equal_var=False)
    ci = ref.confidence_interval(0.95)
    assert d.ci == pytest.approx((ci.low, ci.high)) and d.p == pytest.approx(ref.pvalue)
    na, nb = 7, 5
    sp = math.sqrt(((na - 1) * stats.tvar(A) + (nb - 1) * stats.tvar(B[:5])) / (na + nb - 2))
    assert d.effect == pytest.approx((stats.tmean(A) - stats.tmean(B[:5])) / sp * (1 - 3 / (4 * (na + nb) - 9)))


def test_non_inferiority_is_a_one_sided_t_against_the_margin():
    margin = 0.05
    r = S.non_inferiority(A, B, margin)
    diffs = [a - b for a, b in zip(A, B)]
    ref = stats.ttest_1samp(diffs, popmean=-margin, alternative="greater")
    assert r.p == pytest.approx(ref.pvalue)
    assert r.lower == pytest.approx(ref.confidence_interval(0.95).low)
    assert r.lower == pytest.approx(stats.tmean(diffs) - stats.t.ppf(0.95, 6) * stats.sem(diffs))
    assert r.outcome == ("non-inferior" if r.lower > -margin else "not shown non-inferior")
    worse = S.non_inferiority([b - 0.2 for b in B], B, margin)  # 0.2 worse everywhere: clearly not
    assert worse.outcome == "not shown non-inferior"
    noisy_worse = S.non_inferiority([b - 0.2 + 0.01 * i for i, b in enumerate(B)], B, margin)
    assert noisy_worse.outcome == "not shown non-inferior" and noisy_worse.p > 0.5
    assert S.non_inferiority(A[:4], B[:4], margin).outcome == "inconclusive"
    with pytest.raises(ValueError):
        S.non_inferiority(A, B, 0.0)


def test_pearson_matches_pearsonr_and_its_interval():
    x = [0.1, 0.4, 0.35, 0.8, 0.9, 0.55, 0.2, 0.65]
    y = [1.0, 1.9, 1.2, 3.1, 2.8, 2.5, 0.7, 2.0]
    c = S.pearson(x, y)
    ref = stats.pearsonr(x, y)
    ci = ref.confidence_interval(0.95)
    assert c.r == pytest.approx(ref.statistic) and c.p == pytest.approx(ref.pvalue)
    assert c.ci == pytest.approx((ci.low, ci.high)) and c.n == 8 and c.direction() == "positive"
    assert math.isnan(S.pearson([1, 2], [1, 2]).r) and math.isnan(S.pearson([1, 1, 1, 1], [1, 2, 3, 4]).r)
    assert S.pearson([0, 1, 2, 3], [0, 1, 2, 4]).direction() == "inconclusive"  # n = 4 < MIN_N


def test_pearson_within_one_group_is_pearsonr_and_groups_cost_degrees_of_freedom():
    x = [0.1, 0.4, 0.35, 0.8, 0.9, 0.55, 0.2, 0.65]
    y = [1.0, 1.9, 1.2, 3.1, 2.8, 2.5, 0.7, 2.0]
    c, g = S.pearson_within(x, y, ["a"] * 8)
    ref = stats.pearsonr(x, y)
    assert g == 1 and c.r == pytest.approx(ref.statistic) and c.p == pytest.approx(ref.pvalue)
    assert c.ci == pytest.approx(tuple(ref.confidence_interval(0.95)))
    # two groups whose means differ: the within-group r is that of the demeaned data, with one
    # more degree of freedom spent (a wider interval than pearsonr would give on the same points)
    x2, y2 = x + [v + 10 for v in x], y + [v - 5 for v in y]
    w, g = S.pearson_within(x2, y2, ["a"] * 8 + ["b"] * 8)
    assert g == 2 and w.r == pytest.approx(ref.statistic)
    naive = stats.pearsonr([v - stats.tmean(x) for v in x] * 2, [v - stats.tmean(y) for v in y] * 2)
    assert w.ci[1] - w.ci[0] > naive.confidence_interval().high - naive.confidence_interval().low
    df = 16 - 2 - 1
    t = w.r * math.sqrt(df / (1 - w.r ** 2))
    assert w.p == pytest.approx(2 * stats.t.sf(abs(t), df))


def test_sign_test_matches_binomtest():
    st = S.sign_test([True] * 9 + [False] * 2)
    ref = stats.binomtest(9, 11, 0.5)
    ci = ref.proportion_ci(0.95, method="exact")
    assert (st.n, st.k) == (11, 9) and st.ci == pytest.approx((ci.low, ci.high))
    assert st.p_greater == pytest.approx(stats.binomtest(9, 11, 0.5, alternative="greater").pvalue)
    assert st.p_less == pytest.approx(stats.binomtest(9, 11, 0.5, alternative="less").pvalue)
    assert st.outcome() == "holds"
    assert S.sign_test([False] * 6).outcome() == "does not hold"
    assert S.sign_test([True, False] * 4).outcome() == "mixed"
    assert S.sign_test([True] * (S.MIN_N - 1)).outcome() == "inconclusive"
    assert S.sign_test([]).outcome() == "no data" and S.sign_test([None, None]).n == 0


def test_mean_sd():
    m, sd, n = S.mean_sd([1.0, 2.0, float("nan"), 4.0])
    assert (m, n) == (pytest.approx(7 / 3), 3) and sd == pytest.approx(stats.tstd([1.0, 2.0, 4.0]))
    assert S.mean_sd([3.0]) == (3.0, 0.0, 1) and S.mean_sd([])[2] == 0


def test_import_sparsecomm_does_not_import_scipy():
    import subprocess
    import sys

    code = "import sys, sparsecomm, sparsecomm.research.analysis, sparsecomm.research.stats; print('scipy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"
