"""Decode: one recurrent step of each linear-mixer op, and a 1B TNL decoding after long contexts.

(a) op_step: one decode step of each op — q, k, v with T = 1, an fp32 initial_state
    (B, H, K, V) and output_final_state=True, the new state fed back as the next step's — at
    B = 1 and 64, H = 16, D = 128 (bf16 inputs): TNL (`zoo.kernels.lightning.lightning`,
    log_decay = tnl_log_decay(H, 0, 2)), cosFormer2 (the same op, log_decay = None, K = 2·D) and
    HGRN2 (its op `zoo.kernels.gla.gla`, log_f = logsigmoid(randn)), with backend="torch" and, on
    CUDA, backend="triton" and fla's fused recurrent kernels (`fused_recurrent_lightning_attn`
    else `fused_recurrent_simple_gla`, `fused_recurrent_linear_attn(normalize=False)`,
    `fused_recurrent_gla`) when `import fla` works. Microseconds per step: a loop of 100 steps
    (50 on a CPU) timed as one (synchronized only at its ends, so launch overhead counts and the
    sync does not), the median of --repeats loops; the first call (compilation, autotuning) is
    recorded apart. A variant that raises is recorded with its error and the run goes on.
(b) model: a TNL of the named size "1b" (`TNLConfig.from_size("1b", vocab_size=100_280)`, the
    scaling-law paper's vocabulary: 1.07B parameters, 32 layers, width 1536, 12 heads of 128),
    random init, bf16, on CUDA. Per context length (1K, 2K, 4K, 8K, 16K, 32K, batch 1): prefill
    a random context through the cache in chunks of --prefill-chunk tokens (logits_to_keep=1),
    then greedy-decode with a manual loop over the cache (what `generate()` runs per token,
    without its logits processors and stopping checks): 4 warm-up tokens, then 32 tokens each
    timed alone (2 and 16 on a CPU). Per-token latency (median and mean), the cache's bytes
    (`zoo.cache.cache_nbytes`, after the prefill and after decoding) and, on CUDA,
    torch.cuda.max_memory_allocated over the decode steps (peak stats reset after the prefill):
    a recurrent cache keeps both constant in the context length.

On a CPU (the default) (a) runs at H = 4, D = 32 in fp32 through the torch backend only, and (b)
runs a tiny TNL (hidden 64, 2 layers, 2 heads, fp32) at contexts 64 to 512, so the code paths are
tested; memory there is the cache bytes only.

One script rather than a flag of scans.py: scans.py measures chunked-form throughput on long
inputs (ms, TFLOP/s, forward and backward), this measures latency at T = 1 and a whole model's
decode, with other settings, other variants (fused recurrent kernels) and its own JSON.

    .venv/bin/python benchmarks/decode.py                 # CPU, fp32, well under a minute
    .venv/bin/python benchmarks/decode.py --quick         # smaller settings, seconds
    .venv/bin/python benchmarks/decode.py --device cuda   # H=16, D=128 steps; the 1B TNL, bf16
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from common import (
    bench_parser,
    error_text,
    finish,
    fla_op,
    fla_version,
    new_result,
    sync,
    time_once,
    warm_up,
    with_notes,
)

from zoo.cache import cache_nbytes, new_cache
from zoo.configuration import TNLConfig
from zoo.kernels.gla import gla as zoo_gla
from zoo.kernels.lightning import lightning, tnl_log_decay
from zoo.modeling import ZooForCausalLM

SETTINGS: dict[str, dict[str, Any]] = {
    "cuda": {
        "op_step": {"batches": [1, 64], "heads": 16, "head_dim": 128, "steps": 100},
        "model": {
            "size": "1b",
            "overrides": {"vocab_size": 100_280},
            "contexts": [1024, 2048, 4096, 8192, 16384, 32768],
            "warmup": 4,
            "decode_tokens": 32,
        },
    },
    "cpu": {
        "op_step": {"batches": [1, 64], "heads": 4, "head_dim": 32, "steps": 50},
        "model": {
            "size": None,
            "overrides": {
                "hidden_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "intermediate_size": 128,
            },
            "contexts": [64, 128, 256, 512],
            "warmup": 2,
            "decode_tokens": 16,
        },
    },
}
QUICK: dict[str, dict[str, Any]] = {
    "cuda": {
        "op_step": {**SETTINGS["cuda"]["op_step"], "steps": 20},
        "model": {**SETTINGS["cuda"]["model"], "contexts": [1024, 4096], "decode_tokens": 8},
    },
    "cpu": {
        "op_step": {"batches": [1, 4], "heads": 2, "head_dim": 16, "steps": 5},
        "model": {**SETTINGS["cpu"]["model"], "contexts": [64, 128], "decode_tokens": 4},
    },
}
OPS = {"tnl": "TNL", "cosformer2": "cosFormer2", "hgrn2": "HGRN2"}

Inputs = dict[str, torch.Tensor | None]
# One decode step: (inputs, state) -> new state.
Step = Callable[[Inputs, torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------------------------
# (a) one recurrent step per op


def step_inputs(
    op: str, batch: int, heads: int, head_dim: int, device: torch.device, dtype: torch.dtype
) -> tuple[Inputs, torch.Tensor]:
    """One token's inputs (T = 1) and a random fp32 initial state (B, H, K, V)."""
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*size: int, dtype: torch.dtype = dtype) -> torch.Tensor:
        return torch.randn(*size, generator=gen, device=device, dtype=dtype)

    K = 2 * head_dim if op == "cosformer2" else head_dim
    x = {
        "q": randn(batch, 1, heads, K),  # (B, 1, H, K)
        "k": randn(batch, 1, heads, K),
        "v": randn(batch, 1, heads, head_dim),  # (B, 1, H, V)
    }
    if op == "tnl":
        x["log_decay"] = tnl_log_decay(heads, 0, 2).to(device)  # (H,)
    elif op == "cosformer2":
        x["log_decay"] = None  # no decay: the kernels skip the decay arithmetic
    else:
        x["log_f"] = F.logsigmoid(randn(batch, 1, heads, K))  # (B, 1, H, K)
    return x, randn(batch, heads, K, head_dim, dtype=torch.float32)  # (B, H, K, V)


