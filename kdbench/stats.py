"""Paired statistics over seeds: is a method's difference to another real, or seed noise?

For one seed, every run of a pair sees the same data order and the same initial student (the runs of a seed are
paired), so a method is compared with another through the per-seed differences ``d_s = a_s - b_s`` of the seeds
both finished: their mean, a 95 % confidence interval (Student t with n - 1 degrees of freedom, or a seeded
percentile bootstrap), the paired t-test and, where n allows, the Wilcoxon signed-rank test. Over a suite's pairs,
methods are ranked per pair and compared with the Friedman test and the Nemenyi critical difference (Demšar,
"Statistical Comparisons of Classifiers over Multiple Data Sets", JMLR 2006).

``scipy.stats`` supplies every distribution; it is imported only when a statistic is computed.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

CI_METHODS = ("t", "bootstrap")
LEVEL = 0.95
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0


@dataclass(frozen=True)
class Paired:
    """The paired difference of two methods over the seeds both finished."""

    n: int  # paired seeds
    mean: float  # mean of the per-seed differences (NaN when n == 0)
    ci_low: float | None  # None below two pairs
    ci_high: float | None
    p_t: float | None  # paired t-test, two-sided (None below two pairs or when every difference is equal)
    p_wilcoxon: float | None  # Wilcoxon signed-rank, two-sided (None below the n it needs, or all differences 0)
    unpaired: int  # seeds only one side finished

    @property
    def significant(self) -> bool | None:
        """True when the interval excludes 0, False when it holds it, None without an interval."""
        if self.ci_low is None or self.ci_high is None:
            return None
        return self.ci_low > 0 or self.ci_high < 0


def differences(a: Mapping[Any, float], b: Mapping[Any, float]) -> tuple[list[float], int]:
    """Per-seed ``a - b`` over the seeds both have a finite value for (in seed order), and the number of seeds
    only one side has."""
    fa = {k: v for k, v in a.items() if v is not None and math.isfinite(v)}
    fb = {k: v for k, v in b.items() if v is not None and math.isfinite(v)}
    both = sorted(set(fa) & set(fb), key=lambda s: (not isinstance(s, int), str(s) if not isinstance(s, int) else s))
    return [fa[s] - fb[s] for s in both], len(set(fa) ^ set(fb))


def interval(diffs: Sequence[float], ci: str = "t", level: float = LEVEL, *, resamples: int = BOOTSTRAP_RESAMPLES,
             seed: int = BOOTSTRAP_SEED) -> tuple[float, float] | None:
    """The ``level`` confidence interval of the mean of ``diffs``: Student t with n - 1 degrees of freedom
    (``ci="t"``), or the percentile bootstrap of ``resamples`` resamples drawn with numpy's generator seeded
    ``seed`` (``ci="bootstrap"``). None below two values."""
    if ci not in CI_METHODS:
        raise ValueError(f"unknown interval {ci!r}; valid: {', '.join(CI_METHODS)}")
    n = len(diffs)
    if n < 2:
        return None
    mean = statistics.fmean(diffs)
    if ci == "t":
        from scipy import stats

        sd = statistics.stdev(diffs)
        if sd == 0:
            return mean, mean
        half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
        return mean - half, mean + half
    if resamples < 10_000:
        raise ValueError(f"a bootstrap interval takes at least 10,000 resamples, got {resamples}")
    import numpy as np

    rng = np.random.default_rng(seed)
    x = np.asarray(diffs, dtype=float)
    means = x[rng.integers(0, n, size=(resamples, n))].mean(axis=1)
    lo, hi = np.percentile(means, [100 * (0.5 - level / 2), 100 * (0.5 + level / 2)])
    return float(lo), float(hi)


def paired(a: Mapping[Any, float], b: Mapping[Any, float], ci: str = "t", level: float = LEVEL) -> Paired:
    """``a`` against ``b`` (seed -> value each): the mean paired difference, its interval and the two tests."""
    diffs, unpaired = differences(a, b)
    n = len(diffs)
    if n == 0:
        return Paired(0, math.nan, None, None, None, None, unpaired)
    iv = interval(diffs, ci, level)
    p_t = p_w = None
    if n >= 2 and len(set(diffs)) > 1:
        from scipy import stats

        p_t = float(stats.ttest_1samp(diffs, 0.0).pvalue)
    if n >= 2 and any(d != 0 for d in diffs):
        from scipy import stats

        try:
            p_w = float(stats.wilcoxon(diffs).pvalue)
        except ValueError:  # scipy refuses n it cannot test
            p_w = None
    return Paired(n, statistics.fmean(diffs), iv[0] if iv else None, iv[1] if iv else None, p_t, p_w, unpaired)


def ranks(values: Mapping[str, float], higher_is_better: bool = True) -> dict[str, float]:
    """Rank of each method in one pair (1 = best), ties sharing the mean of their ranks."""
    order = sorted(values, key=lambda k: -values[k] if higher_is_better else values[k])
    out: dict[str, float] = {}
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in order[i:j + 1]:
            out[k] = (i + j) / 2 + 1
        i = j + 1
    return out


@dataclass(frozen=True)
class Friedman:
    """The Friedman test of k methods over n pairs (blocks), and the Nemenyi critical difference."""

    k: int
    n: int
    mean_ranks: dict[str, float]
    statistic: float | None
    p: float | None
    cd: float | None  # Nemenyi critical difference of mean ranks at alpha = 0.05


def friedman(table: Mapping[str, Mapping[str, float]], higher_is_better: bool = True, alpha: float = 0.05) -> Friedman:
    """``table``: pair -> {method: value}, over the pairs where every method has a value. The mean rank of each
    method, the Friedman chi-square test (``scipy.stats.friedmanchisquare``; it needs k >= 3 methods and n >= 2
    pairs, else None) and the Nemenyi critical difference CD = q_alpha sqrt(k (k + 1) / (6 n)), q_alpha the
    studentized range quantile over sqrt 2 (Demšar 2006, eq. 8)."""
    methods = sorted(set().union(*(set(v) for v in table.values()))) if table else []
    blocks = [row for row in table.values() if all(m in row for m in methods)]
    k, n = len(methods), len(blocks)
    if not n or not k:
        return Friedman(k, n, {}, None, None, None)
    per = [ranks({m: row[m] for m in methods}, higher_is_better) for row in blocks]
    mean_ranks = {m: statistics.fmean(r[m] for r in per) for m in methods}
    stat = p = cd = None
    if k >= 2:
        from scipy import stats

        q = float(stats.studentized_range.ppf(1 - alpha, k, math.inf)) / math.sqrt(2)
        cd = q * math.sqrt(k * (k + 1) / (6 * n))
        if k >= 3 and n >= 2:
            res = stats.friedmanchisquare(*[[row[m] for row in blocks] for m in methods])
            stat, p = float(res.statistic), float(res.pvalue)
            if not math.isfinite(p):
                stat = p = None
    return Friedman(k, n, mean_ranks, stat, p, cd)


__all__ = ["Paired", "Friedman", "CI_METHODS", "LEVEL", "differences", "interval", "paired", "ranks", "friedman"]
