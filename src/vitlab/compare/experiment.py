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
    metric: acc1                       # what the ranking ranks: acc1, acc5 or auroc_macro
    correction: holm                   # p-values adjusted for the number of arms: holm (default),
                                       # bonferroni, fdr_bh (Benjamini-Hochberg) or none
    arm_recipe_keys: [train.lr]        # optional: data/train keys an arm may set (say, a pretrained
                                       # baseline's lr); by default arms set model.* keys only

Every run of an experiment shares the base, the overrides and the split: the arms differ only in
their own keys. Keys that define the split (``data.name``, ``data.root``, ``data.limit``, ...) can
differ neither between arms nor along the grid; recipe keys (``train.*``, augmentation) differ
between arms only where ``arm_recipe_keys`` says so, and the report names them.

Named studies (``vitlab compare string-cifar-quick``) are experiment files shipped in
``vitlab/experiments/``; ``vitlab list`` shows them.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from importlib import resources

from ..config import RunConfig, beside, deep_merge, load_yaml_file, parse_overrides, read_yaml, validate
from .stats import CORRECTIONS

EXPERIMENT_KEYS = ("base", "overrides", "arms", "grid", "seeds", "baseline", "description", "metric",
                   "correction", "arm_recipe_keys", "quick")
#: the default study (`vitlab compare` with no argument): every PE on Fashion-MNIST, quick scale
DEFAULT_STUDY = "default"
METRICS = ("acc1", "acc5", "auroc_macro")
#: data keys that define the split: the same for every run of a comparison
SPLIT_KEYS = ("data.name", "data.root", "data.limit", "data.val_fraction", "data.split", "data.test_fraction",
              "data.split_seed", "data.dedupe", "data.dedupe_threshold", "data.options")
STUDY_DIR = Path(str(resources.files("vitlab") / "experiments"))


def studies() -> List[str]:
    """The shipped study presets (experiment files in ``vitlab/experiments/``), each also as
    ``NAME-quick`` when its file has a ``quick`` section."""
    names = []
    for p in sorted(STUDY_DIR.glob("*.yaml")):
        names.append(p.stem)
        if "quick" in (load_yaml_file(p, "experiment") or {}):
            names.append(p.stem + "-quick")
    return names


def _within(key: str, other: str) -> bool:
    """``key`` is ``other`` or a key inside it (``data.options.n`` within ``data.options``)."""
    return key == other or key.startswith(other + ".")


def _splits_key(key: str) -> bool:
    return any(_within(key, k) for k in SPLIT_KEYS)


def _set_by(key: str, arms: Dict[str, Dict[str, Any]]) -> List[str]:
    """The arms that set ``key``, a key inside it, or one it is inside."""
    return [a for a, keys in arms.items() if _overlaps(key, keys)]


def _overlaps(key: str, keys) -> bool:
    """``key`` is one of ``keys``, inside one, or holds one: setting both sets the same value."""
    return any(_within(key, k) or _within(k, key) for k in keys)


def _check_dotted(keys, where: str) -> None:
    """Every key is text naming a config key as section.key; ``where`` leads the one-line error."""
    for key in keys:
        if not isinstance(key, str):
            raise ValueError(f"{where}experiment key {key!r} must be text: a dotted section.key, e.g. model.qk_pe")
        if "." not in key:
            raise ValueError(f"{where}experiment key {key!r} must be dotted (section.key), e.g. model.qk_pe")


