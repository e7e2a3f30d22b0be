"""Mamba2 and Gated DeltaNet against transformers' own torch code (fp32): ms and ratios.

Three comparisons, each timed round-robin (the implementations take turns within every repeat,
so that this machine's drifts hit them alike), medians over --repeats after a warm-up call:

(a) mamba2_model: zoo's Mamba2ForCausalLM against transformers' Mamba2ForCausalLM holding the
    *same* weights (`zoo.convert.mamba2.to_hf_mamba2`), one inference_mode forward with
    use_cache=False at B=1, T = 256 and 1024; transformers runs its torch path (mamba-ssm and
    causal-conv1d are CUDA packages, absent here). ≈14M parameters: hidden 384, 12 layers, heads
    of 64 (12 of them), state 64, one group, conv 4, vocab 4096, tied embeddings. transformers
    is timed at its own default chunk length (256) and at ours (64), and its faster one counts;
    the max |logit difference| of the two models is recorded.
(b) ssd_op: the SSD op alone (`zoo.kernels.ssd.ssd`, torch form) against transformers'
    `mamba2_chunk_scan` (the function its Mamba2 mixer's torch path calls; its kernel-hub wrapper
    removed), forward and forward + backward, at (B, T, H, P, N, G) = (1, 1024, 24, 64, 128, 1),
    chunk 64 (transformers' own default 256 is timed too; its faster one counts).
(c) gated_delta_op: the gated delta rule (`zoo.kernels.gated_delta.gated_delta`, torch form)
    against transformers' Qwen3-Next `torch_chunk_gated_delta_rule`, forward and forward +
    backward, at (B, T, H, K, V) = (1, 1024, 16, 128, 128), chunk 64 (transformers' default),
    L2-normalised q, k (transformers normalises inside, ours takes them normalised: the
    normalisation is timed on both sides), with an initial state and the final state out.

Goals (issue 26, CPU): Mamba2's chunked forward ≥ 2× transformers' torch path at T = 1K (b),
and Gated DeltaNet's chunked forward ≥ 1× transformers' torch chunked form (c). The JSON's
`goals` holds each ratio (transformers / ours; ≥ the goal meets it). The whole model (a) gains
less: both models run the same projections, and at this width they are most of the time (the
JSON's `gemm_ms_estimate`: the model's matrix products alone, timed as plain `F.linear` calls
on the same shapes).

    .venv/bin/python benchmarks/mixers.py            # CPU, a few minutes on 2 idle cores
    .venv/bin/python benchmarks/mixers.py --quick    # tiny shapes, seconds
"""

from __future__ import annotations

import inspect
import statistics
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from common import bench_parser, finish, new_result, progress, sync, time_once, with_notes

from zoo.configuration import Mamba2Config
from zoo.convert import to_hf_mamba2
from zoo.kernels.gated_delta import gated_delta
from zoo.kernels.ssd import ssd
from zoo.modeling import Mamba2ForCausalLM

SHAPES: dict[str, dict[str, Any]] = {
    "full": {
        "model": dict(hidden_size=384, num_hidden_layers=12, vocab_size=4096,
                      mamba2_head_dim=64, mamba2_d_state=64, mamba2_n_groups=1),
        "lengths": [256, 1024],
        "ssd": dict(B=1, T=1024, H=24, P=64, N=128, G=1),
        "gdn": dict(B=1, T=1024, H=16, K=128, V=128),
    },
    "quick": {
        "model": dict(hidden_size=64, num_hidden_layers=2, vocab_size=256,
                      mamba2_head_dim=16, mamba2_d_state=16, mamba2_n_groups=1),
        "lengths": [64],
        "ssd": dict(B=1, T=128, H=4, P=16, N=16, G=1),
        "gdn": dict(B=1, T=128, H=2, K=32, V=32),
    },
}  # fmt: skip


def _unwrapped(module: Any, name: str) -> Callable[..., Any]:
    """transformers' torch function under its kernel-hub decorator (which would call an installed
    CUDA kernel instead, or fall back to this same code after a check)."""
    return inspect.unwrap(getattr(module, name))


def round_robin(
    runs: dict[str, Callable[[], Any]], device: torch.device, repeats: int
) -> dict[str, float]:
    """Median ms of each run, the runs taking turns within every repeat after one warm-up each."""
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            times[name].append(time_once(run, device))
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