def _zoo_step(op: str, backend: str) -> tuple[str, Step]:
    if op == "hgrn2":
        return f"zoo.kernels.gla.gla(backend={backend!r})", lambda x, s: zoo_gla(
            x["q"], x["k"], x["v"], x["log_f"], s, output_final_state=True, backend=backend
        )[1]
    return f"zoo.kernels.lightning.lightning(backend={backend!r})", lambda x, s: lightning(
        x["q"],
        x["k"],
        x["v"],
        x["log_decay"],
        initial_state=s,
        output_final_state=True,
        backend=backend,
    )[1]


def _fla_step(op: str) -> tuple[str, Step] | str:
    """(name, step) of fla's fused recurrent kernel for one of our ops, or why there is none."""
    kw = {"scale": 1.0, "output_final_state": True}
    if op == "tnl":
        lightning_attn = fla_op("lightning_attn", "fused_recurrent_lightning_attn")
        if callable(lightning_attn):
            return (
                "fla.ops.lightning_attn.fused_recurrent_lightning_attn",
                lambda x, s: lightning_attn(x["q"], x["k"], x["v"], 0, 2, initial_state=s, **kw)[1],
            )
        simple_gla = fla_op("simple_gla", "fused_recurrent_simple_gla")
        if not callable(simple_gla):
            return f"{lightning_attn}; {simple_gla}"

        def tnl_simple_gla(x: Inputs, s: torch.Tensor) -> torch.Tensor:
            B, T, H, _ = x["q"].shape
            g = x["log_decay"].view(1, 1, H).expand(B, T, H).contiguous()  # (B, 1, H)
            return simple_gla(x["q"], x["k"], x["v"], g=g, initial_state=s, **kw)[1]

        return "fla.ops.simple_gla.fused_recurrent_simple_gla", tnl_simple_gla
    if op == "cosformer2":
        linear_attn = fla_op("linear_attn", "fused_recurrent_linear_attn")
        if not callable(linear_attn):
            return linear_attn
        return (
            "fla.ops.linear_attn.fused_recurrent_linear_attn(normalize=False)",
            lambda x, s: linear_attn(
                x["q"], x["k"], x["v"], initial_state=s, normalize=False, **kw
            )[1],
        )
    gla = fla_op("gla", "fused_recurrent_gla")
    if not callable(gla):
        return gla
    return "fla.ops.gla.fused_recurrent_gla", lambda x, s: gla(
        x["q"], x["k"], x["v"], gk=x["log_f"], initial_state=s, **kw
    )[1]


