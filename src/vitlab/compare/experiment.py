"""Experiment files: a base config, the arms, a hyper-parameter grid and the seeds.

    base: fashion-mnist-quick          # a preset or YAML file every run starts from
    overrides: {train.epochs: 3}       # applied to every run (dotted keys)
    arms:                              # name -> dotted model/train/data keys that differ
      none: {}
      rope_axial: {model.qk_pe: rope_axial}
      rope_mixed+learned: {model.qk_pe: rope_mixed, model.token_pe: learned}
    grid: {train.lr: [1.0e-3, 3.0e-3]} # optional: every arm at every point
    seeds: 3                           # or a list [0, 1, 2]
    baseline: none                     # the arm the others are tested against

Every run of an experiment shares the base, the overrides and ``data.split_seed``: the arms differ
only in their own keys.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..config import RunConfig, deep_merge, load_yaml_file, parse_overrides, read_yaml, validate

EXPERIMENT_KEYS = ("base", "overrides", "arms", "grid", "seeds", "baseline", "description")

DEFAULT_EXPERIMENT = {
    "description": "The default study: every positional encoding on Fashion-MNIST (quick scale), 3 seeds.",
    "base": "fashion-mnist-quick",
    "arms": {
        "none": {"model.qk_pe": "none"},
        "learned": {"model.qk_pe": "none", "model.token_pe": "learned"},
        "sincos": {"model.qk_pe": "none", "model.token_pe": "sincos"},
        "rope_axial": {"model.qk_pe": "rope_axial"},
        "rope_mixed": {"model.qk_pe": "rope_mixed"},
        "rope_mixed+learned": {"model.qk_pe": "rope_mixed", "model.token_pe": "learned"},
        "string_cayley": {"model.qk_pe": "string_cayley"},
        "pope": {"model.qk_pe": "pope"},
    },
    "seeds": 3,
    "baseline": "none",
}


@dataclass
class RunSpec:
    """One run of the grid: its directory name and its resolved config."""
    name: str
    arm: str
    point: Dict[str, Any]
    seed: int
    config: RunConfig


@dataclass
class Experiment:
    base: str
    arms: Dict[str, Dict[str, Any]]
    seeds: List[int]
    baseline: str
    overrides: Dict[str, Any] = field(default_factory=dict)
    grid: Dict[str, List[Any]] = field(default_factory=dict)
    description: str = ""

    def points(self) -> List[Dict[str, Any]]:
        keys = list(self.grid)
        return [dict(zip(keys, values)) for values in itertools.product(*(self.grid[k] for k in keys))] or [{}]

    def runs(self, extra: Optional[List[str]] = None) -> List[RunSpec]:
        """Every run, validated before any starts (a bad arm fails the whole experiment up front)."""
        base = deep_merge(read_yaml(self.base), _nest(self.overrides))
        base = deep_merge(base, parse_overrides(extra or []))
        specs = []
        for arm, keys in self.arms.items():
            for point in self.points():
                for seed in self.seeds:
                    raw = deep_merge(deep_merge(base, _nest(keys)), _nest(point))
                    raw = deep_merge(raw, {"train": {"seed": seed}})
                    try:
                        cfg = validate(raw)
                    except ValueError as err:
                        raise ValueError(f"arm {arm!r}{' at ' + str(point) if point else ''}: {err}") from None
                    tag = "-".join(f"{k.split('.')[-1]}{v}" for k, v in point.items())
                    specs.append(RunSpec("-".join(filter(None, [arm, tag, f"s{seed}"])), arm, point, seed, cfg))
        return specs


def _nest(flat: Dict[str, Any]) -> dict:
    """{"model.qk_pe": "pope"} -> {"model": {"qk_pe": "pope"}} (values kept as given)."""
    out: dict = {}
    for key, value in (flat or {}).items():
        if "." not in key:
            raise ValueError(f"experiment key {key!r} must be dotted (section.key), e.g. model.qk_pe")
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def load_experiment(source: Optional[str]) -> Experiment:
    """An experiment YAML file, or the default study when ``source`` is None."""
    if source is None:
        raw = DEFAULT_EXPERIMENT
    else:
        path = Path(source)
        raw = load_yaml_file(path, "experiment")
        if not isinstance(raw, dict) or "arms" not in raw:
            raise ValueError(f"{path}: an experiment needs 'base' and 'arms' (see `vitlab compare --help`); "
                             f"a run config goes to `vitlab train`")
    unknown = sorted(set(raw) - set(EXPERIMENT_KEYS))
    if unknown:
        raise ValueError(f"unknown experiment key(s) {unknown}; valid: {', '.join(EXPERIMENT_KEYS)}")
    arms = raw.get("arms") or {}
    if not isinstance(arms, dict) or not arms:
        raise ValueError("experiment 'arms' must be a non-empty mapping of arm name -> dotted keys")
    seeds = raw.get("seeds", 3)
    seeds = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    if not seeds or not all(isinstance(s, int) for s in seeds):
        raise ValueError(f"experiment 'seeds' must be a positive count or a list of ints, got {raw.get('seeds')!r}")
    baseline = raw.get("baseline", next(iter(arms)))
    if baseline not in arms:
        raise ValueError(f"baseline {baseline!r} is not an arm; arms: {', '.join(arms)}")
    grid = raw.get("grid") or {}
    if any(not isinstance(v, list) or not v for v in grid.values()):
        raise ValueError("experiment 'grid' maps dotted keys to non-empty lists of values")
    return Experiment(base=raw.get("base", "fashion-mnist-quick"), arms={k: dict(v or {}) for k, v in arms.items()},
                      seeds=seeds, baseline=baseline, overrides=raw.get("overrides") or {}, grid=grid,
                      description=raw.get("description", ""))
