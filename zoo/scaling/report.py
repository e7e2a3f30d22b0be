"""Scaling-law report of a sweep: every fit as JSON, markdown tables and PNG plots.

`analyze(runs)` fits, per family of the IsoFLOP grid, Chinchilla's approach 2 (IsoFLOP parabolas,
bootstrapped), approach 3 (the parametric law) and Shen et al.'s envelope power laws; MAD's
state-optimal law across families; and, on an MoE grid at fixed total parameters, loss against
sparsity: a parabola in Ŝ = −ln(1 − S) (Abnar et al.'s fixed-N slice) gives S*. A fit that
cannot be made (too few runs, no minimum) is reported with its reason instead of stopping the
report. `write_report` writes fits.json, report.md and the plots into one folder.

Shen et al.'s published laws (zoo.scaling.laws.SHEN_2024) are drawn beside ours as slopes through
our own frontier: their constants belong to their tokenizer, data and PF-day scale, ours to the
embedded corpus at ~1e12 FLOPs, so exponents compare and absolute values do not.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from zoo.atomic import write_json_atomic, write_text_atomic
from zoo.scaling import fit as fits
from zoo.scaling.laws import SHEN_2024
from zoo.scaling.runs import SUMMARY_FILE, Run, write_summary

logger = logging.getLogger(__name__)

FAMILY_ORDER = ("llama", "tnl", "hgrn2", "cosformer2")
COLORS = {"llama": "tab:blue", "tnl": "tab:orange", "hgrn2": "tab:green", "cosformer2": "tab:red"}


def _attempt(what: str, make: Callable[[], Any]) -> Any:
    """The fit, or {"error": reason} when the data cannot support it."""
    try:
        return make()
    except (ValueError, np.linalg.LinAlgError) as error:
        logger.warning("%s: %s", what, error)
        return {"error": str(error)}


def _families(runs: Sequence[Run]) -> list[str]:
    present = {run.family for run in runs}
    return [f for f in FAMILY_ORDER if f in present] + sorted(present - set(FAMILY_ORDER))


def moe_sparsity_slice(runs: Sequence[Run]) -> dict[str, Any]:
    """Loss against sparsity at fixed total parameters and compute: a parabola in
    Ŝ = −ln(1 − S) through every run (Abnar et al.'s fixed-N slice) and its minimum S*."""
    S = np.array([run.sparsity for run in runs])
    loss = np.array([run.loss for run in runs])
    if len(np.unique(S)) < 3:
        raise ValueError(f"the MoE slice needs ≥ 3 distinct sparsities, got {sorted(set(S))}")
    s_hat = -np.log1p(-S)
    c2, c1, c0 = np.polyfit(s_hat, loss, 2)
    lo, hi = float(s_hat.min()), float(s_hat.max())
    if c2 > 0:
        x = min(max(-c1 / (2 * c2), lo), hi)
    else:  # no interior minimum: the best end of the sampled range
        x = lo if np.polyval([c2, c1, c0], lo) <= np.polyval([c2, c1, c0], hi) else hi
    best = min(runs, key=lambda run: run.loss)
    return {
        "coefficients": [float(c2), float(c1), float(c0)],
        "s_star": float(-math.expm1(-x)),
        "loss_at_s_star": float(np.polyval([c2, c1, c0], x)),
        "at_edge": bool(x in (lo, hi)),
        "best_run": best.name,
        "best_run_sparsity": best.sparsity,
        "dense_loss": float(np.mean([run.loss for run in runs if run.sparsity == 0]))
        if any(run.sparsity == 0 for run in runs)
        else None,
        "runs": [
            {"name": r.name, "sparsity": r.sparsity, "loss": r.loss, "active": r.active}
            for r in runs
        ],
    }


def analyze(
    runs: Sequence[Run], bootstrap: int = 200, seed: int = 0, full_grid: bool = False
) -> dict[str, Any]:
    """Every fit of the report, as objects (or {"error": ...}); see the module docstring.
    Approach 3 starts from Chinchilla's whole 4,500-point grid with `full_grid`, else from its
    32-point subset (`CHINCHILLA_GRID_SMALL`, the same optimum on our data, 100× faster)."""
    grid_starts = fits.CHINCHILLA_GRID if full_grid else fits.CHINCHILLA_GRID_SMALL
    grid = [run for run in runs if run.grid == "isoflop"]
    moe = [run for run in runs if run.grid == "moe"]
    out: dict[str, Any] = {"families": {}, "n_runs": len(runs)}
    for family in _families(grid):
        members = [run for run in grid if run.family == family]
        out["families"][family] = {
            "isoflop": _attempt(
                f"{family} IsoFLOP",
                lambda m=members: fits.fit_isoflop(m, bootstrap=bootstrap, seed=seed),
            ),
            "parametric": _attempt(
                f"{family} parametric",
                lambda m=members: fits.fit_parametric(
                    m, grid=grid_starts, bootstrap=min(bootstrap, 50), seed=seed
                ),
            ),
            "envelope": _attempt(f"{family} envelope", lambda m=members: fits.fit_envelope(m)),
        }
    if grid:
        out["state_optimal"] = _attempt("state-optimal", lambda: fits.fit_state_optimal(grid))
    if moe:
        out["moe"] = _attempt("MoE sparsity", lambda: moe_sparsity_slice(moe))
    return out


def _jsonable(value: Any) -> Any:
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float | np.floating) and not math.isfinite(float(value)):
        return None
    if isinstance(value, np.generic):
        return value.item()
    return value


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    return f"{x:.{digits}g}"


