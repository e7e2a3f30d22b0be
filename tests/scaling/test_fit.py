import json
import math

import numpy as np
import pytest

from zoo.scaling.fit import (
    CHINCHILLA_GRID_SMALL,
    fit_envelope,
    fit_isoflop,
    fit_isoflop_sparsity_surface,
    fit_parametric,
    fit_power_law,
    fit_sparsity,
    fit_state_optimal,
    moe_accounting,
    optimal_sparsity,
)
from zoo.scaling.laws import CHINCHILLA, PF_DAY_FLOPS, ChinchillaLaw, sparsity_loss
from zoo.scaling.runs import CurvePoint, Run

LAW = CHINCHILLA["hoffmann2022"]
BUDGETS = np.geomspace(6e18, 3e21, 9)  # Hoffmann's approach-2 range
SPARSITY_GRID = {
    "log_a": (5.0,),
    "log_b": (5.0,),
    "log_c": (0.0,),
    "log_d": (0.0, 5.0),
    "log_e": (0.0,),
    "alpha": (0.3,),
    "beta": (0.3,),
    "gamma": (0.25, 0.75),
    "lam": (-0.5, 0.5),
    "delta": (-0.5, 0.5),
}


def isoflop_runs(law: ChinchillaLaw, budgets, noise: float, seed: int, sizes: int = 9) -> list[Run]:
    """IsoFLOP grids around the law's own optimum: N from N_opt/6 to 6·N_opt, D = C/6N,
    loss × lognormal noise."""
    rng = np.random.default_rng(seed)
    runs = []
    for C in budgets:
        for N in law.n_opt(C) * np.geomspace(1 / 6, 6, sizes):
            D = C / (6 * N)
            loss = law.loss(N, D) * math.exp(rng.normal(0, noise))
            runs.append(
                Run(
                    name=f"C{C:.2g}-N{N:.3g}",
                    family="llama",
                    params=N,
                    tokens=D,
                    flops=C,
                    loss=loss,
                    budget=C,
                )
            )
    return runs


@pytest.fixture(scope="module")
def chinchilla_runs() -> list[Run]:
    return isoflop_runs(LAW, BUDGETS, noise=0.005, seed=0)


def test_power_law_recovers_exponent_and_coefficient_with_noise():
    rng = np.random.default_rng(1)
    x = np.geomspace(1, 1e4, 40)
    y = 3.0 * x**-0.37 * np.exp(rng.normal(0, 0.02, x.size))
    fit = fit_power_law(x, y, bootstrap=200)
    assert fit.exponent == pytest.approx(-0.37, rel=0.03)
    assert fit.coef == pytest.approx(3.0, rel=0.05)
    lo, hi = fit.intervals["exponent"]
    assert lo < -0.37 < hi and hi - lo < 0.03
    assert fit.predict(100.0) == pytest.approx(3.0 * 100**-0.37, rel=0.03)
    json.dumps(fit.to_dict(), allow_nan=False)


def test_parametric_recovers_chinchilla_exponents_and_predicts_held_out_losses(chinchilla_runs):
    fit = fit_parametric(chinchilla_runs, grid=CHINCHILLA_GRID_SMALL, bootstrap=20)
    assert fit.converged and fit.n_at_best >= 2
    assert fit.alpha == pytest.approx(LAW.alpha, rel=0.1)
    assert fit.beta == pytest.approx(LAW.beta, rel=0.1)
    assert fit.a == pytest.approx(LAW.a, rel=0.1) and fit.b == pytest.approx(LAW.b, rel=0.1)
    # Held out: budgets between and beyond the fitted ones, sizes off the fitted grid.
    held_out = isoflop_runs(LAW, [2e19, 5e20, 1e22], noise=0.0, seed=1, sizes=7)
    N, D = np.array([r.params for r in held_out]), np.array([r.tokens for r in held_out])
    assert np.max(np.abs(fit.predict(N, D) / LAW.loss(N, D) - 1)) < 0.01
    assert fit.n_bootstrap >= 18
    lo, hi = fit.intervals["a"]
    assert lo < fit.a < hi
    json.dumps(fit.to_dict(), allow_nan=False)


