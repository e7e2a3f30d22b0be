"""The end-to-end demo behind `make demo` / `zoo demo`, on CPU in a few minutes.

For each family (a tiny LLaMA and a tiny TNL of the same width and depth): train on the embedded
synthetic corpus, measure held-out loss against the corpus' unigram entropy, save a Hub-style
folder (config.json, model.safetensors, tokenizer, generation config, remote-code shim), reload
it with `AutoModelForCausalLM.from_pretrained` in a fresh process and generate from a prompt,
then measure the cache a 2K-token context costs.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, GenerationConfig

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
from zoo.data import (
    CorpusConfig,
    TokenBatches,
    pack_tokens,
    sequential_windows,
    synthetic_documents,
    unigram_entropy,
)
from zoo.modeling import ZooForCausalLM
from zoo.tokenizer import byte_tokenizer

DEMO_FAMILIES: dict[str, type[ZooConfig]] = {
    "llama": LlamaConfig,
    "tnl": TNLConfig,
    "hgrn2": HGRN2Config,
    "cosformer2": CosFormer2Config,
    "mamba": MambaConfig,
    "hyena": HyenaConfig,
    "hybrid": HybridConfig,
}
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
    generated: str


def demo_config(family: str, settings: DemoSettings) -> ZooConfig:
    """The tiny model of `family` the demo trains: same width and depth budget for all."""
    fields = {
        "hidden_size": settings.hidden_size,
        "num_hidden_layers": settings.num_hidden_layers,
        "num_attention_heads": settings.num_attention_heads,
        "tie_word_embeddings": True,
    }
    if family == "hgrn2":
        fields["hgrn2_expand_ratio"] = settings.hidden_size // settings.num_attention_heads
    elif family == "mamba":
        # No channel mixer: two Mamba blocks hold about one Transformer layer's parameters.
        fields["num_hidden_layers"] = 2 * settings.num_hidden_layers
    elif family == "hybrid":
        # MAD's best stripes: three TNL blocks, then one attention block (25% attention), every
        # channel mixer a MoE layer. Top-2 of 4 experts of half the dense width: the active
        # channel-mixer compute of one dense SwiGLU (iso-active), twice its parameters.
        n = settings.num_hidden_layers
        dense = LlamaConfig(**fields)
        fields["mixers"] = ["lightning"] * (n - 1) + ["attention"]
        fields["channel_mixers"] = ["moe"] * n
        fields["num_experts"], fields["num_experts_per_tok"] = 4, 2
        fields["moe_intermediate_size"] = dense.intermediate_size // 2
    return DEMO_FAMILIES[family](**fields)


def lr_at(step: int, settings: DemoSettings) -> float:
    """Linear warmup, then cosine decay to a tenth of the peak."""
    if step < settings.warmup:
        return settings.lr * (step + 1) / settings.warmup
    progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
    return settings.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def train(
    model: ZooForCausalLM, batches: Iterator[torch.Tensor], settings: DemoSettings, desc: str
) -> float:
    """Train in place; returns training tokens per second."""
    # Weight decay on matrices only, and never on parameters a mixer exempts (Mamba's A and D).
    exempt = {
        id(getattr(module, name))
        for module in model.modules()
        for name in getattr(module, "no_weight_decay_params", ())
    }
    decay = [p for p in model.parameters() if p.dim() >= 2 and id(p) not in exempt]
    no_decay = [p for p in model.parameters() if p.dim() < 2 or id(p) in exempt]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.lr,
        betas=(0.9, 0.95),
    )
    model.train()
    start = time.perf_counter()
    progress = tqdm(range(settings.steps), desc=desc, unit="step", dynamic_ncols=True)
    for step in progress:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, settings)
        window = next(batches)  # (B, T + 1)
        loss = model(window, labels=window, use_cache=False).loss  # labels shift inside
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 10 == 0 or step == settings.steps - 1:
            progress.set_postfix(loss=f"{loss.item():.3f}")
    elapsed = time.perf_counter() - start
    return settings.steps * settings.batch_size * settings.seq_len / elapsed


@torch.inference_mode()
def heldout_loss(model: ZooForCausalLM, stream: torch.Tensor, settings: DemoSettings) -> float:
    """Mean next-token loss (nats) over the first `eval_windows` held-out windows."""
    model.eval()
    total, count = 0.0, 0
    for i, window in enumerate(sequential_windows(stream, settings.seq_len)):
        if i == settings.eval_windows:
            break
        tokens = window.shape[1] - 1
        total += model(window, labels=window, use_cache=False).loss.item() * tokens
        count += tokens
    return total / count


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
    torch.manual_seed(settings.seed)
    tokenizer = byte_tokenizer()
    corpus = CorpusConfig(seed=settings.seed)
    echo("Generating the embedded synthetic corpus ...")
    train_stream = pack_tokens(synthetic_documents("train", corpus), tokenizer)
    heldout_stream = pack_tokens(synthetic_documents("validation", corpus), tokenizer)
    entropy = unigram_entropy(train_stream)
    echo(
        f"  {train_stream.numel():,} train tokens, {heldout_stream.numel():,} held-out tokens, "
        f"unigram entropy {entropy:.3f} nats"
    )
    results = []
    for family in families:
        config = demo_config(family, settings)
        torch.manual_seed(settings.seed)
        model = AutoModelForCausalLM.from_config(config)
        batches = TokenBatches(
            train_stream, settings.batch_size, settings.seq_len, seed=settings.seed
        )
        tokens_per_s = train(model, batches, settings, desc=f"train {family}")
        loss = heldout_loss(model, heldout_stream, settings)
        path = out_dir / family
        model.generation_config = GenerationConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            max_new_tokens=40,
            do_sample=False,
        )
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        generated = generate_in_fresh_process(path, PROMPT)
        result = DemoResult(
            family=family,
            path=str(path),
            params=model.num_parameters(),
            active_params=model.num_parameters(active=True),
            heldout_loss=loss,
            unigram_entropy=entropy,
            train_tokens_per_s=tokens_per_s,
            cache_bytes_per_token_2k=cache_bytes_per_token(model),
            generated=generated,
        )
        echo(f"  {family}: held-out loss {loss:.3f} nats; reloaded and generated: {generated!r}")
        results.append(result)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {"settings": asdict(settings), "results": [asdict(r) for r in results]}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return results