def check_folder_name(name, what: str) -> None:
    """``name`` can be one folder under the comparison directory and one cell of the report's tables:
    text, not empty, no ``/``, ``\\`` or ``|`` (a table's column separator), no control characters
    (a newline would break a table row), not starting with a dot (``..``, hidden files); a one-line
    ValueError led by ``what`` otherwise."""
    if not isinstance(name, str):
        raise ValueError(f"{what} {name!r} must be text (quote it: '{name}')")
    if not name or name.startswith(".") or any(c in name for c in "/\\|") or not name.isprintable():
        raise ValueError(f"{what} {name!r} cannot be a folder name under the comparison directory and a row of its "
                         f"report: it must be non-empty, without /, \\, | or control characters, and not "
                         f"start with a dot")



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
    metric: str = "acc1"
    correction: str = "holm"
    arm_recipe_keys: List[str] = field(default_factory=list)

    def points(self) -> List[Dict[str, Any]]:
        keys = list(self.grid)
        return [dict(zip(keys, values)) for values in itertools.product(*(self.grid[k] for k in keys))] or [{}]

    def runs(self, extra: Optional[List[str]] = None) -> List[RunSpec]:
        """Every run, validated before any starts (a bad arm fails the whole experiment up front).
        An override (``extra``) of a key an arm or the grid sets is refused: it would apply to some
        runs only, silently."""
        base = deep_merge(read_yaml(self.base), _nest(self.overrides))
        base = deep_merge(base, parse_overrides(extra or []))
        for key in (item.partition("=")[0] for item in extra or []):
            setters = _set_by(key, self.arms)
            if setters:
                raise ValueError(f"override {key} conflicts with arm(s) {', '.join(setters)}, which set it; change "
                                 f"the arms in the experiment file instead")
            if _overlaps(key, self.grid):
                raise ValueError(f"override {key} conflicts with the grid, which sets it; change the grid in the "
                                 f"experiment file instead")
            if _within("train.seed", key):
                raise ValueError(f"override {key} conflicts with the experiment's seeds, which set train.seed for "
                                 f"each run; use --seeds N or the experiment's 'seeds'")
        specs, names = [], set()
        for arm, keys in self.arms.items():
            for point in self.points():
                for seed in self.seeds:
                    raw = deep_merge(deep_merge(base, _nest(keys)), _nest(point))
                    raw = deep_merge(raw, {"train": {"seed": seed}})
                    where = f"arm {arm!r}{' at ' + str(point) if point else ''}"
                    try:
                        cfg = validate(raw)
                    except ValueError as err:
                        raise ValueError(f"{where}: {err}") from None
                    tag = "-".join(f"{k.split('.')[-1]}{v}" for k, v in point.items())
                    name = "-".join(filter(None, [arm, tag, f"s{seed}"]))
                    check_folder_name(name, f"{where}: run name")
                    if name in names:
                        raise ValueError(f"two runs would share the run name {name!r} (a grid value repeated, or "
                                         f"two that read the same as text); make the grid values distinct")
                    names.add(name)
                    specs.append(RunSpec(name, arm, point, seed, cfg))
        return specs


def _nest(flat: Dict[str, Any]) -> dict:
    """{"model.qk_pe": "pope"} -> {"model": {"qk_pe": "pope"}} (values kept as given)."""
    out: dict = {}
    _check_dotted(flat or {}, "")
    for key, value in (flat or {}).items():
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def read_experiment(source: str) -> dict:
    """The raw experiment of a file path or a shipped study's name. ``NAME-quick`` is study NAME at
    laptop scale: its ``quick`` section's keys replace the top-level ones (typically ``base``, the
    preset's -quick variant, and a smaller grid)."""
    path = Path(source)
    quick = False
    if not path.suffix and not path.exists():
        name = source
        if name.endswith("-quick") and not (STUDY_DIR / f"{name}.yaml").is_file():
            name, quick = name[: -len("-quick")], True
        path = STUDY_DIR / f"{name}.yaml"
        if not path.is_file():
            raise ValueError(f"unknown study {source!r}; valid: {', '.join(studies())} "
                             f"(or a path to an experiment .yaml)")
    raw = load_yaml_file(path, "experiment")
    if not isinstance(raw, dict) or "arms" not in raw:
        raise ValueError(f"{path}: an experiment needs 'base' and 'arms' (see `vitlab compare --help`); "
                         f"a run config goes to `vitlab train`")
    section = raw.pop("quick", None)
    if quick:
        if not isinstance(section, dict):
            raise ValueError(f"unknown study {source!r}: {path.name} has no 'quick' section; valid: "
                             f"{', '.join(studies())}")
        raw.update(section)
    if "base" in raw:  # a config next to the experiment file, wherever the command runs from
        raw["base"] = beside(raw["base"], path)
    return raw


