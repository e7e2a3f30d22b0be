"""benchmarks/parallel.py on a CPU: context parallelism keeps the loss and divides the
activations a rank saves; expert parallelism's all-to-all volume is counted."""

from __future__ import annotations


def test_parallel_quick_splits_activations_and_keeps_the_loss(run_benchmark):
    result = run_benchmark("parallel.py")
    assert result["benchmark"] == "parallel" and result["device"]["type"] == "cpu"
    one, two = result["context"]["1"], result["context"]["2"]
    assert abs(two["loss"] - one["loss"]) <= 1e-5 * one["loss"]
    # Half the tokens per rank: well under the whole (attention's gathered K/V stay whole).
    assert 0.3 < two["ratio_vs_1"] < 0.75
    assert len(two["saved_bytes_by_rank"]) == 2
    expert = result["expert"]["2"]
    assert 0 < expert["remote_pairs"] < expert["pairs"]
    assert expert["bytes_per_step"] == 4 * expert["remote_pairs"] * result["settings"]["hidden"] * 4
