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

(c) generate: whole ≈14M-parameter models (benchmarks/cpu_models.py) greedy through
    `generate()` after a 1K-token prompt, ours (eager, `torch.compile`'s step, the
    ahead-of-time step) and transformers' own Llama and Mamba on the same weights, at B = 1 and
    16; each decode step timed from inside generate()'s loop (`StepClock`) against its bound:
    reading every weight and the cache once at the GEMV bandwidth measured around the call over
    a matrix of that many bytes, or for a batch, if longer, the products' FLOPs at the GEMM
    rate measured around the call (a roofline).
(d) products (CPU): one decode step's matrix products alone, by backend (ATen, oneDNN, and at
    B = 1 inductor's reductions, `zoo.kernels.matvec`), at B = 1 and 16: why each decode path
    multiplies the way it does.
(e) cache_reads (CPU): one token's attention over the LLaMA model's static cache (6 heads of 64,
    1,090 slots, six layers' caches in turn), compiled as a step compiles it: `step_attention`
    (the values read in one pass), the same with the values' sum as one reduction over the slots
    (a pass per 16-float slice of the head), and ATen's SDPA: µs per layer, GB/s of its keys
    and values.

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

import contextlib
import functools
import gc
import statistics
import time
from collections.abc import Callable
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F
from common import (
    bench_parser,
    error_text,
    finish,
    fla_op,
    fla_version,
    median_time,
    new_result,
    progress,
    sync,
    time_once,
    warm_up,
    with_notes,
)
from cpu_models import FULL as CPU_MODELS
from cpu_models import QUICK as CPU_MODELS_QUICK
from cpu_models import model_configs
from transformers import CompileConfig
from transformers.generation.streamers import BaseStreamer
from transformers.utils import logging as transformers_logging

import zoo.decode
from zoo.cache import cache_nbytes, new_cache
from zoo.configuration import TNLConfig
from zoo.convert import to_hf_llama, to_hf_mamba
from zoo.decode import ahead_of_time_config, compile_config, decode_linears
from zoo.kernels.gla import gla as zoo_gla
from zoo.kernels.lightning import lightning, tnl_log_decay
from zoo.kernels.matvec import matvec
from zoo.layers.attention import step_attention
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
# (c) whole models through generate(): eager, compiled, and transformers' own models


GENERATE: dict[str, dict[str, Any]] = {
    "full": {
        "model": CPU_MODELS["model"],
        "families": ["llama", "tnl", "hgrn2", "mamba"],
        "batches": [1, 16],
        "context": 1024,
        "long_contexts": {"tnl": [4096, 16384]},
        # Tokens per timed generate() call: their decode steps are timed one by one (StepClock).
        "steps": 66,
        "steps_batched": 34,
        "rounds": 7,
    },
    "quick": {
        "model": CPU_MODELS_QUICK["model"],
        "families": ["llama", "tnl"],
        "batches": [1, 4],
        "context": 64,
        "long_contexts": {"tnl": [256]},
        "steps": 12,
        "steps_batched": 12,
        "rounds": 2,
    },
}
FAMILY_KEYS = {"llama": "zoo_llama", "tnl": "zoo_tnl", "hgrn2": "zoo_hgrn2", "mamba": "zoo_mamba"}
FAST_PATHS = ("zoo compiled", "zoo ahead-of-time")


class StepClock(BaseStreamer):
    """generate()'s decode steps timed from inside its loop. A streamer is handed the prompt, then
    each new token as soon as it is chosen, so the gaps between its calls after the first two are
    whole decode steps (the model's step, the cache update, the token's choice, the stopping
    check), the prefill left out. A streamer is what a chat front end passes anyway, and it
    leaves the loop's work as it is: a logits processor would add a float32 copy of the logits
    and the processor list's per-call signature inspection to every step (~50 µs here). On CUDA
    each call synchronizes, which costs a step the overlap of the host's work with the device's."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.times = device, []

    def put(self, value: torch.Tensor) -> None:
        sync(self.device)
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass

    def step_s(self, skip: int = 2) -> float:
        """Median seconds of a decode step: the gaps after the prefill's (prompt to first token),
        the first `skip` of them (warming caches) left out."""
        gaps = [b - a for a, b in zip(self.times[1:], self.times[2:], strict=False)]
        return statistics.median(gaps[skip:] or gaps)


Generate = Callable[[torch.Tensor, int, StepClock | None], torch.Tensor]


# Inductor's GEMV, made once: `gemv_bandwidth` runs before and after every timed call.
_COMPILED_MATVEC = torch.compile(matvec, dynamic=False)
# The matrices the rates are measured over, by shape, made once per model (the largest, a
# batch's cache-sized one, takes seconds to fill).
_MATRICES: dict[tuple[int, int, str], torch.Tensor] = {}


def _matrix(rows: int, width: int, device: torch.device) -> torch.Tensor:
    key = (rows, width, str(device))
    if key not in _MATRICES:
        _MATRICES[key] = torch.randn(rows, width, device=device)
    return _MATRICES[key]


def _best_rates(
    products: dict[str, Callable[[], Any]],
    work: float,
    unit: str,
    device: torch.device,
    repeats: int,
) -> dict[str, float]:
    """Per product, `work` (bytes or FLOPs) ÷ its median seconds, in billions a second, keyed
    "<name>_<unit>"."""
    return {
        f"{name}_{unit}": work / median_time(product, device, 2, repeats) / 1e9
        for name, product in products.items()
    }


def _onednn_available(device: torch.device) -> bool:
    return device.type == "cpu" and torch.backends.mkldnn.is_available()


def gemv_bandwidth(nbytes: int, width: int, device: torch.device, repeats: int) -> dict[str, float]:
    """GB/s of one matrix-vector product over a matrix of `nbytes` fp32 weights, `width` wide, in
    `nn.Linear`'s layout: by ATen (`F.linear`'s BLAS) and, on a CPU, by oneDNN's linear
    (`torch.ops.mkldnn._linear_pointwise`) and by inductor's compiled reduction
    (`zoo.kernels.matvec`, what our batch-1 steps run). The best is the bound's bandwidth: every
    byte read once, at the fastest rate a GEMV reached here over that many bytes (the rate
    depends on the size: what stays in the last-level cache between calls is read faster)."""
    weight = _matrix(max(1, nbytes // (4 * width)), width, device)
    x = torch.randn(width, device=device)
    products: dict[str, Callable[[], Any]] = {"linear_layout": lambda: weight @ x}
    if _onednn_available(device):
        row, onednn = x[None], torch.ops.mkldnn._linear_pointwise
        products["onednn"] = lambda: onednn(row, weight, None, "none", [], "")
    if device.type == "cpu":
        products["inductor"] = lambda: _COMPILED_MATVEC(x, weight)
    return _best_rates(products, weight.numel() * 4, "gb_per_s", device, repeats)


def gemm_rate(
    nbytes: int, width: int, batch: int, device: torch.device, repeats: int
) -> dict[str, float]:
    """GFLOP/s of `batch` rows multiplied by a matrix of `nbytes` fp32 weights (`width` wide, in
    `nn.Linear`'s layout): by ATen and, on a CPU, by oneDNN. The best is the compute side of a
    batched step's bound: its products' FLOPs at the fastest rate a GEMM of their shape reached."""
    weight = _matrix(max(1, nbytes // (4 * width)), width, device)
    x = torch.randn(batch, width, device=device)
    products: dict[str, Callable[[], Any]] = {"linear_layout": lambda: F.linear(x, weight)}
    if _onednn_available(device):
        onednn = torch.ops.mkldnn._linear_pointwise
        products["onednn"] = lambda: onednn(x, weight, None, "none", [], "")
    return _best_rates(products, 2 * batch * weight.numel(), "gflop_per_s", device, repeats)


def _weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the weights one decode step reads: every parameter once, the embedding table
    excepted (a step reads one row of it per sequence); a tied LM head counts once."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    head = model.get_output_embeddings()
    read = {id(head.weight)} if head is not None else set()
    return sum(
        p.numel() * p.element_size()
        for p in model.parameters()
        if id(p) not in embeddings or id(p) in read
    )


def _generate_fn(model: torch.nn.Module, **options: Any) -> Generate:
    """generate() of `n` greedy tokens, exactly n (no end-of-sequence stop), its steps timed by
    `clock` when one is given."""

    def run(ids: torch.Tensor, n: int, clock: StepClock | None = None) -> torch.Tensor:
        return model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
            streamer=clock,
            **options,
        )

    return run


def _hf_compile_config(device: torch.device) -> CompileConfig | None:
    """How transformers' models compile their decode step: on CUDA their own default (CUDA graphs,
    None here); on a CPU, where transformers does not compile by itself, inductor's default mode
    allowed on every device, as the zoo does (`zoo.decode.compile_config`)."""
    return None if device.type == "cuda" else compile_config(device)


def _zoo_variants(model: ZooForCausalLM) -> dict[str, Generate]:
    """Our ways to decode: eager, `torch.compile`'s step, and on a CPU the AOTInductor step."""
    out = {
        "zoo eager": _generate_fn(model),
        "zoo compiled": _generate_fn(model, cache_implementation="static"),
    }
    if model.device.type == "cpu":
        out["zoo ahead-of-time"] = _generate_fn(
            model, cache_implementation="static", compile_config=ahead_of_time_config()
        )
    return out