def _interval(fit: Any, key: str) -> str:
    lo_hi = getattr(fit, "intervals", {}).get(key)
    return f" [{_fmt(lo_hi[0])}, {_fmt(lo_hi[1])}]" if lo_hi else ""


def report_markdown(runs: Sequence[Run], results: dict[str, Any], missing: Sequence[str]) -> str:
    lines = ["# Scaling-law fits", ""]
    lines.append(f"{len(runs)} finished runs" + (f", {len(missing)} unfinished" if missing else ""))
    lines += ["", "## Runs", ""]
    lines.append("| run | family | params | active | tokens | FLOPs | state | loss |")
    lines.append("|---|---|---:|---:|---:|---:|---:|---:|")
    for run in sorted(runs, key=lambda r: (r.grid, r.family, r.budget or 0, r.params)):
        lines.append(
            f"| {run.name} | {run.family} | {run.params:,.0f} | {run.active:,.0f} "
            f"| {run.tokens:,.0f} | {run.flops:.3g} | {_fmt(run.state_size, 4)} "
            f"| {run.loss:.4f} |"
        )
    lines += ["", "## Compute-optimal exponents", ""]
    lines.append(
        "N_opt ∝ C^a, D_opt ∝ C^b, L_opt ∝ C^p: approach 2 (IsoFLOP vertices; 10th–90th "
        "percentile bootstrap intervals), approach 3 (the parametric law's frontier on C = 6ND) "
        "and the envelope of training curves (Shen et al.'s method), beside Shen et al.'s "
        "published exponents (Table 3)."
    )
    lines.append("")
    lines.append("| family | method | a | b | p (loss) | notes |")
    lines.append("|---|---|---|---|---|---|")
    for family, result in results["families"].items():
        iso, par, env = result["isoflop"], result["parametric"], result["envelope"]
        if isinstance(iso, dict):
            lines.append(f"| {family} | IsoFLOP | — | — | — | {iso['error']} |")
        else:
            notes = [f"extrapolated vertex at C = {b:.3g}" for b in iso.extrapolated]
            notes += [f"C = {b:.3g} left out: {why.split(' (runs')[0]}" for b, why in iso.skipped]
            note = "; ".join(notes)
            lines.append(
                f"| {family} | IsoFLOP | {_fmt(iso.a)}{_interval(iso, 'a')} "
                f"| {_fmt(iso.b)}{_interval(iso, 'b')} "
                f"| {_fmt(iso.loss_opt.exponent)}{_interval(iso, 'loss_exponent')} | {note} |"
            )
        if isinstance(par, dict):
            lines.append(f"| {family} | parametric | — | — | — | {par['error']} |")
        else:
            note = (
                f"E={_fmt(par.E)} A={_fmt(par.A)} B={_fmt(par.B)} α={_fmt(par.alpha)} "
                f"β={_fmt(par.beta)}" + ("" if par.converged else "; not converged")
            )
            lines.append(
                f"| {family} | parametric | {_fmt(par.a)}{_interval(par, 'a')} "
                f"| {_fmt(par.b)}{_interval(par, 'b')} | — | {note} |"
            )
        if isinstance(env, dict):
            lines.append(f"| {family} | envelope | — | — | — | {env['error']} |")
        else:
            lines.append(
                f"| {family} | envelope | {_fmt(env.params_opt.exponent)} "
                f"| {_fmt(env.tokens_opt.exponent)} | {_fmt(env.loss.exponent)} | |"
            )
        if family in SHEN_2024:
            law = SHEN_2024[family]
            lines.append(
                f"| {family} | Shen et al. 2024 | {law.n_opt.exponent:.4f} "
                f"| {law.d_opt.exponent:.4f} | {law.loss.exponent:.4f} | published |"
            )
    state = results.get("state_optimal")
    if state is not None:
        lines += ["", "## State-optimal scaling (MAD)", ""]
        if isinstance(state, dict):
            lines.append(f"not fitted: {state['error']}")
        else:
            lines.append(
                "Compute-optimal perplexity P* = exp(L*) of each family's best run per budget "
                "against its inference state M (cache elements at batch 1 and the training "
                "context): P* ∝ M^c. MAD reports c ≈ −0.28."
            )
            lines += ["", "| family | c | points |", "|---|---:|---:|"]
            for family in results["families"]:
                law = state.families.get(family)
                if law is None:
                    lines.append(f"| {family} | — (one state size won every budget) | |")
                else:
                    lines.append(f"| {family} | {_fmt(law.exponent)} | {law.n_points} |")
            lines.append(f"| pooled | {_fmt(state.pooled.exponent)} | {state.pooled.n_points} |")
    moe = results.get("moe")
    if moe is not None:
        lines += ["", "## MoE sparsity at fixed total parameters", ""]
        if "error" in moe:
            lines.append(f"not fitted: {moe['error']}")
        else:
            lines.append(
                f"Parabola in Ŝ = −ln(1 − S) through {len(moe['runs'])} runs: S* = "
                f"{moe['s_star']:.3f} (loss {moe['loss_at_s_star']:.4f}"
                + (", at the edge of the sampled range" if moe["at_edge"] else "")
                + f"); best run {moe['best_run']} (S = {moe['best_run_sparsity']:.3f})"
                + (f"; dense {moe['dense_loss']:.4f}" if moe["dense_loss"] is not None else "")
                + "."
            )
            lines += ["", "| run | sparsity | active params | loss |", "|---|---:|---:|---:|"]
            for r in sorted(moe["runs"], key=lambda r: r["sparsity"]):
                lines.append(
                    f"| {r['name']} | {r['sparsity']:.3f} | {r['active']:,.0f} | {r['loss']:.4f} |"
                )
    return "\n".join(lines) + "\n"


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _fitted(results: dict[str, Any], key: str) -> dict[str, Any]:
    """family → the `key` fit of each family that could be fitted."""
    return {f: r[key] for f, r in results["families"].items() if not isinstance(r[key], dict)}


