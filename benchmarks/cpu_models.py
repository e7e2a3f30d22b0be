"""Model-level speed of zoo LLaMA, TNL and Mamba (fp32), against transformers' own models.

One run, one config (≈14M parameters: hidden 384, 6 layers, 6 heads of dim 64, intermediate
1024, vocab 4096, untied embeddings) and one set of weights per family, measured three ways:

(a) train step: forward + loss (labels = input_ids) + backward + AdamW step at B=4, T=512, with
    use_cache=False, for zoo LLaMA, transformers' LlamaForCausalLM holding the *same* weights
    (attn_implementation="sdpa", converted with `zoo.convert.to_hf_llama`) and zoo TNL of the
    same width and depth. The three models are timed round-robin so background load hits them
    alike. Tokens/s and ours/HF.
(b) prefill: one inference_mode forward at B=1, T = 512, 2048, 8192, with use_cache=True into a
    fresh `zoo.cache.new_cache(config)` and logits_to_keep=1, as `generate()` prefills.
    Milliseconds and the ratio T=8192 / T=2048 (linear would be 4, quadratic 16).
(c) greedy decode: prefill a random context of 1K, 4K or 16K tokens into a cache, then time
    single-token steps that feed back the argmax token and reuse the cache (no attention_mask:
    LLaMA derives positions from the cache length). Tokens/s (from the median step) and
    `zoo.cache.cache_nbytes(cache)` after the prefill.
(d) mamba_vs_transformers: zoo Mamba against transformers' MambaForCausalLM holding the *same*
    weights (`zoo.convert.to_hf_mamba`; its pure-torch slow path, as mamba-ssm and causal-conv1d
    are not installed) at ≈13M parameters (hidden 384, 12 layers, state 16, conv 4, expand 2,
    vocab 4096, tied embeddings): one inference_mode forward with use_cache=False at B=1,
    T = 256 and 1024, timed round-robin. Milliseconds, HF/ours and the max |logit difference|.
    It runs in a fresh interpreter: transformers' slow path allocates ~50 MB per layer and its
    speed depends on the allocator state earlier sections leave (after (a) it ran ~1.6x faster
    than in any process that only runs Mamba), so (d) must not inherit that state.

Every number is the median of several repeats after warmup. Run from the repository root:

    .venv/bin/python benchmarks/cpu_models.py                 # full run, ~2-3 min on 2 idle cores
    .venv/bin/python benchmarks/cpu_models.py --quick         # tiny smoke run, < 60 s
    .venv/bin/python benchmarks/cpu_models.py --device cuda   # writes results/gpu_models.json

It prints a markdown table and writes JSON (default benchmarks/results/cpu_models.json, or
gpu_models.json for --device cuda; --quick writes *_quick.json so it never overwrites a full run).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import importlib.util
import itertools
import multiprocessing
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
from common import (
    RESULTS,
    device_info,
    finish,
    load_note,
    median_time,
    sync,
    time_once,
    versions,
)
from transformers import AutoModelForCausalLM
from transformers import LlamaForCausalLM as HFLlamaForCausalLM

from zoo.cache import cache_nbytes, new_cache
from zoo.configuration import (
    CosFormer2Config,
    HGRN2Config,
    HybridConfig,
    HyenaConfig,
    LlamaConfig,
    MambaConfig,
    TNLConfig,
    ZooConfig,
)
from zoo.convert import to_hf_llama, to_hf_mamba
from zoo.modeling import MambaForCausalLM, ZooForCausalLM

# Shapes of the full run and of the --quick smoke run.
FULL = {
    "model": {
        "vocab_size": 4096,
        "hidden_size": 384,
        "num_hidden_layers": 6,
        "num_attention_heads": 6,
        "intermediate_size": 1024,
    },
    "train": {"batch": 4, "seq_len": 512, "warmup": 2, "repeats": 10},
    "prefill": {"lengths": [512, 2048, 8192], "warmup": 1, "repeats": 5},
    "decode": {"contexts": [1024, 4096, 16384], "warmup": 5, "steps": 32},
    "mamba": {
        "model": {
            "vocab_size": 4096,
            "hidden_size": 384,
            "num_hidden_layers": 12,
            "mamba_d_state": 16,
            "mamba_d_conv": 4,
            "mamba_expand": 2,
        },
        "lengths": [256, 1024],
        "repeats": 3,
    },
}
QUICK = {
    "model": {
        "vocab_size": 512,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 128,
    },
    "train": {"batch": 2, "seq_len": 64, "warmup": 1, "repeats": 2},
    "prefill": {"lengths": [64, 128, 256], "warmup": 1, "repeats": 2},
    "decode": {"contexts": [64, 256, 1024], "warmup": 1, "steps": 4},
    "mamba": {
        "model": {
            "vocab_size": 512,
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "mamba_d_state": 8,
            "mamba_d_conv": 4,
            "mamba_expand": 2,
        },
        "lengths": [64, 128],
        "repeats": 2,
    },
}


# --------------------------------------------------------------------------------------------
# Timing helpers


# --------------------------------------------------------------------------------------------
# Models


# Families whose prefill and decode are measured, with their table labels.
LABELS = {
    "zoo_llama": "zoo LLaMA",
    "zoo_tnl": "zoo TNL",
    "zoo_hgrn2": "zoo HGRN2",
    "zoo_cosformer2": "zoo cosFormer2",
    "zoo_mamba": "zoo Mamba",
    "zoo_hyena": "zoo Hyena",
    "zoo_hybrid": "zoo hybrid (3 TNL : 1 LLaMA)",
}


def model_configs(model: dict[str, int]) -> dict[str, ZooConfig]:
    """One config per family at the same width; untied embeddings so parameter counts compare.

    Mamba stacks twice the layers (it has no channel mixer: two Mamba blocks ≈ one layer);
    the hybrid stripes one LLaMA block after every three TNL blocks.
    """
    # Room for the 16K decode context plus its prefill and decode steps (Hyena needs it).
    common = dict(model, tie_word_embeddings=False, max_position_embeddings=16384 + 256)
    layers = common["num_hidden_layers"]
    stripe = ["lightning", "lightning", "lightning", "attention"] * (layers // 4 + 1)
    channel = {"lightning": "glu", "attention": "swiglu"}
    return {
        "zoo_llama": LlamaConfig(**common),
        "zoo_tnl": TNLConfig(**common),
        # HGRN2's state expansion e = the head dim of the other families.
        "zoo_hgrn2": HGRN2Config(
            **common, hgrn2_expand_ratio=common["hidden_size"] // common["num_attention_heads"]
        ),
        "zoo_cosformer2": CosFormer2Config(**common),
        "zoo_mamba": MambaConfig(**{**common, "num_hidden_layers": 2 * layers}),
        "zoo_hyena": HyenaConfig(**common),
        "zoo_hybrid": HybridConfig(
            **common,
            mixers=stripe[:layers],
            channel_mixers=[channel[m] for m in stripe[:layers]],
        ),
    }


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _to_hf(model: ZooForCausalLM) -> tuple[HFLlamaForCausalLM, str]:
    """transformers' LlamaForCausalLM holding the zoo LLaMA's weights, on SDPA attention."""
    hf = to_hf_llama(model)
    hf.set_attn_implementation("sdpa")
    return hf, "zoo.convert.to_hf_llama"


@torch.inference_mode()
def _logits_diff(a: torch.nn.Module, b: torch.nn.Module, vocab: int, device: torch.device) -> float:
    ids = torch.randint(0, vocab, (2, 64), device=device)
    la = a(input_ids=ids, use_cache=False).logits
    lb = b(input_ids=ids, use_cache=False).logits
    return (la - lb).abs().max().item()


# --------------------------------------------------------------------------------------------
# (a) train step


def bench_train(
    models: dict[str, torch.nn.Module], vocab: int, shape: dict[str, int], device: torch.device
) -> dict[str, Any]:
    batch, seq_len = shape["batch"], shape["seq_len"]
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (batch, seq_len), generator=gen).to(device)
    steps = {}
    for name, model in models.items():
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(model: torch.nn.Module = model, opt: torch.optim.Optimizer = opt) -> None:
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        steps[name] = step
    for _ in range(shape["warmup"]):
        for step in steps.values():
            step()
    # Round-robin repeats, so background load on a shared machine hits every model alike.
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(shape["repeats"]):
        for name, step in steps.items():
            times[name].append(time_once(step, device))
    out: dict[str, Any] = {"batch": batch, "seq_len": seq_len, "repeats": shape["repeats"]}
    for name, ts in times.items():
        med = statistics.median(ts)
        out[name] = {
            "median_s": med,
            "min_s": min(ts),
            "tokens_per_s": batch * seq_len / med,
            "times_s": ts,
        }
        models[name].eval()
    out["llama_over_hf"] = out["zoo_llama"]["tokens_per_s"] / out["hf_llama"]["tokens_per_s"]
    out["tnl_over_hf"] = out["zoo_tnl"]["tokens_per_s"] / out["hf_llama"]["tokens_per_s"]
    return out


# --------------------------------------------------------------------------------------------
# (b) prefill and (c) decode


def _prefill(model: ZooForCausalLM, ids: torch.Tensor) -> tuple[torch.Tensor, Any]:
    cache = new_cache(model.config)
    out = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
    return out.logits, out.cache


@torch.inference_mode()
def bench_prefill(
    models: dict[str, ZooForCausalLM], vocab: int, shape: dict[str, Any], device: torch.device
) -> dict[str, Any]:
    out: dict[str, Any] = {"batch": 1}
    for name, model in models.items():
        res: dict[str, Any] = {}
        for length in shape["lengths"]:
            gen = torch.Generator().manual_seed(length)
            ids = torch.randint(0, vocab, (1, length), generator=gen).to(device)
            sec = median_time(
                lambda model=model, ids=ids: _prefill(model, ids),
                device,
                shape["warmup"],
                shape["repeats"],
            )
            res[str(length)] = {"ms": 1e3 * sec, "tokens_per_s": length / sec}
            gc.collect()
        lo, hi = shape["lengths"][-2], shape["lengths"][-1]
        res[f"ratio_{hi}_over_{lo}"] = res[str(hi)]["ms"] / res[str(lo)]["ms"]
        out[name] = res
    return out


@torch.inference_mode()
def bench_decode(
    models: dict[str, ZooForCausalLM], vocab: int, shape: dict[str, Any], device: torch.device
) -> dict[str, Any]:
    out: dict[str, Any] = {"batch": 1, "steps": shape["steps"], "warmup_steps": shape["warmup"]}
    for name, model in models.items():
        res: dict[str, Any] = {}
        for context in shape["contexts"]:
            gen = torch.Generator().manual_seed(context)
            ids = torch.randint(0, vocab, (1, context), generator=gen).to(device)
            sync(device)
            start = time.perf_counter()
            logits, cache = _prefill(model, ids)
            sync(device)
            prefill_s = time.perf_counter() - start
            nbytes = cache_nbytes(cache)
            state = {"token": logits[:, -1].argmax(-1, keepdim=True)}

            def step(
                model: ZooForCausalLM = model, cache: Any = cache, state: dict = state
            ) -> None:
                logits = model(input_ids=state["token"], cache=cache, use_cache=True).logits
                state["token"] = logits[:, -1].argmax(-1, keepdim=True)

            for _ in range(shape["warmup"]):
                step()
            times = [time_once(step, device) for _ in range(shape["steps"])]
            med = statistics.median(times)
            res[str(context)] = {
                "tokens_per_s": 1.0 / med,
                "median_step_ms": 1e3 * med,
                "mean_tokens_per_s": len(times) / sum(times),
                "cache_nbytes": nbytes,
                "cache_nbytes_after_decode": cache_nbytes(cache),
                "prefill_s": prefill_s,
            }
            del logits, cache, state, step
            gc.collect()
        out[name] = res
    return out


# --------------------------------------------------------------------------------------------
# (d) Mamba vs transformers


@torch.inference_mode()
def bench_mamba_vs_hf(shape: dict[str, Any], device: torch.device, seed: int) -> dict[str, Any]:
    """zoo Mamba vs transformers' MambaForCausalLM (same weights): B=1 forward, no cache."""
    torch.manual_seed(seed)
    config = MambaConfig(**shape["model"], tie_word_embeddings=True)
    models: dict[str, torch.nn.Module] = {"zoo_mamba": MambaForCausalLM(config).to(device).eval()}
    models["hf_mamba"] = to_hf_mamba(models["zoo_mamba"]).to(device).eval()
    hf_fast = importlib.util.find_spec("mamba_ssm") is not None and device.type == "cuda"
    out: dict[str, Any] = {
        "batch": 1,
        "repeats": shape["repeats"],
        "config": {**shape["model"], "tie_word_embeddings": True, "dtype": "float32"},
        "params": {name: _n_params(model) for name, model in models.items()},
        "hf_conversion": "zoo.convert.to_hf_mamba",
        "hf_path": "mamba-ssm kernels" if hf_fast else "slow path (pure torch)",
        "zoo_chunk_size": config.mamba_chunk_size,
        "zoo_kernel_backend": config.kernel_backend,
        "process": "fresh interpreter (spawn)",
    }
    for length in shape["lengths"]:
        gen = torch.Generator().manual_seed(length)
        ids = torch.randint(0, config.vocab_size, (1, length), generator=gen).to(device)
        # The first call of each model is the warmup; its logits give the difference.
        logits = {name: m(input_ids=ids, use_cache=False).logits for name, m in models.items()}
        diff = (logits["zoo_mamba"] - logits["hf_mamba"]).abs().max().item()
        scale = logits["hf_mamba"].abs().max().item()
        del logits
        # Round-robin repeats, so background load hits both models alike.
        times: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(shape["repeats"]):
            for name, model in models.items():
                times[name].append(
                    time_once(lambda m=model, i=ids: m(input_ids=i, use_cache=False), device)
                )
        res: dict[str, Any] = {
            name: {"ms": 1e3 * statistics.median(ts), "min_ms": 1e3 * min(ts), "times_s": ts}
            for name, ts in times.items()
        }
        res["hf_over_zoo"] = res["hf_mamba"]["ms"] / res["zoo_mamba"]["ms"]
        res["logits_max_abs_diff"] = diff
        res["logits_max_abs"] = scale
        out[str(length)] = res
        gc.collect()
    return out