def load_experiment(source: Optional[str], seeds: Optional[int] = None) -> Experiment:
    """An experiment YAML file or a shipped study's name, or the default study when ``source`` is
    None. ``seeds`` (a count) replaces the file's seeds."""
    raw = read_experiment(source or DEFAULT_STUDY)
    unknown = sorted(set(raw) - set(EXPERIMENT_KEYS), key=str)
    if unknown:
        raise ValueError(f"unknown experiment key(s) {unknown}; valid: {', '.join(EXPERIMENT_KEYS)}")
    arms = raw.get("arms") or {}
    if not isinstance(arms, dict) or not arms or not all(isinstance(v, dict) or v is None for v in arms.values()):
        raise ValueError("experiment 'arms' must be a non-empty mapping of arm name -> dotted keys")
    for name in arms:  # each names the folders of its runs
        check_folder_name(name, "arm name")
    if seeds is not None:
        if seeds < 1:
            raise ValueError(f"--seeds must be >= 1, got {seeds}")
        raw = {**raw, "seeds": seeds}
    seeds_ = raw.get("seeds", 3)
    seeds_ = list(range(seeds_)) if isinstance(seeds_, int) and not isinstance(seeds_, bool) else seeds_
    if (not isinstance(seeds_, list) or not seeds_ or not all(isinstance(s, int) and not isinstance(s, bool)
                                                               for s in seeds_) or len(set(seeds_)) != len(seeds_)):
        raise ValueError(f"experiment 'seeds' must be a positive count or a list of distinct ints, "
                         f"got {raw.get('seeds')!r}")
    baseline = raw.get("baseline", next(iter(arms)))
    if not isinstance(baseline, str) or baseline not in arms:
        raise ValueError(f"baseline {baseline!r} is not an arm; arms: {', '.join(arms)}")
    grid = raw.get("grid") or {}
    if not isinstance(grid, dict) or any(not isinstance(v, list) or not v for v in grid.values()):
        raise ValueError("experiment 'grid' maps dotted keys to non-empty lists of values")
    _check_dotted(grid, "grid: ")
    metric = raw.get("metric", "acc1")
    if metric not in METRICS:
        raise ValueError(f"experiment metric {metric!r}; valid: {', '.join(METRICS)}")
    correction = raw.get("correction", "holm")
    if not isinstance(correction, str) or correction not in CORRECTIONS:
        raise ValueError(f"experiment correction {correction!r}; valid: {', '.join(CORRECTIONS)}")
    recipe_keys = raw.get("arm_recipe_keys") or []
    if not isinstance(recipe_keys, list) or not all(isinstance(k, str) for k in recipe_keys):
        raise ValueError("experiment 'arm_recipe_keys' must be a list of dotted keys, e.g. [train.lr]")
    if not isinstance(raw.get("description", ""), str) or not isinstance(raw.get("base", ""), str):
        raise ValueError(f"experiment 'description' and 'base' must be text; got description="
                         f"{raw.get('description')!r}, base={raw.get('base')!r}")
    overrides = raw.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise ValueError("experiment 'overrides' must map dotted keys to values")
    _check_dotted(overrides, "overrides: ")
    check_fairness({k: dict(v or {}) for k, v in arms.items()}, grid, recipe_keys)
    return Experiment(base=raw.get("base", "fashion-mnist-quick"), arms={k: dict(v or {}) for k, v in arms.items()},
                      seeds=seeds_, baseline=baseline, overrides=overrides, grid=grid,
                      description=raw.get("description", ""), metric=metric, correction=correction,
                      arm_recipe_keys=list(recipe_keys))


def check_fairness(arms: Dict[str, Dict[str, Any]], grid: Dict[str, list], recipe_keys: List[str]) -> None:
    """Arms share the split always, and the recipe unless ``arm_recipe_keys`` lets a key differ; a
    grid key is set by no arm (the grid would override the arm, and the report label it wrongly)."""
    for arm, keys in arms.items():
        _check_dotted(keys, f"arm {arm!r}: ")
    for key in [*grid, *recipe_keys]:
        if _splits_key(key):
            raise ValueError(f"{key} defines the split, which every run of a comparison shares; it cannot be a "
                             f"grid key or an arm_recipe_key (set it in 'overrides' or run another comparison)")
    for key in grid:
        setters = _set_by(key, arms)
        if setters:
            raise ValueError(f"grid key {key} is also set by arm(s) {', '.join(setters)}: the grid would override "
                             f"the arms; set it in the arms or the grid, not both")
    for arm, keys in arms.items():
        for key in keys:
            if _splits_key(key):
                raise ValueError(f"arm {arm!r} sets {key}, which defines the split: every arm must train and "
                                 f"test on the same split (put it in 'overrides' for all arms)")
            if not key.startswith("model.") and key not in recipe_keys:
                raise ValueError(f"arm {arm!r} sets {key}: arms differ in model keys only, so the recipe stays "
                                 f"the same; to let an arm change {key}, list it in 'arm_recipe_keys'")
