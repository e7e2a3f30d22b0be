"""Grouped GEMM for MoE experts: zoo's Triton kernel against torch._grouped_mm and a loop of mm.

x [M, K] sorted by expert, W [E, N, K] (transformers' layout, trans_b), balanced or skewed
routing (skewed: group sizes ∝ a Zipf law, one expert takes ~40%). Forward and forward+backward
TFLOP/s (2·M·K·N per GEMM, 3× for forward+backward), all in one run on one device.

GPU shapes: OLMoE-like M=131072 E=64 K=2048 N=1024; Mixtral-like M=32768 E=8
K=4096 N=7168; small M=16384 E=8 K=1024 N=2816; bf16. On a CPU the Triton kernel only runs in
the interpreter (a correctness tool, not a speed one), so the CPU run times the torch paths on
small shapes, which keeps the script itself tested.

    .venv/bin/python benchmarks/grouped_gemm.py                 # CPU, small shapes, fp32
    .venv/bin/python benchmarks/grouped_gemm.py --device cuda   # the three shapes, bf16
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from common import finish, new_result, time_once, with_notes

from zoo.kernels.grouped_gemm import grouped_gemm, grouped_gemm_torch

SHAPES = {
    "cuda": {
        "olmoe": (131072, 64, 2048, 1024),
        "mixtral": (32768, 8, 4096, 7168),
        "small": (16384, 8, 1024, 2816),
    },
    "cpu": {"small-cpu": (4096, 8, 512, 1024), "many-experts-cpu": (4096, 32, 256, 512)},
}


def group_sizes(m: int, experts: int, skewed: bool, generator: torch.Generator) -> torch.Tensor:
    if not skewed:
        sizes = torch.full((experts,), m // experts)
    else:
        weights = 1.0 / torch.arange(1, experts + 1, dtype=torch.float64) ** 1.2
        sizes = (weights / weights.sum() * m).floor().long()
        sizes = sizes[torch.randperm(experts, generator=generator)]
    sizes[0] += m - int(sizes.sum())
    return sizes


def variants(device: torch.device) -> dict[str, Any]:
    out: dict[str, Any] = {
        "loop of torch.mm": lambda x, w, o: grouped_gemm_torch(x, w, o, trans_b=True),
    }
    grouped_mm = getattr(torch.nn.functional, "grouped_mm", None) or getattr(
        torch, "_grouped_mm", None
    )
    if grouped_mm is not None:
        out["torch._grouped_mm"] = lambda x, w, o: grouped_mm(x, w.transpose(-2, -1), offs=o)
    if device.type == "cuda":
        out["zoo triton"] = lambda x, w, o: grouped_gemm(x, w, o, trans_b=True, backend="triton")
    return out


def _steps(fn, x, w, offsets, grad):
    """(forward, forward + backward) closures over one variant and one set of inputs."""

    def fwd():
        with torch.no_grad():
            fn(x, w, offsets)

    def fwd_bwd():
        x.grad = w.grad = None
        fn(x, w, offsets).backward(grad)

    return fwd, fwd_bwd


def bench(device: torch.device, dtype: torch.dtype, repeats: int) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(0)
    rows: dict[str, Any] = {}
    for name, (m, experts, k, n) in SHAPES[device.type].items():
        for skewed in (False, True):
            sizes = group_sizes(m, experts, skewed, generator)
            offsets = sizes.cumsum(0).to(device=device, dtype=torch.int32)
            x = torch.randn(m, k, device=device, dtype=dtype, requires_grad=True)
            w = torch.randn(experts, n, k, device=device, dtype=dtype, requires_grad=True)
            grad = torch.randn(m, n, device=device, dtype=dtype)
            flops = 2 * m * k * n
            key = f"{name} ({'skewed' if skewed else 'balanced'})"
            rows[key] = {
                "shape": {"M": m, "E": experts, "K": k, "N": n},
                "max_group": int(sizes.max()),
            }
            for label, fn in variants(device).items():
                fwd, fwd_bwd = _steps(fn, x, w, offsets, grad)
                fwd(), fwd_bwd()  # warm-up (and Triton compilation)
                t_f = statistics.median(time_once(fwd, device) for _ in range(repeats))
                t_fb = statistics.median(time_once(fwd_bwd, device) for _ in range(repeats))
                rows[key][label] = {
                    "fwd_tflops": flops / t_f / 1e12,
                    "fwd_bwd_tflops": 3 * flops / t_fb / 1e12,
                }
    return rows


def table(result: dict[str, Any]) -> str:
    labels = [k for k in next(iter(result["rows"].values())) if k not in ("shape", "max_group")]
    lines = [
        f"Grouped GEMM, {result['device']['name']} ({result['dtype']}), TFLOP/s fwd / fwd+bwd",
        "",
        "| shape | " + " | ".join(labels) + " |",
        "|---|" + "---:|" * len(labels),
    ]
    for key, row in result["rows"].items():
        cells = [f"{row[v]['fwd_tflops']:.3f} / {row[v]['fwd_bwd_tflops']:.3f}" for v in labels]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return with_notes(lines, [], result["device"])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    start = time.perf_counter()
    result, out_path = new_result("grouped_gemm", device, args.threads, False)
    result["dtype"] = str(dtype).removeprefix("torch.")
    result["rows"] = bench(device, dtype, args.repeats)
    result["wall_s"] = time.perf_counter() - start
    finish(result, out_path, table)
    return result


if __name__ == "__main__":
    main()
