"""Scaling-law fitters: power laws, IsoFLOP profiles, the Chinchilla parametric law, training-curve
envelopes, MoE sparsity laws and state-optimal exponents. Every fitter returns a frozen dataclass
with the fitted numbers, a `predict` method and `to_dict()` for JSON.

Papers and equations (zoo.scaling.laws holds the published constants):

* Power laws y = k·x^p: least squares of log y on log x (`fit_power_law`).
* Chinchilla approach 2, IsoFLOP profiles (Hoffmann et al., arXiv 2203.15556 §3.2): per compute
  budget C, fit loss = c₂(ln N)² + c₁ ln N + c₀; the vertex is N_opt(C), L_opt(C); then
  N_opt ∝ C^a and D_opt ∝ C^b across budgets (`fit_isoflop`).
* Chinchilla approach 3 (App. D.2, Eq. 11): L̂ = E + A/N^α + B/D^β fitted by

      min over (a, b, e, α, β) of  Σ_i Huber_δ( LSE(a − α ln N_i, b − β ln D_i, e) − ln L_i ),

  A = e^a, B = e^b, E = e^e, δ = 1e-3, L-BFGS from every point of a grid, best fit kept
  (`fit_parametric`).
* Chinchilla approach 1 as Shen et al. use it (arXiv 2406.16690 §4): the lower envelope of loss
  over FLOPs across all training curves, then pure power laws L(C), N_opt(C), D_opt(C)
  (`fit_envelope`).
* Abnar et al. (arXiv 2501.12370) Eq. 6, L(N, D, S) = a/N^α + b/D^β + c/(1−S)^λ
  + d/((1−S)^δ N^γ) + e, by the same Huber/LSE recipe (`fit_sparsity`); their per-budget
  IsoFLOP surface (Eq. 8) L = Σ_{i≤2} a_i N̂^i + Σ_{i≤2} b_i Ŝ^i + Σ_{i≤2} c_i (N̂Ŝ)^i + d with
  N̂ = ln N, Ŝ = −ln(1−S) (`fit_isoflop_sparsity_surface`).
* MAD (arXiv 2403.17844): compute-optimal perplexity P* = exp(L*) against inference state M,
  ln P* = ln k + c ln M (`fit_state_optimal`).

Our choices where the papers are silent or wrong:

* The Huber terms are **summed**, not averaged (Besiroglu et al., arXiv 2404.10102, trace
  Hoffmann's too-small α, β and too-narrow intervals to an averaged objective that stopped
  L-BFGS early). The optimiser sees Σ Huber / δ (same minimiser) with ftol = 1e-12 and
  gtol = 1e-10: with scipy's default ftol the 10-parameter sparsity fit stopped up to 0.6%
  above its minimum, each start somewhere else. A start counts only if scipy reports
  convergence; the best converged start is kept (`converged=False` and a logged warning when
  none converged), and `n_at_best` counts the starts that reached it.
* Bootstrap refits (runs resampled with replacement) start from the full-data optimum, not the
  whole grid: one L-BFGS run each. Intervals are percentiles, 10th–90th by default as in
  Hoffmann et al. Replicates that fail (no convergence, degenerate resample) are dropped and
  counted (`n_bootstrap`).
* IsoFLOP: C for a budget is its nominal value (`run.budget`, or the budget a run's FLOPs round
  to); D_opt comes from a least-squares line of ln D on ln N through the budget's runs,
  evaluated at the vertex (exact for D = C/(k·N)). A vertex outside the budget's sampled N range
  is flagged `extrapolated`, logged, and kept unless `drop_extrapolated=True`. A budget whose
  parabola opens downward has no optimum and raises.
* Envelope: curves are interpolated linearly in (ln FLOPs, loss) and (ln FLOPs, ln tokens) on
  `n_grid` log-spaced FLOP values (Hoffmann: 1,500) over the range where some curve exists; the
  power laws weight every grid point equally (uniform in ln C).
* Sparsity: Abnar et al.'s Table 2 grid has 437,400 starts; the default ABNAR_GRID_REDUCED
  keeps two values of most axes (512 starts, ~10 s). Eq. 6 is nearly degenerate (c against e
  as λ → 0, d against a as δ → 0), so its losses are far better determined than its ten
  parameters. `optimal_sparsity` states its accounting of N_active(S) and D(S).
* State-optimal: per (family, budget) the lowest-loss run is compute-optimal; the pooled fit is
  one line through all families' points.
* L-BFGS-B solves 5- to 10-parameter problems, where a threaded BLAS on a busy machine costs
  ~10× in thread hand-offs: the fits pin BLAS to one thread through threadpoolctl when it is
  installed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import numpy as np
from numpy.typing import ArrayLike
from scipy import optimize, stats
from scipy.special import huber

from zoo.scaling.laws import PF_DAY_FLOPS, ChinchillaLaw, PowerLaw, sparsity_loss
from zoo.scaling.runs import Run

logger = logging.getLogger(__name__)

HUBER_DELTA = 1e-3
"""Hoffmann et al.'s δ (App. D.2); Abnar et al. use the same."""

CHINCHILLA_GRID: dict[str, tuple[float, ...]] = {
    "a": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "b": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "e": (-1.0, -0.5, 0.0, 0.5, 1.0),
    "alpha": (0.0, 0.5, 1.0, 1.5, 2.0),
    "beta": (0.0, 0.5, 1.0, 1.5, 2.0),
}
"""Hoffmann et al. App. D.2: 4,500 starts (a = ln A, b = ln B, e = ln E)."""

CHINCHILLA_GRID_SMALL: dict[str, tuple[float, ...]] = {
    "a": (0.0, 10.0),
    "b": (0.0, 10.0),
    "e": (-1.0, 1.0),
    "alpha": (0.5, 1.0),
    "beta": (0.5, 1.0),
}
"""A 32-start subset of CHINCHILLA_GRID (for tests and quick looks): on Chinchilla-like data it
reaches the same optimum as the full grid."""

ABNAR_GRID: dict[str, tuple[float, ...]] = {
    "log_a": (0.0, 10.0, 20.0),
    "log_b": (0.0, 10.0, 20.0),
    "log_c": (0.0, 10.0, 20.0),
    "log_d": (0.0, 10.0, 20.0),
    "log_e": (1.5,),
    "alpha": (0.0, 0.25, 0.5, 0.75, 1.0, 1.25),
    "beta": (0.0, 0.25, 0.5, 0.75, 1.0, 1.25),
    "gamma": (0.0, 0.25, 0.5, 0.75, 1.0, 1.25),
    "lam": (-1.0, -0.5, 0.0, 0.5, 1.0),
    "delta": (-1.0, -0.5, 0.0, 0.5, 1.0),
}
"""Abnar et al. Table 2: 437,400 starts, too many to run here; see ABNAR_GRID_REDUCED."""

