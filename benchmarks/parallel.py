"""Context and expert parallelism: memory per rank, step time and all-to-all volume, 1/2/4 ranks.

(a) Context parallelism at a fixed total length T: a striped hybrid (attention, Mamba, TNL's
lightning attention, HGRN2, a gated short conv; SwiGLU and MoE channel mixers) runs one
forward + backward on 1, 2 and 4 processes, each holding T/P tokens of every row
(`zoo.parallel.context`). Per rank: the bytes of activations autograd saves for the backward
(every tensor the graph keeps, counted once per storage, weights excluded: the quantity context
parallelism divides), the peak allocated memory on a GPU, and the median step time. The loss of
every P is checked against P = 1.

(b) Expert parallelism: one MoE layer's tokens, experts sharded over P ranks
(`zoo.parallel.expert`): the bytes each rank sends to other ranks per layer and step. A
(token, slot) pair whose expert lives elsewhere goes out as d activations and comes back as d
outputs in the forward; the backward moves the same again, so one step sends
4 · d · bytes per remote pair.

    .venv/bin/python benchmarks/parallel.py                 # CPU, gloo, fp32
    .venv/bin/python benchmarks/parallel.py --quick         # smoke run, 1 and 2 ranks
    .venv/bin/python benchmarks/parallel.py --device cuda   # NCCL, bf16; needs >= 2 GPUs

Each world size runs in its own spawned processes (gloo on CPU, 1 thread each; NCCL on GPUs, one
per rank; world sizes above the GPU count are skipped, and with fewer than 2 GPUs the script
records that and exits 0). On a CPU the ranks share the machine's cores, so the step times say
little about speed-ups; the memory per rank is the measurement. Writes
benchmarks/results/{cpu,gpu}_parallel[_quick].json.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from common import finish, new_result, with_notes

# (a) the model and the length; (b) the MoE layer's tokens.
SETTINGS = {
    "cpu": dict(hidden=128, heads=4, experts=8, top_k=2, seq_len=2048, batch=1, worlds=(1, 2, 4)),
    "cuda": dict(
        hidden=1024, heads=16, experts=16, top_k=2, seq_len=32768, batch=1, worlds=(1, 2, 4, 8)
    ),
    "quick": dict(hidden=32, heads=2, experts=4, top_k=2, seq_len=128, batch=1, worlds=(1, 2)),
}
PATTERN = "attention:moe mamba:swiglu lightning:moe hgrn2:swiglu gated_conv:moe"


def _config(s: dict[str, Any]) -> Any:
    import zoo

    d, heads = s["hidden"], s["heads"]
    return zoo.HybridConfig.from_pattern(
        s["pattern"],
        hidden_size=d,
        intermediate_size=2 * d,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        vocab_size=256,
        max_position_embeddings=s["seq_len"],
        num_experts=s["experts"],
        num_experts_per_tok=s["top_k"],
        moe_intermediate_size=d,
        mamba_d_state=16,
    )


class _SavedBytes:
    """Bytes of the distinct storages autograd saves for the backward, parameters excluded."""

    def __init__(self, params: set[int]) -> None:
        self.params, self.seen, self.total = params, set(), 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        try:
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
        except RuntimeError:  # a wrapper subclass (a collective's pending result): its own size
            key, nbytes = id(t), t.numel() * t.element_size()
        if key not in self.params and key not in self.seen:
            self.seen.add(key)
            self.total += nbytes
        return t

    @staticmethod
    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t


def _context_rank(rank: int, world: int, s: dict[str, Any], repeats: int, dev: str) -> dict:
    from transformers import AutoModelForCausalLM

    from zoo.parallel.batch import shard_causal_batch
    from zoo.parallel.context import context_parallel

    device = torch.device(dev if dev == "cpu" else f"cuda:{rank}")
    dtype = torch.float32 if dev == "cpu" else torch.bfloat16
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(s)).to(device, dtype)
    ids = torch.randint(
        0, 256, (s["batch"], s["seq_len"]), generator=torch.Generator().manual_seed(1)
    )
    ids = ids.to(device)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    group = dist.group.WORLD if world > 1 else None
    times, saved, loss = [], 0, 0.0
    for step in range(repeats + 1):
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        counter = _SavedBytes(params)
        start = time.perf_counter()
        with (
            context_parallel(group) as cp,
            torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack),
        ):
            out = model(**shard_causal_batch(ids, ids, cp))
            out.loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step:  # the first step warms up (allocations, Triton compiles)
            times.append(time.perf_counter() - start)
        saved, loss = counter.total, out.loss.item()
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {
        "saved_bytes": saved,
        "peak_bytes": peak,
        "step_s": statistics.median(times),
        "loss": loss,
    }


def _expert_rank(rank: int, world: int, s: dict[str, Any], dev: str) -> dict:
    from transformers import AutoModelForCausalLM

    device = torch.device(dev if dev == "cpu" else f"cuda:{rank}")
    torch.manual_seed(0)  # the model's own initialisation, the same router on every rank
    config = _config({**s, "pattern": "attention:moe"})  # one MoE layer, whatever --pattern
    layer = AutoModelForCausalLM.from_config(config).model.layers[0].channel_mixer.to(device)
    tokens = s["batch"] * s["seq_len"] // world  # this rank's share of one step's tokens
    x = torch.randn(tokens, s["hidden"], generator=torch.Generator().manual_seed(rank)).to(device)
    with torch.no_grad():
        _, _, indices = layer.gate(x)
    owner = indices // (s["experts"] // world)  # the rank holding each pair's expert
    remote = int((owner != rank).sum())
    elem = 4 if dev == "cpu" else 2
    return {
        "pairs": indices.numel(),
        "remote_pairs": remote,
        "bytes_per_step": 4 * remote * s["hidden"] * elem,
    }


def _child(rank, world, port, fn, args, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dev = args[-1]
    backend = "nccl" if dev == "cuda" else "gloo"
    if dev == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        queue.put((rank, json.dumps(fn(rank, world, *args))))  # numbers only
    finally:
        dist.destroy_process_group()


def _spawn(fn, world: int, *args) -> list[dict]:
    """`fn(rank, world, *args)` on `world` processes; their results by rank."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    procs = [
        ctx.Process(target=_child, args=(r, world, port, fn, args, queue)) for r in range(world)
    ]
    for p in procs:
        p.start()
    results: dict[int, dict] = {}
    while len(results) < world:
        if queue.empty():
            if any(p.exitcode not in (None, 0) for p in procs):
                for p in procs:
                    p.kill()
                raise RuntimeError(f"{fn.__name__} failed on one of {world} ranks (see above)")
            time.sleep(0.05)
            continue
        rank, payload = queue.get()
        results[rank] = json.loads(payload)
    for p in procs:
        p.join()
    return [results[r] for r in range(world)]


