"""Statistics over seeds: mean, sample std, 95% t-interval, paired t-test against the baseline
(paired by seed; its std floored at what the metric's step allows, see :func:`paired_test`), through
scipy; the p-values of a comparison's several tests adjusted for their number through statsmodels."""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import numpy as np
from scipy import stats

ALPHA = 0.05
#: metric values (accuracies, AUROC: all in [0, 1]) closer than this are equal: float32-stored results
#: carry ~1e-7 of rounding, and no test set is large enough for a real difference this small
EQUAL = 1e-6
#: multiple-comparison corrections an experiment may ask for (``correction:``): statsmodels
#: ``multipletests`` methods, and ``none``
CORRECTIONS = {"holm": "Holm's step-down method, which controls the family-wise error rate",
               "bonferroni": "Bonferroni's method, which controls the family-wise error rate",
               "fdr_bh": "the Benjamini-Hochberg method, which controls the false discovery rate",
               "none": "no correction"}


def is_number(v) -> bool:
    """An int or float read from JSON (true/false are not numbers)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def mean_ci(values: List[float], level: float = 0.95) -> dict:
    """Mean, sample standard deviation and the half-width of the ``level`` t-interval of the mean."""
    x = np.asarray(values, dtype=float)
    n = len(x)
    mean = float(x.mean()) if n else math.nan
    std = float(x.std(ddof=1)) if n > 1 else math.nan
    half = float(stats.t.ppf(0.5 + level / 2, n - 1) * std / math.sqrt(n)) if n > 1 else math.nan
    return {"n": n, "mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half}


def paired_test(arm: Dict[int, float], base: Dict[int, float], resolution: Optional[float] = None) -> dict:
    """Two-sided paired t-test over the seeds both have. ``verdict``: better / worse at p < 0.05,
    else tie; ``untested`` with fewer than 2 pairs (nothing to test).

    ``resolution``: the metric's smallest step, 1/(test images) for an accuracy. Accuracies are whole
    numbers of images, so the differences of 3 seeds may all be equal (an arm one image ahead on
    each): their sample std is 0, t infinite and scipy's p 0, which would call a one-image
    difference significant. With a resolution the std is floored at the smallest nonzero std such
    differences can have, resolution/sqrt(n) (one of n differences one step off), so equal
    differences are judged as the nearest spread the metric can show: +3,+3,+3 images gets a smaller
    p than +2,+2,+3, +1,+1,+1 is a tie. Where the differences vary the floor never binds and the test
    is scipy's ``ttest_rel`` exactly (``test`` "t"; "t, std floored" where the floor was used).
    Without a resolution (AUROC) equal differences get the exact two-sided sign test (scipy
    ``binomtest``): p = 2 / 2^n for n pairs all on one side."""
    seeds = sorted(set(arm) & set(base))
    if len(seeds) < 2:
        return {"pairs": len(seeds), "diff": None, "p": None, "test": None, "verdict": "untested"}
    a, b = np.array([arm[s] for s in seeds], dtype=float), np.array([base[s] for s in seeds], dtype=float)
    d = a - b
    n, diff = len(d), float(d.mean())
    floor = resolution / math.sqrt(n) if resolution else 0.0
    if np.ptp(d) > EQUAL and d.std(ddof=1) >= floor * (1 - 1e-6):  # (the floor itself, to rounding)
        p, test = float(stats.ttest_rel(a, b).pvalue), "t"
    elif abs(diff) <= EQUAL:  # no difference (to rounding)
        p, test = 1.0, "t"
    elif floor:
        t = diff / (max(float(d.std(ddof=1)), floor) / math.sqrt(n))
        p, test = float(2 * stats.t.sf(abs(t), n - 1)), "t, std floored"
    else:  # equal differences of a metric without a known step
        p, test = float(stats.binomtest(int((d > 0).sum()), n).pvalue), "sign"
    return {"pairs": len(seeds), "diff": diff, "p": p, "test": test, "verdict": _verdict(p, diff)}


def _verdict(p: float, diff: float) -> str:
    return "tie" if p >= ALPHA else ("better" if diff > 0 else "worse")


def adjust_p(rows: List[dict], correction: str = "holm") -> List[dict]:
    """Adjust the rows' paired-test p-values for how many there are (``correction``, one of
    ``CORRECTIONS``), into ``p_adj``, and decide each verdict by it: seven unadjusted tests at 0.05
    (seven arms against one baseline) would, were they independent, call at least one tie a
    difference 30% of the time (1 - 0.95^7). Rows without a test (the baseline, a single seed) get
    ``p_adj`` None. In place; returns ``rows``."""
    if not isinstance(correction, str) or correction not in CORRECTIONS:
        raise ValueError(f"correction {correction!r}; valid: {', '.join(CORRECTIONS)}")
    tested = [r for r in rows if r.get("p") is not None]
    adjusted = [r["p"] for r in tested]
    if tested and correction != "none":
        from statsmodels.stats.multitest import multipletests

        adjusted = multipletests(adjusted, alpha=ALPHA, method=correction)[1]
    for r in rows:
        r["p_adj"] = None
    for r, p in zip(tested, adjusted):
        r["p_adj"] = float(p)
        r["verdict"] = _verdict(r["p_adj"], r["diff"])
    return rows


def summarize(groups: Dict[str, Dict[int, float]], baseline: Optional[str], metric: str = "acc1",
              correction: str = "holm", resolution: Optional[float] = None) -> List[dict]:
    """Rows per group (arm or arm@point), ranked by mean, with intervals and the paired test against
    ``baseline`` (``resolution``: the metric's step, see :func:`paired_test`), its p-values adjusted
    for their number by ``correction`` (:func:`adjust_p`)."""
    rows = []
    for name, by_seed in groups.items():
        row = {"group": name, "metric": metric, **mean_ci(list(by_seed.values()))}
        if baseline is not None and baseline in groups and name != baseline:
            row.update(paired_test(by_seed, groups[baseline], resolution), base_n=len(groups[baseline]))
        else:
            row.update(pairs=None, diff=None, p=None, test=None, verdict="baseline" if name == baseline else "")
        rows.append(row)
    adjust_p(rows, correction)
    return sorted(rows, key=lambda r: -r["mean"] if not math.isnan(r["mean"]) else math.inf)