def _in_transformers_loop(run: Generate) -> Generate:
    """`run` decoding through transformers' `_sample` instead of the zoo's loop
    (`zoo.decode.decode_loop`), the same step: what the zoo's loop saves a step."""

    def in_their_loop(ids: torch.Tensor, n: int, clock: StepClock | None = None) -> Any:
        with mock.patch.object(zoo.decode, "runs_decode_loop", lambda *args: False):
            return run(ids, n, clock)

    return in_their_loop


def _variants(family: str, model: ZooForCausalLM, batch: int) -> dict[str, Generate]:
    """name -> generate of every way the benchmark decodes one family's weights: ours; at batch 1
    also our ahead-of-time step in transformers' loop, transformers' own model on the same
    weights, in its documented configurations, and (Llama) with our decode products
    (`zoo.decode.decode_linears`), to show what they alone buy."""
    out = _zoo_variants(model)
    if batch != 1:
        return out
    if "zoo ahead-of-time" in out:
        out["zoo ahead-of-time, transformers' loop"] = _in_transformers_loop(
            out["zoo ahead-of-time"]
        )
    if family == "llama":
        hf = to_hf_llama(model)
        hf.set_attn_implementation("sdpa")
        static = {"cache_implementation": "static"}
        compiled = _generate_fn(hf, **static, compile_config=_hf_compile_config(model.device))

        def hf_zoo_products(ids: torch.Tensor, n: int, clock: StepClock | None = None) -> Any:
            with decode_linears(hf):
                return compiled(ids, n, clock)

        out["transformers dynamic cache"] = _generate_fn(hf)
        out["transformers static cache"] = _generate_fn(hf, **static, disable_compile=True)
        out["transformers static + compile"] = compiled
        out["transformers static + compile + zoo decode products"] = hf_zoo_products
    if family == "mamba":
        hf = to_hf_mamba(model)
        out["transformers"] = _generate_fn(hf)
        out["transformers + compile"] = _generate_fn(
            hf, cache_implementation="static", compile_config=_hf_compile_config(model.device)
        )
    return out