def _plots(runs: Sequence[Run], results: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    families = list(results["families"])
    grid = [run for run in runs if run.grid == "isoflop"]

    # IsoFLOP profiles: loss against N per budget, with the parabolas and their vertices.
    if families:
        fig, axes = plt.subplots(1, len(families), figsize=(4 * len(families), 3.6), sharey=True)
        for ax, family in zip(np.atleast_1d(axes), families, strict=True):
            members = [run for run in grid if run.family == family]
            budgets = sorted({run.budget for run in members})
            cmap = plt.get_cmap("viridis", max(len(budgets), 2))
            iso = results["families"][family]["isoflop"]
            for i, budget in enumerate(budgets):
                row = sorted((r for r in members if r.budget == budget), key=lambda r: r.params)
                ax.plot([r.params for r in row], [r.loss for r in row], "o", color=cmap(i),
                        label=f"C = {budget:.1g}")  # fmt: skip
            if not isinstance(iso, dict):
                for profile in iso.profiles:
                    i = budgets.index(profile.budget)  # the color of its budget's points
                    lo, hi = profile.params_range
                    n = np.geomspace(lo / 1.5, hi * 1.5, 100)
                    ax.plot(n, profile.predict(n), "-", color=cmap(i), alpha=0.6)
                    ax.plot(profile.params_opt, profile.loss_opt, "*", color=cmap(i), ms=12,
                            markeredgecolor="k")  # fmt: skip
            ax.set_xscale("log")
            ax.set_title(family)
            ax.set_xlabel("parameters N")
        np.atleast_1d(axes)[0].set_ylabel("held-out loss (nats/token)")
        np.atleast_1d(axes)[0].legend(fontsize=7)
        fig.suptitle("IsoFLOP profiles (stars: fitted optima)")
        written.append(_save(fig, out / "isoflop.png"))

    # Frontiers: N_opt(C), D_opt(C), L_opt(C) and Shen et al.'s slopes through our midpoints.
    fitted = _fitted(results, "isoflop")
    if fitted:
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
        for family, iso in fitted.items():
            color = COLORS.get(family)
            budgets = np.array([p.budget for p in iso.profiles])
            c = np.geomspace(budgets.min() / 1.5, budgets.max() * 1.5, 50)
            for ax, law, values, key in (
                (axes[0], iso.params_opt, [p.params_opt for p in iso.profiles], "n_opt"),
                (axes[1], iso.tokens_opt, [p.tokens_opt for p in iso.profiles], "d_opt"),
                (axes[2], iso.loss_opt, [p.loss_opt for p in iso.profiles], "loss"),
            ):
                ax.plot(budgets, values, "o", color=color)
                ax.plot(c, law.predict(c), "-", color=color, label=f"{family} ({law.exponent:.2f})")
                if family in SHEN_2024:  # their exponent through our midpoint
                    theirs = getattr(SHEN_2024[family], key).exponent
                    mid = math.sqrt(budgets.min() * budgets.max())
                    y_mid = float(law.predict(mid))
                    ax.plot(c, y_mid * (c / mid) ** theirs, ":", color=color, alpha=0.7)
        for ax, label in zip(axes, ("N_opt", "D_opt", "L_opt"), strict=True):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("training FLOPs C")
            ax.set_title(f"{label}(C): ours (solid), Shen et al.'s slope (dotted)", fontsize=9)
            ax.legend(fontsize=7)
        written.append(_save(fig, out / "frontier.png"))

    # Approach 3: predicted against observed loss.
    parametric = _fitted(results, "parametric")
    if parametric:
        fig, ax = plt.subplots(figsize=(4.6, 4.2))
        lows, highs = [], []
        for family, par in parametric.items():
            members = [run for run in grid if run.family == family]
            observed = np.array([r.loss for r in members])
            predicted = np.asarray(
                par.predict([r.params for r in members], [r.tokens for r in members])
            )
            ax.plot(observed, predicted, "o", color=COLORS.get(family), label=family, ms=4)
            lows.append(min(observed.min(), predicted.min()))
            highs.append(max(observed.max(), predicted.max()))
        span = [min(lows), max(highs)]
        ax.plot(span, span, "k--", lw=1)
        ax.set_xlabel("observed loss")
        ax.set_ylabel("L̂(N, D) = E + A/N^α + B/D^β")
        ax.set_title("Approach 3: predicted vs observed")
        ax.legend(fontsize=7)
        written.append(_save(fig, out / "predicted_vs_observed.png"))

    state = results.get("state_optimal")
    if state is not None and not isinstance(state, dict):
        fig, ax = plt.subplots(figsize=(4.8, 4.0))
        for family, law in state.families.items():
            pts = [p for p in state.points if p.family == family]
            m = np.array([p.state_size for p in pts])
            ax.plot(
                m,
                [p.perplexity for p in pts],
                "o",
                color=COLORS.get(family),
                label=f"{family} (c={law.exponent:.2f})",
            )
            grid_m = np.geomspace(m.min() / 1.2, m.max() * 1.2, 20)
            ax.plot(grid_m, law.predict(grid_m), "-", color=COLORS.get(family), alpha=0.6)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("inference state M (cache elements)")
        ax.set_ylabel("compute-optimal perplexity P*")
        ax.set_title("State-optimal scaling")
        ax.legend(fontsize=7)
        written.append(_save(fig, out / "state_optimal.png"))

    moe = results.get("moe")
    if moe is not None and "error" not in moe:
        fig, ax = plt.subplots(figsize=(4.8, 3.8))
        S = np.array([r["sparsity"] for r in moe["runs"]])
        ax.plot(-np.log1p(-S), [r["loss"] for r in moe["runs"]], "o", color="tab:purple")
        x = np.linspace(0, (-np.log1p(-S)).max() * 1.05, 100)
        ax.plot(x, np.polyval(moe["coefficients"], x), "-", color="tab:purple", alpha=0.6)
        ax.axvline(-math.log1p(-moe["s_star"]), color="k", ls=":", lw=1)
        ticks = [0, 0.5, 0.75, 0.875, 0.9375]
        ax.set_xticks([-math.log1p(-t) for t in ticks], [f"{t:g}" for t in ticks])
        ax.set_xlabel("sparsity S = 1 − k/E (axis: −ln(1 − S))")
        ax.set_ylabel("held-out loss")
        ax.set_title(f"MoE at fixed total parameters: S* = {moe['s_star']:.2f}")
        written.append(_save(fig, out / "moe_sparsity.png"))
    return written


def write_report(
    runs: Sequence[Run],
    missing: Sequence[str],
    out: str | Path,
    bootstrap: int = 200,
    seed: int = 0,
    full_grid: bool = False,
) -> dict[str, Any]:
    """`runs.jsonl` (the runs, from which this report regenerates), fits.json, report.md and the
    PNGs of `analyze(runs)` in `out` (written atomically)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_summary(list(runs), list(missing), out / SUMMARY_FILE)
    results = analyze(runs, bootstrap=bootstrap, seed=seed, full_grid=full_grid)
    payload = {"unfinished_runs": list(missing), **_jsonable(results)}
    write_json_atomic(out / "fits.json", payload)
    write_text_atomic(out / "report.md", report_markdown(runs, results, missing))
    results["plots"] = [str(p) for p in _plots(runs, results, out)]
    return results
