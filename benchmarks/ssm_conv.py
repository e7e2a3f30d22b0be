"""Mamba's selective scan, Hyena's long convolution and the short causal conv: ms and GB/s.

Per shape (B, T, D) and implementation: one forward (under no_grad) and one forward + backward
(y.backward(dy) into every input), in milliseconds, the median of --repeats calls after a warm-up
call. The first call of each is recorded apart (`first_call_s`): it holds Triton compilation and
autotuning (and cuFFT plan creation), which the steady-state numbers never include.

Ops, channels last like the zoo layers (D_in = D):
- selective scan: `zoo.kernels.selective_scan.selective_scan(u, delta, A, B, C, D, chunk_size=64)`,
  u (B, T, D), delta = softplus(randn) ≥ 0 (B, T, D), A = −exp(randn) ≤ 0 (D, N), B, C (B, T, N),
  D (D,), N = 16; A and D in fp32 (Mamba keeps them so, and mamba_ssm's kernel requires it), the
  rest in the run's dtype. Against `mamba_ssm.ops.selective_scan_interface.selective_scan_fn(
  delta_softplus=False)` on its own layout (u, delta (B, D, T); B, C (B, N, T); dy (B, D, T)),
  transposed and made contiguous outside the timed region. fla has no Mamba-1 op of its own (its
  Mamba layer calls mamba_ssm's selective_scan_fn): the JSON records that, or fla's absence.
- long convolution: `zoo.kernels.long_conv.long_conv(u, k)`, u (B, T, D), filters k (D, T) (scaled
  by T^−½), no skip bias, against `zoo.kernels.long_conv.long_conv_fft`, the plain torch FFT conv
  (rfft, product, irfft, in fp32), the bar to beat. backend="torch" dispatches: the FFT
  under autograd, the direct conv for a forward of T ≤ 128 without it. On CUDA also at T = 64,
  128, 256, 1024 and 4096 (B = 8, D = 2048), so the Triton-vs-FFT crossover can be read off by
  length.
- short conv: `zoo.kernels.long_conv.short_conv(u, weight, bias)`, K = 4 taps, weight (D, K),
  bias (D,), against `causal_conv1d.causal_conv1d_fn(x, weight, bias)` on its (B, D, T) layout
  (made contiguous outside the timed region; no activation, since ours has none).
Ours run with backend="torch" and, on CUDA, backend="triton". A variant that raises (a kernel
failing to compile, a missing baseline) or runs past --time-limit is recorded with its error and
the run goes on. The baselines' versions, "not installed" or the import error are in the JSON
(`baselines`); mamba-ssm and causal-conv1d are CUDA extensions (benchmarks/README.md).

Goals (CUDA, bf16): the selective scan's forward + backward ≤ 1.0× the time of
mamba_ssm's CUDA kernel, and the long convolution ≤ the torch FFT conv's time at every length.
The table ends with each ratio ours / reference (`goals` in the JSON; ≤ 1.00 meets the goal).

Byte convention (no FLOP rate: the forms do different work for one result — the FFT conv
O(T log T) per channel, the direct conv O(T²), the scan O(T·N) — so one FLOP count would favour
one form; the traffic an ideal fused kernel cannot avoid is the same for all): with I the bytes
of the inputs and O those of the output, at the tensors' own dtypes,
- forward: I + O (every input read once, y written once);
- backward: 2·I + O (the inputs and dy read, one gradient per input written);
- forward + backward: 3·I + 2·O.
GB/s = bytes / time: an achieved rate under one shared convention, comparable across the
implementations of an op, not a count of what each kernel moves (the torch forms compute in fp32
and materialise per-token states or spectra).

GPU: (8, 2048, 2048) and (1, 32768, 2048) in bf16, plus the long conv alone at (8, T, 2048),
T ∈ {64, 128, 256, 1024, 4096}. CPU (the default): (2, 256, 64), (1, 1024, 64) and (1, 1024, 768)
(the D_in of benchmarks/cpu_models.py's Mamba, whose forward the scan dominates) in fp32, plus
the long conv at (2, 64, 64) and (2, 1024, 64), the torch forms only (Triton runs on a CPU only in
its interpreter, and the baselines are CUDA kernels), which keeps the script itself tested.

    .venv/bin/python benchmarks/ssm_conv.py                 # CPU, fp32, well under a minute
    .venv/bin/python benchmarks/ssm_conv.py --quick         # tiny shapes, seconds
    .venv/bin/python benchmarks/ssm_conv.py --device cuda   # the shapes above, bf16
"""