def time_group(
    runs: dict[str, tuple[Generate, torch.Tensor]],
    steps: int,
    rounds: int,
    rates: dict[str, Callable[[], dict[str, float]]],
) -> dict[str, dict[str, Any]]:
    """Each run's decode step, round by round: a generate() of `steps` tokens whose steps a
    `StepClock` times one by one (the median step of the call is the round's), with the run's
    machine rates (`rates[name]`: GEMV GB/s, and for a batch GEMM GFLOP/s) measured just before
    and just after it (their mean is the round's), so that each step is set against what the
    machine gave at that moment (this machine's drifts move both). The runs take turns within
    each round. Each run's first call compiles (its excess over a timed call is recorded as
    compile time)."""
    out: dict[str, dict[str, Any]] = {}
    for name, (run, ids) in runs.items():
        device = ids.device
        start = time.perf_counter()
        first = run(ids, steps)
        sync(device)
        out[name] = {"first_call_s": time.perf_counter() - start, "rounds": []}
        out[name]["tokens"] = first[:, ids.shape[1] :]
    for _ in range(rounds):
        for name, (run, ids) in runs.items():
            before = rates[name]()
            clock = StepClock(ids.device)
            call_s = time_once(functools.partial(run, ids, steps, clock), ids.device)
            after = rates[name]()
            rate = {k: (before[k] + after[k]) / 2 for k in before}  # the call's time, bracketed
            out[name]["rounds"].append({"rates": rate, "step_s": clock.step_s(), "call_s": call_s})
    for name, (_, ids) in runs.items():
        res = out[name]
        timed = res.pop("rounds")
        step = statistics.median(r["step_s"] for r in timed)
        call = statistics.median(r["call_s"] for r in timed)
        res["compile_s"] = max(res["first_call_s"] - call, 0.0)
        res["step_ms_rounds"] = [1e3 * r["step_s"] for r in timed]
        for kind, unit in (("gemv", "gb_per_s"), ("gemm", "gflop_per_s")):
            keys = [k for k in timed[0]["rates"] if k.endswith(unit)]
            if keys:
                res[kind] = {k: statistics.median(r["rates"][k] for r in timed) for k in keys}
                best = [max(r["rates"][k] for k in keys) for r in timed]
                res[f"{kind}_best_{unit}_rounds"] = best
        res["step_ms"], res["tokens_per_s"] = 1e3 * step, ids.shape[0] / step
    return out


