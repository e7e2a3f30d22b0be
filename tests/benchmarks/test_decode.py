"""benchmarks/decode.py on a CPU: op steps are timed, a TNL's cache stays one size, and whole
models decode through generate(), eager, compiled and as transformers' own."""

from __future__ import annotations

import statistics

import pytest


def test_decode_quick_times_steps_and_keeps_the_cache_constant(run_benchmark):
    result = run_benchmark("decode.py")
    assert result["benchmark"] == "decode" and result["device"]["type"] == "cpu"
    steps = result["op_step"]
    assert {(row["op"], row["impl"]) for row in steps} == {
        (op, "zoo torch") for op in ("tnl", "cosformer2", "hgrn2")
    }
    assert len({row["B"] for row in steps}) == 2
    for row in steps:
        assert "error" not in row, row
        assert row["us_per_step"] > 0 and row["first_call_s"] > 0

    model = result["model"]
    assert model["params"] > 0 and model["config"]["num_hidden_layers"] == 2
    contexts = model["contexts"]
    assert len(contexts) >= 2
    for res in contexts.values():
        assert res["median_token_ms"] > 0 and res["prefill_s"] > 0
        assert res["cache_nbytes_after_decode"] == res["cache_nbytes"]
    # One state per layer and head, whatever the context: H × D × D fp32 in each of 2 layers.
    config = model["config"]
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    expected = 2 * config["num_attention_heads"] * head_dim * head_dim * 4
    assert {res["cache_nbytes"] for res in contexts.values()} == {expected}
    # (c) generate(): every variant ran, the compiled path gave the eager greedy tokens, and the
    # bound's bytes are the weights' and the cache's.
    gen = result["generate"]
    impls = {(row["family"], row["impl"]) for row in gen["rows"]}
    assert {
        ("llama", "zoo compiled"),
        ("llama", "zoo ahead-of-time"),
        ("llama", "transformers static + compile"),
    } <= impls
    assert set(gen["goals"]["zoo_loop_over_transformers_loop"]["value"]) == {"llama", "tnl"}
    for row in gen["rows"]:
        assert "error" not in row, row
        assert row["step_ms"] > 0 and row["bound_ms"] > 0, row
        assert row["weight_bytes"] > 0 and row["cache_bytes"] > 0
        # Every round timed its steps and measured the memory around them.
        assert len(row["step_ms_rounds"]) == len(row["gemv_best_gb_per_s_rounds"]) == gen["rounds"]
    assert gen["goals"]["greedy_equals_zoo_eager"]["met"]
    # The batch ratio comes from the larger batch's group, where our B=1 path ran beside it.
    batched = [r for r in gen["rows"] if r["group"] != "B=1" and r["group"] != "contexts"]
    assert {r["B"] for r in batched} == {1, 4}
    assert "tnl_b4_over_b1" in gen["goals"]
    # A batch's bound is a roofline: its GEMM rate was measured too, and the bound is at least
    # the products' FLOPs at the best of it (and at least its bytes at the best GEMV rate).
    for row in batched:
        nbytes = row["weight_bytes"] + row["cache_bytes"]
        memory = [1e3 * nbytes / (gb * 1e9) for gb in row["gemv_best_gb_per_s_rounds"]]
        if row["B"] == 1:
            assert "gemm" not in row
            assert row["bound_ms"] == pytest.approx(statistics.median(memory))
            continue
        flops = 2 * row["B"] * row["weight_bytes"] / 4
        compute = [1e3 * flops / (g * 1e9) for g in row["gemm_best_gflop_per_s_rounds"]]
        rounds = [max(m, c) for m, c in zip(memory, compute, strict=True)]
        assert row["bound_ms"] == pytest.approx(statistics.median(rounds))
    goal = gen["goals"]["tnl_b4_over_b1"]
    assert 0 < goal["at_bounds"] <= 4 + 1e-9  # a batch of 4 at most 4× the tokens at the bounds
    # (d) one step's products by backend: ATen at both batches, inductor's reductions at B=1.
    products = result["products"]["rows"]
    assert {(r["family"], r["B"]) for r in products} == {
        (f, b) for f in ("llama", "tnl") for b in (1, 4)
    }
    assert {(r["impl"], r["B"]) for r in products} >= {("aten", 1), ("aten", 4), ("inductor", 1)}
    assert ("inductor", 4) not in {(r["impl"], r["B"]) for r in products}
    # The bound's bandwidth counts every way a GEMV ran, inductor's reduction included.
    assert all("inductor_gb_per_s" in row["gemv"] for row in gen["rows"])
    assert all(r["ms"] > 0 and r["layers"] > 0 for r in products)
    # (e) one token's attention over a static cache, three ways, the same values.
    reads = result["cache_reads"]
    assert [r["impl"] for r in reads["rows"]] == [
        "zoo step_attention",
        "values as one reduction",
        "ATen SDPA",
    ]
    assert reads["bytes_per_layer"] == 2 * reads["heads"] * reads["slots"] * reads["head_dim"] * 4
    for row in reads["rows"]:
        assert row["us_per_layer"] > 0 and row["max_abs_diff_vs_sdpa"] < 1e-5
