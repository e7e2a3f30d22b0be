"""benchmarks/decode.py on a CPU: op steps are timed, a TNL's cache stays one size, and whole
models decode through generate(), eager, compiled and as transformers' own."""

from __future__ import annotations


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
    assert {("llama", "zoo compiled"), ("llama", "transformers static + compile")} <= impls
    for row in gen["rows"]:
        assert "error" not in row, row
        assert row["step_ms"] > 0 and row["bound_ms"] > 0, row
        assert row["weight_bytes"] > 0 and row["cache_bytes"] > 0
    assert gen["goals"]["greedy_equals_zoo_eager"]["met"]
