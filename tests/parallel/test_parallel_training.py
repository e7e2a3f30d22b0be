"""The recipe loop (`python -m zoo.train`) under expert and context parallelism on 4 CPU gloo
processes trains the tiny striped MoE hybrid (TNL, attention, HGRN2, Mamba blocks; MoE channel
mixers) like one process given the same global batches.

Tolerances, fp32: losses, held-out losses and gradient norms rel 1e-5 (seen: 2e-7), final
weights 1e-4 of each tensor's largest entry (seen: 3e-5 with experts over 2 ranks, 5e-6 with
context parallelism too). Both runs feed the model T inputs per (T + 1)-token window: a forward
on the window's last token would put its router scores into the router losses of one process
and not of a context-parallel one (found so: the gradient norms differed by 0.1%).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.parallel.harness import ROOT, TRAIN_ENV, train_command
from zoo.training import read_metrics

RECIPE = str(ROOT / "recipes" / "configs" / "tiny-striped-moe.yaml")
# 6 steps of 2,048 tokens: 4 micro-batches of 8 × 64 in one process, one per data rank in four.
ARGS = ("training.steps=6", "logging.log_every=1", "logging.checkpoint_every=null",
        "logging.eval_every=3")  # fmt: skip


def _train(cwd: Path, name: str, *parallel: str, processes: int) -> dict[str, list[float]]:
    command = train_command(RECIPE, *ARGS, f"output_dir={name}", *parallel, processes=processes)
    done = subprocess.run(
        command, cwd=cwd, env=TRAIN_ENV, capture_output=True, text=True, timeout=400
    )
    assert done.returncode == 0, done.stderr[-3000:]
    records = read_metrics(cwd / name / "metrics.jsonl")
    return {
        key: [r[key] for r in records if key in r] for key in ("loss", "eval_loss", "grad_norm")
    }


def _same_weights(run: Path, reference_run: Path) -> None:
    ours, reference = (load_file(r / "final/model.safetensors") for r in (run, reference_run))
    assert ours.keys() == reference.keys()  # the experts were gathered whole, [E, ...]
    for key, tensor in reference.items():
        assert ours[key].shape == tensor.shape, key
        assert (ours[key] - tensor).abs().max() <= 1e-4 * tensor.abs().max(), key


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, dict[str, list[float]]]:
    cwd = tmp_path_factory.mktemp("parallel-training")
    return cwd, _train(cwd, "single", processes=1)


def test_expert_times_data_parallel_trains_like_one_process(runs):
    cwd, single = runs
    ep = _train(cwd, "ep", "parallel.dp_shard_size=4", "parallel.ep_size=2", processes=4)
    for key in single:
        assert ep[key] == pytest.approx(single[key], rel=1e-5), key
    assert single["loss"][-1] < single["loss"][0] - 0.5  # it learned something
    _same_weights(cwd / "ep", cwd / "single")


def test_context_and_expert_parallel_trains_like_one_process(runs):
    cwd, single = runs
    sizes = ("parallel.dp_shard_size=2", "parallel.cp_size=2", "parallel.ep_size=4")
    cp = _train(cwd, "cp", *sizes, processes=4)
    for key in single:
        assert cp[key] == pytest.approx(single[key], rel=1e-5), key
    _same_weights(cwd / "cp", cwd / "single")
