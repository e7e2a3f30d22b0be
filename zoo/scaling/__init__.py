"""Scaling laws: plan a sweep, train it, fit the laws, report them.

plan.py    IsoFLOP and MoE grids as recipes, sized by the zoo's FLOP count
sweep.py   the sweep file, and a resumable runner that trains the planned recipes
runs.py    the `Run` records the fitters read, from a plan folder or a CSV
fit.py     Chinchilla approaches 2 and 3, Shen et al.'s envelope, Abnar et al.'s sparsity
           law, MAD's state-optimal law
laws.py    the functional forms and the papers' published laws
report.py  fits.json, report.md and plots
"""

from zoo.scaling.fit import (
    fit_envelope,
    fit_isoflop,
    fit_parametric,
    fit_power_law,
    fit_sparsity,
    fit_state_optimal,
    optimal_sparsity,
)
from zoo.scaling.runs import Run, load_runs

__all__ = [
    "Run",
    "fit_envelope",
    "fit_isoflop",
    "fit_parametric",
    "fit_power_law",
    "fit_sparsity",
    "fit_state_optimal",
    "load_runs",
    "optimal_sparsity",
]
