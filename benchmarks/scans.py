"""Linear-mixer ops (TNL, cosFormer2, HGRN2, Mamba2, Gated DeltaNet) against SDPA causal
attention and fla: ms, TFLOP/s.

Per shape (B, T, H, D) and implementation: one forward (under no_grad) and one forward + backward
(o.backward(do) into q, k, v and the gate where it is an input), in milliseconds, the median of
--repeats calls after a warm-up call. The first call of each is recorded apart (`first_call_s`):
it holds Triton compilation and autotuning, which the steady-state numbers never include.

Ops, in fla's layout (q, k (B, T, H, K); v (B, T, H, V)), scale 1, chunk size C = 64:
- TNL: `zoo.kernels.lightning.lightning`, log_decay = tnl_log_decay(H, 0, 2), K = V = D; fla's
  `fla.ops.lightning_attn.chunk_lightning_attn` (layer 0 of 2: its own per-head decay, the TNL
  paper's form), else `fla.ops.simple_gla.chunk_simple_gla` with g = our log decay per token.
- cosFormer2: the same op with log_decay = None (no decay) and K = 2·D (LRPE doubles the key
  dim), V = D; fla's `fla.ops.linear_attn.chunk_linear_attn(normalize=False)`.
- HGRN2: its op `zoo.kernels.gla.gla`, log_f = logsigmoid(randn) (B, T, H, D), K = V = D;
  fla's `fla.ops.gla.chunk_gla(g=log_f)`.
- Mamba2: its SSD op `zoo.kernels.ssd.ssd`, x (B, T, H, P = D), dt = softplus(randn − 2),
  A (H,) from −0.5 to −4, B and C one group of N = D (K = D); fla's
  `fla.ops.simple_gla.chunk_simple_gla` with q = C, k = dt·B, g = dt·A per head (the same math).
- Gated DeltaNet: `zoo.kernels.gated_delta.gated_delta`, k L2-normalised, g = logsigmoid(randn),
  β = sigmoid(randn) per head and token, K = V = D, scale K^−½; fla's
  `fla.ops.gated_delta_rule.chunk_gated_delta_rule` (its FLOPs are counted like the others':
  the delta rule's triangular solve comes on top).
- softmax attention: `torch.nn.functional.scaled_dot_product_attention(is_causal=True)` on
  (B, H, T, D), with whatever backend torch picks (flash attention for bf16 on a recent GPU).
Ours run with backend="torch" and, on CUDA, backend="triton". A variant that raises (a kernel
that fails to compile, fla missing) is recorded with its error, and the run goes on. fla's
version, or "not installed", is in the JSON (`fla`).

FLOP convention (matmul work only; gates, decay tables and masks are not counted):
- attention forward: 4·B·H·T²·D / 2 = 2·B·H·T²·D (QKᵀ and PV, halved by the causal mask);
- linear ops forward, the chunked form's dense products: 2·B·H·T·(C·K + C·V + 2·K·V), i.e. per
  chunk QKᵀ (C·C·K), the masked scores times V (C·C·V), Q times the carried state (C·K·V) and
  the state update (C·K·V); the mask is not credited, since the chunked form computes the
  whole C×C block;
- backward = 2 × forward, so forward + backward = 3 × forward, for every op.
TFLOP/s = count / measured time: an achieved rate under one shared convention, comparable across
the implementations of an op, not a count of what each kernel executes (the torch form computes
in fp32 whatever the input dtype).

GPU: (8, 2048, 16, 128), (2, 8192, 16, 128), (1, 32768, 16, 128) in bf16. CPU (the default):
(2, 256, 4, 32) and (1, 1024, 4, 32) in fp32, the torch form and SDPA only (Triton runs on a CPU
only in its interpreter, and fla's ops are Triton), which keeps the script itself tested.

    .venv/bin/python benchmarks/scans.py                 # CPU, fp32, well under a minute
    .venv/bin/python benchmarks/scans.py --quick         # one tiny shape, seconds
    .venv/bin/python benchmarks/scans.py --device cuda   # the three shapes, bf16
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from common import (
    bench_parser,
    checkpoint,
    finish,
    fla_op,
    fla_version,
    fwd_bwd_table,
    measure_fwd_bwd,
    new_result,
    warm_up,
    with_notes,
)

from zoo.kernels.gated_delta import gated_delta
from zoo.kernels.gla import gla as zoo_gla
from zoo.kernels.lightning import lightning, tnl_log_decay
from zoo.kernels.ssd import ssd

SHAPES = {
    "cuda": [(8, 2048, 16, 128), (2, 8192, 16, 128), (1, 32768, 16, 128)],
    "cpu": [(2, 256, 4, 32), (1, 1024, 4, 32)],
}
QUICK_SHAPES = {"cuda": [(1, 2048, 16, 128)], "cpu": [(1, 128, 2, 16)]}
CHUNK = 64
OPS = {
    "attention": "softmax attention", "tnl": "TNL", "cosformer2": "cosFormer2", "hgrn2": "HGRN2",
    "mamba2": "Mamba2 (SSD)", "gdn": "Gated DeltaNet",
}  # fmt: skip

Inputs = dict[str, torch.Tensor | None]
Op = Callable[[Inputs], torch.Tensor]


def make_inputs(
    op: str, shape: tuple[int, int, int, int], device: torch.device, dtype: torch.dtype
) -> tuple[Inputs, torch.Tensor]:
    """Fresh random inputs of one op (leaves that need grad) and the output gradient do."""
    B, T, H, D = shape
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=gen, device=device, dtype=dtype)

    if op == "attention":
        x = {name: randn(B, H, T, D).requires_grad_() for name in "qkv"}  # (B, H, T, D)
        return x, randn(B, H, T, D)
    K = 2 * D if op == "cosformer2" else D
    x = {
        "q": randn(B, T, H, K).requires_grad_(),  # (B, T, H, K)
        "k": randn(B, T, H, K).requires_grad_(),
        "v": randn(B, T, H, D).requires_grad_(),  # (B, T, H, V)
    }
    if op == "mamba2":  # x = v (B, T, H, P = D), dt (B, T, H), A (H,), B and C one group (N = D)
        x = {
            "x": x["v"],
            "dt": F.softplus(randn(B, T, H) - 2).requires_grad_(),
            "A": -torch.linspace(0.5, 4.0, H, device=device),
            "B": randn(B, T, 1, D).requires_grad_(),
            "C": randn(B, T, 1, D).requires_grad_(),
        }
        return x, randn(B, T, H, D)
    if op == "gdn":  # k normalised, as the layer gives it; g and beta per head and token
        x["k"] = F.normalize(x["k"].detach().float(), dim=-1).to(dtype).requires_grad_()
        x["g"] = F.logsigmoid(randn(B, T, H)).requires_grad_()
        x["beta"] = torch.sigmoid(randn(B, T, H)).requires_grad_()
        return x, randn(B, T, H, D)
    if op == "tnl":
        x["log_decay"] = tnl_log_decay(H, 0, 2).to(device)  # (H,)
    elif op == "cosformer2":
        x["log_decay"] = None  # no decay: the kernels skip the decay arithmetic
    else:
        x["log_f"] = F.logsigmoid(randn(B, T, H, D)).requires_grad_()  # (B, T, H, K), < 0
    return x, randn(B, T, H, D)


def _zoo(op: str, backend: str) -> tuple[str, Op]:
    if op == "mamba2":
        return f"zoo.kernels.ssd.ssd(backend={backend!r})", lambda x: ssd(
            x["x"], x["dt"], x["A"], x["B"], x["C"], chunk_size=CHUNK, backend=backend
        )[0]
    if op == "gdn":
        return f"zoo.kernels.gated_delta.gated_delta(backend={backend!r})", lambda x: gated_delta(
            x["q"], x["k"], x["v"], x["g"], x["beta"], chunk_size=CHUNK, backend=backend
        )[0]
    if op == "hgrn2":
        return f"zoo.kernels.gla.gla(backend={backend!r})", lambda x: zoo_gla(
            x["q"], x["k"], x["v"], x["log_f"], chunk_size=CHUNK, backend=backend
        )[0]
    return f"zoo.kernels.lightning.lightning(backend={backend!r})", lambda x: lightning(
        x["q"], x["k"], x["v"], x["log_decay"], chunk_size=CHUNK, backend=backend
    )[0]


def _fla(op: str) -> tuple[str, Op] | str:
    """(name, op) of fla's chunked kernel for one of our ops, or why there is none."""
    if op == "mamba2":  # SSD is simple GLA: q = C, k = dt·B, v = x, g = dt·A per head
        simple_gla = fla_op("simple_gla", "chunk_simple_gla")
        if not callable(simple_gla):
            return simple_gla

        def ssd_simple_gla(x: Inputs) -> torch.Tensor:
            H = x["x"].shape[2]
            q = x["C"].expand(-1, -1, H, -1)
            k = x["B"].expand(-1, -1, H, -1) * x["dt"].unsqueeze(-1).to(x["B"].dtype)
            g = (x["dt"].float() * x["A"]).to(x["x"].dtype)
            return simple_gla(q, k, x["x"], g=g, scale=1.0)[0]

        return "fla.ops.simple_gla.chunk_simple_gla (SSD as simple GLA)", ssd_simple_gla
    if op == "gdn":
        rule = fla_op("gated_delta_rule", "chunk_gated_delta_rule")
        if not callable(rule):
            return rule

        def gdn(x: Inputs) -> torch.Tensor:
            return rule(x["q"], x["k"], x["v"], g=x["g"], beta=x["beta"])[0]

        return "fla.ops.gated_delta_rule.chunk_gated_delta_rule", gdn
    if op == "tnl":
        lightning_attn = fla_op("lightning_attn", "chunk_lightning_attn")
        if callable(lightning_attn):

            def tnl(x: Inputs) -> torch.Tensor:
                return lightning_attn(x["q"], x["k"], x["v"], layer_idx=0, num_layers=2, scale=1.0)[
                    0
                ]

            return "fla.ops.lightning_attn.chunk_lightning_attn", tnl
        simple_gla = fla_op("simple_gla", "chunk_simple_gla")
        if not callable(simple_gla):
            return f"{lightning_attn}; {simple_gla}"

        def tnl_simple_gla(x: Inputs) -> torch.Tensor:
            B, T, H, _ = x["q"].shape
            g = x["log_decay"].view(1, 1, H).expand(B, T, H).contiguous()  # (B, T, H)
            return simple_gla(x["q"], x["k"], x["v"], g=g, scale=1.0)[0]

        return "fla.ops.simple_gla.chunk_simple_gla", tnl_simple_gla
    if op == "cosformer2":
        linear_attn = fla_op("linear_attn", "chunk_linear_attn")
        if not callable(linear_attn):
            return linear_attn

        def cosformer2(x: Inputs) -> torch.Tensor:
            return linear_attn(x["q"], x["k"], x["v"], scale=1.0, normalize=False)[0]

        return "fla.ops.linear_attn.chunk_linear_attn(normalize=False)", cosformer2
    gla = fla_op("gla", "chunk_gla")
    if not callable(gla):
        return gla

    def hgrn2_gla(x: Inputs) -> torch.Tensor:
        return gla(x["q"], x["k"], x["v"], g=x["log_f"], scale=1.0)[0]

    return "fla.ops.gla.chunk_gla", hgrn2_gla