from __future__ import annotations

import gc
import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from common import (
    bench_parser,
    checkpoint,
    error_text,
    finish,
    fla_version,
    fwd_bwd_table,
    measure_fwd_bwd,
    new_result,
    warm_up,
    with_notes,
)

from zoo.kernels.long_conv import long_conv, long_conv_fft, short_conv
from zoo.kernels.selective_scan import selective_scan

Shape = tuple[int, int, int]
SHAPES: dict[str, list[Shape]] = {
    "cuda": [(8, 2048, 2048), (1, 32768, 2048)],
    "cpu": [(2, 256, 64), (1, 1024, 64), (1, 1024, 768)],
}
QUICK_SHAPES: dict[str, list[Shape]] = {"cuda": [(1, 2048, 2048)], "cpu": [(1, 128, 16)]}
# The long conv alone at more lengths: where the Triton kernel and the FFT cross over.
LONG_CONV_SHAPES: dict[str, list[Shape]] = {
    "cuda": [(8, 64, 2048), (8, 128, 2048), (8, 256, 2048), (8, 1024, 2048), (8, 4096, 2048)],
    "cpu": [(2, 64, 64), (2, 1024, 64)],
}
QUICK_LONG_CONV_SHAPES: dict[str, list[Shape]] = {"cuda": [], "cpu": [(1, 64, 16)]}
N_STATE = 16
CHUNK = 64
SHORT_K = 4
OPS = {"selective_scan": "selective scan", "long_conv": "long conv", "short_conv": "short conv"}
# (op, reference impl, modes, the goal in words): ratios of every zoo impl to the reference.
GOALS = (
    ("selective_scan", "mamba_ssm", ("fwd_bwd",), "selective scan fwd+bwd ≤ 1.0× mamba_ssm"),
    ("long_conv", "torch fft", ("fwd", "fwd_bwd"), "long conv ≤ torch FFT conv at every length"),
)

Inputs = dict[str, torch.Tensor]
Op = Callable[[Inputs], torch.Tensor]


@dataclass
class Variant:
    call: str  # what runs, as the JSON records it
    fn: Op
    # The inputs and dy on the variant's own layout, made before (outside) the timed calls.
    relayout: Callable[[Inputs, torch.Tensor], tuple[Inputs, torch.Tensor]] | None = None


def make_inputs(
    op: str, shape: Shape, device: torch.device, dtype: torch.dtype
) -> tuple[Inputs, torch.Tensor]:
    """Fresh random inputs of one op (leaves that need grad) and the output gradient dy."""
    B, T, D = shape
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*size: int, dtype: torch.dtype = dtype) -> torch.Tensor:
        return torch.randn(*size, generator=gen, device=device, dtype=dtype)

    if op == "selective_scan":
        x = {
            "u": randn(B, T, D),  # (B, T, D_in)
            "delta": F.softplus(randn(B, T, D)),  # (B, T, D_in), ≥ 0
            "A": -torch.exp(randn(D, N_STATE, dtype=torch.float32)),  # (D_in, N), ≤ 0
            "B": randn(B, T, N_STATE),  # (B, T, N)
            "C": randn(B, T, N_STATE),  # (B, T, N)
            "D": randn(D, dtype=torch.float32),  # (D_in,)
        }
    elif op == "long_conv":
        x = {"u": randn(B, T, D), "k": randn(D, T) * T**-0.5}  # (B, T, D), (D, T)
    else:
        x = {"u": randn(B, T, D), "weight": randn(D, SHORT_K), "bias": randn(D)}  # (D, K), (D,)
    return {name: t.requires_grad_() for name, t in x.items()}, randn(B, T, D)