ABNAR_GRID_REDUCED: dict[str, tuple[float, ...]] = {
    "log_a": (0.0, 10.0),
    "log_b": (0.0, 10.0),
    "log_c": (0.0,),
    "log_d": (0.0, 10.0),
    "log_e": (0.0, 1.5),
    "alpha": (0.25, 0.75),
    "beta": (0.25, 0.75),
    "gamma": (0.25, 0.75),
    "lam": (-0.5, 0.5),
    "delta": (-0.5, 0.5),
}
"""A subset of every axis of Table 2 (plus ln e = 0): 512 starts."""

LBFGS_TOLERANCES = {"ftol": 1e-12, "gtol": 1e-10}
"""scipy's defaults (ftol 2.2e-9 relative to max(|f|, 1)) stop early on these objectives (< 1)."""

ParamColumn = Literal["params", "active", "non_embedding"]


# ---------------------------------------------------------------------------------------------
# Validation and small helpers


def _check_column(values: ArrayLike, column: str, labels: Sequence[str]) -> np.ndarray:
    """`values` as floats, each finite and > 0, or an error naming the run/point and column."""
    array = np.asarray(values, dtype=float)
    for value, label in zip(array.tolist(), labels, strict=True):
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"{label}: {column}={value!r} must be finite and > 0")
    return array


def _check_sparsity(values: ArrayLike, labels: Sequence[str]) -> np.ndarray:
    array = np.asarray(values, dtype=float)
    for value, label in zip(array.tolist(), labels, strict=True):
        if not math.isfinite(value) or not 0.0 <= value < 1.0:
            raise ValueError(f"{label}: sparsity={value!r} must be in [0, 1)")
    return array


def _arrays(names: Sequence[str] | None, **columns: ArrayLike) -> tuple[list[str], list[Any]]:
    """Equal-length 1-D arrays and a label per point ('run NAME' or 'point I')."""
    arrays = {key: np.atleast_1d(np.asarray(value, dtype=float)) for key, value in columns.items()}
    lengths = {key: len(value) for key, value in arrays.items()}
    if names is not None:
        lengths["names"] = len(names)
    if len(set(lengths.values())) > 1:
        raise ValueError(f"arrays of different lengths: {lengths}")
    n = next(iter(lengths.values()))
    labels = (
        [f"run {name!r}" for name in names]
        if names is not None
        else [f"point {i}" for i in range(n)]
    )
    return labels, [_check_column(arrays[key], key, labels) for key in arrays]


def _params(runs: Sequence[Run], param: ParamColumn) -> np.ndarray:
    """The parameter count each fit uses: all, active (MoE) or non-embedding (Shen et al.)."""
    values = []
    for run in runs:
        if param == "params":
            value, column = run.params, "params"
        elif param == "active":
            value, column = run.active, "active_params"
        elif param == "non_embedding":
            value, column = run.non_embedding_params, "non_embedding_params"
        else:
            raise ValueError(f"param={param!r}; allowed: 'params', 'active', 'non_embedding'")
        if value is None:
            raise ValueError(f"run {run.name!r}: {column} is missing (param={param!r})")
        value = float(value)
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"run {run.name!r}: {column}={value!r} must be finite and > 0")
        values.append(value)
    return np.array(values)


def _run_column(runs: Sequence[Run], column: str) -> np.ndarray:
    return _check_column(
        [getattr(run, column) for run in runs], column, [f"run {run.name!r}" for run in runs]
    )


def _need(n: int, minimum: int, what: str, labels: Sequence[str]) -> None:
    if n < minimum:
        listed = ", ".join(labels) if labels else "none"
        raise ValueError(f"{what} needs at least {minimum} points, got {n} ({listed})")


def _percentiles(samples: np.ndarray, interval: float) -> tuple[float, float]:
    if not 0 < interval < 1:
        raise ValueError(f"interval={interval} must be in (0, 1)")
    lo, hi = np.percentile(samples, [50 * (1 - interval), 50 * (1 + interval)])
    return float(lo), float(hi)


def _intervals(
    samples: Mapping[str, list[float]], interval: float
) -> dict[str, tuple[float, float]]:
    return {
        key: _percentiles(np.asarray(values), interval) for key, values in samples.items() if values
    }