def _mamba_section(shape: dict[str, Any], device: str, seed: int, threads: int) -> dict[str, Any]:
    torch.set_num_threads(threads)
    return bench_mamba_vs_hf(shape, torch.device(device), seed)


def _in_fresh_process(fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) in a new interpreter (spawn), so it sees no state left by earlier sections."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(fn, *args).result()


# --------------------------------------------------------------------------------------------
# Report


def _goals(result: dict[str, Any], shapes: dict[str, Any]) -> dict[str, Any]:
    lo, hi = shapes["prefill"]["lengths"][-2:]
    contexts = [str(c) for c in shapes["decode"]["contexts"]]
    tnl_dec, llama_dec = result["decode"]["zoo_tnl"], result["decode"]["zoo_llama"]
    ratio_train = result["train_step"]["llama_over_hf"]
    ratio_prefill = result["prefill"]["zoo_tnl"][f"ratio_{hi}_over_{lo}"]
    tnl_long = tnl_dec[contexts[-1]]["tokens_per_s"] / tnl_dec[contexts[0]]["tokens_per_s"]
    tnl_bytes = [tnl_dec[c]["cache_nbytes"] for c in contexts]
    llama_tps = [llama_dec[c]["tokens_per_s"] for c in contexts]
    llama_bytes = [llama_dec[c]["cache_nbytes"] for c in contexts]
    falls = all(a > b for a, b in itertools.pairwise(llama_tps))
    grows = all(a < b for a, b in itertools.pairwise(llama_bytes))
    mamba = result["mamba_vs_transformers"][str(shapes["mamba"]["lengths"][-1])]
    return {
        "llama_train_step_vs_hf >= 1.0": {"value": ratio_train, "met": ratio_train >= 1.0},
        "tnl_prefill_8192_over_2048 <= 4.5": {"value": ratio_prefill, "met": ratio_prefill <= 4.5},
        # One-sided: decode at the longest context keeps >= 80% of the shortest one's speed.
        "tnl_decode_16k_within_20pct_of_1k": {"value": tnl_long, "met": tnl_long >= 0.8},
        "tnl_cache_bytes_constant": {"value": tnl_bytes, "met": len(set(tnl_bytes)) == 1},
        "llama_decode_falls_and_cache_grows": {
            "value": {"tokens_per_s": llama_tps, "cache_nbytes": llama_bytes},
            "met": falls and grows,
        },
        "mamba_forward_vs_hf_1024 >= 3": {
            "value": mamba["hf_over_zoo"],
            "met": mamba["hf_over_zoo"] >= 3.0,
        },
        # Same weights, same function: only summation order may differ.
        "mamba_logits_match_hf (max abs diff <= 1e-4)": {
            "value": mamba["logits_max_abs_diff"],
            "met": mamba["logits_max_abs_diff"] <= 1e-4,
        },
    }


