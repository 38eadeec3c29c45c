"""Comparisons: an experiment grid (arms x grid points x seeds) of independent runs, and the report."""
from .experiment import Experiment, load_experiment
from .runner import run_compare
from .stats import summarize

__all__ = ["Experiment", "load_experiment", "run_compare", "summarize"]