def test_parametric_takes_arrays_and_sums_huber_terms(chinchilla_runs):
    N = [r.params for r in chinchilla_runs]
    D = [r.tokens for r in chinchilla_runs]
    L = [r.loss for r in chinchilla_runs]
    from_runs = fit_parametric(chinchilla_runs, grid=CHINCHILLA_GRID_SMALL)
    from_arrays = fit_parametric(N=N, D=D, L=L, grid=CHINCHILLA_GRID_SMALL)
    assert from_arrays.alpha == pytest.approx(from_runs.alpha, rel=1e-6)
    # Doubling every point doubles a summed objective (an averaged one would not change).
    doubled = fit_parametric(N=N * 2, D=D * 2, L=L * 2, grid=CHINCHILLA_GRID_SMALL)
    assert doubled.objective == pytest.approx(2 * from_runs.objective, rel=1e-4)
    with pytest.raises(ValueError, match="different lengths"):
        fit_parametric(N=N, D=D[:-1], L=L, grid=CHINCHILLA_GRID_SMALL)


def test_isoflop_recovers_frontier_exponents(chinchilla_runs):
    fit = fit_isoflop(chinchilla_runs, bootstrap=100)
    assert fit.a == pytest.approx(LAW.a, rel=0.1)
    assert fit.b == pytest.approx(LAW.b, rel=0.1)
    assert fit.extrapolated == ()
    lo, hi = fit.intervals["a"]
    assert lo < fit.a < hi and fit.n_bootstrap >= 90
    for profile in fit.profiles:
        assert profile.params_opt == pytest.approx(LAW.n_opt(profile.budget), rel=0.15)
        # D_opt read off the runs' own tokens: C = 6·N·D holds at the vertex.
        assert 6 * profile.params_opt * profile.tokens_opt == pytest.approx(
            profile.budget, rel=1e-6
        )
    optimum = fit.predict(1e21)
    assert optimum.params == pytest.approx(LAW.n_opt(1e21), rel=0.15)
    assert optimum.loss == pytest.approx(LAW.loss_opt(1e21), rel=0.01)
    json.dumps(fit.to_dict(), allow_nan=False)


def test_isoflop_groups_runs_by_flops_when_given_budgets(chinchilla_runs):
    # No run.budget, FLOPs off the nominal budget by a few percent (another FLOP accounting).
    runs = [
        Run(r.name, r.family, r.params, r.tokens, r.flops * 1.07, r.loss) for r in chinchilla_runs
    ]
    with pytest.raises(ValueError, match="have no budget"):
        fit_isoflop(runs)
    fit = fit_isoflop(runs, budgets=BUDGETS)
    assert fit.a == pytest.approx(fit_isoflop(chinchilla_runs).a, rel=1e-9)
    with pytest.raises(ValueError, match=r"run 'C6e\+18-N.*': flops=.* is not within rtol=0.01"):
        fit_isoflop(runs, budgets=BUDGETS, rtol=0.01)


def test_isoflop_flags_a_vertex_outside_the_sampled_sizes(caplog):
    runs = isoflop_runs(LAW, BUDGETS[:3], noise=0.0, seed=0)
    C = BUDGETS[3]
    for N in LAW.n_opt(C) * np.array([0.05, 0.1, 0.2, 0.4]):  # all smaller than N_opt
        runs.append(
            Run(f"small-N{N:.3g}", "llama", N, C / (6 * N), C, LAW.loss(N, C / (6 * N)), budget=C)
        )
    fit = fit_isoflop(runs)
    assert fit.extrapolated == (C,)
    assert "outside the sampled N range" in caplog.text
    trusted = fit_isoflop(runs, drop_extrapolated=True)
    assert trusted.params_opt.n_points == 3