def _jsonable(value: Any) -> Any:
    """Dataclasses, tuples and numpy scalars as plain JSON types; NaN and ±inf as None."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [_jsonable(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _single_thread_blas() -> contextlib.AbstractContextManager:
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _group_by_budget(
    runs: Sequence[Run], budgets: Sequence[float] | None, rtol: float
) -> dict[float, list[Run]]:
    """Runs by `run.budget`, or, given `budgets`, by the budget nearest their FLOPs (in ln);
    a run more than `rtol` away from every budget is an error."""
    groups: dict[float, list[Run]] = {}
    if budgets is None:
        missing = [run.name for run in runs if run.budget is None]
        if missing:
            raise ValueError(
                f"runs {missing} have no budget: set run.budget or pass budgets=[...] "
                "to group runs by their FLOPs"
            )
        for run in runs:
            _check_column([run.budget], "budget", [f"run {run.name!r}"])
            groups.setdefault(float(run.budget), []).append(run)
        return dict(sorted(groups.items()))
    grid = _check_column(budgets, "budget", [f"budgets[{i}]" for i in range(len(budgets))])
    for run in runs:
        flops = _check_column([run.flops], "flops", [f"run {run.name!r}"])[0]
        nearest = grid[np.argmin(np.abs(np.log(grid / flops)))]
        if abs(math.log(flops / nearest)) > math.log1p(rtol):
            raise ValueError(
                f"run {run.name!r}: flops={flops:.3g} is not within rtol={rtol} of any budget "
                f"(nearest {nearest:.3g})"
            )
        groups.setdefault(float(nearest), []).append(run)
    return dict(sorted(groups.items()))


# ---------------------------------------------------------------------------------------------
# Power laws


@dataclasses.dataclass(frozen=True)
class PowerLawFit:
    """y = coef · x^exponent by least squares in log-log space."""

    coef: float
    exponent: float
    r2: float
    """R² of ln y on ln x."""
    exponent_stderr: float
    """Standard error of the slope (NaN with 2 points)."""
    n_points: int
    columns: tuple[str, str] = ("x", "y")
    intervals: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)
    """Bootstrap percentile intervals of 'coef' and 'exponent' (empty without bootstrap)."""
    n_bootstrap: int = 0

    @property
    def law(self) -> PowerLaw:
        return PowerLaw(self.coef, self.exponent)

    def predict(self, x: ArrayLike) -> np.ndarray | float:
        return self.law(x)

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(self)


def _log_linear(log_x: np.ndarray, log_y: np.ndarray) -> tuple[float, float, float, float]:
    """(intercept, slope, r², slope stderr) of a least-squares line."""
    result = stats.linregress(log_x, log_y)
    stderr = float(result.stderr) if len(log_x) > 2 else math.nan
    return float(result.intercept), float(result.slope), float(result.rvalue**2), stderr


def fit_power_law(
    x: ArrayLike,
    y: ArrayLike,
    *,
    names: Sequence[str] | None = None,
    columns: tuple[str, str] = ("x", "y"),
    bootstrap: int = 0,
    seed: int = 0,
    interval: float = 0.8,
) -> PowerLawFit:
    """Fit y = coef · x^exponent. `names` label the points (run names) in errors; `columns`
    name x and y there; `bootstrap` resamples points with replacement."""
    labels, (x, y) = _arrays(names, **{columns[0]: x, columns[1]: y})
    _need(len(x), 2, "fit_power_law", labels)
    log_x, log_y = np.log(x), np.log(y)
    if np.ptp(log_x) == 0:
        raise ValueError(f"fit_power_law: every {columns[0]} equals {x[0]:.6g}")
    intercept, slope, r2, stderr = _log_linear(log_x, log_y)
    samples: dict[str, list[float]] = {"coef": [], "exponent": []}
    rng = np.random.default_rng(seed)
    for _ in range(bootstrap):
        idx = rng.integers(0, len(x), len(x))
        if np.ptp(log_x[idx]) == 0:
            continue
        result = stats.linregress(log_x[idx], log_y[idx])
        samples["coef"].append(math.exp(result.intercept))
        samples["exponent"].append(float(result.slope))
    return PowerLawFit(
        coef=math.exp(intercept),
        exponent=slope,
        r2=r2,
        exponent_stderr=stderr,
        n_points=len(x),
        columns=columns,
        intervals=_intervals(samples, interval),
        n_bootstrap=len(samples["exponent"]),
    )


class Optimum(NamedTuple):
    """A compute-optimal point: parameters, tokens, loss."""

    params: np.ndarray | float
    tokens: np.ndarray | float
    loss: np.ndarray | float


# ---------------------------------------------------------------------------------------------
# Chinchilla approach 2: IsoFLOP profiles


@dataclasses.dataclass(frozen=True)
class IsoFlopProfile:
    """One budget's parabola loss = c2·(ln N)² + c1·ln N + c0 and its vertex."""

    budget: float
    params_opt: float
    tokens_opt: float
    loss_opt: float
    coefficients: tuple[float, float, float]
    """(c2, c1, c0)."""
    params_range: tuple[float, float]
    extrapolated: bool
    """The vertex lies outside the sampled N range: treat N_opt as a guess."""
    rmse: float
    runs: tuple[str, ...]

    def predict(self, N: ArrayLike) -> np.ndarray | float:
        return np.polyval(self.coefficients, np.log(np.asarray(N, dtype=float)))


def _parabola(
    log_n: np.ndarray, log_d: np.ndarray, loss: np.ndarray
) -> tuple[np.ndarray, float, float, float, float] | None:
    """(coefficients, ln N_opt, ln D_opt, L_opt, rmse), or None without a minimum."""
    if len(np.unique(log_n)) < 3:
        return None
    coefficients = np.polyfit(log_n, loss, 2)
    if coefficients[0] <= 0:
        return None
    x_opt = -coefficients[1] / (2 * coefficients[0])
    slope, intercept = np.polyfit(log_n, log_d, 1)
    rmse = float(np.sqrt(np.mean((np.polyval(coefficients, log_n) - loss) ** 2)))
    return (
        coefficients,
        x_opt,
        slope * x_opt + intercept,
        float(np.polyval(coefficients, x_opt)),
        rmse,
    )


@dataclasses.dataclass(frozen=True)
class IsoFlopFit:
    """Chinchilla approach 2: per-budget vertices and N_opt, D_opt, L_opt power laws in C."""

    profiles: tuple[IsoFlopProfile, ...]
    params_opt: PowerLawFit
    """N_opt = k · C^a."""
    tokens_opt: PowerLawFit
    """D_opt = k · C^b."""
    loss_opt: PowerLawFit
    """L_opt = k · C^p (a pure power law, as Shen et al. fit it)."""
    param: str
    intervals: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)
    """Bootstrap percentile intervals of 'a', 'b', 'loss_exponent'."""
    n_bootstrap: int = 0
    skipped: tuple[tuple[float, str], ...] = ()
    """Budgets left out for want of an optimum, with the reason."""

    @property
    def a(self) -> float:
        return self.params_opt.exponent

    @property
    def b(self) -> float:
        return self.tokens_opt.exponent

    @property
    def extrapolated(self) -> tuple[float, ...]:
        """Budgets whose vertex lies outside their sampled N range."""
        return tuple(p.budget for p in self.profiles if p.extrapolated)

    def predict(self, C: ArrayLike) -> Optimum:
        return Optimum(
            self.params_opt.predict(C), self.tokens_opt.predict(C), self.loss_opt.predict(C)
        )

    def to_dict(self) -> dict[str, Any]:
        return {**_jsonable(self), "a": self.a, "b": self.b}


