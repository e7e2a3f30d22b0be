"""Run a function on N CPU processes joined in one gloo process group, and collect what each
rank returns; and the command of a recipe run on N CPU processes. The function must live at
module level (it is imported by name in each child); what it returns may hold tensors, numbers,
strings, lists, tuples and dicts: it travels as `torch.save` bytes and is read back with
`weights_only=True` (a child's shared-memory tensors would vanish with the child)."""

from __future__ import annotations

import io
import os
import socket
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[2]
TRAIN_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
"""The environment of a CPU training run on several processes (recipes/accelerate/cpu_ddp.yaml)."""


def train_command(recipe: str, *args: str, processes: int) -> list[str]:
    """`python -m zoo.train RECIPE ARGS`, launched by accelerate on `processes` CPU processes
    (gloo) when more than one; run it with `TRAIN_ENV`."""
    if processes == 1:
        return [sys.executable, "-m", "zoo.train", recipe, *args]
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    config = str(ROOT / "recipes" / "accelerate" / "cpu_ddp.yaml")
    return [accelerate, "launch", "--config_file", config, "--num_processes", str(processes),
            "-m", "zoo.train", recipe, *args]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _plain(value: Any) -> Any:
    """Tensors as plain CPU tensors (a collective's result may be a waiting tensor subclass)."""
    if isinstance(value, torch.Tensor):
        return torch.empty(value.shape, dtype=value.dtype).copy_(value.detach())
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _child(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        try:
            buffer = io.BytesIO()
            torch.save(_plain(fn(rank, world, *args)), buffer)
            queue.put((rank, "ok", buffer.getvalue()))
        finally:
            dist.destroy_process_group()
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))


def run_ranks(fn: Callable[..., Any], world: int, *args: Any, timeout: float = 240.0) -> list[Any]:
    """`fn(rank, world, *args)` on `world` gloo processes; the list of their results by rank.
    A rank that raises fails the call with its traceback; a hang fails it after `timeout` s."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = _free_port()
    procs = [
        ctx.Process(target=_child, args=(r, world, port, fn, args, queue), daemon=True)
        for r in range(world)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    deadline = time.monotonic() + timeout
    while len(results) + len(errors) < world:
        if time.monotonic() > deadline:
            for p in procs:
                p.kill()
            raise TimeoutError(f"{fn.__name__} on {world} ranks took over {timeout} s")
        if queue.empty():
            if errors:  # the other ranks may wait on the failed one forever
                break
            dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
            if dead:
                errors.append(f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode}")
                break
            time.sleep(0.05)
            continue
        rank, status, value = queue.get()
        if status == "ok":
            results[rank] = torch.load(io.BytesIO(value), weights_only=True)
        else:
            errors.append(f"rank {rank}:\n{value}")
    for p in procs:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(world)]