def step_bounds(row: dict[str, Any]) -> list[float]:
    """The bound of each round of a row, in ms: its bytes (weights and cache) at that round's best
    GEMV bandwidth, or for a batch, if longer, its products' FLOPs (2 × batch × weights) at that
    round's best GEMM rate: no implementation reads faster or multiplies faster than the fastest
    of those the benchmark ran, so none steps faster (a roofline)."""
    nbytes = row["weight_bytes"] + row["cache_bytes"]
    bounds = [1e3 * nbytes / (gb * 1e9) for gb in row["gemv_best_gb_per_s_rounds"]]
    if "gemm_best_gflop_per_s_rounds" in row:
        flops = 2 * row["B"] * row["weight_bytes"] / 4
        bounds = [
            max(memory, 1e3 * flops / (gflops * 1e9))
            for memory, gflops in zip(bounds, row["gemm_best_gflop_per_s_rounds"], strict=True)
        ]
    return bounds


def machine_rates(
    step_bytes: int, weight_bytes: int, width: int, batch: int, device: torch.device
) -> dict[str, float]:
    """The rates a step's bound is taken from: GEMV bandwidth over a matrix of the bytes the step
    reads (weights and cache), and for a batch the GEMM rate of its rows over the weights."""
    out = gemv_bandwidth(step_bytes, width, device, 5)
    if batch > 1:
        out |= gemm_rate(weight_bytes, width, batch, device, 5)
    return out


@torch.inference_mode()
def bench_generate(settings: dict[str, Any], device: torch.device) -> dict[str, Any]:
    configs = model_configs(settings["model"])
    fast = "zoo ahead-of-time" if device.type == "cpu" else "zoo compiled"
    out: dict[str, Any] = {
        "model": settings["model"],
        "context": settings["context"],
        "steps": settings["steps"],
        "steps_batched": settings["steps_batched"],
        "rounds": settings["rounds"],
        "rows": [],
    }
    one = settings["batches"][0]
    for family in settings["families"]:
        torch.manual_seed(0)
        model = ZooForCausalLM(configs[FAMILY_KEYS[family]]).to(device).eval()
        nbytes, width = _weight_bytes(model), model.config.hidden_size
        _MATRICES.clear()

        # Groups of runs timed in turns: each batch at the base context with every variant (a
        # larger batch beside our fastest path at the first batch, so that their ratio comes
        # from one round), and (TNL) our fastest path at each context, whose decode must not
        # depend on it.
        groups: list[dict[str, tuple[str, int, int, Generate]]] = []
        zoo_fast = _zoo_variants(model)[fast]
        for batch in settings["batches"]:
            variants = _variants(family, model, batch)
            context = settings["context"]
            group = {name: (name, batch, context, run) for name, run in variants.items()}
            if batch != one:
                group[f"{fast}, B={one}"] = (fast, one, context, zoo_fast)
            groups.append(group)
        contexts = settings["long_contexts"].get(family, [])
        if contexts:
            groups.append(
                {f"context {c}": (fast, one, c, zoo_fast) for c in [settings["context"], *contexts]}
            )
        for index, group in enumerate(groups):
            label = "contexts" if index == len(settings["batches"]) else None
            progress(f"generate: {family}: {', '.join(group)}")
            batched = any(batch > 1 for _, batch, _, _ in group.values())
            steps = settings["steps_batched" if batched else "steps"]
            runs, cache_bytes, rates = {}, {}, {}
            for key, (_, batch, context, run) in group.items():
                gen = torch.Generator().manual_seed(context + batch)
                ids = torch.randint(3, model.config.vocab_size, (batch, context), generator=gen)
                runs[key] = (run, ids.to(device))
                cache_bytes[key] = cache_nbytes(_prefill(model, runs[key][1], context)[1])
                rates[key] = functools.partial(
                    machine_rates, nbytes + cache_bytes[key], nbytes, width, batch, device
                )
            torch._dynamo.reset()  # the group's compiled runs compile afresh, and only they
            try:
                timed = time_group(runs, steps, settings["rounds"], rates)
            except Exception as exc:  # a configuration that fails is a result of the run
                for impl, batch, context, _ in group.values():
                    out["rows"].append(
                        {"family": family, "impl": impl, "B": batch, "context": context,
                         "error": error_text(exc)}
                    )  # fmt: skip
                continue
            first = next(iter(group))
            group_name = label or f"B={max(b for _, b, _, _ in group.values())}"
            for key, (impl, batch, context, _) in group.items():
                row = {
                    "family": family, "impl": impl, "B": batch, "context": context,
                    "group": group_name, "steps": steps,
                    "weight_bytes": nbytes, "cache_bytes": cache_bytes[key], **timed[key],
                }  # fmt: skip
                generated = row.pop("tokens")
                same_prompt = runs[key][1].shape == runs[first][1].shape and torch.equal(
                    runs[key][1], runs[first][1]
                )
                if same_prompt:
                    # Same prompt as the group's first run (zoo eager): the same greedy tokens.
                    row["greedy_equals_zoo_eager"] = bool(
                        torch.equal(generated, timed[first]["tokens"])
                    )
                # The bound of each round (`step_bounds`); the fraction is the median over
                # rounds of bound ÷ step.
                bounds = step_bounds(row)
                row["bound_ms"] = statistics.median(bounds)
                row["fraction_of_bound"] = statistics.median(
                    b / s for b, s in zip(bounds, row["step_ms_rounds"], strict=True)
                )
                progress(
                    f"  {impl} B={batch} context={context}: {row['step_ms']:.2f} ms/step, "
                    f"{100 * row['fraction_of_bound']:.0f}% of the bound, "
                    f"compile {row['compile_s']:.1f} s"
                )
                out["rows"].append(row)
        del model
        gc.collect()
    out["goals"] = generate_goals(out["rows"], settings, fast)
    return out


