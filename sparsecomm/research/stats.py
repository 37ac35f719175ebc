"""The statistics behind every verdict the research report and the benchmarks publish: thin,
tested wrappers around scipy.stats, so no number rests on a hand-written formula.

    from sparsecomm.research import stats as S
    S.paired(aspg_rewards, dense_rewards)            # paired t: mean difference, 95% CI, p, d_z
    S.non_inferiority(aspg, dense, margin=0.05)      # one-sided paired t against -margin
    S.welch(a, b)                                    # unpaired (Welch) t, Hedges' g
    S.pearson(x, y)                                  # Pearson r, its 95% CI (Fisher z, scipy)
    S.pearson_within(x, y, groups)                   # r after removing each group's mean
    S.sign_test(successes)                           # fraction of runs, exact binomial test + CI

Why these tests: the matrix's runs come in seeds, and the H1/H3/convergence comparisons share
seeds (same init, data and prompts), so the paired t on per-seed differences is the natural test
and d_z = mean(diff) / sd(diff) its effect size. Claims phrased "in what fraction of runs does X
hold" (layer order, sparser over time, RL sparser than SFT) are judged by an exact sign test:
it makes no assumption about how the differences are distributed.

Every helper returns a small frozen dataclass that states its own test and n (`describe()`), so
a verdict can quote them; and `MIN_N` (5) below which the report says "inconclusive" rather
than quoting an interval computed from 2-4 points. scipy is imported inside the functions:
`import sparsecomm` stays light. Tests: tests/unit/research/test_stats.py (against scipy on
fixed inputs).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

MIN_N = 5
"""Fewer runs (or pairs) than this: the verdict is "inconclusive", whatever the point estimate."""
ALPHA = 0.05
"""Two-sided 95% intervals; one-sided tests at 5%."""

_NAN = float("nan")


def _clean(xs) -> list[float]:
    return [float(x) for x in xs if isinstance(x, (int, float)) and not math.isnan(x)]


def _pairs(a, b) -> tuple[list[float], list[float]]:
    """Keep the positions where both values are numbers (a pair missing one side is dropped)."""
    pa, pb = [], []
    for x, y in zip(a, b):
        if isinstance(x, (int, float)) and isinstance(y, (int, float)) and not (math.isnan(x) or math.isnan(y)):
            pa.append(float(x))
            pb.append(float(y))
    return pa, pb


def _fmt(*xs):
    """A signed formatter for numbers on the scale of xs: 3 decimals, or 3 significant digits when
    they are all below 0.01 (fp32 sparsity differences are ~1e-5)."""
    scale = max((abs(x) for x in xs if x == x and not math.isinf(x)), default=1.0)
    return (lambda x: f"{x:+.3f}") if scale >= 0.01 or scale == 0 else (lambda x: f"{x:+.2e}")


def _direction(enough: bool, ci: tuple[float, float], above: str, below: str, neither: str) -> str:
    """Which side of 0 a confidence interval lies on, or "inconclusive" without enough data."""
    if not enough or math.isnan(ci[0]):
        return "inconclusive"
    return above if ci[0] > 0 else below if ci[1] < 0 else neither


@dataclass(frozen=True)
class Diff:
    """A difference of means (a - b) with its test."""
    test: str
    n: int
    diff: float
    ci: tuple[float, float]
    p: float
    effect: float
    effect_name: str

    @property
    def enough(self) -> bool:
        return self.n >= MIN_N

    def direction(self) -> str:
        """above | below | same (the 95% CI excludes 0 or not) | inconclusive (n < MIN_N)."""
        return _direction(self.enough, self.ci, "above", "below", "same")

    def describe(self) -> str:
        f = _fmt(self.diff, *self.ci)
        return (f"{f(self.diff)} [95% CI {f(self.ci[0])}, {f(self.ci[1])}], {self.test}, n={self.n}, "
                f"p={self.p:.3g}, {self.effect_name}={self.effect:+.2f}")


def _constant(d: list[float]) -> bool:
    """All equal up to float round-off (scipy then warns of catastrophic cancellation and returns noise)."""
    return max(d) - min(d) <= 1e-12 * max(1.0, max(abs(x) for x in d))


def paired(a, b, confidence: float = 1 - ALPHA) -> Diff:
    """Paired t test of mean(a - b) = 0 (scipy.stats.ttest_rel), with its t confidence interval and
    Cohen's d_z = mean(diff) / sd(diff). a[i] and b[i] must share seed i."""
    from scipy import stats

    a, b = _pairs(a, b)
    n = len(a)
    d = [x - y for x, y in zip(a, b)]
    if n < 2:
        return Diff("paired t", n, d[0] if d else _NAN, (_NAN, _NAN), _NAN, _NAN, "d_z")
    mean = sum(d) / n
    if _constant(d):  # every pair differs by the same amount: the interval is that point
        dz = math.copysign(math.inf, mean) if mean else 0.0
        return Diff("paired t", n, mean, (mean, mean), 0.0 if mean else 1.0, dz, "d_z")
    res = stats.ttest_rel(a, b)
    ci = res.confidence_interval(confidence)
    return Diff("paired t", n, mean, (float(ci.low), float(ci.high)), float(res.pvalue), mean / float(stats.tstd(d)), "d_z")