def fit_isoflop(
    runs: Sequence[Run],
    budgets: Sequence[float] | None = None,
    *,
    param: ParamColumn = "params",
    bootstrap: int = 0,
    seed: int = 0,
    interval: float = 0.8,
    rtol: float = 0.3,
    drop_extrapolated: bool = False,
) -> IsoFlopFit:
    """Chinchilla approach 2. Runs are grouped by `run.budget`, or by the nearest of `budgets`
    to their FLOPs; each budget needs ≥ 3 runs of distinct size. `bootstrap` resamples runs
    with replacement within each budget."""
    groups = _group_by_budget(runs, budgets, rtol)
    _need(len(groups), 2, "fit_isoflop (budgets)", [f"{b:.3g}" for b in groups])
    data = []
    profiles = []
    skipped: list[tuple[float, str]] = []
    for budget, members in groups.items():
        labels = [run.name for run in members]
        if len(np.unique(_params(members, param))) < 3:
            raise ValueError(
                f"budget {budget:.3g}: an IsoFLOP parabola needs at least 3 runs of distinct "
                f"size, got {len(members)} ({', '.join(labels)})"
            )
        log_n = np.log(_params(members, param))
        log_d = np.log(_run_column(members, "tokens"))
        loss = _run_column(members, "loss")
        vertex = _parabola(log_n, log_d, loss)
        if vertex is None or vertex[3] <= 0:
            # A budget whose runs have no interior minimum (loss against ln N opens downward,
            # or the vertex predicts a non-positive loss) gives no optimum: it is left out and
            # named, and the law is fitted on the other budgets.
            reason = (
                "loss against ln N opens downward, no minimum"
                if vertex is None
                else (f"the vertex predicts loss {vertex[3]:.3g} <= 0")
            )
            logger.warning("budget %.3g: %s (runs %s)", budget, reason, ", ".join(labels))
            skipped.append((budget, f"{reason} (runs {', '.join(labels)})"))
            continue
        coefficients, x_opt, y_opt, loss_opt, rmse = vertex
        extrapolated = not log_n.min() <= x_opt <= log_n.max()
        if extrapolated:
            logger.warning(
                "budget %.3g: the IsoFLOP vertex N=%.3g lies outside the sampled N range "
                "[%.3g, %.3g]",
                budget,
                math.exp(x_opt),
                math.exp(log_n.min()),
                math.exp(log_n.max()),
            )
        profiles.append(
            IsoFlopProfile(
                budget=budget,
                params_opt=math.exp(x_opt),
                tokens_opt=math.exp(y_opt),
                loss_opt=loss_opt,
                coefficients=tuple(float(c) for c in coefficients),
                params_range=(math.exp(log_n.min()), math.exp(log_n.max())),
                extrapolated=extrapolated,
                rmse=rmse,
                runs=tuple(labels),
            )
        )
        data.append((budget, log_n, log_d, loss, extrapolated))
    used = [p for p in profiles if not (drop_extrapolated and p.extrapolated)]
    _need(
        len(used),
        2,
        "fit_isoflop (budgets with a trusted vertex)",
        [f"{p.budget:.3g}" for p in used] + [f"{b:.3g} skipped: {why}" for b, why in skipped],
    )
    C = [p.budget for p in used]
    names = [f"budget {p.budget:.3g}" for p in used]
    fits = {
        key: fit_power_law(C, [getattr(p, key) for p in used], names=names, columns=("C", key))
        for key in ("params_opt", "tokens_opt", "loss_opt")
    }

    trusted = [d for d in data if not (drop_extrapolated and d[-1])]

    def resampled_exponents(rng: np.random.Generator) -> tuple[float, ...] | None:
        """(a, b, loss exponent) with each budget's runs resampled; None if a parabola fails."""
        vertices = []
        for budget, log_n, log_d, loss, _ in trusted:
            idx = rng.integers(0, len(log_n), len(log_n))
            vertex = _parabola(log_n[idx], log_d[idx], loss[idx])
            if vertex is None or vertex[3] <= 0:
                return None
            vertices.append((math.log(budget), vertex[1], vertex[2], math.log(vertex[3])))
        log_c, *columns = np.array(vertices).T
        return tuple(float(np.polyfit(log_c, column, 1)[0]) for column in columns)

    samples: dict[str, list[float]] = {"a": [], "b": [], "loss_exponent": []}
    rng = np.random.default_rng(seed)
    for _ in range(bootstrap):
        exponents = resampled_exponents(rng)
        if exponents is not None:
            for key, value in zip(samples, exponents, strict=True):
                samples[key].append(value)
    return IsoFlopFit(
        profiles=tuple(profiles),
        params_opt=fits["params_opt"],
        tokens_opt=fits["tokens_opt"],
        loss_opt=fits["loss_opt"],
        param=param,
        intervals=_intervals(samples, interval),
        n_bootstrap=len(samples["a"]),
        skipped=tuple(skipped),
    )


# ---------------------------------------------------------------------------------------------
# Huber regression of ln L on a log-sum-exp of power-law terms (approach 3 and Abnar Eq. 6)


@dataclasses.dataclass(frozen=True)
class _LseModel:
    """ln L̂ = LSE_k( θ[coef_k] − Σ_j θ[exp_kj] · F[:, col_kj] ): a sum of power-law terms, each
    `terms[k] = (coef_k, ((exp_kj, col_kj), ...))` with F the ln-features (ln N, ln D, ...)."""

    names: tuple[str, ...]
    terms: tuple[tuple[str, tuple[tuple[str, int], ...]], ...]

    def design(self, F: np.ndarray) -> np.ndarray:
        """M with log-terms T = M @ θ: every term is linear in θ."""
        M = np.zeros((F.shape[0], len(self.terms), len(self.names)))  # (n, K, P)
        for k, (coef, exps) in enumerate(self.terms):
            M[:, k, self.names.index(coef)] = 1.0
            for exponent, col in exps:
                M[:, k, self.names.index(exponent)] = -F[:, col]
        return M


def _huber_lse(
    theta: np.ndarray, M: np.ndarray, y: np.ndarray, delta: float
) -> tuple[float, np.ndarray]:
    """Σ_i Huber_δ(LSE_k T_ik − y_i) / δ and its gradient in θ."""
    T = M @ theta  # (n, K)
    top = T.max(axis=1, keepdims=True)
    softmax = np.exp(T - top)
    total = softmax.sum(axis=1, keepdims=True)
    softmax /= total
    r = (top + np.log(total))[:, 0] - y
    psi = np.clip(r, -delta, delta) / delta  # dHuber/dr / δ
    grad = np.einsum("nk,nkp->p", softmax * psi[:, None], M)
    return float(huber(delta, r).sum() / delta), grad


@dataclasses.dataclass(frozen=True)
class _LseResult:
    theta: np.ndarray
    objective: float
    converged: bool
    n_starts: int
    n_converged: int
    n_at_best: int
    message: str
    start: dict[str, float]


def _grid_starts(model: _LseModel, grid: Mapping[str, Sequence[float]]) -> Iterator[np.ndarray]:
    if set(grid) != set(model.names):
        raise ValueError(f"grid keys {sorted(grid)} must be exactly {sorted(model.names)}")
    for point in itertools.product(*(grid[name] for name in model.names)):
        yield np.array(point, dtype=float)


def _minimize(
    M: np.ndarray, y: np.ndarray, x0: np.ndarray, delta: float, maxiter: int
) -> optimize.OptimizeResult:
    return optimize.minimize(
        _huber_lse,
        x0,
        args=(M, y, delta),
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": maxiter, **LBFGS_TOLERANCES},
    )


def _fit_lse(
    model: _LseModel,
    F: np.ndarray,
    y: np.ndarray,
    grid: Mapping[str, Sequence[float]],
    delta: float,
    maxiter: int,
) -> _LseResult:
    M = model.design(F)
    best: dict[bool, tuple[optimize.OptimizeResult, np.ndarray]] = {}  # by converged
    converged_objectives = []
    n_starts = 0
    with _single_thread_blas():
        for x0 in _grid_starts(model, grid):
            n_starts += 1
            result = _minimize(M, y, x0, delta, maxiter)
            ok = bool(result.success) and bool(np.all(np.isfinite(result.x)))
            if ok:
                converged_objectives.append(result.fun)
            if ok not in best or result.fun < best[ok][0].fun:
                best[ok] = (result, x0)
    if not converged_objectives:
        logger.warning("no L-BFGS start converged (best: %s)", best[False][0].message)
    result, start = best[bool(converged_objectives)]
    n_at_best = sum(f <= result.fun * (1 + 1e-6) + 1e-12 for f in converged_objectives)
    return _LseResult(
        theta=result.x,
        objective=float(result.fun) * delta,
        converged=bool(converged_objectives),
        n_starts=n_starts,
        n_converged=len(converged_objectives),
        n_at_best=n_at_best,
        message=str(result.message),
        start=dict(zip(model.names, map(float, start), strict=True)),
    )