def _row(rows: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    for row in rows:
        if all(row.get(k) == v for k, v in match.items()) and "error" not in row:
            return row
    return None


def _round_ratio(num: dict[str, Any], den: dict[str, Any], scale: float = 1.0) -> float:
    """Median over the rounds of one group of den's step ÷ num's step (× scale): how many times
    faster `num` ran than `den`, each round against the other run of that round."""
    return statistics.median(
        scale * d / n for n, d in zip(num["step_ms_rounds"], den["step_ms_rounds"], strict=True)
    )


def generate_goals(
    rows: list[dict[str, Any]], settings: dict[str, Any], fast: str
) -> dict[str, Any]:
    """Issue 25's decode goals, from this run's rows (fp32, ≈14M parameters, base context), for
    our fastest path on the device (`fast`)."""
    b1, b16 = settings["batches"][:2]
    goals: dict[str, Any] = {}
    for family in settings["families"]:
        one = _row(rows, family=family, impl=fast, B=b1, group=f"B={b1}")
        if one is None:
            continue
        goals[f"{family}_fraction_of_bound_b{b1}"] = {
            "value": one["fraction_of_bound"], "impl": fast, "met": one["fraction_of_bound"] >= 0.75
        }  # fmt: skip
        many = _row(rows, family=family, impl=fast, B=b16, group=f"B={b16}")
        beside = _row(rows, family=family, impl=fast, B=b1, group=f"B={b16}")
        if many is not None and beside is not None:
            ratio = _round_ratio(many, beside, scale=b16 / b1)  # tokens/s ratio, same rounds
            # What the ratio would be with both steps at their bounds: below 8, no
            # implementation meets the goal on this machine without a slower batch-1 step.
            at_bounds = statistics.median(
                b16 / b1 * one / many
                for one, many in zip(step_bounds(beside), step_bounds(many), strict=True)
            )
            goals[f"{family}_b{b16}_over_b{b1}"] = {
                "value": ratio, "impl": fast, "met": ratio >= 8, "at_bounds": at_bounds
            }  # fmt: skip
    ours = _row(rows, family="llama", impl=fast, B=b1, group=f"B={b1}")
    theirs = [
        r for r in rows
        if r["family"] == "llama" and r["impl"].startswith("transformers") and "error" not in r
    ]  # fmt: skip
    documented = [r for r in theirs if "zoo" not in r["impl"]]
    if ours and documented:
        fastest = max(documented, key=lambda r: r["tokens_per_s"])
        ratio = _round_ratio(ours, fastest)
        goals["llama_over_transformers_fastest"] = {
            "value": ratio, "impl": fast, "against": fastest["impl"], "met": ratio >= 1.3
        }  # fmt: skip
    loops = {}
    for family in settings["families"]:
        mine = _row(rows, family=family, impl=fast, B=b1, group=f"B={b1}")
        theirs_loop = _row(rows, family=family, impl=f"{fast}, transformers' loop", B=b1)
        if mine and theirs_loop:
            loops[family] = _round_ratio(mine, theirs_loop)
    if loops:
        # Not a goal: what the zoo's decode loop buys the same step, in the same rounds.
        goals["zoo_loop_over_transformers_loop"] = {"value": loops, "met": None}
    with_layout = [r for r in theirs if "zoo" in r["impl"]]
    if ours and with_layout:
        # Not a goal: how much of the lead is the products, which transformers' model can borrow.
        goals["llama_over_transformers_with_zoo_decode_products"] = {
            "value": _round_ratio(ours, with_layout[0]), "met": None
        }  # fmt: skip
    tnl = [r for r in rows if r["family"] == "tnl" and r.get("group") == "contexts"]
    tnl = [r for r in tnl if "error" not in r]
    if len(tnl) > 1:
        speeds = [r["tokens_per_s"] for r in tnl]
        spread = min(speeds) / max(speeds)
        goals["tnl_flat_over_contexts"] = {
            "value": spread, "contexts": [r["context"] for r in tnl], "met": spread >= 0.8
        }  # fmt: skip
    same = [r["greedy_equals_zoo_eager"] for r in rows if "greedy_equals_zoo_eager" in r]
    goals["greedy_equals_zoo_eager"] = {"value": all(same), "met": all(same)}
    compile_s = [r["compile_s"] for r in rows if r["impl"] in FAST_PATHS and "error" not in r]
    if compile_s:
        goals["compile_under_60s"] = {"value": max(compile_s), "met": max(compile_s) < 60}
    return goals


# --------------------------------------------------------------------------------------------
# (d) the matrix products of one decode step, by backend (CPU)


PRODUCTS: dict[str, dict[str, Any]] = {
    "full": {"model": CPU_MODELS["model"], "families": list(FAMILY_KEYS), "batches": [1, 16],
             "rounds": 7, "loops": 20},
    "quick": {"model": CPU_MODELS_QUICK["model"], "families": ["llama", "tnl"], "batches": [1, 4],
              "rounds": 2, "loops": 5},
}  # fmt: skip


def _products(layers: list[torch.nn.Linear], batch: int, how: str) -> Callable[[], None]:
    """One decode step's products: every layer once on a `batch`-row input, by `how`."""
    inputs = [torch.randn(batch, layer.in_features) for layer in layers]
    weights = [layer.weight for layer in layers]
    if how == "inductor":  # the step's products compiled together, as our batch-1 steps are
        compiled = torch.compile(
            lambda xs, ws: [matvec(x, w) for x, w in zip(xs, ws, strict=True)], dynamic=False
        )
        return functools.partial(compiled, inputs, weights)

    def step() -> None:
        for x, w in zip(inputs, weights, strict=True):
            if how == "onednn":
                torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
            else:
                F.linear(x, w)

    return step


@torch.inference_mode()
def bench_products(settings: dict[str, Any]) -> dict[str, Any]:
    """The ms of one decode step's matrix products (every `nn.Linear` of each family's model on
    a B-row input) in ATen (`F.linear`), in oneDNN (`torch.ops.mkldnn._linear_pointwise`; the
    ahead-of-time step runs a batch through whichever of the two was faster,
    `zoo.decode.batched_products_backend`) and at B = 1 as inductor's reductions
    (`zoo.kernels.matvec` compiled, what both our compiled steps run for one token;
    `zoo.decode.decode_linears`): loops of `loops` steps, the median over rounds, the ways in
    turns within each round."""
    configs = model_configs(settings["model"])
    rows = []
    for family in settings["families"]:
        torch.manual_seed(0)
        model = ZooForCausalLM(configs[FAMILY_KEYS[family]]).eval()
        layers = [m for m in model.modules() if type(m) is torch.nn.Linear]
        nbytes = sum(layer.weight.numel() * 4 for layer in layers)
        flops = sum(2 * layer.weight.numel() for layer in layers)
        for batch in settings["batches"]:
            hows = ["aten"] + (["onednn"] if torch.backends.mkldnn.is_available() else [])
            hows += ["inductor"] if batch == 1 else []
            steps = {how: _products(layers, batch, how) for how in hows}
            for step in steps.values():
                step()  # compiles the inductor way
            times: dict[str, list[float]] = {how: [] for how in hows}
            for _ in range(settings["rounds"]):
                for how, step in steps.items():
                    loop = functools.partial(_repeat, step, settings["loops"])
                    times[how].append(median_time(loop, torch.device("cpu"), 1, 1))
            for how in hows:
                ms = 1e3 * statistics.median(times[how]) / settings["loops"]
                rows.append(
                    {"family": family, "B": batch, "impl": how, "layers": len(layers),
                     "ms": ms, "gb_per_s": nbytes / ms / 1e6,
                     "gflop_per_s": batch * flops / ms / 1e6}
                )  # fmt: skip
            progress(
                f"products: {family} B={batch}: "
                + ", ".join(f"{r['impl']} {r['ms']:.2f} ms" for r in rows[-len(hows) :])
            )
    return {"model": settings["model"], "rows": rows}


# The LLaMA benchmark model's attention at 1K context: 6 heads of 64 over the static cache's
# 1,090 slots (prompt and new tokens), one read per layer.
CACHE_READS: dict[str, dict[str, Any]] = {
    "full": {"heads": 6, "head_dim": 64, "slots": 1090, "layers": 6, "rounds": 7, "loops": 50},
    "quick": {"heads": 2, "head_dim": 40, "slots": 37, "layers": 2, "rounds": 2, "loops": 3},
}


def _one_reduction(x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """x (..., K) times matrix (..., K, N) as one reduction over K: compiled, a pass over the
    matrix per 16-float slice of N (what `zoo.kernels.matvec.vecmat` reads in one pass): `matvec`
    against the matrix's transpose, the form `step_attention` and `gla_step` had before it."""
    return matvec(x, matrix.transpose(-1, -2))


@torch.inference_mode()
def bench_cache_reads(settings: dict[str, Any]) -> dict[str, Any]:
    """One token's attention over a static cache (B = 1), compiled as a decode step compiles it,
    for every layer's cache in turn: `step_attention` (values read in one pass, `vecmat`), the
    same with the values' weighted sum as one reduction over the slots, and ATen's SDPA (an
    external kernel; what transformers' Llama runs). µs per layer and the GB/s of its keys and
    values; loops of `loops` calls, the median over rounds, the ways in turns within each."""
    heads, dim, slots, layers = (settings[k] for k in ("heads", "head_dim", "slots", "layers"))
    torch.manual_seed(0)
    q = torch.randn(1, heads, 1, dim)
    caches = [(torch.randn(1, heads, slots, dim), torch.randn(1, heads, slots, dim))
              for _ in range(layers)]  # fmt: skip
    mask = torch.ones(1, 1, 1, slots, dtype=torch.bool)
    mask[..., slots // 2 :] = False  # a cache half filled

    def every_layer(attention: Callable[..., torch.Tensor]) -> Callable[[], list[torch.Tensor]]:
        compiled = torch.compile(
            lambda q, caches: [attention(q, k, v, mask) for k, v in caches], dynamic=False
        )
        return functools.partial(compiled, q, caches)

    one_reduction = mock.patch("zoo.layers.attention.vecmat", _one_reduction)
    ways = {
        "zoo step_attention": (every_layer(step_attention), contextlib.nullcontext),
        "values as one reduction": (every_layer(step_attention), lambda: one_reduction),
        "ATen SDPA": (every_layer(F.scaled_dot_product_attention), contextlib.nullcontext),
    }
    outputs = {}
    for name, (read, context) in ways.items():
        with context():
            outputs[name] = read()  # compiles
    expected = outputs["ATen SDPA"]
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(settings["rounds"]):
        for name, (read, context) in ways.items():
            with context():
                loop = functools.partial(_repeat, read, settings["loops"])
                times[name].append(median_time(loop, torch.device("cpu"), 1, 1))
    nbytes = 2 * heads * slots * dim * 4  # one layer's keys and values
    rows = []
    for name in ways:
        us = 1e6 * statistics.median(times[name]) / settings["loops"] / layers
        diff = max((a - b).abs().max().item() for a, b in zip(outputs[name], expected, strict=True))
        rows.append({"impl": name, "us_per_layer": us, "gb_per_s": nbytes / us / 1e3,
                     "max_abs_diff_vs_sdpa": diff})  # fmt: skip
    progress("cache reads: " + ", ".join(f"{r['impl']} {r['us_per_layer']:.1f} µs" for r in rows))
    return {**{k: settings[k] for k in ("heads", "head_dim", "slots", "layers")},
            "bytes_per_layer": nbytes, "rows": rows}  # fmt: skip


def _repeat(fn: Callable[[], None], n: int) -> None:
    for _ in range(n):
        fn()


# --------------------------------------------------------------------------------------------
# Report


def _mib(n: int | None) -> str:
    return "—" if n is None else f"{n / 2**20:,.2f}"


def table(result: dict[str, Any]) -> str:
    lines = [f"Decode, {result['device']['name']} ({result['dtype']}), fla: {result['fla']}", ""]
    if "op_step" in result:
        lines += [
            "| one step: op | impl | B | K | V | µs / step | first call s |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
    notes = []
    for row in result.get("op_step", []):
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
    model = result.get("model")
    lines += [""]
    if model is None:
        pass
    elif "error" in model:
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
    if "generate" in result:
        lines += ["", *generate_table(result["generate"])]
    if "products" in result:
        lines += [
            "",
            "One decode step's matrix products (every nn.Linear once), ms:",
            "",
            "| model | B | impl | ms | GB/s of weights | GFLOP/s |",
            "|---|---:|---|---:|---:|---:|",
        ]
        for row in result["products"]["rows"]:
            lines.append(
                f"| {row['family']} | {row['B']} | {row['impl']} | {row['ms']:.2f} "
                f"| {row['gb_per_s']:.1f} | {row['gflop_per_s']:.0f} |"
            )
    if "cache_reads" in result:
        reads = result["cache_reads"]
        lines += [
            "",
            f"One token's attention over a static cache, {reads['heads']} heads of "
            f"{reads['head_dim']} over {reads['slots']:,} slots, B=1, per layer:",
            "",
            "| impl | µs | GB/s of keys and values | max abs diff vs SDPA |",
            "|---|---:|---:|---:|",
        ]
        for row in reads["rows"]:
            lines.append(
                f"| {row['impl']} | {row['us_per_layer']:.1f} | {row['gb_per_s']:.1f} "
                f"| {row['max_abs_diff_vs_sdpa']:.1e} |"
            )
    return with_notes(lines, notes, result["device"])


def generate_table(gen: dict[str, Any]) -> list[str]:
    lines = [
        f"generate(): greedy, context {gen['context']:,} unless said; ms per decode step: the "
        f"median over {gen['rounds']} rounds of each call's median step ({gen['steps']} tokens, "
        f"batches {gen['steps_batched']}); bound: weights + cache bytes at the best GEMV "
        "bandwidth (three ways, over a matrix of those bytes) measured around the call, or for a "
        "batch, if longer, its products' FLOPs at the best GEMM rate (ATen / oneDNN) measured "
        "there; % of bound: median over the rounds of bound ÷ step",
        "",
        "| model | group | impl | B | context | ms / step | tokens/s | bound ms | % of bound "
        "| GEMV GB/s (ATen / oneDNN / inductor) | GEMM GFLOP/s | compile s | greedy = zoo eager |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---|",
    ]
    for row in gen["rows"]:
        head = (
            f"| {row['family']} | {row.get('group', '')} | {row['impl']} | {row['B']} "
            f"| {row['context']:,} |"
        )
        if "error" in row:
            lines.append(f"{head} error: {row['error'][:80]} | | | | | | | |")
            continue
        gemv = row["gemv"]
        gemm = max(row["gemm"].values()) if "gemm" in row else None
        lines.append(
            f"{head} {row['step_ms']:.2f} | {row['tokens_per_s']:,.0f} | {row['bound_ms']:.2f} "
            f"| {100 * row['fraction_of_bound']:.0f}% "
            f"| {gemv['linear_layout_gb_per_s']:.1f} / "
            f"{gemv.get('onednn_gb_per_s', float('nan')):.1f} / "
            f"{gemv.get('inductor_gb_per_s', float('nan')):.1f} "
            f"| {'—' if gemm is None else f'{gemm:.0f}'} "
            f"| {row['compile_s']:.1f} | {row.get('greedy_equals_zoo_eager', '—')} |"
        )
    lines += ["", "| goal | value | met | with both steps at their bounds |", "|---|---:|---|---:|"]
    for name, goal in gen["goals"].items():
        value = goal["value"]
        shown = f"{value:.3g}" if isinstance(value, float) else str(value)
        met = "(information)" if goal["met"] is None else goal["met"]
        at_bounds = f"{goal['at_bounds']:.3g}" if "at_bounds" in goal else ""
        lines.append(f"| {name} | {shown} | {met} | {at_bounds} |")
    return lines


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = bench_parser(__doc__, repeats=5, quick_help="smaller settings (a smoke run)")
    parser.add_argument(
        "--kernel-backend",
        default="auto",
        choices=["auto", "torch", "triton"],
        help="the TNL model's config.kernel_backend",
    )
    parser.add_argument("--prefill-chunk", type=int, default=4096, help="tokens per prefill call")
    parser.add_argument(
        "--rounds", type=int, default=None, help="generate section: rounds per group (default: 7)"
    )
    parser.add_argument(
        "--sections",
        default="op_step,model,generate,products,cache_reads",
        help="comma-separated sections to run (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    sections = set(args.sections.split(","))
    known = {"op_step", "model", "generate", "products", "cache_reads"}
    if not sections <= known:
        parser.error(f"--sections: unknown {sorted(sections - known)}")
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
    if "op_step" in sections:
        result["op_step"] = bench_op_step(settings["op_step"], device, dtype, args.repeats)
    if "model" in sections:
        try:
            result["model"] = bench_model(
                settings["model"], device, dtype, args.kernel_backend, args.prefill_chunk
            )
        except Exception as exc:
            if device.type != "cuda":
                raise
            # On a lent GPU the op-step numbers are worth keeping when the model run fails.
            result["model"] = {"error": error_text(exc)}
    if "generate" in sections:
        # Each compiled variant recompiles the same frames (after a dynamo reset); transformers'
        # warnings about generation flags would drown the progress lines.
        transformers_logging.set_verbosity_error()
        settings = GENERATE["quick" if args.quick else "full"]
        if args.rounds is not None:
            settings = {**settings, "rounds": args.rounds}
        result["generate"] = bench_generate(settings, device)
    if "products" in sections and device.type == "cpu":
        result["products"] = bench_products(PRODUCTS["quick" if args.quick else "full"])
    if "cache_reads" in sections and device.type == "cpu":
        result["cache_reads"] = bench_cache_reads(CACHE_READS["quick" if args.quick else "full"])
    result["wall_s"] = time.perf_counter() - start
    finish(result, out_path, table)
    return result


if __name__ == "__main__":
    main()