def channels_first(*names: str) -> Callable[[Inputs, torch.Tensor], tuple[Inputs, torch.Tensor]]:
    """A relayout: the named (B, T, X) inputs and dy as contiguous (B, X, T) leaves."""

    def relayout(x: Inputs, dy: torch.Tensor) -> tuple[Inputs, torch.Tensor]:
        moved = {
            name: t.detach().transpose(1, 2).contiguous().requires_grad_() if name in names else t
            for name, t in x.items()
        }
        return moved, dy.transpose(1, 2).contiguous()

    return relayout


def package_version(package: str) -> str:
    """A baseline's version, "not installed", or why importing it failed (a CUDA extension
    built against another torch fails with an ImportError that is not a missing module)."""
    try:
        module = importlib.import_module(package)
    except ModuleNotFoundError as exc:
        if exc.name == package:
            return "not installed"
        return f"import failed: {error_text(exc)}"
    except Exception as exc:  # a broken install is a result too
        return f"import failed: {error_text(exc)}"
    return str(getattr(module, "__version__", "unknown version"))


def baseline_op(module: str, name: str) -> Callable[..., Any] | str:
    """<module>.<name> of an optional baseline, or a string saying why it cannot be used."""
    package = module.split(".")[0]
    version = package_version(package)
    if version == "not installed" or version.startswith("import failed"):
        return f"{package} {version}"
    try:
        return getattr(importlib.import_module(module), name)
    except Exception as exc:
        return f"{package} {version} has no {module}.{name} ({error_text(exc, 200)})"


def _zoo(op: str, backend: str) -> Variant:
    if op == "selective_scan":
        return Variant(
            f"zoo.kernels.selective_scan.selective_scan(backend={backend!r})",
            lambda x: selective_scan(
                x["u"],
                x["delta"],
                x["A"],
                x["B"],
                x["C"],
                x["D"],
                chunk_size=CHUNK,
                backend=backend,
            )[0],
        )
    if op == "long_conv":
        return Variant(
            f"zoo.kernels.long_conv.long_conv(backend={backend!r})",
            lambda x: long_conv(x["u"], x["k"], backend=backend)[0],
        )
    return Variant(
        f"zoo.kernels.long_conv.short_conv(backend={backend!r})",
        lambda x: short_conv(x["u"], x["weight"], x["bias"], backend=backend)[0],
    )


def _mamba_ssm() -> Variant | str:
    scan = baseline_op("mamba_ssm.ops.selective_scan_interface", "selective_scan_fn")
    if isinstance(scan, str):
        return scan
    return Variant(
        "mamba_ssm.ops.selective_scan_interface.selective_scan_fn(delta_softplus=False)",
        lambda x: scan(
            x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], delta_softplus=False
        ),  # (B, D_in, T)
        channels_first("u", "delta", "B", "C"),
    )


def _fla_selective_scan() -> str:
    """fla's Mamba layer (fla.layers.mamba) calls mamba_ssm's selective_scan_fn: fla has no
    Mamba-1 scan of its own to time, and the mamba_ssm row is the one its layer would run."""
    version = fla_version()
    if version == "not installed" or version.startswith("import failed"):
        return f"fla {version}"
    return (
        f"fla {version} has no Mamba-1 selective-scan op (fla.layers.mamba calls mamba_ssm's "
        "selective_scan_fn, timed as mamba_ssm)"
    )


def _causal_conv1d() -> Variant | str:
    conv = baseline_op("causal_conv1d", "causal_conv1d_fn")
    if isinstance(conv, str):
        return conv
    return Variant(
        "causal_conv1d.causal_conv1d_fn(activation=None)",
        lambda x: conv(x["u"], x["weight"], x["bias"]),  # (B, D, T)
        channels_first("u"),
    )


