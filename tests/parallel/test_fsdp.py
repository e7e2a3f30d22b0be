"""FSDP2 of our own on CPU gloo processes: HSDP gradients equal one process's; a 2-process
sharded run trains like one process, writes sharded pickle-free checkpoints, resumes bit for
bit after SIGKILL, and continues on 1 process after `python -m zoo.train_state reshard` (and
only after it)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from tests.parallel.harness import ROOT, TRAIN_ENV, run_ranks, train_command
from zoo import train_state
from zoo.checkpoint import CheckpointError
from zoo.training import Checkpoints, read_metrics

RECIPE = str(ROOT / "recipes" / "configs" / "tiny-llama.yaml")
ENV = TRAIN_ENV
# 16 steps of 2,048 tokens; checkpoints at 4, 8, 12, 16 (all kept), every step logged.
ARGS = ("training.steps=16", "logging.checkpoint_every=4", "logging.keep_last=4",
        "logging.log_every=1")  # fmt: skip
SHARDED = "parallel.dp_shard_size=2"


def _command(*args: str, processes: int) -> list[str]:
    return train_command(RECIPE, *args, processes=processes)


def _train(cwd: Path, *args: str, processes: int = 2) -> subprocess.CompletedProcess:
    return subprocess.run(
        _command(*args, processes=processes), cwd=cwd, env=ENV, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r}


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "final" / "model.safetensors")


def _joined_shards(checkpoint: Path, kind: str) -> dict[str, torch.Tensor]:
    """The full tensors of a 2-shard checkpoint, joined here by hand (dim 0, shard order)."""
    parts = [load_file(checkpoint / f"{kind}-shard-{i:05d}-of-00002.safetensors") for i in (0, 1)]
    return {k: torch.cat([parts[0][k], parts[1][k]]) if parts[0][k].dim() else parts[0][k]
            for k in parts[0]}  # fmt: skip


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory) -> Path:
    """The uninterrupted 2-process FSDP2 run every test compares with (about 15 s)."""
    cwd = tmp_path_factory.mktemp("fsdp")
    done = _train(cwd, *ARGS, SHARDED, "output_dir=reference")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "FSDP2 (zoo.parallel) on the mesh dp_replicate=1 × dp_shard=2" in done.stdout
    return cwd / "reference"


def test_sharded_checkpoints_are_pickle_free_and_verified(sharded_run, tmp_path):
    checkpoint = sharded_run / "checkpoints" / "step-00000008"
    state = train_state.verify(checkpoint)
    assert state["world_size"] == 2 and state["sharding"]["shards"] == 2
    assert state["sharding"]["mesh"] == {"dp_replicate": 1, "dp_shard": 2, "cp": 1, "ep": 1}
    record = state["sharding"]["model"]["model.embed_tokens.weight"]
    assert record == {"shape": [259, 64], "placements": ["shard(0)"]}
    names = sorted(p.name for p in checkpoint.iterdir())  # safetensors and JSON, nothing else
    assert set(names) == {*state["manifest"], train_state.STATE_FILE}
    assert all(name.endswith((".safetensors", ".json")) for name in names)
    assert "model-shard-00001-of-00002.safetensors" in names and "model.safetensors" not in names
    # The final model (gathered to rank 0) is the last checkpoint's shards joined.
    last = _joined_shards(sharded_run / "checkpoints" / "step-00000016", "model")
    final = _weights(sharded_run)
    assert final.keys() == last.keys() and all(torch.equal(final[k], last[k]) for k in final)
    # A changed shard is refused by name, as a full checkpoint's file is.
    copy = tmp_path / "step-00000008"
    shutil.copytree(checkpoint, copy)
    shard = copy / "optimizer-shard-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-4] + b"oops")
    with pytest.raises(CheckpointError, match=r"optimizer-shard-00001-of-00002\.safetensors"):
        train_state.verify(copy)


def test_two_sharded_processes_train_like_one_and_resume_bit_identically(sharded_run):
    cwd = sharded_run.parent
    single = _train(cwd, *ARGS, "output_dir=single", processes=1)
    assert single.returncode == 0, single.stderr[-3000:]
    # The same step on 2 × half the batch: equal up to float summation order.
    reference, one = _losses(sharded_run), _losses(cwd / "single")
    assert list(reference) == list(range(1, 17))
    assert list(reference.values()) == pytest.approx(list(one.values()), rel=1e-5)

    process = subprocess.Popen(
        _command(*ARGS, SHARDED, "output_dir=killed", processes=2), cwd=cwd, env=ENV,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    checkpoints = Checkpoints(cwd / "killed", keep_last=4)
    first = checkpoints.root / "step-00000004" / train_state.STATE_FILE
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None and not first.is_file():
        time.sleep(0.02)
    assert process.poll() is None, "the run finished before it could be killed"
    # The launcher and both ranks, mid-step (torchrun starts each rank in its own session).
    everyone = [psutil.Process(process.pid), *psutil.Process(process.pid).children(True)]
    for member in everyone:
        member.send_signal(signal.SIGKILL)
    process.wait()
    psutil.wait_procs(everyone, timeout=60)  # the ranks, reaped by init: the lock is free
    killed_at = checkpoints.latest()
    assert killed_at is not None and killed_at.name < "step-00000016"

    resumed = _train(cwd, *ARGS, SHARDED, "output_dir=killed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {killed_at.relative_to(cwd)}" in resumed.stdout
    a, b = _weights(sharded_run), _weights(cwd / "killed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(cwd / "killed") == reference  # every step, bit for bit


def test_another_world_size_resumes_only_after_resharding(sharded_run):
    cwd = sharded_run.parent
    checkpoint = sharded_run / "checkpoints" / "step-00000008"
    refused = _train(cwd, *ARGS, f"--resume={checkpoint}", "output_dir=one", processes=1)
    assert refused.returncode == 2, refused.stderr[-3000:]
    line = refused.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and "written by 2 processes, this run has 1" in line
    assert f"python -m zoo.train_state reshard {checkpoint} OUT --world-size 1" in line

    out = cwd / "for-one"
    reshard = [sys.executable, "-m", "zoo.train_state", "reshard", str(checkpoint), str(out),
               "--world-size", "1"]  # fmt: skip
    done = subprocess.run(reshard, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    state = train_state.verify(out)
    assert state["world_size"] == 1 and "sharding" not in state
    # The re-sharded tensors are the shards joined, bit for bit (weights and AdamW moments).
    for kind in ("model", "optimizer"):
        joined, full = _joined_shards(checkpoint, kind), load_file(out / f"{kind}.safetensors")
        assert joined.keys() == full.keys() and all(torch.equal(joined[k], full[k]) for k in full)
    # Loaded by one process, the weights are the 2-process checkpoint's, joined by hand; the
    # data position is the 2-process run's (the next step reads the windows it would have).
    model, data = _load_on_one_process(out)
    joined = _joined_shards(checkpoint, "model")
    loaded = model.state_dict()
    assert loaded.keys() == joined.keys()
    assert all(torch.equal(loaded[k], joined[k]) for k in joined)
    assert data == json.loads((checkpoint / "rank-0.json").read_text())["data"]

    one = _train(cwd, *ARGS, f"--resume={out}", "output_dir=one", processes=1)
    assert one.returncode == 0, one.stderr[-3000:]
    assert f"resuming from {out} (step 8)" in one.stdout
    # Steps 9-16 on one process continue the 2-process run up to float summation order.
    reference, continued = _losses(sharded_run), _losses(cwd / "one")
    assert list(continued) == list(range(9, 17))
    assert [reference[s] for s in continued] == pytest.approx(list(continued.values()), rel=1e-5)
    a, b = _weights(sharded_run), _weights(cwd / "one")
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-5) for k in a)


def _load_on_one_process(checkpoint: Path) -> tuple[torch.nn.Module, dict]:
    """`train_state.load` of `checkpoint` into the tiny recipe's model in this process (as a
    1-process run loads it): the model, and the data position it restored."""
    from transformers import AutoModelForCausalLM

    from zoo.recipe import load_recipe
    from zoo.tokenizer import load_tokenizer
    from zoo.training import param_groups

    class Position:
        state: dict = {}

        def load_state_dict(self, state: dict) -> None:
            self.state = state

    recipe = load_recipe(RECIPE)
    model = AutoModelForCausalLM.from_config(recipe.build_config(load_tokenizer(None)))
    optimizer = torch.optim.AdamW(param_groups(model, 0.1))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    process = type("OneProcess", (), {"process_index": 0, "num_processes": 1})()
    data = Position()
    train_state.load(checkpoint, process, model, optimizer, scheduler, data)
    return model, data.state


def _hsdp_gradients(rank, world):
    """HSDP (2 replicas × 2 shards) on a STAR-style model whose blocks share weights: each rank
    runs its quarter of the batch; the gathered gradients against one process's whole batch."""
    from transformers import AutoModelForCausalLM

    from tests.tiny import tiny_config
    from zoo.parallel.fsdp import apply_fsdp
    from zoo.parallel.mesh import build_mesh, resolve_sizes

    config = tiny_config("shared")
    torch.manual_seed(0)
    whole = AutoModelForCausalLM.from_config(config)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    mesh = build_mesh(resolve_sizes(world, dp_shard=2), "cpu")
    apply_fsdp(model, mesh)
    batch = torch.randint(0, 250, (8, 17), generator=torch.Generator().manual_seed(1))
    whole(input_ids=batch, labels=batch).loss.backward()
    mine = batch[2 * rank : 2 * rank + 2]
    model(input_ids=mine, labels=mine).loss.backward()
    placements = {str(p.placements) for p in model.parameters()}
    grads = {k: p.grad.full_tensor() for k, p in model.named_parameters()}
    return placements, max(
        (grads[k] - p.grad).abs().max().item() for k, p in whole.named_parameters()
    )


def test_hsdp_gradients_equal_one_process_with_shared_blocks():
    for placements, worst in run_ranks(_hsdp_gradients, 4):
        assert placements == {"(Replicate(), Shard(dim=0))"}
        assert worst < 1e-6
