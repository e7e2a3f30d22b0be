"""The end-to-end demo behind `make demo` / `zoo demo`, on CPU in a few minutes.

For each family (a tiny LLaMA and a tiny TNL of the same width and depth by default): train on
the embedded synthetic corpus through the recipe loop (`zoo.training`, the one
`accelerate launch recipes/train.py` runs), measure held-out loss against the corpus' unigram
entropy, save a Hub-style folder (config.json, model.safetensors, tokenizer, generation config,
remote-code shim), reload it with `AutoModelForCausalLM.from_pretrained` in a fresh process and
generate from a prompt, then measure the cache a 2K-token context costs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from zoo import registry
from zoo.cache import cache_nbytes, new_cache
from zoo.card import card_for_run
from zoo.configuration import ZooConfig
from zoo.data import CorpusConfig, pack_tokens, synthetic_documents, unigram_entropy
from zoo.eval.retrieval import niah_grid
from zoo.modeling import ZooForCausalLM
from zoo.recipe import Recipe
from zoo.results import lm_eval_layout, write_json_atomic
from zoo.tokenizer import byte_tokenizer
from zoo.training import train

PROMPT = "recall: ka=17 mo=3 zu=88 ; mo?"


@dataclass
class DemoSettings:
    steps: int = 300
    """Optimizer steps per model."""
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    warmup: int = 30
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    eval_windows: int = 48
    """Held-out windows of `seq_len` tokens scored at the end."""
    seed: int = 0


@dataclass
class DemoResult:
    family: str
    path: str
    params: int
    active_params: int
    heldout_loss: float
    unigram_entropy: float
    train_tokens_per_s: float
    cache_bytes_per_token_2k: float
    niah_accuracy: float
    """Needle in a haystack in the corpus' own recall format (zoo.eval.retrieval), 64-128 tokens."""
    generated: str


def _demo_fields(family: str, settings: DemoSettings) -> dict:
    """Config fields of the tiny model of `family`: the same width and depth budget for all,
    adjusted by the family's registry entry (Mamba doubles its blocks, the hybrid stripes)."""
    shared = {
        "hidden_size": settings.hidden_size,
        "num_hidden_layers": settings.num_hidden_layers,
        "num_attention_heads": settings.num_attention_heads,
        "tie_word_embeddings": True,
    }
    return registry.family(family).demo_fields(shared)


def demo_config(family: str, settings: DemoSettings) -> ZooConfig:
    """The tiny model of `family` the demo trains."""
    return registry.family(family).config_class()(**_demo_fields(family, settings))


def demo_recipe(family: str, settings: DemoSettings, out_dir: Path) -> Recipe:
    """The recipe the demo trains `family` with: what a YAML under recipes/configs would say."""
    return Recipe.model_validate(
        {
            "model": {"preset": family, "overrides": _demo_fields(family, settings)},
            "data": {"source": "synthetic", "synthetic": {"seed": settings.seed}},
            "optimizer": {"lr": settings.lr, "weight_decay": 0.1, "betas": [0.9, 0.95]},
            "schedule": {"kind": "cosine", "warmup_steps": settings.warmup, "min_lr_ratio": 0.1},
            "training": {
                "steps": settings.steps,
                "global_batch_tokens": settings.batch_size * settings.seq_len,
                "micro_batch_size": settings.batch_size,
                "seq_len": settings.seq_len,
                "seed": settings.seed,
            },
            "logging": {
                "log_every": 10,
                "eval_batches": -(-settings.eval_windows // settings.batch_size),
                "tensorboard": False,
            },
            "output_dir": str(out_dir / family),
            "source": f"zoo demo ({family})",
        }
    )


@torch.inference_mode()
def cache_bytes_per_token(model: ZooForCausalLM, context: int = 2048) -> float:
    """Bytes of decode cache per context token after a `context`-token prefill."""
    model.eval()
    cache = new_cache(model.config)
    ids = torch.randint(0, 256, (1, context))
    model(ids, cache=cache, use_cache=True, logits_to_keep=1)
    return cache_nbytes(cache) / context


def generate_in_fresh_process(path: Path, prompt: str, max_new_tokens: int = 40) -> str:
    """`zoo generate` in a new interpreter: loading goes through the Auto classes from disk."""
    command = [sys.executable, "-m", "zoo.cli", "generate", str(path), "--prompt", prompt]
    command += ["--max-new-tokens", str(max_new_tokens)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"reloading {path} failed:\n{result.stderr[-3000:]}")
    return result.stdout.strip()


def run_demo(
    out_dir: Path,
    settings: DemoSettings,
    families: list[str],
    echo: Callable[[str], None] = print,
) -> list[DemoResult]:
    tokenizer = byte_tokenizer()
    echo("Generating the embedded synthetic corpus ...")
    corpus = CorpusConfig(seed=settings.seed)
    train_stream = pack_tokens(synthetic_documents("train", corpus), tokenizer)
    entropy = unigram_entropy(train_stream)
    echo(f"  {train_stream.numel():,} train tokens, unigram entropy {entropy:.3f} nats")
    results = []
    for family in families:
        run = train(demo_recipe(family, settings, out_dir), resume="never", echo=lambda _: None)
        model = AutoModelForCausalLM.from_pretrained(run.final_dir)
        generated = generate_in_fresh_process(run.final_dir, PROMPT)
        niah = niah_grid(model, tokenizer, (64, 128), (0.0, 0.5, 1.0), trials=4, style="corpus")[
            "mean_accuracy"
        ]
        result = DemoResult(
            family=family,
            path=str(run.final_dir),
            params=model.num_parameters(),
            active_params=model.num_parameters(active=True),
            heldout_loss=run.eval_loss,
            unigram_entropy=entropy,
            train_tokens_per_s=run.tokens_per_s,
            cache_bytes_per_token_2k=cache_bytes_per_token(model),
            niah_accuracy=niah,
            generated=generated,
        )
        scores = {"heldout": {"loss": run.eval_loss}, "niah": {"acc": niah}}
        write_json_atomic(
            run.output_dir / "eval" / "results.json",
            lm_eval_layout(
                scores,
                str(run.final_dir.relative_to(run.output_dir.parent)),
                configs={"niah": {"niah_style": "corpus"}},
            ),
        )
        card_for_run(run.output_dir, f"zoo-demo-{family}")
        echo(
            f"  {family}: held-out loss {run.eval_loss:.3f} nats; reloaded and generated: "
            f"{generated!r}"
        )
        results.append(result)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {"settings": asdict(settings), "results": [asdict(r) for r in results]}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return results