def envelope_runs(law: ChinchillaLaw) -> list[Run]:
    """Training curves of 20 sizes, each evaluated at 60 token counts, C = 6ND."""
    runs = []
    for N in np.geomspace(1e7, 3e9, 20):
        D = np.geomspace(1e8, 2e12, 60)
        curve = tuple(CurvePoint(d, 6 * N * d, law.loss(N, d)) for d in D)
        runs.append(Run(f"N{N:.3g}", "llama", N, D[-1], 6 * N * D[-1], curve[-1].loss, curve=curve))
    return runs


def test_envelope_recovers_the_frontier_of_a_pure_power_law():
    # With E = 0, L_opt(C) is a pure power law (Shen et al.'s form): exponent −αβ/(α+β).
    law = ChinchillaLaw(E=0.0, A=LAW.A, B=LAW.B, alpha=LAW.alpha, beta=LAW.beta)
    runs = envelope_runs(law)
    fit = fit_envelope(runs, min_flops=1e17, max_flops=1e20)
    assert fit.params_opt.exponent == pytest.approx(law.a, rel=0.1)
    assert fit.tokens_opt.exponent == pytest.approx(law.b, rel=0.1)
    loss_exponent = -law.alpha * law.beta / (law.alpha + law.beta)
    assert fit.loss.exponent == pytest.approx(loss_exponent, rel=0.05)
    C = np.array([1e18, 1e19])
    assert fit.predict(C).loss == pytest.approx(law.loss_opt(C), rel=0.01)
    assert fit.predict(C).params == pytest.approx(law.n_opt(C), rel=0.2)
    assert len(fit.segments) > 5 and fit.segments[0].compute_from == pytest.approx(1e17)
    # The same fit with C in PF-days: same exponents, coefficients rescaled.
    pf = fit_envelope(runs, min_flops=1e17, max_flops=1e20, unit="pf_days")
    assert pf.loss.exponent == pytest.approx(fit.loss.exponent)
    assert pf.predict(1.0).loss == pytest.approx(fit.predict(PF_DAY_FLOPS).loss)
    json.dumps(fit.to_dict(), allow_nan=False)


SPARSITY_LAW = dict(
    a=400.0, alpha=0.34, b=410.0, beta=0.28, c=0.4, lam=-0.2, d=10.0, delta=0.15, gamma=0.2, e=1.5
)


@pytest.fixture(scope="module")
def sparsity_runs() -> list[Run]:
    """Abnar et al.'s IsoFLOP design: budgets × sparsities × total sizes, N_a = (1 − S)·N,
    D = C / (6·N_a), loss from Eq. 6 × 0.3% lognormal noise."""
    rng = np.random.default_rng(1)
    runs = []
    for C in (3e19, 1e20, 3e20, 1e21):
        for S in (0.0, 0.5, 0.75, 0.875, 0.9375, 0.98):
            for N in np.geomspace(1e8, 2e10, 6):
                D = C / (6 * N * (1 - S))
                if 1e9 <= D <= 1e12:
                    loss = sparsity_loss(N, D, S, **SPARSITY_LAW) * math.exp(rng.normal(0, 0.003))
                    runs.append(
                        Run(
                            f"C{C:.0e}-S{S}-N{N:.2g}",
                            "moe",
                            N,
                            D,
                            C,
                            loss,
                            active_params=N * (1 - S),
                            sparsity=S,
                            budget=C,
                        )
                    )
    return runs