@torch.inference_mode()
def bench_mamba2_model(shape: dict[str, Any], device: torch.device, repeats: int) -> dict[str, Any]:
    torch.manual_seed(0)
    config = Mamba2Config(**shape["model"], tie_word_embeddings=True, mamba2_chunk_size=64)
    zoo_model = Mamba2ForCausalLM(config).to(device).eval()
    hf = to_hf_mamba2(zoo_model).to(device).eval()
    out: dict[str, Any] = {
        "params": sum(p.numel() for p in zoo_model.parameters()),
        "hf_path": "torch (mamba_chunk_scan / causal_conv1d fallbacks)",
        "zoo_chunk_size": config.mamba2_chunk_size,
    }
    for T in shape["lengths"]:
        ids = torch.randint(0, config.vocab_size, (1, T), device=device)
        zoo_logits = zoo_model(ids, use_cache=False).logits
        hf_logits = hf(ids, use_cache=False).logits
        row: dict[str, Any] = {
            "logits_max_abs_diff": (zoo_logits - hf_logits).abs().max().item(),
            "logits_max_abs": hf_logits.abs().max().item(),
        }

        def hf_at(chunk: int, ids: torch.Tensor = ids) -> Callable[[], Any]:
            def run() -> Any:
                hf.config.chunk_size = chunk
                for layer in hf.backbone.layers:
                    layer.mixer.chunk_size = chunk
                return hf(ids, use_cache=False)

            return run

        ms = round_robin(
            {
                "zoo": lambda ids=ids: zoo_model(ids, use_cache=False),
                "transformers chunk 256": hf_at(256),
                "transformers chunk 64": hf_at(64),
            },
            device,
            repeats,
        )
        best = min(ms["transformers chunk 256"], ms["transformers chunk 64"])
        row.update(ms={**ms}, hf_over_zoo=best / ms["zoo"])
        row["gemm_ms_estimate"] = _gemm_ms(zoo_model, T, device, repeats)
        out[str(T)] = row
        progress(f"mamba2 model T={T}: {ms}, transformers/zoo {row['hf_over_zoo']:.2f}")
    return out


def _gemm_ms(model: Mamba2ForCausalLM, T: int, device: torch.device, repeats: int) -> float:
    """ms of the model's matrix products alone at B=1 and T tokens: every nn.Linear (in_proj,
    out_proj, the head) as one F.linear on a random (T, in) input, summed."""
    total = 0.0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            x = torch.randn(T, module.in_features, device=device)
            total += round_robin({"mm": lambda x=x, m=module: F.linear(x, m.weight)}, device,
                                 repeats)["mm"]  # fmt: skip
    return total


def _ssd_inputs(s: dict[str, int], device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=g).to(device)

    B, T, H, P, N, G = (s[k] for k in "BTHPNG")
    return {
        "x": randn(B, T, H, P).requires_grad_(),
        "dt": F.softplus(randn(B, T, H) - 2).requires_grad_(),
        "A": (-torch.rand(H, generator=g) * 4 - 0.5).to(device).requires_grad_(),
        "B": randn(B, T, G, N).requires_grad_(),
        "C": randn(B, T, G, N).requires_grad_(),
        "D": randn(H).requires_grad_(),
        "dy": randn(B, T, H, P),
    }


def bench_ssd(s: dict[str, int], device: torch.device, repeats: int) -> dict[str, Any]:
    from transformers.models.mamba2 import modeling_mamba2

    theirs = _unwrapped(modeling_mamba2, "mamba2_chunk_scan")
    x = _ssd_inputs(s, device)
    leaves = [x[k] for k in ("x", "dt", "A", "B", "C", "D")]

    def ours() -> torch.Tensor:
        return ssd(x["x"], x["dt"], x["A"], x["B"], x["C"], x["D"], chunk_size=64,
                   backend="torch")[0]  # fmt: skip

    def hf(chunk: int) -> Callable[[], torch.Tensor]:
        return lambda: theirs(x["x"], x["dt"], x["A"], x["B"], x["C"], chunk, D=x["D"])

    fns = {"zoo": ours, "transformers chunk 256": hf(256), "transformers chunk 64": hf(64)}
    return _fwd_bwd(fns, leaves, x["dy"], device, repeats, s)


def _gdn_inputs(s: dict[str, int], device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(1)

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=g).to(device)

    B, T, H, K, V = (s[k] for k in "BTHKV")
    return {
        "q": randn(B, T, H, K).requires_grad_(),
        "k": randn(B, T, H, K).requires_grad_(),
        "v": randn(B, T, H, V).requires_grad_(),
        "g": F.logsigmoid(randn(B, T, H)).requires_grad_(),
        "beta": torch.sigmoid(randn(B, T, H)).requires_grad_(),
        "h0": (0.1 * randn(B, H, K, V)).requires_grad_(),
        "dy": randn(B, T, H, V),
    }


def _l2(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + 1e-6)


def bench_gated_delta(s: dict[str, int], device: torch.device, repeats: int) -> dict[str, Any]:
    from transformers.models.qwen3_next import modeling_qwen3_next

    theirs = _unwrapped(modeling_qwen3_next, "torch_chunk_gated_delta_rule")
    x = _gdn_inputs(s, device)
    leaves = [x[k] for k in ("q", "k", "v", "g", "beta", "h0")]

    def ours() -> torch.Tensor:
        o, final = gated_delta(_l2(x["q"]), _l2(x["k"]), x["v"], x["g"], x["beta"],
                               initial_state=x["h0"], output_final_state=True, chunk_size=64,
                               backend="torch")  # fmt: skip
        return o + 0 * final.sum()

    def hf() -> torch.Tensor:
        o, final = theirs(x["q"], x["k"], x["v"], x["g"], x["beta"], chunk_size=64,
                          initial_state=x["h0"], output_final_state=True,
                          use_qk_l2norm_in_kernel=True)  # fmt: skip
        return o + 0 * final.sum()

    return _fwd_bwd({"zoo": ours, "transformers": hf}, leaves, x["dy"], device, repeats, s)