def table(result: dict[str, Any]) -> str:
    s, dev = result["settings"], result["device"]
    lines = [
        f"Context parallelism, {dev['name']} ({result['dtype']}): striped hybrid `{s['pattern']}`, "
        f"d={s['hidden']}, T={s['seq_len']:,} in all, B={s['batch']}",
        "",
        "| ranks | tokens per rank | activations saved per rank MiB | vs 1 rank | "
        "peak allocated MiB | step s (median) | loss |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for world, row in result["context"].items():
        if isinstance(row, str):
            lines.append(f"| {world} | {row} | | | | | |")
            continue
        peak = "" if row["peak_bytes"] is None else f"{row['peak_bytes'] / 2**20:,.1f}"
        lines.append(
            f"| {world} | {s['seq_len'] // int(world):,} | {row['saved_bytes'] / 2**20:,.2f} "
            f"| {row['ratio_vs_1']:.3f} | {peak} | {row['step_s']:.3f} | {row['loss']:.6f} |"
        )
    lines += [
        "",
        f"Expert parallelism, one MoE layer (E={s['experts']}, k={s['top_k']}, d={s['hidden']}), "
        f"{s['batch'] * s['seq_len']:,} tokens over the ranks",
        "",
        "| ranks | pairs per rank | sent to other ranks | MiB sent per rank and step |",
        "|---:|---:|---:|---:|",
    ]
    for world, row in result["expert"].items():
        if isinstance(row, str):
            lines.append(f"| {world} | {row} | | |")
            continue
        share = row["remote_pairs"] / max(row["pairs"], 1)
        lines.append(
            f"| {world} | {row['pairs']:,} | {row['remote_pairs']:,} ({share:.0%}) "
            f"| {row['bytes_per_step'] / 2**20:,.2f} |"
        )
    return with_notes(lines, [], dev)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank (1)")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run, 1 and 2 ranks")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per world size")
    parser.add_argument("--out", type=Path, default=None, help="JSON path")
    parser.add_argument("--pattern", default=PATTERN, help=f"the hybrid's layers ({PATTERN!r})")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    settings = {**SETTINGS["quick" if args.quick else device.type], "pattern": args.pattern}
    repeats = args.repeats or (1 if args.quick else 3)
    result, out_path = new_result("parallel", device, args.threads, args.quick, args.out)
    result["dtype"] = "float32" if device.type == "cpu" else "bfloat16"
    result["settings"] = {k: v for k, v in settings.items() if k != "worlds"}
    result["context"], result["expert"] = {}, {}
    gpus = torch.cuda.device_count() if device.type == "cuda" else None
    if gpus is not None and gpus < 2:
        result["skipped"] = f"{gpus} GPU(s): context and expert parallelism need at least 2"
        print(result["skipped"])
        finish(result, out_path, lambda r: r["skipped"])
        return result
    for world in settings["worlds"]:
        if gpus is not None and world > gpus:
            result["context"][str(world)] = result["expert"][str(world)] = f"skipped: {gpus} GPUs"
            continue
        ranks = _spawn(_context_rank, world, settings, repeats, device.type)
        worst = max(ranks, key=lambda r: r["saved_bytes"])  # the rank memory is sized for
        result["context"][str(world)] = {
            **worst,
            "saved_bytes_by_rank": [r["saved_bytes"] for r in ranks],
            "step_s": max(r["step_s"] for r in ranks),
        }
        if world > 1:
            result["expert"][str(world)] = max(
                _spawn(_expert_rank, world, settings, device.type),
                key=lambda r: r["bytes_per_step"],
            )
    one = result["context"]["1"]["saved_bytes"]
    for row in result["context"].values():
        if isinstance(row, dict):
            row["ratio_vs_1"] = row["saved_bytes"] / one
            row["loss_diff_vs_1"] = abs(row["loss"] - result["context"]["1"]["loss"])
    finish(result, out_path, table)
    return result


if __name__ == "__main__":
    main()