def implementations(op: str, device: torch.device) -> dict[str, tuple[str, Op] | str]:
    """Every implementation of `op` on this device: (call, op), or a reason it is skipped."""
    if op == "attention":
        sdpa = lambda x: F.scaled_dot_product_attention(x["q"], x["k"], x["v"], is_causal=True)
        return {"sdpa": ("torch.nn.functional.scaled_dot_product_attention(is_causal=True)", sdpa)}
    out: dict[str, tuple[str, Op] | str] = {"zoo torch": _zoo(op, "torch")}
    if device.type == "cuda":
        out["zoo triton"] = _zoo(op, "triton")
        out["fla"] = _fla(op)
    return out


def flops_forward(op: str, shape: tuple[int, int, int, int]) -> int:
    """Forward FLOPs by the convention of the module docstring."""
    B, T, H, D = shape
    if op == "attention":
        return 4 * B * H * T * T * D // 2
    K, V = (2 * D if op == "cosformer2" else D), D
    return 2 * B * H * T * (CHUNK * K + CHUNK * V + 2 * K * V)


def bench(
    shapes: list[tuple[int, int, int, int]],
    device: torch.device,
    dtype: torch.dtype,
    repeats: int,
    time_limit_s: float | None = None,
    on_row: Callable[[list[dict[str, Any]]], None] = lambda rows: None,
) -> list[dict[str, Any]]:
    """One row per shape, op and implementation; `on_row` sees the rows after each one lands."""
    rows: list[dict[str, Any]] = []

    def keep(row: dict[str, Any]) -> None:
        rows.append(row)
        on_row(rows)

    for shape in shapes:
        B, T, H, D = shape
        for op in OPS:
            x, grad = make_inputs(op, shape, device, dtype)
            flops = flops_forward(op, shape)
            for impl, entry in implementations(op, device).items():
                row: dict[str, Any] = {"B": B, "T": T, "H": H, "D": D, "op": op, "impl": impl}
                if isinstance(entry, str):
                    keep({**row, "skipped": entry})
                    continue
                call, fn = entry
                K = x["q"].shape[-1] if "q" in x else x["B"].shape[-1]
                row.update(call=call, K=K, V=D, flops_fwd=flops)
                label = f"{shape} {op} {impl}"
                row.update(measure_fwd_bwd(fn, x, grad, device, repeats, time_limit_s, label))
                for mode, factor in (("fwd", 1), ("fwd_bwd", 3)):
                    if "ms" in row[mode]:
                        row[mode]["tflops"] = factor * flops / (row[mode]["ms"] * 1e-3) / 1e12
                keep(row)
            del x, grad
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def table(result: dict[str, Any]) -> str:
    lines, notes = fwd_bwd_table(result["rows"], "BTHD", OPS, ("tflops", "TFLOP/s", ".3f"))
    lines = [
        f"Linear-mixer ops, {result['device']['name']} ({result['dtype']}), fla: {result['fla']}",
        "",
        *lines,
    ]
    return with_notes(lines, notes, result["device"])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = bench_parser(
        __doc__, repeats=10, quick_help="one small shape (a smoke run)", time_limit_s=120.0
    )
    parser.add_argument(
        "--shapes",
        default=None,
        help="comma-separated indices of the shapes to run (default: all); fla's first calls "
        "autotune for up to ~2 min each on a GPU, so one 10-minute command covers about one shape. "
        "The JSON is then gpu_scans_shapes-<indices>.json unless --out says otherwise",
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    start = time.perf_counter()
    shapes = (QUICK_SHAPES if args.quick else SHAPES)[device.type]
    suffix = ""
    if args.shapes:
        try:
            picked = [int(i) for i in args.shapes.split(",")]
            shapes = [shapes[i] for i in picked]
        except (ValueError, IndexError):
            parser.error(f"--shapes {args.shapes!r}: indices 0..{len(shapes) - 1}, comma-separated")
        suffix = "_shapes-" + "-".join(map(str, picked))
    result, out_path = new_result("scans", device, args.threads, args.quick, args.out, suffix)
    result["dtype"] = str(dtype).removeprefix("torch.")
    result["fla"] = fla_version()
    result["chunk_size"] = CHUNK
    result["repeats"] = args.repeats
    result["flop_convention"] = {
        "attention_fwd": "4*B*H*T^2*D/2 (causal)",
        "linear_fwd": "2*B*H*T*(C*K + C*V + 2*K*V), C = chunk_size",
        "fwd_bwd": "3 * fwd (backward = 2 * forward)",
    }
    warm_up(device)
    result["time_limit_s"] = args.time_limit or None
    result["rows"] = bench(
        shapes,
        device,
        dtype,
        args.repeats,
        result["time_limit_s"],
        on_row=lambda rows: checkpoint({**result, "rows": rows}, out_path),
    )
    result["wall_s"] = time.perf_counter() - start
    finish(result, out_path, table)
    return result


if __name__ == "__main__":
    main()