def _bootstrap_lse(
    model: _LseModel,
    F: np.ndarray,
    y: np.ndarray,
    theta: np.ndarray,
    n: int,
    seed: int,
    delta: float,
    maxiter: int,
) -> list[np.ndarray]:
    M = model.design(F)
    rng = np.random.default_rng(seed)
    thetas = []
    with _single_thread_blas():
        for _ in range(n):
            idx = rng.integers(0, len(y), len(y))
            result = _minimize(M[idx], y[idx], theta, delta, maxiter)
            if result.success and np.all(np.isfinite(result.x)):
                thetas.append(result.x)
    return thetas


# ---------------------------------------------------------------------------------------------
# Chinchilla approach 3: parametric fit

_CHINCHILLA_MODEL = _LseModel(
    names=("a", "b", "e", "alpha", "beta"),
    terms=(("a", (("alpha", 0),)), ("b", (("beta", 1),)), ("e", ())),
)


def _lse_fit_and_bootstrap(
    model: _LseModel,
    numbers: Callable[[np.ndarray], dict[str, float]],
    F: np.ndarray,
    y: np.ndarray,
    grid: Mapping[str, Sequence[float]],
    delta: float,
    maxiter: int,
    bootstrap: int,
    seed: int,
    interval: float,
) -> tuple[dict[str, float], dict[str, Any]]:
    """The best fit from the grid and its bootstrap: (the law's numbers, the fields every LSE
    fit reports: objective, convergence, start, intervals of every number, n_bootstrap)."""
    result = _fit_lse(model, F, y, grid, delta, maxiter)
    thetas = _bootstrap_lse(model, F, y, result.theta, bootstrap, seed, delta, maxiter)
    samples: dict[str, list[float]] = {}
    for theta in thetas:
        for key, value in numbers(theta).items():
            samples.setdefault(key, []).append(value)
    diagnostics = {
        "objective": result.objective,
        "converged": result.converged,
        "n_starts": result.n_starts,
        "n_converged": result.n_converged,
        "message": result.message,
        "start": result.start,
        "n_at_best": result.n_at_best,
        "intervals": _intervals(samples, interval),
        "n_bootstrap": len(thetas),
    }
    return numbers(result.theta), diagnostics