def step_variants(op: str, device: torch.device) -> dict[str, tuple[str, Step] | str]:
    out: dict[str, tuple[str, Step] | str] = {"zoo torch": _zoo_step(op, "torch")}
    if device.type == "cuda":
        out["zoo triton"] = _zoo_step(op, "triton")
        out["fla"] = _fla_step(op)
    return out


def time_steps(
    step: Step, x: Inputs, state: torch.Tensor, device: torch.device, steps: int, repeats: int
) -> dict[str, Any]:
    """First-call seconds and the median microseconds per step of `steps`-step loops."""
    holder = {"state": state}

    def one() -> None:
        holder["state"] = step(x, holder["state"])

    def loop() -> None:
        for _ in range(steps):
            one()

    first = time_once(one, device)
    loop()  # warm-up
    seconds = statistics.median(time_once(loop, device) for _ in range(repeats))
    return {"first_call_s": first, "us_per_step": 1e6 * seconds / steps}


@torch.inference_mode()
def bench_op_step(
    shape: dict[str, Any], device: torch.device, dtype: torch.dtype, repeats: int
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for batch in shape["batches"]:
        for op in OPS:
            x, state = step_inputs(op, batch, shape["heads"], shape["head_dim"], device, dtype)
            for impl, entry in step_variants(op, device).items():
                row: dict[str, Any] = {
                    "B": batch,
                    "H": shape["heads"],
                    "K": x["q"].shape[-1],
                    "V": shape["head_dim"],
                    "op": op,
                    "impl": impl,
                }
                if isinstance(entry, str):
                    rows.append({**row, "skipped": entry})
                    continue
                row["call"], step = entry
                try:
                    row.update(time_steps(step, x, state, device, shape["steps"], repeats))
                except Exception as exc:  # a kernel that fails is a result of the run
                    row["error"] = error_text(exc)
                rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------
# (b) a whole TNL decoding after a long context


def tnl_config(settings: dict[str, Any], kernel_backend: str) -> TNLConfig:
    room = max(settings["contexts"]) + settings["warmup"] + settings["decode_tokens"]
    # TNL has no positional limit: max_position_embeddings is information only.
    overrides = {
        **settings["overrides"],
        "max_position_embeddings": room,
        "kernel_backend": kernel_backend,
    }
    if settings["size"] is None:
        return TNLConfig(**overrides)
    return TNLConfig.from_size(settings["size"], **overrides)


def _prefill(model: ZooForCausalLM, ids: torch.Tensor, chunk: int) -> tuple[torch.Tensor, Any]:
    cache = new_cache(model.config)
    for start in range(0, ids.shape[1], chunk):
        out = model(
            input_ids=ids[:, start : start + chunk], cache=cache, use_cache=True, logits_to_keep=1
        )
    return out.logits, out.cache


@torch.inference_mode()
def bench_model(
    settings: dict[str, Any],
    device: torch.device,
    dtype: torch.dtype,
    kernel_backend: str,
    prefill_chunk: int,
) -> dict[str, Any]:
    config = tnl_config(settings, kernel_backend)
    torch.manual_seed(0)
    with torch.device(device):
        model = ZooForCausalLM(config)
    model = model.to(dtype).eval()
    out: dict[str, Any] = {
        "size": settings["size"] or "tiny",
        "config": {
            "hidden_size": config.hidden_size,
            "num_hidden_layers": config.num_hidden_layers,
            "num_attention_heads": config.num_attention_heads,
            "intermediate_size": config.intermediate_size,
            "vocab_size": config.vocab_size,
            "kernel_backend": config.kernel_backend,
            "dtype": str(dtype).removeprefix("torch."),
        },
        "params": sum(p.numel() for p in model.parameters()),
        "batch": 1,
        "prefill_chunk": prefill_chunk,
        "warmup_tokens": settings["warmup"],
        "decode_tokens": settings["decode_tokens"],
        "contexts": {},
    }
    # One short prefill first, so the first context's numbers hold no one-time set-up.
    _prefill(model, torch.zeros(1, 16, dtype=torch.long, device=device), prefill_chunk)
    for context in settings["contexts"]:
        gen = torch.Generator().manual_seed(context)
        ids = torch.randint(0, config.vocab_size, (1, context), generator=gen).to(device)
        sync(device)
        start = time.perf_counter()
        logits, cache = _prefill(model, ids, prefill_chunk)
        sync(device)
        prefill_s = time.perf_counter() - start
        nbytes = cache_nbytes(cache)
        state = {"token": logits[:, -1].argmax(-1, keepdim=True)}  # (1, 1)
        del logits, ids

        def step(cache: Any = cache, state: dict[str, torch.Tensor] = state) -> None:
            logits = model(input_ids=state["token"], cache=cache, use_cache=True).logits
            state["token"] = logits[:, -1].argmax(-1, keepdim=True)

        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            allocated = torch.cuda.memory_allocated(device)
        for _ in range(settings["warmup"]):
            step()
        times = [time_once(step, device) for _ in range(settings["decode_tokens"])]
        res: dict[str, Any] = {
            "prefill_s": prefill_s,
            "prefill_tokens_per_s": context / prefill_s,
            "median_token_ms": 1e3 * statistics.median(times),
            "mean_token_ms": 1e3 * statistics.mean(times),
            "tokens_per_s": 1.0 / statistics.median(times),
            "cache_nbytes": nbytes,
            "cache_nbytes_after_decode": cache_nbytes(cache),
        }
        if device.type == "cuda":
            res["memory_allocated_before_decode_bytes"] = allocated
            res["max_memory_allocated_decode_bytes"] = torch.cuda.max_memory_allocated(device)
        out["contexts"][str(context)] = res
        del cache, state, step
        gc.collect()
    return out


# --------------------------------------------------------------------------------------------
# Report


def _mib(n: int | None) -> str:
    return "—" if n is None else f"{n / 2**20:,.2f}"


def table(result: dict[str, Any]) -> str:
    lines = [
        f"Decode, {result['device']['name']} ({result['dtype']}), fla: {result['fla']}",
        "",
        "| one step: op | impl | B | K | V | µs / step | first call s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    notes = []
    for row in result["op_step"]:
        what = f"{OPS[row['op']]} {row['impl']} B={row['B']}"
        if "skipped" in row:
            notes.append(f"- {what}: skipped, {row['skipped']}")
            continue
        if "error" in row:
            notes.append(f"- {what}: {row['error']}")
            cells = "error | "
        else:
            cells = f"{row['us_per_step']:,.1f} | {row['first_call_s']:.3g}"
        lines.append(
            f"| {OPS[row['op']]} | {row['impl']} | {row['B']} | {row['K']} | {row['V']} | {cells} |"
        )
    model = result["model"]
    lines += [""]
    if "error" in model:
        lines.append(f"TNL decode: {model['error']}")
    else:
        lines += [
            f"TNL {model['size']} ({model['params'] / 1e6:,.1f}M parameters), greedy decode at B=1",
            "",
            "| context | prefill ms | ms / token (median) | tokens/s | cache bytes "
            "| peak allocated during decode MiB |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for context, res in model["contexts"].items():
            lines.append(
                f"| {int(context):,} | {1e3 * res['prefill_s']:,.1f} "
                f"| {res['median_token_ms']:.2f} | {res['tokens_per_s']:,.1f} "
                f"| {res['cache_nbytes']:,} "
                f"| {_mib(res.get('max_memory_allocated_decode_bytes'))} |"
            )
    return with_notes(lines, notes, result["device"])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = bench_parser(__doc__, repeats=5, quick_help="smaller settings (a smoke run)")
    parser.add_argument(
        "--kernel-backend",
        default="auto",
        choices=["auto", "torch", "triton"],
        help="the TNL model's config.kernel_backend",
    )
    parser.add_argument("--prefill-chunk", type=int, default=4096, help="tokens per prefill call")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    settings = (QUICK if args.quick else SETTINGS)[device.type]
    start = time.perf_counter()
    result, out_path = new_result("decode", device, args.threads, args.quick, args.out)
    result["dtype"] = str(dtype).removeprefix("torch.")
    result["fla"] = fla_version()
    result["repeats"] = args.repeats
    result["op_step_settings"] = settings["op_step"]
    warm_up(device)
    result["op_step"] = bench_op_step(settings["op_step"], device, dtype, args.repeats)
    try:
        result["model"] = bench_model(
            settings["model"], device, dtype, args.kernel_backend, args.prefill_chunk
        )
    except Exception as exc:
        if device.type != "cuda":
            raise
        # On a lent GPU the op-step numbers are worth keeping when the model run fails.
        result["model"] = {"error": error_text(exc)}
    result["wall_s"] = time.perf_counter() - start
    finish(result, out_path, table)
    return result


if __name__ == "__main__":
    main()