def test_sparsity_law_predicts_held_out_sparsest_runs(sparsity_runs):
    train = [r for r in sparsity_runs if r.sparsity < 0.98]
    held_out = [r for r in sparsity_runs if r.sparsity == 0.98]  # as Abnar et al. hold out
    fit = fit_sparsity(train, grid=SPARSITY_GRID, bootstrap=5)
    assert fit.converged
    # Eq. 6 has near-degenerate directions (c vs e, d vs a): its loss predictions are pinned
    # down far better than its ten parameters; β and the sign of λ are recovered.
    assert fit.lam < 0
    assert fit.beta == pytest.approx(SPARSITY_LAW["beta"], rel=0.1)
    predicted = np.array([fit.predict(r.params, r.tokens, r.sparsity) for r in held_out])
    truth = np.array(
        [sparsity_loss(r.params, r.tokens, r.sparsity, **SPARSITY_LAW) for r in held_out]
    )
    # Extrapolating from S ≤ 0.9375 to 0.98: 0.2–2.7% worst case over noise seeds 0–5.
    assert np.max(np.abs(predicted / truth - 1)) < 0.03
    assert fit.n_bootstrap >= 4
    json.dumps(fit.to_dict(), allow_nan=False)


def test_optimal_sparsity_is_the_minimum_over_s_at_fixed_n_and_compute(sparsity_runs):
    fit = fit_sparsity(sparsity_runs, grid=SPARSITY_GRID)
    N, C = 3e8, 1e21
    best = optimal_sparsity(fit, N=N, C=C)
    S = np.linspace(0, 0.99, 20001)
    brute = fit.predict(N, C / (6 * N * (1 - S)), S)
    assert best.loss == pytest.approx(brute.min(), rel=1e-6)
    assert best.sparsity == pytest.approx(S[np.argmin(brute)], abs=1e-3)
    assert best.dense_loss == pytest.approx(fit.predict(N, C / (6 * N), 0.0))
    assert best.tokens == pytest.approx(C / (6 * best.active_params))
    # The runs' own accounting: all parameters are expert parameters here, C = 6·N_a·D.
    assert moe_accounting(sparsity_runs) == pytest.approx((1.0, 6.0))
    assert optimal_sparsity(fit, N=N, C=C, runs=sparsity_runs).sparsity == pytest.approx(
        best.sparsity
    )


def test_sparsity_surface_recovers_a_quadratic_surface_per_budget():
    coefficients = {1e20: (-0.5, 0.012, 0.3, -0.02, -0.015, 0.0002, 8.0)}
    runs = []
    rng = np.random.default_rng(2)
    for budget, (a1, a2, b1, b2, c1, c2, d) in coefficients.items():
        for S in (0.0, 0.5, 0.75, 0.9, 0.95):
            for N in rng.uniform(np.log(1e8), np.log(1e10), 4):
                n, s = N, -math.log1p(-S)
                loss = a1 * n + a2 * n**2 + b1 * s + b2 * s**2 + c1 * n * s + c2 * (n * s) ** 2 + d
                runs.append(
                    Run(
                        f"S{S}-N{math.exp(N):.3g}",
                        "moe",
                        math.exp(N),
                        1e10,
                        budget,
                        loss,
                        sparsity=S,
                        budget=budget,
                    )
                )
    fit = fit_isoflop_sparsity_surface(runs)
    (surface,) = fit.surfaces
    assert surface.coefficients == pytest.approx(coefficients[1e20], rel=1e-6)
    assert surface.rmse < 1e-9
    s_opt, loss = surface.optimal_sparsity(1e9)
    S = np.linspace(*surface.sparsity_range, 10001)
    assert loss == pytest.approx(surface.predict(1e9, S).min(), rel=1e-9)
    assert 0.0 <= s_opt <= 0.95
    json.dumps(fit.to_dict(), allow_nan=False)
    with pytest.raises(ValueError, match=r"budget 1e\+20: .* needs at least 8 points, got 5"):
        fit_isoflop_sparsity_surface(runs[:5])