@dataclasses.dataclass(frozen=True)
class ParametricFit:
    """Chinchilla approach 3: L̂ = E + A/N^α + B/D^β."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective: float
    """Σ Huber_δ of the ln-loss residuals at the optimum."""
    converged: bool
    n_starts: int
    n_converged: int
    message: str
    n_at_best: int
    """Converged starts that reached the best objective (to 1e-6): few means a rugged fit."""
    start: dict[str, float]
    """The grid point the best fit started from."""
    n_points: int
    intervals: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)
    """Bootstrap percentile intervals of E, A, B, alpha, beta, a, b."""
    n_bootstrap: int = 0

    @property
    def law(self) -> ChinchillaLaw:
        return ChinchillaLaw(E=self.E, A=self.A, B=self.B, alpha=self.alpha, beta=self.beta)

    @property
    def a(self) -> float:
        """N_opt ∝ C^a on the C = 6ND frontier."""
        return self.law.a

    @property
    def b(self) -> float:
        """D_opt ∝ C^b on the C = 6ND frontier."""
        return self.law.b

    @property
    def G(self) -> float:
        return self.law.G

    def predict(self, N: ArrayLike, D: ArrayLike) -> np.ndarray | float:
        return self.law.loss(N, D)

    def optimum(self, C: ArrayLike) -> Optimum:
        """The compute-optimal point at C = 6ND FLOPs."""
        return Optimum(self.law.n_opt(C), self.law.d_opt(C), self.law.loss_opt(C))

    def to_dict(self) -> dict[str, Any]:
        return {**_jsonable(self), "a": self.a, "b": self.b, "G": self.G}


def _chinchilla_numbers(theta: np.ndarray) -> dict[str, float]:
    a, b, e, alpha, beta = map(float, theta)
    return {
        "E": math.exp(e),
        "A": math.exp(a),
        "B": math.exp(b),
        "alpha": alpha,
        "beta": beta,
        "a": beta / (alpha + beta),
        "b": alpha / (alpha + beta),
    }


def fit_parametric(
    runs: Sequence[Run] | None = None,
    *,
    N: ArrayLike | None = None,
    D: ArrayLike | None = None,
    L: ArrayLike | None = None,
    names: Sequence[str] | None = None,
    param: ParamColumn = "params",
    grid: Mapping[str, Sequence[float]] = CHINCHILLA_GRID,
    delta: float = HUBER_DELTA,
    bootstrap: int = 0,
    seed: int = 0,
    interval: float = 0.8,
    maxiter: int = 5000,
) -> ParametricFit:
    """Chinchilla approach 3 on `runs` (N from `param`, D = tokens, L = loss) or on arrays N, D,
    L. `grid` maps a = ln A, b = ln B, e = ln E, alpha, beta to start values (CHINCHILLA_GRID:
    4,500 starts, ~30 s; pass a smaller one for speed)."""
    if runs is not None:
        if N is not None or D is not None or L is not None:
            raise ValueError("pass either runs or the arrays N, D, L, not both")
        names = [run.name for run in runs]
        N, D, L = _params(runs, param), _run_column(runs, "tokens"), _run_column(runs, "loss")
    elif N is None or D is None or L is None:
        raise ValueError("fit_parametric needs runs or all of N, D, L")
    labels, (N, D, L) = _arrays(names, N=N, D=D, loss=L)
    _need(len(L), 6, "fit_parametric (5 parameters)", labels)
    F = np.stack([np.log(N), np.log(D)], axis=1)  # (n, 2)
    y = np.log(L)
    numbers, diagnostics = _lse_fit_and_bootstrap(
        _CHINCHILLA_MODEL, _chinchilla_numbers, F, y, grid, delta, maxiter, bootstrap, seed,
        interval,
    )  # fmt: skip
    laws = {key: numbers[key] for key in ("E", "A", "B", "alpha", "beta")}
    return ParametricFit(**laws, **diagnostics, n_points=len(L))


# ---------------------------------------------------------------------------------------------
# Approach 1 / Shen et al.: the envelope of training curves


@dataclasses.dataclass(frozen=True)
class EnvelopeSegment:
    """A stretch of the FLOP grid on which one run has the lowest loss."""

    run: str
    compute_from: float
    compute_to: float


@dataclasses.dataclass(frozen=True)
class EnvelopeFit:
    """L(C), N_opt(C), D_opt(C) power laws fitted to the lower envelope of training curves."""

    loss: PowerLawFit
    params_opt: PowerLawFit
    tokens_opt: PowerLawFit
    unit: str
    """C's unit: 'flops' or 'pf_days' (Shen et al.'s Table 3)."""
    param: str
    segments: tuple[EnvelopeSegment, ...]
    n_grid: int

    def predict(self, C: ArrayLike) -> Optimum:
        """N_opt, D_opt, L at C (in `unit`)."""
        return Optimum(self.params_opt.predict(C), self.tokens_opt.predict(C), self.loss.predict(C))

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(self)


def fit_envelope(
    runs: Sequence[Run],
    *,
    param: ParamColumn = "params",
    unit: Literal["flops", "pf_days"] = "flops",
    n_grid: int = 1500,
    min_flops: float | None = None,
    max_flops: float | None = None,
) -> EnvelopeFit:
    """Shen et al.'s method (Hoffmann approach 1) on the runs' loss curves. `min_flops` /
    `max_flops` trim the FLOP range (e.g. to skip warm-up); N is `param` (Shen et al. use
    non-embedding parameters)."""
    if unit not in ("flops", "pf_days"):
        raise ValueError(f"unit={unit!r}; allowed: 'flops', 'pf_days'")
    _need(len(runs), 2, "fit_envelope (runs)", [run.name for run in runs])
    params = _params(runs, param)
    curves = []
    short = [run.name for run in runs if len(run.curve) < 2]
    if short:  # a run too short to log twice has no curve to take part in the envelope
        logger.warning("fit_envelope: runs with fewer than 2 curve points left out: %s", short)
        runs = [run for run in runs if len(run.curve) >= 2]
        _need(len(runs), 2, "fit_envelope (runs with a curve)", [run.name for run in runs])
        params = _params(runs, param)
    for run in runs:
        labels = [f"run {run.name!r} curve[{i}]" for i in range(len(run.curve))]
        flops = _check_column([p.flops for p in run.curve], "flops", labels)
        tokens = _check_column([p.tokens for p in run.curve], "tokens", labels)
        loss = _check_column([p.loss for p in run.curve], "loss", labels)
        if np.any(np.diff(flops) <= 0):
            raise ValueError(f"run {run.name!r}: curve FLOPs must increase strictly")
        curves.append((np.log(flops), np.log(tokens), loss))
    lo = min(c[0][0] for c in curves)
    hi = max(c[0][-1] for c in curves)
    if min_flops is not None:
        lo = max(lo, math.log(min_flops))
    if max_flops is not None:
        hi = min(hi, math.log(max_flops))
    if not hi > lo:
        raise ValueError(f"empty FLOP range [{math.exp(lo):.3g}, {math.exp(hi):.3g}]")
    log_c = np.linspace(lo, hi, n_grid)
    losses = np.full((len(runs), n_grid), np.inf)  # (runs, grid)
    log_tokens = np.zeros((len(runs), n_grid))
    for i, (log_f, log_t, loss) in enumerate(curves):
        inside = (log_c >= log_f[0]) & (log_c <= log_f[-1])
        losses[i, inside] = np.interp(log_c[inside], log_f, loss)
        log_tokens[i, inside] = np.interp(log_c[inside], log_f, log_t)
    covered = np.isfinite(losses).any(axis=0)
    winner = np.argmin(losses, axis=0)[covered]
    log_c = log_c[covered]
    cols = np.arange(n_grid)[covered]
    compute = np.exp(log_c) / (PF_DAY_FLOPS if unit == "pf_days" else 1.0)
    envelope_loss = losses[winner, cols]
    tokens = np.exp(log_tokens[winner, cols])
    names = [f"C={c:.3g}" for c in compute]
    fits = {
        "loss": fit_power_law(compute, envelope_loss, names=names, columns=("C", "loss")),
        "params_opt": fit_power_law(compute, params[winner], names=names, columns=("C", "params")),
        "tokens_opt": fit_power_law(compute, tokens, names=names, columns=("C", "tokens")),
    }
    changes = np.flatnonzero(np.diff(winner)) + 1
    starts = np.concatenate([[0], changes])
    ends = np.concatenate([changes - 1, [len(winner) - 1]])
    segments = tuple(
        EnvelopeSegment(runs[winner[s]].name, float(compute[s]), float(compute[e]))
        for s, e in zip(starts, ends, strict=True)
    )
    return EnvelopeFit(**fits, unit=unit, param=param, segments=segments, n_grid=n_grid)


# ---------------------------------------------------------------------------------------------
# MoE sparsity: Abnar et al. Eq. 6, the optimal sparsity and the per-budget surface

_SPARSITY_MODEL = _LseModel(
    names=("log_a", "log_b", "log_c", "log_d", "log_e", "alpha", "beta", "lam", "delta", "gamma"),
    # Features: 0 = ln N, 1 = ln D, 2 = ln(1 − S).
    terms=(
        ("log_a", (("alpha", 0),)),
        ("log_b", (("beta", 1),)),
        ("log_c", (("lam", 2),)),
        ("log_d", (("delta", 2), ("gamma", 0))),
        ("log_e", ()),
    ),
)

_SPARSITY_FIELDS = ("a", "alpha", "b", "beta", "c", "lam", "d", "delta", "gamma", "e")


def _sparsity_numbers(theta: np.ndarray) -> dict[str, float]:
    p = dict(zip(_SPARSITY_MODEL.names, map(float, theta), strict=True))
    return {
        "a": math.exp(p["log_a"]),
        "alpha": p["alpha"],
        "b": math.exp(p["log_b"]),
        "beta": p["beta"],
        "c": math.exp(p["log_c"]),
        "lam": p["lam"],
        "d": math.exp(p["log_d"]),
        "delta": p["delta"],
        "gamma": p["gamma"],
        "e": math.exp(p["log_e"]),
    }


@dataclasses.dataclass(frozen=True)
class SparsityFit:
    """Abnar et al. Eq. 6: L = a/N^α + b/D^β + c/(1−S)^λ + d/((1−S)^δ N^γ) + e, N total."""

    a: float
    alpha: float
    b: float
    beta: float
    c: float
    lam: float
    d: float
    delta: float
    gamma: float
    e: float
    objective: float
    converged: bool
    n_starts: int
    n_converged: int
    message: str
    n_at_best: int
    start: dict[str, float]
    n_points: int
    param: str
    intervals: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)
    n_bootstrap: int = 0

    @property
    def coefficients(self) -> dict[str, float]:
        """The law's parameters, as `laws.sparsity_loss` takes them."""
        return {name: getattr(self, name) for name in _SPARSITY_FIELDS}

    def predict(self, N: ArrayLike, D: ArrayLike, S: ArrayLike) -> np.ndarray | float:
        return sparsity_loss(N, D, S, **self.coefficients)

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(self)


