"""benchmarks/scans.py on a CPU: the smoke run writes every op's timings and its FLOP counts."""

from __future__ import annotations


def test_scans_quick_times_every_op_forward_and_backward(run_benchmark):
    result = run_benchmark("scans.py")
    assert result["benchmark"] == "scans" and result["quick"] is True
    assert result["device"]["type"] == "cpu" and result["dtype"] == "float32"
    assert result["fla"]  # a version or "not installed", never missing
    assert set(result["flop_convention"]) == {"attention_fwd", "linear_fwd", "fwd_bwd"}
    rows = {(row["op"], row["impl"]): row for row in result["rows"]}
    # A CPU run times the torch form and SDPA only.
    assert set(rows) == {
        ("attention", "sdpa"),
        ("tnl", "zoo torch"),
        ("cosformer2", "zoo torch"),
        ("hgrn2", "zoo torch"),
        ("mamba2", "zoo torch"),
        ("gdn", "zoo torch"),
    }
    for row in rows.values():
        assert row["flops_fwd"] > 0
        for mode in ("fwd", "fwd_bwd"):
            assert "error" not in row[mode], row[mode]
            assert row[mode]["ms"] > 0 and row[mode]["tflops"] > 0
            assert row[mode]["first_call_s"] > 0
    # cosFormer2's key dim is doubled by LRPE.
    assert rows["cosformer2", "zoo torch"]["K"] == 2 * rows["tnl", "zoo torch"]["K"]
    B, T, H, D = (rows["tnl", "zoo torch"][k] for k in "BTHD")
    assert rows["attention", "sdpa"]["flops_fwd"] == 2 * B * H * T * T * D
    assert rows["tnl", "zoo torch"]["flops_fwd"] == 2 * B * H * T * (64 * D + 64 * D + 2 * D * D)
