"""benchmarks/mixers.py on a CPU: the smoke run times Mamba2 against transformers' model on the
same weights (equal logits) and the SSD and gated-delta ops against transformers' torch code."""

from __future__ import annotations


def test_mixers_quick_compares_with_transformers(run_benchmark):
    result = run_benchmark("mixers.py")
    assert result["benchmark"] == "mixers" and result["quick"] is True
    model = result["mamba2_model"][str(result["lengths"][-1])]
    assert model["logits_max_abs_diff"] <= 1e-4 * max(model["logits_max_abs"], 1.0)
    assert set(model["ms"]) == {"zoo", "transformers chunk 256", "transformers chunk 64"}
    assert all(ms > 0 for ms in model["ms"].values()) and model["hf_over_zoo"] > 0
    for op in ("ssd_op", "gated_delta_op"):
        row = result[op]
        # The same math: outputs equal within fp32 rounding of outputs of order one.
        assert row["max_abs_diff"] <= 1e-4 * max(row["output_max_abs"], 1.0), op
        for mode in ("fwd", "fwd_bwd"):
            assert row[f"{mode}_ms"]["zoo"] > 0 and row[f"hf_over_zoo_{mode}"] > 0
    assert len(result["goals"]) == 2
    assert all(isinstance(goal["met"], bool) for goal in result["goals"].values())
