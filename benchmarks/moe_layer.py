"""One MoE layer, forward + backward: zoo's experts backends against transformers' Mixtral block.

Same weights everywhere: zoo's `MoE` layer (router `gate.weight` [E, d], `experts.gate_up_proj`
[E, 2f, d], `experts.down_proj` [E, d, f]) is loaded into transformers'
`MixtralSparseMoeBlock`, whose router is the same function, so every variant routes every token
to the same experts. Variants:

- zoo `torch` (reference: sort by expert, loop), zoo `torch_grouped_mm` (one grouped GEMM per
  projection), zoo `triton` (when zoo.kernels.grouped_gemm exists) and zoo `megablocks` (CUDA
  with megablocks installed);
- transformers `eager` (loop over experts with index_add), `grouped_mm` and `batched_mm` (skipped
  when it would gather more than --batched-mm-limit-gb of per-token expert weights: at the CPU
  shape that is S·2f·d·4 B = 16 GiB).

One timed step = forward of a (1, T, d) input, then backward of a fixed random output gradient
into the input and every parameter (grads set to None between steps). Variants are timed
round-robin, so background load hits them alike; the number is the median step.

    .venv/bin/python benchmarks/moe_layer.py                 # CPU shape, fp32
    .venv/bin/python benchmarks/moe_layer.py --quick         # smoke run, seconds
    .venv/bin/python benchmarks/moe_layer.py --device cuda   # GPU shape, bf16

CPU shape d=512, f=1024, E=8, k=2, 2048 tokens (fp32); GPU shape d=2048, f=1024, E=64, k=8,
16384 tokens (bf16). Writes JSON to benchmarks/results/{cpu,gpu}_moe_layer[_quick].json.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from common import finish, new_result, time_once, with_notes
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

from zoo.configuration import LlamaConfig
from zoo.layers.moe import MoE

SHAPES = {
    "cpu": {"hidden": 512, "ffn": 1024, "experts": 8, "top_k": 2, "tokens": 2048},
    "cuda": {"hidden": 2048, "ffn": 1024, "experts": 64, "top_k": 8, "tokens": 16384},
    "quick": {"hidden": 64, "ffn": 128, "experts": 8, "top_k": 2, "tokens": 256},
}


def _zoo_layer(shape: dict[str, int], backend: str) -> MoE:
    config = LlamaConfig(
        hidden_size=shape["hidden"],
        num_attention_heads=1,
        num_hidden_layers=1,
        channel_mixers=["moe"],
        num_experts=shape["experts"],
        num_experts_per_tok=shape["top_k"],
        moe_intermediate_size=shape["ffn"],
        moe_backend=backend,
    )
    return MoE(config)


def _hf_block(shape: dict[str, int]) -> MixtralSparseMoeBlock:
    config = MixtralConfig(
        hidden_size=shape["hidden"],
        intermediate_size=shape["ffn"],
        num_local_experts=shape["experts"],
        num_experts_per_tok=shape["top_k"],
    )
    config._experts_implementation = "eager"
    return MixtralSparseMoeBlock(config)


def _zoo_backends(device: torch.device) -> list[str]:
    names = ["torch", "torch_grouped_mm"]
    if importlib.util.find_spec("zoo.kernels.grouped_gemm") is not None:
        names.append("triton")
    if device.type == "cuda" and importlib.util.find_spec("megablocks") is not None:
        names.append("megablocks")
    return names


def build_variants(
    shape: dict[str, int], device: torch.device, dtype: torch.dtype, batched_mm_limit_gb: float
) -> tuple[
    dict[str, Callable[[torch.Tensor], torch.Tensor]], dict[str, str], list[torch.nn.Module]
]:
    """name -> forward function, skipped name -> reason, and the modules (to clear grads)."""
    torch.manual_seed(0)
    reference = _zoo_layer(shape, "torch")
    for param in reference.parameters():
        torch.nn.init.normal_(param, std=0.02)
    reference.to(device=device, dtype=dtype)
    variants: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    modules: list[torch.nn.Module] = []
    for backend in _zoo_backends(device):
        layer = _zoo_layer(shape, backend).to(device=device, dtype=dtype)
        layer.load_state_dict(reference.state_dict())
        variants[f"zoo {backend}"] = lambda x, m=layer: m(x)[0]
        modules.append(layer)
    hf = _hf_block(shape).to(device=device, dtype=dtype)
    hf.load_state_dict(reference.state_dict())
    modules.append(hf)
    skipped: dict[str, str] = {}
    pairs = shape["tokens"] * shape["top_k"]
    gathered_gb = pairs * 2 * shape["ffn"] * shape["hidden"] * dtype.itemsize / 2**30
    for impl in ("eager", "grouped_mm", "batched_mm"):
        if impl == "batched_mm" and gathered_gb > batched_mm_limit_gb:
            skipped[f"transformers {impl}"] = (
                f"gathers one weight matrix per (token, expert) pair: {gathered_gb:.1f} GiB "
                f"> --batched-mm-limit-gb {batched_mm_limit_gb}"
            )
            continue

        def run(x: torch.Tensor, impl: str = impl) -> torch.Tensor:
            hf.experts.config._experts_implementation = impl
            return hf(x)

        variants[f"transformers {impl}"] = run
    return variants, skipped, modules


def bench(
    shape: dict[str, int],
    device: torch.device,
    dtype: torch.dtype,
    warmup: int,
    repeats: int,
    batched_mm_limit_gb: float,
) -> dict[str, Any]:
    variants, skipped, modules = build_variants(shape, device, dtype, batched_mm_limit_gb)
    generator = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(1, shape["tokens"], shape["hidden"], generator=generator)
    grad = torch.randn(1, shape["tokens"], shape["hidden"], generator=generator)
    x, grad = x.to(device=device, dtype=dtype), grad.to(device=device, dtype=dtype)

    def step(fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        for module in modules:
            module.zero_grad(set_to_none=True)
        inp = x.detach().requires_grad_()
        out = fn(inp)
        out.backward(grad)
        return out

    with torch.no_grad():
        outputs = {name: fn(x).float() for name, fn in variants.items()}
    reference = outputs["transformers eager"]
    scale = reference.abs().max().item()
    diffs = {name: (out - reference).abs().max().item() / scale for name, out in outputs.items()}
    for fn in variants.values():
        for _ in range(warmup):
            step(fn)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            times[name].append(time_once(lambda f=fn: step(f), device))
    ms = {name: 1e3 * statistics.median(ts) for name, ts in times.items()}
    tokens = shape["tokens"]
    rows = {
        name: {
            "ms_fwd_bwd": ms[name],
            "tokens_per_s": tokens / (ms[name] / 1e3),
            "max_rel_diff_vs_transformers_eager": diffs[name],
        }
        for name in variants
    }
    ours = {name: t for name, t in ms.items() if name.startswith("zoo")}
    theirs = {name: t for name, t in ms.items() if name.startswith("transformers")}
    best_ours, fastest_theirs = min(ours, key=ours.get), min(theirs, key=theirs.get)
    speedup = theirs[fastest_theirs] / ours[best_ours]
    return {
        "rows": rows,
        "skipped": skipped,
        "best_zoo": best_ours,
        "fastest_transformers": fastest_theirs,
        "speedup_best_zoo_over_fastest_transformers": speedup,
    }


def table(result: dict[str, Any]) -> str:
    shape, dev = result["shape"], result["device"]
    lines = [
        f"MoE layer forward+backward, {dev['name']} ({dev['type']}, {result['dtype']}), "
        f"d={shape['hidden']}, f={shape['ffn']}, E={shape['experts']}, k={shape['top_k']}, "
        f"{shape['tokens']} tokens",
        "",
        "| implementation | ms (fwd+bwd) | tokens/s | max rel. diff vs transformers eager |",
        "|---|---:|---:|---:|",
    ]
    for name, row in result["bench"]["rows"].items():
        lines.append(
            f"| {name} | {row['ms_fwd_bwd']:.1f} | {row['tokens_per_s']:,.0f} | "
            f"{row['max_rel_diff_vs_transformers_eager']:.1e} |"
        )
    for name, reason in result["bench"]["skipped"].items():
        lines.append(f"| {name} | skipped: {reason} | | |")
    b = result["bench"]
    lines += [
        "",
        f"Best zoo ({b['best_zoo']}) vs fastest transformers ({b['fastest_transformers']}): "
        f"{b['speedup_best_zoo_over_fastest_transformers']:.2f}x",
    ]
    return with_notes(lines, [], dev)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (2)")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per variant")
    parser.add_argument("--batched-mm-limit-gb", type=float, default=4.0)
    parser.add_argument("--out", type=Path, default=None, help="JSON path")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    torch.set_num_threads(args.threads)
    shape = SHAPES["quick" if args.quick else device.type]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    repeats = args.repeats or (3 if args.quick else 10)

    start = time.perf_counter()
    result, out_path = new_result("moe_layer", device, args.threads, args.quick, args.out)
    result.update(
        {
            "shape": shape,
            "dtype": str(dtype).removeprefix("torch."),
            "notes": "median fwd+bwd step, variants timed round-robin; same weights and routing",
        }
    )
    result["bench"] = bench(shape, device, dtype, 2, repeats, args.batched_mm_limit_gb)
    speedup = result["bench"]["speedup_best_zoo_over_fastest_transformers"]
    result["goals"] = {
        "best_zoo_vs_fastest_transformers >= 1.0": {"value": speedup, "met": speedup >= 1.0}
    }
    result["wall_s"] = time.perf_counter() - start
    finish(result, out_path, table)
    return result


if __name__ == "__main__":
    main()
