"""Training throughput through the recipe loop (zoo.training): tokens/s and MFU per model.

Four models of the same width and depth, each trained for a few steps by `zoo.training.train`
(packed sequences of the embedded corpus, AdamW, grad clipping, the real loop with its logging):

- zoo LLaMA,
- transformers' `LlamaForCausalLM` holding the same weights (`zoo.convert.to_hf_llama`, SDPA),
  trained by the same loop (the loop takes any causal LM),
- zoo TNL,
- a striped MoE hybrid: (lightning:moe lightning:moe attention:moe) × depth/3, 8 experts of half
  the dense width, top-2 (iso-active with the dense MLP),
- zoo LLaMA and transformers' Llama again with the recipe's `training.compile: true`
  (`nn.Module.compile`, inductor; `--no-compile` leaves them out). Their first logging window
  holds the compilation: "wall" is train()'s whole time, so compiled − eager wall ≈ compile time.

Tokens/s is the median over logging windows after the first (warm-up) one. MFU = training
FLOPs/token (`zoo.flops`: 6 × matmul parameters + attention's 12·l·T·d, active experts only)
× tokens/s ÷ peak. On a GPU the peak is the data-sheet dense bf16 rate; on a CPU there is no
such figure, so the peak is the fp32 GEMM rate measured in the same run (2048³ matmuls), and
MFU reads "share of this CPU's matmul speed".

    .venv/bin/python benchmarks/train_step.py                  # CPU: d=384, 6 layers, B=4, T=512
    .venv/bin/python benchmarks/train_step.py --quick          # smoke run
    .venv/bin/python benchmarks/train_step.py --device cuda    # ~374M, bf16, B=8, T=2048
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from common import finish, new_result, with_notes
from transformers import AutoModelForCausalLM

from zoo.configuration import HybridConfig, LlamaConfig, TNLConfig
from zoo.convert import to_hf_llama
from zoo.flops import model_flops
from zoo.recipe import Recipe
from zoo.training import PEAK_TFLOPS_BF16, train

SHAPES = {
    "cpu": dict(hidden=384, layers=6, heads=6, ffn=1024, vocab=4096, batch=4, seq=512, steps=25),
    "cuda": dict(
        hidden=1024, layers=24, heads=16, ffn=2816, vocab=32000, batch=8, seq=2048, steps=40
    ),
    "quick": dict(hidden=64, layers=3, heads=4, ffn=192, vocab=512, batch=2, seq=64, steps=10),
}


def _configs(s: dict[str, int]) -> dict[str, Any]:
    common = dict(
        hidden_size=s["hidden"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        intermediate_size=s["ffn"],
        vocab_size=s["vocab"],
        tie_word_embeddings=False,
        max_position_embeddings=max(2048, s["seq"]),
    )
    stripes = "(lightning:moe*2 attention:moe)*" + str(s["layers"] // 3)
    return {
        "zoo LLaMA": LlamaConfig(**common),
        "zoo TNL": TNLConfig(**common),
        "zoo striped MoE hybrid": HybridConfig.from_pattern(
            stripes,
            **{k: v for k, v in common.items() if k != "num_hidden_layers"},
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=s["ffn"] // 2,
        ),
    }


def measured_gemm_peak(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matmul on this device: the CPU's achievable peak."""
    a = torch.randn(2048, 2048, device=device, dtype=dtype)
    b = torch.randn(2048, 2048, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    start, repeats = time.perf_counter(), 8
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return repeats * 2 * 2048**3 / (time.perf_counter() - start)


def _recipe(
    s: dict[str, int], out: Path, precision: str, peak: float | None, compile_: bool = False
) -> Recipe:
    return Recipe.model_validate(
        {
            "model": {"preset": "llama"},  # replaced by the model handed to train()
            "data": {"source": "synthetic", "synthetic": {"train_docs": 4000}},
            "optimizer": {"lr": 1e-3},
            "schedule": {"kind": "constant", "warmup_steps": 0},
            "training": {
                "steps": s["steps"],
                "global_batch_tokens": s["batch"] * s["seq"],
                "micro_batch_size": s["batch"],
                "seq_len": s["seq"],
                "precision": precision,
                "peak_tflops": peak / 1e12 if peak else None,
                "compile": compile_,
            },
            "logging": {"log_every": max(1, s["steps"] // 5), "tensorboard": False},
            "output_dir": str(out),
            "source": "benchmarks/train_step.py",
        }
    )


ZOO_COMPILED, HF_COMPILED = "zoo LLaMA, compile: true", "transformers LlamaForCausalLM, compiled"


def bench(
    s: dict[str, int], device: torch.device, precision: str, peak: float | None, compiled: bool
):
    mixed = {"fp32": "no", "bf16": "bf16"}[precision]
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=mixed)
    torch.manual_seed(0)
    models: dict[str, torch.nn.Module] = {
        name: AutoModelForCausalLM.from_config(config) for name, config in _configs(s).items()
    }
    models["transformers LlamaForCausalLM"] = to_hf_llama(models["zoo LLaMA"])
    order = ["zoo LLaMA", "transformers LlamaForCausalLM", "zoo TNL", "zoo striped MoE hybrid"]
    if compiled:  # the same starting weights again
        models[ZOO_COMPILED] = copy.deepcopy(models["zoo LLaMA"])
        models[HF_COMPILED] = to_hf_llama(models[ZOO_COMPILED])
        order += [ZOO_COMPILED, HF_COMPILED]
    flops = {
        name: model_flops(m, s["seq"]).train_per_token
        for name, m in models.items()
        if name.startswith("zoo")
    }
    flops["transformers LlamaForCausalLM"] = flops["zoo LLaMA"]
    flops[HF_COMPILED] = flops["zoo LLaMA"]
    rows = {}
    for name in order:
        model = models[name]
        torch._dynamo.reset()
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as out:
            recipe = _recipe(
                s, Path(out), precision, peak, compile_=name in (ZOO_COMPILED, HF_COMPILED)
            )
            result = train(
                recipe,
                model=model,
                accelerator=accelerator,
                flops_per_token=flops[name],
                save_final=False,
                resume="never",
                echo=lambda _: None,
            )
            records = [
                r
                for r in map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines())
                if "tokens_per_s" in r
            ]
        per_window = [r["tokens_per_s"] for r in records[1:]] or [result.tokens_per_s]
        tokens_per_s = statistics.median(per_window)
        rows[name] = {
            "params": model.num_parameters(),
            "active_params": model.num_parameters(active=True)
            if name.startswith("zoo")
            else model.num_parameters(),
            "train_flops_per_token": flops[name],
            "tokens_per_s": tokens_per_s,
            "mfu": flops[name] * tokens_per_s / peak if peak else None,
            "final_loss": result.train_loss,
            "wall_s": time.perf_counter() - start,
        }
        del model
        models[name] = None
        accelerator.free_memory()  # drop the prepared model and optimizer before the next
    ratio = (
        rows["zoo LLaMA"]["tokens_per_s"] / rows["transformers LlamaForCausalLM"]["tokens_per_s"]
    )
    return rows, ratio


def table(result: dict[str, Any]) -> str:
    s, dev = result["shape"], result["device"]
    lines = [
        f"Training through zoo.training, {dev['name']} ({dev['type']}, {result['precision']}): "
        f"d={s['hidden']}, {s['layers']} layers, vocab {s['vocab']}, B={s['batch']}, "
        f"T={s['seq']}, {s['steps']} steps; peak {result['peak_tflops']:.2f} TFLOP/s "
        f"({result['peak_source']})",
        "",
        "| model | params (active) | train GFLOPs/token | tokens/s | MFU | wall (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, row in result["rows"].items():
        params = f"{row['params'] / 1e6:.1f}M"
        if row["active_params"] != row["params"]:
            params += f" ({row['active_params'] / 1e6:.1f}M)"
        mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "—"
        lines.append(
            f"| {name} | {params} | {row['train_flops_per_token'] / 1e9:.3f} | "
            f"{row['tokens_per_s']:,.0f} | {mfu} | {row.get('wall_s', float('nan')):.0f} |"
        )
    lines += ["", f"zoo LLaMA / transformers Llama, same loop: {result['llama_over_hf']:.2f}x"]
    return with_notes(lines, [], dev)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--no-compile", action="store_true", help="leave out the compiled LLaMA rows"
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    torch.set_num_threads(args.threads)
    shape = SHAPES["quick" if args.quick else device.type]
    precision = "bf16" if device.type == "cuda" else "fp32"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        tflops = next((v for k, v in PEAK_TFLOPS_BF16.items() if k in name), None)
        peak, source = (tflops * 1e12 if tflops else None), "data sheet, dense bf16"
        if peak is None:
            peak, source = measured_gemm_peak(device, torch.bfloat16), "measured bf16 GEMM"
    else:
        peak, source = measured_gemm_peak(device, torch.float32), "measured fp32 GEMM"
    start = time.perf_counter()
    result, out_path = new_result("train_step", device, args.threads, args.quick, args.out)
    result.update(
        {
            "shape": shape,
            "precision": precision,
            "peak_tflops": peak / 1e12,
            "peak_source": source,
        }
    )
    rows, ratio = bench(shape, device, precision, peak, compiled=not args.no_compile)
    result["rows"], result["llama_over_hf"] = rows, ratio
    result["goals"] = {
        "zoo_llama_vs_transformers_llama >= 1.0": {"value": ratio, "met": ratio >= 1.0}
    }
    if ZOO_COMPILED in rows:
        ours = rows[ZOO_COMPILED]["tokens_per_s"]
        over_eager = ours / rows["transformers LlamaForCausalLM"]["tokens_per_s"]
        over_compiled = ours / rows[HF_COMPILED]["tokens_per_s"]
        result["goals"]["zoo_compiled_vs_transformers_eager >= 1.2"] = {
            "value": over_eager, "met": over_eager >= 1.2,
        }  # fmt: skip
        result["goals"]["zoo_compiled_vs_transformers_compiled >= 1.0"] = {
            "value": over_compiled, "met": over_compiled >= 1.0,
        }  # fmt: skip
    if device.type == "cuda" and not args.quick:
        mfu = rows["zoo LLaMA"]["mfu"]
        result["goals"]["zoo_llama_mfu >= 0.45"] = {
            "value": mfu,
            "met": mfu is not None and mfu >= 0.45,
        }
    result["wall_s"] = time.perf_counter() - start
    finish(result, out_path, table)
    return result


if __name__ == "__main__":
    main()