def _fwd_bwd(
    fns: dict[str, Callable[[], torch.Tensor]],
    leaves: list[torch.Tensor],
    dy: torch.Tensor,
    device: torch.device,
    repeats: int,
    shape: dict[str, int],
) -> dict[str, Any]:
    """Forward (no_grad) and forward + backward ms of each fn, round-robin; outputs compared."""
    with torch.no_grad():
        outs = {name: fn() for name, fn in fns.items()}
    ref = outs.pop("zoo")
    diff = max((o - ref).abs().max().item() for o in outs.values())

    def forward(fn: Callable[[], torch.Tensor]) -> Callable[[], Any]:
        def run() -> Any:
            with torch.no_grad():
                return fn()

        return run

    def backward(fn: Callable[[], torch.Tensor]) -> Callable[[], Any]:
        def run() -> None:
            for leaf in leaves:
                leaf.grad = None
            fn().backward(dy)

        return run

    fwd = round_robin({n: forward(f) for n, f in fns.items()}, device, repeats)
    fwd_bwd = round_robin({n: backward(f) for n, f in fns.items()}, device, repeats)
    out: dict[str, Any] = {
        "shape": shape, "max_abs_diff": diff, "output_max_abs": ref.abs().max().item(),
        "fwd_ms": fwd, "fwd_bwd_ms": fwd_bwd,
    }  # fmt: skip
    for mode, ms in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
        best = min(v for k, v in ms.items() if k != "zoo")
        out[f"hf_over_zoo_{mode}"] = best / ms["zoo"]
    progress(f"  fwd {fwd}, fwd+bwd {fwd_bwd}")
    return out


def table(result: dict[str, Any]) -> str:
    m = result["mamba2_model"]
    lines = [
        f"Mamba2 model forward, B=1 ({m['params']:,} parameters; transformers: {m['hf_path']}), ms",
        "",
        "| T | zoo | transformers chunk 256 | transformers chunk 64 | transformers / zoo "
        "| max abs logit diff | matrix products alone |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for T in result["lengths"]:
        r = m[str(T)]
        ms = r["ms"]
        lines.append(
            f"| {T} | {ms['zoo']:.1f} | {ms['transformers chunk 256']:.1f} "
            f"| {ms['transformers chunk 64']:.1f} | {r['hf_over_zoo']:.2f} "
            f"| {r['logits_max_abs_diff']:.1e} | {r['gemm_ms_estimate']:.1f} |"
        )
    lines += ["", "| op | shape | impl | fwd ms | fwd+bwd ms |", "|---|---|---|---:|---:|"]
    for key, name in (("ssd_op", "SSD"), ("gated_delta_op", "gated delta rule")):
        r = result[key]
        shape = ", ".join(f"{k}={v}" for k, v in r["shape"].items())
        for impl in r["fwd_ms"]:
            lines.append(
                f"| {name} | {shape} | {impl} | {r['fwd_ms'][impl]:.1f} "
                f"| {r['fwd_bwd_ms'][impl]:.1f} |"
            )
        lines.append(
            f"| {name} | | transformers / zoo | {r['hf_over_zoo_fwd']:.2f}× "
            f"| {r['hf_over_zoo_fwd_bwd']:.2f}× |"
        )
    lines += ["", "Goals: " + "; ".join(
        f"{name} {g['value']:.2f} ({'met' if g['met'] else 'not met'})"
        for name, g in result["goals"].items()
    )]  # fmt: skip
    return with_notes(lines, [], result["device"])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = bench_parser(__doc__, repeats=7, quick_help="tiny shapes, seconds")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    result, out_path = new_result("mixers", device, args.threads, args.quick, args.out)
    shapes = SHAPES["quick" if args.quick else "full"]
    result["lengths"] = shapes["lengths"]
    result["transformers"] = transformers.__version__
    progress("mamba2 model ...")
    result["mamba2_model"] = bench_mamba2_model(shapes, device, args.repeats)
    progress("ssd op ...")
    result["ssd_op"] = bench_ssd(shapes["ssd"], device, args.repeats)
    progress("gated delta op ...")
    result["gated_delta_op"] = bench_gated_delta(shapes["gdn"], device, args.repeats)
    sync(device)
    ssd_ratio = result["ssd_op"]["hf_over_zoo_fwd"]
    gdn = result["gated_delta_op"]["hf_over_zoo_fwd"]
    result["goals"] = {
        "mamba2_chunked_forward_vs_transformers >= 2": {
            "value": ssd_ratio, "met": ssd_ratio >= 2.0,
        },
        "gated_delta_chunked_forward_vs_transformers >= 1": {"value": gdn, "met": gdn >= 1.0},
    }  # fmt: skip
    finish(result, out_path, table)
    return result


if __name__ == "__main__":
    main()
