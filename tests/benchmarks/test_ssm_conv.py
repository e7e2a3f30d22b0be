"""benchmarks/ssm_conv.py on a CPU: the smoke run times every op's torch form, counts its bytes
and reads the long conv's goal off against the FFT conv at every length."""

from __future__ import annotations


def test_ssm_conv_quick_times_every_op_forward_and_backward(run_benchmark):
    result = run_benchmark("ssm_conv.py")
    assert result["benchmark"] == "ssm_conv" and result["quick"] is True
    assert result["device"]["type"] == "cpu" and result["dtype"] == "float32"
    # A version, "not installed" or the import error: never missing.
    assert set(result["baselines"]) == {"mamba_ssm", "causal_conv1d", "fla"}
    assert all(result["baselines"].values())
    assert set(result["byte_convention"]) == {"fwd", "fwd_bwd"}
    rows = {(row["op"], row["impl"], row["T"]): row for row in result["rows"]}
    # A CPU run times the torch forms only (the baselines are CUDA kernels), and the long conv
    # at a second length besides the shape all ops share.
    assert set(rows) == {
        ("selective_scan", "zoo torch", 128),
        ("long_conv", "zoo torch", 128),
        ("long_conv", "torch fft", 128),
        ("short_conv", "zoo torch", 128),
        ("long_conv", "zoo torch", 64),
        ("long_conv", "torch fft", 64),
    }
    for row in rows.values():
        assert row["bytes_fwd"] > 0 and row["bytes_fwd_bwd"] > row["bytes_fwd"]
        for mode in ("fwd", "fwd_bwd"):
            assert "error" not in row[mode], (row["op"], row["impl"], row[mode])
            assert row[mode]["ms"] > 0 and row[mode]["gb_s"] > 0
            assert row[mode]["first_call_s"] > 0
    # Bytes: fwd = I + O, fwd+bwd = 3·I + 2·O, fp32. Long conv: u (B, T, D), k (D, T); y (B, T, D).
    lc = rows["long_conv", "zoo torch", 128]
    B, T, D = lc["B"], lc["T"], lc["D"]
    inputs, output = 4 * (B * T * D + D * T), 4 * B * T * D
    assert lc["bytes_fwd"] == inputs + output
    assert lc["bytes_fwd_bwd"] == 3 * inputs + 2 * output
    scan = rows["selective_scan", "zoo torch", 128]
    N = scan["N"]
    assert scan["bytes_fwd"] == 4 * (2 * B * T * D + 2 * B * T * N + D * N + D) + output
    # The long conv's goal is read at both lengths and modes; the scan's needs mamba_ssm (CUDA).
    goals = {(g["T"], g["mode"]) for g in result["goals"]}
    assert goals == {(64, "fwd"), (64, "fwd_bwd"), (128, "fwd"), (128, "fwd_bwd")}
    for g in result["goals"]:
        assert g["reference"] == "torch fft" and g["impl"] == "zoo torch"
        assert g["ratio"] > 0 and g["met"] == (g["ratio"] <= 1.0)
