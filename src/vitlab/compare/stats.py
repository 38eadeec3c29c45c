"""Statistics over seeds: mean, sample std, 95% t-interval, paired t-test against the baseline
(paired by seed), through scipy."""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import numpy as np
from scipy import stats

ALPHA = 0.05


def mean_ci(values: List[float], level: float = 0.95) -> dict:
    """Mean, sample standard deviation and the half-width of the ``level`` t-interval of the mean."""
    x = np.asarray(values, dtype=float)
    n = len(x)
    mean = float(x.mean()) if n else math.nan
    std = float(x.std(ddof=1)) if n > 1 else math.nan
    half = float(stats.t.ppf(0.5 + level / 2, n - 1) * std / math.sqrt(n)) if n > 1 else math.nan
    return {"n": n, "mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half}


def paired_test(arm: Dict[int, float], base: Dict[int, float]) -> dict:
    """Two-sided paired t-test over the seeds both have. ``verdict``: better / worse at p < 0.05,
    else tie (also when fewer than 2 pairs: not enough evidence to rank)."""
    seeds = sorted(set(arm) & set(base))
    if len(seeds) < 2:
        return {"pairs": len(seeds), "diff": None, "p": None, "verdict": "tie"}
    a, b = np.array([arm[s] for s in seeds]), np.array([base[s] for s in seeds])
    diff = float((a - b).mean())
    if np.allclose(a - b, (a - b)[0]):  # identical differences: the t statistic is undefined
        p = 0.0 if diff != 0 else 1.0
    else:
        p = float(stats.ttest_rel(a, b).pvalue)
    verdict = "tie" if p >= ALPHA else ("better" if diff > 0 else "worse")
    return {"pairs": len(seeds), "diff": diff, "p": p, "verdict": verdict}


def summarize(groups: Dict[str, Dict[int, float]], baseline: Optional[str], metric: str = "acc1") -> List[dict]:
    """Rows per group (arm or arm@point), ranked by mean, with intervals and the paired test."""
    rows = []
    for name, by_seed in groups.items():
        row = {"group": name, "metric": metric, **mean_ci(list(by_seed.values()))}
        if baseline is not None and baseline in groups and name != baseline:
            row.update(paired_test(by_seed, groups[baseline]))
        else:
            row.update(pairs=None, diff=None, p=None, verdict="baseline" if name == baseline else "")
        rows.append(row)
    return sorted(rows, key=lambda r: -r["mean"] if not math.isnan(r["mean"]) else math.inf)