def fit_sparsity(
    runs: Sequence[Run],
    *,
    param: ParamColumn = "params",
    grid: Mapping[str, Sequence[float]] = ABNAR_GRID_REDUCED,
    delta: float = HUBER_DELTA,
    bootstrap: int = 0,
    seed: int = 0,
    interval: float = 0.8,
    maxiter: int = 5000,
) -> SparsityFit:
    """Abnar et al. Eq. 6 by Hoffmann's recipe on `runs` (N from `param`: total parameters in
    the paper; D = tokens; S = run.sparsity). The runs need at least two distinct
    sparsities. `grid` keys: log_a … log_e, alpha, beta, gamma, lam, delta."""
    labels = [f"run {run.name!r}" for run in runs]
    _need(len(runs), 11, "fit_sparsity (10 parameters)", [run.name for run in runs])
    N, D, L = _params(runs, param), _run_column(runs, "tokens"), _run_column(runs, "loss")
    S = _check_sparsity([run.sparsity for run in runs], labels)
    if len(np.unique(S)) < 2:
        raise ValueError(f"fit_sparsity needs runs of at least 2 sparsities, all have S={S[0]}")
    F = np.stack([np.log(N), np.log(D), np.log1p(-S)], axis=1)  # (n, 3)
    y = np.log(L)
    numbers, diagnostics = _lse_fit_and_bootstrap(
        _SPARSITY_MODEL, _sparsity_numbers, F, y, grid, delta, maxiter, bootstrap, seed, interval
    )
    return SparsityFit(**numbers, **diagnostics, n_points=len(runs), param=param)


_SCAN_POINTS = 200


def _argmin_1d(f: Callable[[float], float], lo: float, hi: float) -> tuple[float, float]:
    """(x*, f(x*)) on [lo, hi]: a scan of _SCAN_POINTS, then scipy's bounded Brent method in
    the cells beside the best point (the scan guards against a second local minimum)."""
    grid = np.linspace(lo, hi, _SCAN_POINTS)
    values = np.array([f(x) for x in grid])
    i = int(np.argmin(values))
    bounds = (grid[max(i - 1, 0)], grid[min(i + 1, _SCAN_POINTS - 1)])
    result = optimize.minimize_scalar(f, bounds=bounds, method="bounded")
    if result.fun < values[i]:
        return float(result.x), float(result.fun)
    return float(grid[i]), float(values[i])


@dataclasses.dataclass(frozen=True)
class SparsityOptimum:
    """The loss-minimising sparsity at fixed total parameters N and training FLOPs C."""

    sparsity: float
    loss: float
    active_params: float
    tokens: float
    dense_loss: float
    """The loss at S = 0 (same N, same C)."""
    at_bound: bool
    """S* sits at s_max: the law would go sparser still."""
    expert_fraction: float
    flops_per_param_token: float


def moe_accounting(runs: Sequence[Run]) -> tuple[float, float]:
    """(expert_fraction φ, FLOPs per active parameter per token κ) from the runs: φ is the
    median over MoE runs (S > 0) of (1 − N_active/N)/S, κ the median of C/(N_active·D)."""
    labels = [f"run {run.name!r}" for run in runs]
    sparse = [run for run in runs if run.sparsity > 0]
    if not sparse:
        raise ValueError("moe_accounting needs at least one run with sparsity > 0")
    active = _params(runs, "active")
    kappa = _run_column(runs, "flops") / (active * _run_column(runs, "tokens"))
    _check_sparsity([run.sparsity for run in runs], labels)
    phi = (1 - _params(sparse, "active") / _params(sparse, "params")) / np.array(
        [run.sparsity for run in sparse]
    )
    return float(np.median(phi)), float(np.median(kappa))


def optimal_sparsity(
    fit: SparsityFit,
    *,
    N: float,
    C: float,
    expert_fraction: float = 1.0,
    flops_per_param_token: float = 6.0,
    runs: Sequence[Run] | None = None,
    s_max: float = 0.99,
) -> SparsityOptimum:
    """S* = argmin_S L(N, D(S), S) at fixed total parameters N and compute C.

    Assumes N_active(S) = N · (1 − φ·S), with φ = `expert_fraction` the share of N in expert
    weights, unchanged with S (fixed width and total expert weights, fewer experts active; φ = 1
    is Eq. 6's own reading of 1 − S as the active fraction), and D(S) = C / (κ · N_active(S))
    with κ = `flops_per_param_token` (6 for C = 6·N_a·D). With `runs`, φ and κ come from
    `moe_accounting(runs)` instead. The search covers [0, s_max] (`_argmin_1d`)."""
    if runs is not None:
        expert_fraction, flops_per_param_token = moe_accounting(runs)
    for column, value in (("N", N), ("C", C), ("flops_per_param_token", flops_per_param_token)):
        _check_column([value], column, ["optimal_sparsity"])
    if not 0 < expert_fraction <= 1:
        raise ValueError(f"expert_fraction={expert_fraction} must be in (0, 1]")
    if not 0 < s_max < 1:
        raise ValueError(f"s_max={s_max} must be in (0, 1)")

    def tokens(s: float) -> float:
        return C / (flops_per_param_token * N * (1 - expert_fraction * s))

    def loss(s: float) -> float:
        return float(fit.predict(N, tokens(s), s))

    s_opt, l_opt = _argmin_1d(loss, 0.0, s_max)
    return SparsityOptimum(
        sparsity=float(s_opt),
        loss=float(l_opt),
        active_params=N * (1 - expert_fraction * s_opt),
        tokens=tokens(s_opt),
        dense_loss=loss(0.0),
        at_bound=bool(s_opt >= s_max * (1 - 1 / _SCAN_POINTS)),
        expert_fraction=expert_fraction,
        flops_per_param_token=flops_per_param_token,
    )


def _surface_features(N: np.ndarray, S: np.ndarray, degrees: tuple[int, int, int]) -> np.ndarray:
    """Columns N̂^i, Ŝ^i, (N̂Ŝ)^i for i = 1..degree, then 1; N̂ = ln N, Ŝ = −ln(1 − S)."""
    n_hat, s_hat = np.log(N), -np.log1p(-S)
    columns = [n_hat**i for i in range(1, degrees[0] + 1)]
    columns += [s_hat**i for i in range(1, degrees[1] + 1)]
    columns += [(n_hat * s_hat) ** i for i in range(1, degrees[2] + 1)]
    return np.stack([*columns, np.ones_like(n_hat)], axis=1)  # (n, Σ degrees + 1)


