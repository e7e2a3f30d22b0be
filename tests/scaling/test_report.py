"""`zoo scaling fit` on a CSV of runs drawn from known laws: the report recovers them, writes its
tables, JSON and plots, and says which fits the data cannot support."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
from typer.testing import CliRunner

from zoo.cli import app
from zoo.scaling.laws import CHINCHILLA, chinchilla_loss

LAW = CHINCHILLA["hoffmann2022"]
COLUMNS = ["name", "family", "params", "tokens", "flops", "loss", "budget", "state_size", "grid"]
COLUMNS += ["active_params", "sparsity"]


def _law_numbers() -> dict[str, float]:
    return {k: getattr(LAW, k) for k in ("E", "A", "B", "alpha", "beta")}


def _write_runs(path, rng) -> None:
    rows = []
    for family, scale in (("llama", 1.0), ("tnl", 1.02)):
        for budget in (1e18, 1e19, 1e20, 1e21):
            for n in np.geomspace(3e7, 3e9, 7):
                tokens = budget / (6 * n)
                loss = scale * chinchilla_loss(n, tokens, **_law_numbers())
                loss *= math.exp(rng.normal(0, 0.002))
                state = 2 * 64 * n**0.5 if family == "llama" else n**0.5
                rows.append([
                    f"{family}-{n:.2g}-{budget:.0e}", family, n, tokens, budget, loss, budget,
                    state, "isoflop", n, 0.0,
                ])  # fmt: skip
    # An MoE slice at fixed total parameters and compute: loss is a parabola in -ln(1 - S).
    for sparsity in (0.0, 0.5, 0.75, 0.875, 0.9375):
        s_hat = -math.log1p(-sparsity)
        loss = 2.5 + 0.05 * (s_hat - 1.5) ** 2
        rows.append([
            f"moe-{sparsity}", "llama", 1e8, 1e9, 6e17, loss, 6e17, 1e4, "moe",
            1e8 * (1 - 0.6 * sparsity), sparsity,
        ])  # fmt: skip
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        writer.writerows(rows)


def test_fit_cli_recovers_the_frontier_and_writes_the_report(tmp_path):
    runs = tmp_path / "runs.csv"
    _write_runs(runs, np.random.default_rng(0))
    out = tmp_path / "report"
    result = CliRunner().invoke(
        app, ["scaling", "fit", str(runs), "--out", str(out), "--bootstrap", "10"]
    )
    assert result.exit_code == 0, result.output
    fits = json.loads((out / "fits.json").read_text())
    truth_a = LAW.beta / (LAW.alpha + LAW.beta)
    for family in ("llama", "tnl"):
        iso = fits["families"][family]["isoflop"]
        assert abs(iso["a"] - truth_a) / truth_a < 0.1, iso["a"]
        par = fits["families"][family]["parametric"]
        assert "error" not in par
    # The MoE slice's optimum: -ln(1 - S*) = 1.5, S* = 1 - e^-1.5.
    assert abs(fits["moe"]["s_star"] - (1 - math.exp(-1.5))) < 0.02
    assert fits["state_optimal"]["exponents"]["llama"] < 0
    report = (out / "report.md").read_text()
    assert "| llama | IsoFLOP |" in report and "Shen et al. 2024" in report
    for plot in ("isoflop", "frontier", "predicted_vs_observed", "state_optimal", "moe_sparsity"):
        assert (out / f"{plot}.png").stat().st_size > 10_000


def test_fit_cli_reports_what_it_cannot_fit(tmp_path):
    runs = tmp_path / "runs.csv"
    with runs.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["name", "family", "params", "tokens", "flops", "loss", "budget"])
        writer.writerow(["a", "llama", 1e6, 1e8, 6e14, 3.0, 6e14])
        writer.writerow(["b", "llama", 2e6, 5e7, 6e14, 2.9, 6e14])
    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["scaling", "fit", str(runs), "--out", str(out)])
    assert result.exit_code == 0, result.output
    fits = json.loads((out / "fits.json").read_text())
    assert "at least" in fits["families"]["llama"]["isoflop"]["error"]
    bad = tmp_path / "bad.csv"
    bad.write_text("name,family,params,tokens,flops,loss\nx,llama,1e6,1e8,6e14,nan\n")
    result = CliRunner().invoke(app, ["scaling", "fit", str(bad), "--out", str(out)])
    assert result.exit_code == 2 and "run 'x': loss=nan is not finite" in result.output
    missing = CliRunner().invoke(app, ["scaling", "fit", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "neither a plan folder" in missing.output


def test_isoflop_leaves_out_a_budget_without_a_minimum():
    from zoo.scaling.fit import fit_isoflop
    from zoo.scaling.runs import Run

    runs = []
    for budget, curvature in ((1e18, 0.02), (1e19, 0.02), (1e20, 0.02), (1e21, -0.02)):
        for n in np.geomspace(1e7, 1e9, 5):
            centre = math.log(1e8) + 0.5 * math.log(budget / 1e18)
            loss = 3.0 - 0.1 * math.log10(budget) + curvature * (math.log(n) - centre) ** 2
            runs.append(Run(f"{budget:.0e}-{n:.1e}", "x", n, budget / (6 * n), budget, loss,
                            budget=budget))  # fmt: skip
    fit = fit_isoflop(runs)
    assert [b for b, _ in fit.skipped] == [1e21] and "opens downward" in fit.skipped[0][1]
    assert len(fit.profiles) == 3 and abs(fit.a - 0.5) < 0.05
