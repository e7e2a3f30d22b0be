"""Retrieval probes: multi-query associative recall (MQAR) and needle-in-a-haystack (NIAH).

MQAR follows Zoology's generator (`zoology/data/multiquery_ar.py` at d88d6f5; shared/papers/
mqar.md §1): K distinct keys from [1, V/2) and K distinct values from [V/2, V) laid out as
k1 v1 … kK vK, then a query region where each key reappears once at a power-law-distributed slot
(p(g) ∝ a·g^(a−1), a = 0.01 favours early slots); the label of a query is its value, at the
query's position, and every other position is ignored. Fillers are 0, or uniform random tokens
with `random_non_queries` (Zoology's current default). Accuracy is per query, averaged per
(sequence length, number of pairs) cell. `train_mqar` trains a 2-layer model of a zoo
architecture on a mixed set and scores it on a grid, as Zoology's sweeps do (scaled to a CPU).

NIAH hides a passkey ("The pass key is 52817. Remember it.") at a relative depth of generated
filler text (the embedded corpus' grammar) and asks for it back; a cell of the grid is the share
of trials whose greedy continuation contains the passkey. `niah_heatmap` draws the grid.
Everything is generated offline from a seed.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from zoo.eval.mad import IGNORE, architecture_config
from zoo.training import supervised_step

# ---------------------------------------------------------------------------------------------
# MQAR


def multiquery_ar(
    vocab_size: int,
    num_examples: int,
    input_seq_len: int,
    seed: int,
    num_kv_pairs: int = 8,
    power_a: float = 0.01,
    random_non_queries: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels), both (num_examples, input_seq_len); see the module docstring."""
    L, K = input_seq_len, num_kv_pairs
    if L % 2:
        raise ValueError(f"input_seq_len={L} must be even")
    if vocab_size <= L:
        raise ValueError(f"vocab_size={vocab_size} must exceed input_seq_len={L}")
    if 4 * K > L:
        raise ValueError(f"num_kv_pairs={K} needs input_seq_len >= 4 · K = {4 * K}")
    rng = np.random.default_rng(seed)
    context = 2 * K
    key_pool, value_pool = np.arange(1, vocab_size // 2), np.arange(vocab_size // 2, vocab_size)
    keys = np.stack([rng.choice(key_pool, K, replace=False) for _ in range(num_examples)])
    values = np.stack([rng.choice(value_pool, K, replace=False) for _ in range(num_examples)])
    kvs = np.zeros((num_examples, context), dtype=np.int64)
    kvs[:, 0::2], kvs[:, 1::2] = keys, values
    space = (L - context) // 2
    g = np.arange(1, space + 1, dtype=np.float64)
    p = power_a * g ** (power_a - 1)
    p /= p.sum()
    slots = np.stack([rng.choice(space, K, replace=False, p=p) for _ in range(num_examples)])
    queries = np.zeros((num_examples, L - context + 1), dtype=np.int64)
    rows = np.arange(num_examples)[:, None]
    queries[rows, 2 * slots] = keys
    full = np.concatenate([kvs, queries], axis=1)
    labels = np.full((num_examples, L + 1), IGNORE, dtype=np.int64)
    labels[rows, context + 2 * slots + 1] = values
    inputs, labels = full[:, :-1], labels[:, 1:]
    if random_non_queries:
        fillers = inputs == 0
        inputs[fillers] = rng.integers(0, vocab_size, size=int(fillers.sum()))
    return torch.from_numpy(inputs), torch.from_numpy(labels)


@dataclass
class MQARSettings:
    """Zoology's recipe scaled to a CPU: 2 layers, width 64-128, AdamW (wd 0.1), cosine, lr sweep
    replaced by one value; train on a mixture of (L, K) cells, test on a grid."""

    vocab_size: int = 256
    width: int = 64
    train_cells: tuple[tuple[int, int], ...] = ((32, 4), (64, 8))
    num_train: int = 2000
    test_cells: tuple[tuple[int, int], ...] = ((32, 4), (64, 4), (64, 8), (128, 16))
    num_test: int = 100
    epochs: int = 8
    batch_size: int = 32
    lr: float = 1e-3
    seed: int = 123


def mqar_accuracy(model: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> float:
    """Zoology's metric: per example, the share of its queries answered; then the mean."""
    model.eval()
    per_example = []
    with torch.no_grad():
        for start in range(0, inputs.shape[0], 64):
            x, y = inputs[start : start + 64], labels[start : start + 64]
            pred = model(input_ids=x, use_cache=False).logits.argmax(-1)
            mask = y != IGNORE
            hits = ((pred == y) & mask).sum(-1).float() / mask.sum(-1).clamp(min=1)
            per_example += hits.tolist()
    return float(np.mean(per_example))


def mqar_grid(
    model: torch.nn.Module,
    vocab_size: int = 256,
    cells: tuple[tuple[int, int], ...] = ((32, 4), (64, 8), (128, 16)),
    num_examples: int = 100,
    seed: int = 2**31,
) -> dict[str, float]:
    """Zero-shot MQAR accuracy of an already trained model per (L, K) cell (token ids < V)."""
    grid = {}
    for i, (length, pairs) in enumerate(tqdm(cells, desc="mqar cells", unit="cell")):
        inputs = multiquery_ar(vocab_size, num_examples, length, seed + i, pairs)
        grid[f"L={length},K={pairs}"] = mqar_accuracy(model, *inputs)
    return grid


def mqar_plot(accuracy: dict[str, dict[str, float]], path: Any, title: str = "MQAR") -> Any:
    """Accuracy per (L, K) cell, one group of bars per cell and one bar per model, PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(accuracy)
    cells = list(next(iter(accuracy.values()))) if accuracy else []
    width = 0.8 / max(len(names), 1)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.3 * len(cells) * max(1, len(names) / 2)), 3.2))
    for j, name in enumerate(names):
        xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(cells))]
        ax.bar(xs, [accuracy[name].get(c, 0.0) for c in cells], width, label=name)
    ax.set_xticks(range(len(cells)), cells)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    if len(names) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def train_mqar(architecture: str, settings: MQARSettings | None = None) -> dict[str, Any]:
    """Train `architecture` (a MAD architecture name or layer pattern) on MQAR; accuracy per
    test (L, K) cell. MoE architectures train with their router losses (`supervised_step`)."""
    s = settings or MQARSettings()
    config = architecture_config(architecture, s.vocab_size, s.width)
    torch.manual_seed(s.seed)
    model = AutoModelForCausalLM.from_config(config)
    per_cell = s.num_train // len(s.train_cells)
    train_sets = [
        multiquery_ar(s.vocab_size, per_cell, length, s.seed + i, pairs)
        for i, (length, pairs) in enumerate(s.train_cells)
    ]
    steps_per_epoch = sum(math.ceil(x.shape[0] / s.batch_size) for x, _ in train_sets)
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, s.epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(s.seed)
    model.train()
    bar = tqdm(total=s.epochs * steps_per_epoch, desc=f"mqar: {architecture}", unit="step")
    for _ in range(s.epochs):
        batches = [
            (x[idx], y[idx])
            for x, y in train_sets
            for idx in torch.randperm(x.shape[0], generator=generator).split(s.batch_size)
        ]
        for i in torch.randperm(len(batches), generator=generator).tolist():
            supervised_step(model, optimizer, *batches[i], scheduler)
            bar.update()
    bar.close()
    cells = {}
    for length, pairs in s.test_cells:
        x, y = multiquery_ar(s.vocab_size, s.num_test, length, 2**31 + s.seed, pairs)
        cells[f"L={length},K={pairs}"] = mqar_accuracy(model, x, y)
    state = model.state_size(1, max(length for length, _ in s.test_cells))
    return {"architecture": architecture, "accuracy": cells, "state_size": state}


# ---------------------------------------------------------------------------------------------
# Needle in a haystack


def _filler(rng: random.Random, tokens: int, tokenizer: PreTrainedTokenizerBase) -> str:
    from zoo.data import sentence  # the embedded corpus' grammar

    text = ""
    while len(tokenizer(text, add_special_tokens=False)["input_ids"]) < tokens:
        text += sentence(rng) + " "
    return text


# (needle, question) templates: the usual passkey wording, and the embedded corpus' own recall
# format, which the demo's tiny byte models were trained on.
NEEDLES = {
    "passkey": (
        " The pass key is {key}. Remember it. {key} is the pass key. ",
        " What is the pass key? The pass key is",
    ),
    "corpus": (" recall: qv={key} ; ", " qv?"),
}


def niah_prompt(
    tokenizer: PreTrainedTokenizerBase,
    context_len: int,
    depth: float,
    seed: int,
    style: str = "passkey",
) -> tuple[str, str]:
    """(prompt, key): ~`context_len` tokens of filler with the needle at relative `depth`
    (0 = start, 1 = end), ending with the question (`NEEDLES[style]`)."""
    if style not in NEEDLES:
        raise ValueError(f"unknown NIAH style {style!r}; known: {sorted(NEEDLES)}")
    rng = random.Random(seed)
    passkey = str(rng.randint(10_000, 99_999) if style == "passkey" else rng.randint(10, 99))
    needle, question = (part.format(key=passkey) for part in NEEDLES[style])
    budget = context_len - len(tokenizer(needle + question)["input_ids"])
    filler = _filler(rng, max(budget, 0), tokenizer)
    ids = tokenizer(filler, add_special_tokens=False)["input_ids"][: max(budget, 0)]
    cut = round(depth * len(ids))
    before, after = tokenizer.decode(ids[:cut]), tokenizer.decode(ids[cut:])
    return before + needle + after + question, passkey


def niah_grid(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    context_lengths: tuple[int, ...] = (128, 256, 512),
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0),
    trials: int = 3,
    seed: int = 0,
    style: str = "passkey",
) -> dict[str, Any]:
    """Share of trials whose greedy continuation contains the passkey, per (length, depth)."""
    model.eval()
    grid = np.zeros((len(context_lengths), len(depths)))
    for i, length in enumerate(context_lengths):
        for j, depth in enumerate(depths):
            hits = 0
            for trial in range(trials):
                prompt, passkey = niah_prompt(tokenizer, length, depth, seed * 1000 + trial, style)
                inputs = tokenizer(prompt, return_tensors="pt")
                with torch.no_grad():
                    out = model.generate(
                        **inputs,
                        max_new_tokens=len(passkey) + 2,
                        do_sample=False,
                        pad_token_id=tokenizer.pad_token_id,
                    )
                answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :])
                hits += passkey in answer
            grid[i, j] = hits / trials
    return {
        "context_lengths": list(context_lengths),
        "depths": list(depths),
        "trials": trials,
        "style": style,
        "accuracy": grid.tolist(),
        "mean_accuracy": float(grid.mean()),
    }


def niah_heatmap(result: dict[str, Any], path: Any, title: str = "needle in a haystack") -> Any:
    """Accuracy heat-map: context length (rows) × needle depth (columns), PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = np.array(result["accuracy"])
    fig, ax = plt.subplots(figsize=(1.2 * len(result["depths"]) + 2, 0.6 * len(grid) + 1.8))
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(result["depths"])), [f"{d:.0%}" for d in result["depths"]])
    ax.set_yticks(range(len(grid)), [str(n) for n in result["context_lengths"]])
    ax.set_xlabel("needle depth")
    ax.set_ylabel("context tokens")
    for (i, j), value in np.ndenumerate(grid):
        ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=ax, label="accuracy")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