def _fmt_len(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def _table(result: dict[str, Any]) -> str:
    dev = result["device"]
    lines = [
        f"## {result['benchmark']} — {dev['name']} ({dev['type']}, {dev['threads']} threads), "
        f"fp32, torch {result['versions']['torch']}, transformers "
        f"{result['versions']['transformers']}" + (" — QUICK" if result["quick"] else ""),
        "",
        load_note(dev),
        "Config: " + ", ".join(f"{k}={v}" for k, v in result["config"].items() if k != "notes"),
        "Params: " + ", ".join(f"{k} {v:,}" for k, v in result["params"].items()),
        "",
    ]
    tr = result["train_step"]
    lines += [
        f"### Train step (B={tr['batch']}, T={tr['seq_len']}: fwd + loss + bwd + AdamW)",
        "",
        "| model | median step (ms) | tokens/s | vs HF |",
        "|---|---:|---:|---:|",
    ]
    hf_tps = tr["hf_llama"]["tokens_per_s"]
    for name, label in (
        ("zoo_llama", "zoo LLaMA"),
        ("hf_llama", "transformers LLaMA (sdpa)"),
        ("zoo_tnl", "zoo TNL"),
    ):
        r = tr[name]
        lines.append(
            f"| {label} | {1e3 * r['median_s']:.0f} | {r['tokens_per_s']:,.0f} | "
            f"{r['tokens_per_s'] / hf_tps:.2f} |"
        )
    pf = result["prefill"]
    lengths = [int(k) for k in pf["zoo_llama"] if k.isdigit()]
    lo, hi = lengths[-2:]
    lines += [
        "",
        "### Prefill (B=1, use_cache=True, logits_to_keep=1), ms",
        "",
        "| model | " + " | ".join(f"T={_fmt_len(n)}" for n in lengths) + f" | {hi}/{lo} |",
        "|---|" + "---:|" * (len(lengths) + 1),
    ]
    for name in (name for name in LABELS if name in pf):
        label, r = LABELS[name], pf[name]
        cells = " | ".join(f"{r[str(n)]['ms']:.0f}" for n in lengths)
        lines.append(f"| {label} | {cells} | {r[f'ratio_{hi}_over_{lo}']:.2f} |")
    dc = result["decode"]
    contexts = [int(k) for k in dc["zoo_llama"]]
    lines += [
        "",
        f"### Greedy decode (B=1, {dc['steps']} timed steps after a prefilled context)",
        "",
        "| model | context | tokens/s | step (ms) | cache bytes | prefill (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in (name for name in LABELS if name in dc):
        label = LABELS[name]
        for c in contexts:
            r = dc[name][str(c)]
            lines.append(
                f"| {label} | {_fmt_len(c)} | {r['tokens_per_s']:.1f} | "
                f"{r['median_step_ms']:.1f} | {r['cache_nbytes']:,} | {r['prefill_s']:.2f} |"
            )
    mb = result["mamba_vs_transformers"]
    mb_cfg = mb["config"]
    lines += [
        "",
        f"### Mamba vs transformers (B=1, forward, use_cache=False; "
        f"hidden {mb_cfg['hidden_size']}, {mb_cfg['num_hidden_layers']} layers, "
        f"{mb['params']['zoo_mamba']:,} params; HF {mb['hf_path']}), ms",
        "",
        "| T | zoo Mamba | transformers Mamba | HF / zoo | max abs logit diff (max abs logit) |",
        "|---:|---:|---:|---:|---:|",
    ]
    for key, r in mb.items():
        if key.isdigit():
            lines.append(
                f"| {_fmt_len(int(key))} | {r['zoo_mamba']['ms']:.0f} | {r['hf_mamba']['ms']:.0f} "
                f"| {r['hf_over_zoo']:.1f} | {r['logits_max_abs_diff']:.1e} "
                f"({r['logits_max_abs']:.2f}) |"
            )
    lines += ["", "### Goals", "", "| goal | value | met |", "|---|---|---|"]
    for goal, g in result["goals"].items():
        value = g["value"]
        if isinstance(value, float):
            value = f"{value:.2f}" if abs(value) >= 0.01 else f"{value:.1e}"
        elif isinstance(value, dict):
            value = "; ".join(
                f"{k}: " + ", ".join(f"{x:,.1f}" if isinstance(x, float) else f"{x:,}" for x in v)
                for k, v in value.items()
            )
        elif isinstance(value, list):
            value = ", ".join(f"{x:,}" for x in value)
        lines.append(f"| {goal} | {value} | {'yes' if g['met'] else 'NO'} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (2)")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (< 60 s)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    torch.set_num_threads(args.threads)
    shapes = QUICK if args.quick else FULL
    out_path = args.out
    if out_path is None:
        stem = "gpu_models" if device.type == "cuda" else "cpu_models"
        out_path = RESULTS / (stem + ("_quick" if args.quick else "") + ".json")

    t_start = time.perf_counter()
    torch.manual_seed(args.seed)
    configs = model_configs(shapes["model"])
    llama_cfg, tnl_cfg = configs["zoo_llama"], configs["zoo_tnl"]
    zoo_models = {
        name: AutoModelForCausalLM.from_config(config).to(device).eval()
        for name, config in configs.items()
    }
    llama, tnl = zoo_models["zoo_llama"], zoo_models["zoo_tnl"]
    hf, conversion = _to_hf(llama)
    hf = hf.to(device=device, dtype=torch.float32).eval()
    vocab = llama_cfg.vocab_size
    diff = _logits_diff(llama, hf, vocab, device)
    print(f"[check] zoo vs HF LLaMA max |logits diff| = {diff:.2e} ({conversion})")
    if diff > 1e-3:
        print("[warn] the HF copy does not reproduce the zoo LLaMA logits", file=sys.stderr)

    result: dict[str, Any] = {
        "benchmark": "cpu_models",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick,
        "device": device_info(device, args.threads),
        "versions": versions(),
        "config": {
            **shapes["model"],
            "head_dim": llama_cfg.head_dim,
            "tie_word_embeddings": False,
            "dtype": "float32",
            "llama_rotary_base": llama_cfg.rotary_base,
            "tnl_lightning_chunk_size": tnl_cfg.lightning_chunk_size,
            "tnl_kernel_backend": tnl_cfg.kernel_backend,
            "hf_conversion": conversion,
            "hf_attn_implementation": hf.config._attn_implementation,
            "hf_logits_max_abs_diff": diff,
            "notes": "timings are medians after warmup; train step repeats run round-robin",
        },
        "params": {
            "hf_llama": _n_params(hf),
            **{name: _n_params(model) for name, model in zoo_models.items()},
        },
    }

    print("[run] train step ...", flush=True)
    result["train_step"] = bench_train(
        {"zoo_llama": llama, "hf_llama": hf, "zoo_tnl": tnl}, vocab, shapes["train"], device
    )
    del hf
    gc.collect()
    print("[run] prefill ...", flush=True)
    result["prefill"] = bench_prefill(zoo_models, vocab, shapes["prefill"], device)
    print("[run] decode ...", flush=True)
    result["decode"] = bench_decode(zoo_models, vocab, shapes["decode"], device)
    del llama, tnl, zoo_models
    gc.collect()
    print("[run] mamba vs transformers ...", flush=True)
    result["mamba_vs_transformers"] = _in_fresh_process(
        _mamba_section, shapes["mamba"], str(device), args.seed, args.threads
    )
    result["goals"] = _goals(result, shapes)
    result["wall_s"] = time.perf_counter() - t_start
    print()
    finish(result, out_path, lambda r: f"{_table(r)}\n\n(wall {r['wall_s']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