def welch(a, b, confidence: float = 1 - ALPHA) -> Diff:
    """Welch's unpaired t test of mean(a) - mean(b) (scipy.stats.ttest_ind, equal_var=False) with its
    confidence interval and Hedges' g (the pooled-sd standardised difference, small-sample corrected)."""
    from scipy import stats

    a, b = _clean(a), _clean(b)
    na, nb = len(a), len(b)
    n = min(na, nb)
    if na < 2 or nb < 2:
        diff = (sum(a) / na - sum(b) / nb) if na and nb else _NAN
        return Diff("Welch t", n, diff, (_NAN, _NAN), _NAN, _NAN, "g")
    res = stats.ttest_ind(a, b, equal_var=False)
    ci = res.confidence_interval(confidence)
    diff = sum(a) / na - sum(b) / nb
    pooled = math.sqrt(((na - 1) * stats.tvar(a) + (nb - 1) * stats.tvar(b)) / (na + nb - 2))
    g = diff / pooled * (1 - 3 / (4 * (na + nb) - 9)) if pooled else _NAN
    return Diff("Welch t", n, diff, (float(ci.low), float(ci.high)), float(res.pvalue), g, "g")


@dataclass(frozen=True)
class NonInferiority:
    """One-sided paired t test of H0: mean(a - b) <= -margin against H1: mean(a - b) > -margin."""
    n: int
    margin: float
    diff: float
    lower: float
    """One-sided (1 - alpha) lower confidence bound of mean(a - b)."""
    p: float
    effect: float

    @property
    def outcome(self) -> str:
        if self.n < MIN_N or math.isnan(self.lower):
            return "inconclusive"
        return "non-inferior" if self.lower > -self.margin else "not shown non-inferior"

    def describe(self) -> str:
        return (f"{self.diff:+.3f}, one-sided 95% lower bound {self.lower:+.3f} vs margin -{self.margin:g} "
                f"(paired t against -margin, n={self.n}, p={self.p:.3g}, d_z={self.effect:+.2f}): {self.outcome}")


def non_inferiority(a, b, margin: float, alpha: float = ALPHA) -> NonInferiority:
    """Is a (e.g. ASPG's reward per seed) no worse than b (dense, same seeds) by more than `margin`?
    scipy.stats.ttest_1samp of the paired differences against -margin, alternative "greater"; the
    lower bound is that test's one-sided confidence interval. The margin must be fixed before the
    data is seen (write it in the benchmark file)."""
    from scipy import stats

    if not margin > 0:
        raise ValueError(f"margin must be > 0, got {margin}")
    a, b = _pairs(a, b)
    d = [x - y for x, y in zip(a, b)]
    n = len(d)
    if n < 2:
        return NonInferiority(n, margin, d[0] if d else _NAN, _NAN, _NAN, _NAN)
    mean = sum(d) / n
    if _constant(d):
        return NonInferiority(n, margin, mean, mean, 0.0 if mean > -margin else 1.0, _NAN)
    res = stats.ttest_1samp(d, popmean=-margin, alternative="greater")
    lower = float(res.confidence_interval(1 - alpha).low)
    return NonInferiority(n, margin, mean, lower, float(res.pvalue), mean / float(stats.tstd(d)))


@dataclass(frozen=True)
class Correlation:
    test: str
    n: int
    r: float
    ci: tuple[float, float]
    p: float

    @property
    def enough(self) -> bool:
        return self.n >= MIN_N

    def direction(self) -> str:
        """positive | negative | none (the CI covers 0) | inconclusive (n < MIN_N or no interval)."""
        return _direction(self.enough, self.ci, "positive", "negative", "none")

    def describe(self) -> str:
        return f"r = {self.r:+.2f} [95% CI {self.ci[0]:+.2f}, {self.ci[1]:+.2f}], {self.test}, n={self.n}, p={self.p:.3g}"


def pearson(x, y, confidence: float = 1 - ALPHA) -> Correlation:
    """Pearson r with scipy.stats.pearsonr's p-value and Fisher-z confidence interval; nan r when
    fewer than 3 points or a constant input, nan interval below 4 points."""
    from scipy import stats

    x, y = _pairs(x, y)
    n = len(x)
    if n < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return Correlation("Pearson", n, _NAN, (_NAN, _NAN), _NAN)
    res = stats.pearsonr(x, y)
    if n < 4:
        return Correlation("Pearson", n, float(res.statistic), (_NAN, _NAN), float(res.pvalue))
    ci = res.confidence_interval(confidence)
    return Correlation("Pearson", n, float(res.statistic), (float(ci.low), float(ci.high)), float(res.pvalue))