@dataclasses.dataclass(frozen=True)
class SparsitySurface:
    """One budget's L(N, S) = Σ a_i N̂^i + Σ b_i Ŝ^i + Σ c_i (N̂Ŝ)^i + d (Abnar et al. Eq. 8)."""

    budget: float
    degrees: tuple[int, int, int]
    coefficients: tuple[float, ...]
    """a_1..a_p, b_1..b_q, c_1..c_r, d."""
    rmse: float
    params_range: tuple[float, float]
    sparsity_range: tuple[float, float]
    runs: tuple[str, ...]

    def predict(self, N: ArrayLike, S: ArrayLike) -> np.ndarray:
        N, S = np.broadcast_arrays(np.asarray(N, dtype=float), np.asarray(S, dtype=float))
        features = _surface_features(N.ravel(), S.ravel(), self.degrees)
        return (features @ np.array(self.coefficients)).reshape(N.shape)

    def optimal_sparsity(self, N: float) -> tuple[float, float]:
        """(S*, L) at fixed N, searched within the budget's sampled sparsities."""
        return _argmin_1d(lambda s: float(self.predict(N, s)), *self.sparsity_range)

    def optimal_params(self, S: float) -> tuple[float, float]:
        """(N*, L) at fixed S, searched within the budget's sampled N range."""
        log_lo, log_hi = np.log(self.params_range)
        log_n, loss = _argmin_1d(lambda x: float(self.predict(math.exp(x), S)), log_lo, log_hi)
        return math.exp(log_n), loss


@dataclasses.dataclass(frozen=True)
class SparsitySurfaceFit:
    """Abnar et al.'s IsoFLOP surfaces, one per budget."""

    surfaces: tuple[SparsitySurface, ...]
    param: str

    def surface(self, budget: float) -> SparsitySurface:
        for surface in self.surfaces:
            if math.isclose(surface.budget, budget, rel_tol=1e-6):
                return surface
        raise KeyError(
            f"no surface for budget {budget:.3g}; have {[s.budget for s in self.surfaces]}"
        )

    def predict(self, N: ArrayLike, S: ArrayLike, budget: float) -> np.ndarray:
        return self.surface(budget).predict(N, S)

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(self)


def fit_isoflop_sparsity_surface(
    runs: Sequence[Run],
    budgets: Sequence[float] | None = None,
    *,
    degrees: tuple[int, int, int] = (2, 2, 2),
    param: ParamColumn = "params",
    rtol: float = 0.3,
) -> SparsitySurfaceFit:
    """Abnar et al.'s per-budget surface by linear least squares; each budget needs more runs
    than coefficients (8 at degrees (2, 2, 2)) spread over several N and S. `param='active'`
    gives their second fit in N_a."""
    surfaces = []
    for budget, members in _group_by_budget(runs, budgets, rtol).items():
        names = tuple(run.name for run in members)
        n_coef = sum(degrees) + 1
        _need(len(members), n_coef + 1, f"budget {budget:.3g}: surface of degrees {degrees}", names)
        N = _params(members, param)
        S = _check_sparsity([run.sparsity for run in members], [f"run {n!r}" for n in names])
        L = _run_column(members, "loss")
        features = _surface_features(N, S, degrees)
        scale = np.abs(features).max(axis=0)  # column scaling for conditioning; same solution
        solution, _, rank, _ = np.linalg.lstsq(features / scale, L, rcond=None)
        if rank < n_coef:
            raise ValueError(
                f"budget {budget:.3g}: the runs do not determine a degrees-{degrees} surface "
                f"(rank {rank} < {n_coef}); vary both N and S ({', '.join(names)})"
            )
        coefficients = solution / scale
        rmse = float(np.sqrt(np.mean((features @ coefficients - L) ** 2)))
        surfaces.append(
            SparsitySurface(
                budget=budget,
                degrees=tuple(degrees),
                coefficients=tuple(float(c) for c in coefficients),
                rmse=rmse,
                params_range=(float(N.min()), float(N.max())),
                sparsity_range=(float(S.min()), float(S.max())),
                runs=names,
            )
        )
    return SparsitySurfaceFit(surfaces=tuple(surfaces), param=param)


# ---------------------------------------------------------------------------------------------
# MAD: state-optimal scaling


@dataclasses.dataclass(frozen=True)
class StatePoint:
    """The compute-optimal (lowest-loss) run of one family at one budget."""

    family: str
    budget: float
    run: str
    state_size: float
    loss: float

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)


@dataclasses.dataclass(frozen=True)
class StateOptimalFit:
    """P* = k · M^c per family and pooled over families."""

    families: dict[str, PowerLawFit]
    pooled: PowerLawFit
    points: tuple[StatePoint, ...]

    @property
    def exponents(self) -> dict[str, float]:
        """c per family, and 'pooled'."""
        return {
            **{f: fit.exponent for f, fit in self.families.items()},
            "pooled": self.pooled.exponent,
        }

    def predict(self, M: ArrayLike, family: str | None = None) -> np.ndarray | float:
        """Compute-optimal perplexity at state M (the pooled law without `family`)."""
        return (self.families[family] if family is not None else self.pooled).predict(M)

    def to_dict(self) -> dict[str, Any]:
        return {**_jsonable(self), "exponents": self.exponents}


def fit_state_optimal(
    runs: Sequence[Run],
    families: Sequence[str] | None = None,
    budgets: Sequence[float] | None = None,
    *,
    rtol: float = 0.3,
) -> StateOptimalFit:
    """MAD's state-optimal fit: per family and budget the lowest-loss run gives P* = exp(loss)
    and M = run.state_size; ln P* = ln k + c ln M per family (≥ 2 budgets each) and pooled."""
    families = sorted({run.family for run in runs}) if families is None else list(families)
    points = []
    fits = {}
    for family in families:
        members = [run for run in runs if run.family == family]
        if not members:
            raise ValueError(f"family {family!r} has no runs")
        _run_column(members, "loss")
        family_points = []
        for budget, group in _group_by_budget(members, budgets, rtol).items():
            best = min(group, key=lambda run: run.loss)
            if best.state_size is None:
                raise ValueError(f"run {best.name!r}: state_size is missing")
            state = _run_column([best], "state_size")[0]
            family_points.append(StatePoint(family, budget, best.name, float(state), best.loss))
        _need(
            len(family_points),
            2,
            f"fit_state_optimal (family {family!r}, budgets)",
            [f"{p.budget:.3g} ({p.run})" for p in family_points],
        )
        points += family_points
        if len({p.state_size for p in family_points}) < 2:
            # The same size won every budget: no spread in M, no per-family slope (the points
            # still join the pooled fit).
            logger.warning("fit_state_optimal: family %r has one state size only", family)
            continue
        fits[family] = fit_power_law(
            [p.state_size for p in family_points],
            [p.perplexity for p in family_points],
            names=[p.run for p in family_points],
            columns=("state_size", "perplexity"),
        )
    pooled = fit_power_law(
        [p.state_size for p in points],
        [p.perplexity for p in points],
        names=[p.run for p in points],
        columns=("state_size", "perplexity"),
    )
    return StateOptimalFit(families=fits, pooled=pooled, points=tuple(points))