def implementations(op: str, device: torch.device) -> dict[str, Variant | str]:
    """Every implementation of `op` on this device: a Variant, or a reason it is skipped."""
    out: dict[str, Variant | str] = {"zoo torch": _zoo(op, "torch")}
    if device.type == "cuda":
        out["zoo triton"] = _zoo(op, "triton")
    if op == "long_conv":
        out["torch fft"] = Variant(
            "zoo.kernels.long_conv.long_conv_fft", lambda x: long_conv_fft(x["u"], x["k"])[0]
        )
    if device.type == "cuda" and op == "selective_scan":
        out["mamba_ssm"] = _mamba_ssm()
        out["fla"] = _fla_selective_scan()
    if device.type == "cuda" and op == "short_conv":
        out["causal_conv1d"] = _causal_conv1d()
    return out


def traffic(x: Inputs) -> dict[str, int]:
    """Bytes by the convention of the module docstring; every op's y has u's shape and dtype."""
    inputs = sum(t.nbytes for t in x.values())
    output = x["u"].nbytes
    return {"bytes_fwd": inputs + output, "bytes_fwd_bwd": 3 * inputs + 2 * output}


def bench(
    plan: list[tuple[Shape, tuple[str, ...]]],
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

    for shape, ops in plan:
        B, T, D = shape
        for op in ops:
            x, dy = make_inputs(op, shape, device, dtype)
            nbytes = traffic(x)
            for impl, entry in implementations(op, device).items():
                row: dict[str, Any] = {"B": B, "T": T, "D": D, "op": op, "impl": impl}
                if op == "selective_scan":
                    row["N"] = N_STATE
                elif op == "short_conv":
                    row["K"] = SHORT_K
                if isinstance(entry, str):
                    keep({**row, "skipped": entry})
                    continue
                row.update(call=entry.call, **nbytes)
                try:
                    xv, dyv = entry.relayout(x, dy) if entry.relayout else (x, dy)
                except Exception as exc:  # e.g. out of memory for the copies
                    failed = {"error": error_text(exc)}
                    keep({**row, "fwd": failed, "fwd_bwd": dict(failed)})
                    continue
                label = f"{shape} {op} {impl}"
                row.update(measure_fwd_bwd(entry.fn, xv, dyv, device, repeats, time_limit_s, label))
                for mode in ("fwd", "fwd_bwd"):
                    if "ms" in row[mode]:
                        row[mode]["gb_s"] = row[f"bytes_{mode}"] / (row[mode]["ms"] * 1e-3) / 1e9
                keep(row)
                del xv, dyv
            del x, dy
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def goal_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ours / reference time for every zoo implementation, shape and mode a goal names."""
    timed = {(r["B"], r["T"], r["D"], r["op"], r["impl"]): r for r in rows if "skipped" not in r}
    out = []
    for op, reference, modes, goal in GOALS:
        for row in rows:
            if row["op"] != op or not row["impl"].startswith("zoo") or "skipped" in row:
                continue
            base = timed.get((row["B"], row["T"], row["D"], op, reference), {})
            for mode in modes:
                ours, theirs = row[mode].get("ms"), base.get(mode, {}).get("ms")
                if ours is None or theirs is None:
                    continue
                ratio = ours / theirs
                out.append(
                    {
                        "goal": goal,
                        "B": row["B"],
                        "T": row["T"],
                        "D": row["D"],
                        "impl": row["impl"],
                        "reference": reference,
                        "mode": mode,
                        "ratio": ratio,
                        "met": ratio <= 1.0,
                    }
                )
    return out


def _ms(res: dict[str, Any]) -> str:
    return f"{res['ms']:.2f}" if "ms" in res else "error"


def _length_table(rows: list[dict[str, Any]]) -> list[str]:
    """The long conv by length, per (B, D) timed at two lengths or more: fwd / fwd+bwd ms."""
    lines: list[str] = []
    groups: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for row in rows:
        if row["op"] == "long_conv" and "skipped" not in row:
            groups.setdefault((row["B"], row["D"]), []).append(row)
    for (B, D), group in groups.items():
        lengths = sorted({row["T"] for row in group})
        if len(lengths) < 2:
            continue
        lines += [
            "",
            f"Long conv by length, B = {B}, D = {D}: fwd / fwd+bwd ms",
            "",
            "| impl | " + " | ".join(f"T = {T:,}" for T in lengths) + " |",
            "|---|" + "---:|" * len(lengths),
        ]
        for impl in dict.fromkeys(row["impl"] for row in group):
            cells = {row["T"]: row for row in group if row["impl"] == impl}
            line = []
            for T in lengths:
                row = cells.get(T)
                if row is None:
                    line.append("")
                    continue
                f_ms, b_ms = _ms(row["fwd"]), _ms(row["fwd_bwd"])
                line.append(f"{f_ms} / {b_ms}")
            lines.append(f"| {impl} | " + " | ".join(line) + " |")
    return lines


def _goal_lines(result: dict[str, Any]) -> list[str]:
    lines = ["", "Goals (ours / reference time; ≤ 1.00 meets the goal):"]
    for _, reference, _, goal in GOALS:
        hits = [g for g in result["goals"] if g["goal"] == goal]
        if not hits:
            lines.append(f"- {goal}: not measured in this run (no {reference} timings)")
            continue
        for g in hits:
            mode = "fwd+bwd" if g["mode"] == "fwd_bwd" else g["mode"]
            lines.append(
                f"- {goal}: ({g['B']}, {g['T']}, {g['D']}) {g['impl']} {mode} "
                f"{g['ratio']:.2f}× — {'met' if g['met'] else 'not met'}"
            )
    return lines


def table(result: dict[str, Any]) -> str:
    baselines = ", ".join(f"{name}: {v}" for name, v in result["baselines"].items())
    table_lines, notes = fwd_bwd_table(result["rows"], "BTD", OPS, ("gb_s", "GB/s", ".1f"))
    lines = [
        f"Selective scan and convolutions, {result['device']['name']} ({result['dtype']}), "
        f"{baselines}",
        "",
        *table_lines,
    ]
    lines += _length_table(result["rows"]) + _goal_lines(result)
    return with_notes(lines, notes, result["device"])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = bench_parser(
        __doc__, repeats=10, quick_help="tiny shapes (a smoke run)", time_limit_s=120.0
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    start = time.perf_counter()
    result, out_path = new_result("ssm_conv", device, args.threads, args.quick, args.out)
    result["dtype"] = str(dtype).removeprefix("torch.")
    result["baselines"] = {
        "mamba_ssm": package_version("mamba_ssm"),
        "causal_conv1d": package_version("causal_conv1d"),
        "fla": fla_version(),
    }
    result["settings"] = {"N": N_STATE, "chunk_size": CHUNK, "short_conv_K": SHORT_K}
    result["repeats"] = args.repeats
    result["byte_convention"] = {
        "fwd": "I + O (inputs read once, y written once)",
        "fwd_bwd": "3*I + 2*O (backward: inputs and dy read, one gradient per input written)",
    }
    warm_up(device)
    shapes = (QUICK_SHAPES if args.quick else SHAPES)[device.type]
    extra = (QUICK_LONG_CONV_SHAPES if args.quick else LONG_CONV_SHAPES)[device.type]
    plan = [(shape, tuple(OPS)) for shape in shapes] + [(shape, ("long_conv",)) for shape in extra]
    result["time_limit_s"] = args.time_limit or None
    result["rows"] = bench(
        plan,
        device,
        dtype,
        args.repeats,
        result["time_limit_s"],
        on_row=lambda rows: checkpoint({**result, "rows": rows}, out_path),
    )
    result["goals"] = goal_ratios(result["rows"])
    result["wall_s"] = time.perf_counter() - start
    finish(result, out_path, table)
    return result


if __name__ == "__main__":
    main()