def pearson_within(x, y, groups, confidence: float = 1 - ALPHA, min_group: int = 3) -> tuple[Correlation, int]:
    """Pearson r of x and y after subtracting each group's means (groups of >= min_group points),
    i.e. the correlation left once the grouping factor (e.g. the learning rate, which drives both
    sparsity and reward) is held fixed. Removing G group means costs G degrees of freedom where a
    plain r costs one, so the Fisher-z interval uses n - G - 2 (pearsonr's n - 3 when G = 1) and the
    t test n - G - 1 degrees of freedom; quantiles from scipy.stats. Returns (correlation, G)."""
    from scipy import stats

    by: dict = {}
    for a, b, g in zip(x, y, groups):
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not (math.isnan(a) or math.isnan(b)):
            by.setdefault(g, []).append((float(a), float(b)))
    rx, ry, used = [], [], 0
    for pts in by.values():
        if len(pts) < min_group:
            continue
        used += 1
        mx, my = sum(p[0] for p in pts) / len(pts), sum(p[1] for p in pts) / len(pts)
        rx += [p[0] - mx for p in pts]
        ry += [p[1] - my for p in pts]
    n = len(rx)
    name = f"Pearson within {used} group(s)"
    if n < 3 or not used or len(set(rx)) < 2 or len(set(ry)) < 2:
        return Correlation(name, n, _NAN, (_NAN, _NAN), _NAN), used
    r = float(stats.pearsonr(rx, ry).statistic)
    df = n - used - 1  # residual degrees of freedom of a correlation after G means are removed
    if df < 1:
        return Correlation(name, n, r, (_NAN, _NAN), _NAN), used
    rc = max(min(r, 1 - 1e-15), -1 + 1e-15)
    t = rc * math.sqrt(df / (1 - rc * rc))
    p = float(2 * stats.t.sf(abs(t), df))
    if df - 1 < 1:
        return Correlation(name, n, r, (_NAN, _NAN), p), used
    z, se = math.atanh(rc), 1 / math.sqrt(df - 1)
    q = float(stats.norm.ppf(0.5 + confidence / 2))
    return Correlation(name, n, r, (math.tanh(z - q * se), math.tanh(z + q * se)), p), used


@dataclass(frozen=True)
class SignTest:
    """How often a per-run claim holds, with an exact binomial test against 1/2."""
    n: int
    k: int
    ci: tuple[float, float]
    """Clopper-Pearson 95% interval of the fraction."""
    p_greater: float
    p_less: float

    @property
    def frac(self) -> float:
        return self.k / self.n if self.n else _NAN

    def outcome(self, majority: float = 0.75, alpha: float = ALPHA) -> str:
        """holds: in >= `majority` of the runs and more often than not (one-sided p < alpha);
        does not hold: the mirror image; inconclusive: n < MIN_N; otherwise mixed."""
        if self.n < MIN_N:
            return "inconclusive" if self.n else "no data"
        if self.frac >= majority and self.p_greater < alpha:
            return "holds"
        if self.frac <= 1 - majority and self.p_less < alpha:
            return "does not hold"
        return "mixed"

    def describe(self) -> str:
        if not self.n:
            return "no runs"
        return (f"{self.k}/{self.n} = {self.frac:.0%} [95% CI {self.ci[0]:.0%}, {self.ci[1]:.0%}], exact sign test, "
                f"p(>1/2)={self.p_greater:.3g}")


def sign_test(successes) -> SignTest:
    """scipy.stats.binomtest of k successes out of n against p = 1/2 (one-sided both ways) and the
    exact (Clopper-Pearson) interval of k / n. `successes` is an iterable of bools (None skipped)."""
    from scipy import stats

    s = [bool(x) for x in successes if x is not None]
    n, k = len(s), sum(s)
    if not n:
        return SignTest(0, 0, (_NAN, _NAN), _NAN, _NAN)
    ci = stats.binomtest(k, n, 0.5).proportion_ci(1 - ALPHA, method="exact")
    return SignTest(n, k, (float(ci.low), float(ci.high)), float(stats.binomtest(k, n, 0.5, alternative="greater").pvalue),
                    float(stats.binomtest(k, n, 0.5, alternative="less").pvalue))


def mean_sd(xs) -> tuple[float, float, int]:
    """Mean, sample standard deviation (ddof=1; 0 for one value) and n of the numbers in xs."""
    from scipy import stats

    xs = _clean(xs)
    if not xs:
        return _NAN, _NAN, 0
    return sum(xs) / len(xs), (float(stats.tstd(xs)) if len(xs) > 1 else 0.0), len(xs)
