"""The statistics every table of the project uses: one aggregation path.

* :func:`summarize`: mean, sample standard deviation and the t-based 95% confidence interval of a mean;
* :func:`paired_difference`: the mean of per-seed differences (method minus baseline, same seeds,
  so the same data), its 95% interval and a paired t-test's two-sided p-value.

The t quantiles come from scipy (a dependency of scikit-learn, which the analysis already uses).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass
class Summary:
    n: int
    mean: float
    std: float | None  # sample std (ddof = 1); None for n = 1
    ci95: float | None  # half-width of the 95% t interval of the mean; None for n = 1

    def as_dict(self) -> dict:
        return asdict(self)


def summarize(values) -> Summary:
    from scipy import stats

    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        raise ValueError("summarize() needs at least one value")
    mean = sum(xs) / n
    if n == 1:
        return Summary(1, mean, None, None)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    return Summary(n, mean, std, float(stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n))


@dataclass
class Paired:
    n: int
    mean_diff: float
    ci95: float | None
    p_value: float | None  # paired t-test, two-sided; None with fewer than 2 pairs or zero variance


def paired_difference(method: dict, baseline: dict) -> Paired | None:
    """``method`` and ``baseline`` map seed -> value; only seeds present in both are paired."""
    from scipy import stats

    seeds = sorted(set(method) & set(baseline))
    if not seeds:
        return None
    diffs = [method[s] - baseline[s] for s in seeds]
    s = summarize(diffs)
    p = None
    if s.n > 1 and s.std and s.std > 0:
        p = float(stats.ttest_rel([method[k] for k in seeds], [baseline[k] for k in seeds]).pvalue)
    return Paired(s.n, s.mean, s.ci95, p)


def fmt_mean_ci(s: Summary | None, scale: float = 1.0, digits: int = 1) -> str:
    """``mean ± ci95`` (``mean`` alone for one value, ``-`` for none)."""
    if s is None:
        return "-"
    if s.ci95 is None:
        return f"{scale * s.mean:.{digits}f}"
    return f"{scale * s.mean:.{digits}f} ± {scale * s.ci95:.{digits}f}"