def test_state_optimal_recovers_the_state_exponent_per_family_and_pooled():
    rng = np.random.default_rng(3)
    truth = {"mamba": (-0.28, 40.0), "hyena": (-0.2, 30.0)}
    runs = []
    for family, (c, k) in truth.items():
        for i, budget in enumerate((4e18, 8e18, 2e19, 4e19, 8e19)):
            best_state = 1e3 * 3.0**i
            for j, offset in enumerate((0.0, 0.05, 0.1, 0.2)):  # the first run is compute-optimal
                state = best_state * 1.5**j
                loss = math.log(k * best_state**c) + offset + rng.normal(0, 0.003)
                runs.append(
                    Run(
                        f"{family}-{budget:.0e}-{j}",
                        family,
                        1e8,
                        1e9,
                        budget,
                        loss,
                        state_size=state,
                        budget=budget,
                    )
                )
    fit = fit_state_optimal(runs)
    for family, (c, k) in truth.items():
        assert fit.exponents[family] == pytest.approx(c, rel=0.1)
        assert fit.predict(1e4, family) == pytest.approx(k * 1e4**c, rel=0.01)
    assert all(p.run.endswith("-0") for p in fit.points)
    assert -0.3 < fit.exponents["pooled"] < -0.15
    json.dumps(fit.to_dict(), allow_nan=False)
    with pytest.raises(
        ValueError, match=r"family 'mamba', budgets\) needs at least 2 points, got 1"
    ):
        fit_state_optimal([r for r in runs if r.budget == 4e18], families=["mamba"])


def test_too_few_runs_in_a_budget_names_the_budget_and_runs(chinchilla_runs):
    runs = [r for r in chinchilla_runs if r.budget != BUDGETS[0]] + [
        r for r in chinchilla_runs if r.budget == BUDGETS[0]
    ][:2]
    with pytest.raises(ValueError, match=r"budget 6e\+18: .* at least 3 runs .* got 2 \(C6e\+18-N"):
        fit_isoflop(runs)
    with pytest.raises(ValueError, match="needs at least 6 points, got 2"):
        fit_parametric(runs[:2], grid=CHINCHILLA_GRID_SMALL)
    with pytest.raises(ValueError, match="needs at least 2 points, got 1"):
        fit_power_law([1.0], [2.0])


def test_a_nan_loss_names_the_run_and_the_column(chinchilla_runs):
    bad = Run("bad-run", "llama", 1e9, 2e10, 1.2e20, float("nan"), budget=BUDGETS[0])
    for fitter in (fit_isoflop, lambda runs: fit_parametric(runs, grid=CHINCHILLA_GRID_SMALL)):
        with pytest.raises(ValueError, match=r"run 'bad-run': loss=nan must be finite and > 0"):
            fitter([*chinchilla_runs, bad])
    with pytest.raises(ValueError, match=r"point 1: y=nan"):
        fit_power_law([1.0, 2.0], [1.0, float("nan")])


def test_a_zero_parameter_count_names_the_run_and_the_column(chinchilla_runs, sparsity_runs):
    zero = Run("zero-params", "llama", 0.0, 2e10, 1.2e20, 3.0, budget=BUDGETS[0])
    with pytest.raises(ValueError, match=r"run 'zero-params': params=0.0 must be finite and > 0"):
        fit_parametric([*chinchilla_runs, zero], grid=CHINCHILLA_GRID_SMALL)
    with pytest.raises(ValueError, match=r"run 'zero-params': params=0.0"):
        fit_isoflop([*chinchilla_runs, zero])
    with pytest.raises(ValueError, match=r"run 'C6e\+18-N.*': non_embedding_params is missing"):
        fit_isoflop(chinchilla_runs, param="non_embedding")
    dense_only = Run("all-experts", "moe", 1e9, 1e10, 6e19, 3.0, sparsity=1.0)
    with pytest.raises(ValueError, match=r"run 'all-experts': sparsity=1.0 must be in \[0, 1\)"):
        fit_sparsity([*sparsity_runs, dense_only], grid=SPARSITY_GRID)
