"""MAD: the six synthetic tasks of Mechanistic Architecture Design (Poli et al., arXiv 2403.17844)
and its protocol: train a small model per task, score accuracy on the target positions only,
average into a MAD score per architecture.

The generators follow mad-lab (`mad/data/instances.py` at 0f49a45; shared/papers/mad.md §2):
each is a free function of a `numpy.random.Generator` and the task's settings returning
`(inputs, targets)` int64 arrays, with `IGNORE = -100` at unscored positions. Recall tasks train
on every next token of the sequence (`is_training=True`) and test only on recall positions, as
mad-lab does. Train and test sets come from one seeded stream, train first.

What differs from mad-lab, and why:
* Selective copying draws its blank positions from the seeded generator (mad-lab uses the global
  `np.random`, so its sets are not reproducible from the seed).
* The protocol is scaled to a CPU: one learning rate and weight decay instead of MAD's 3 × 2 grid,
  a few epochs over smaller train sets (`MADSettings`); the generator settings themselves are the
  paper's baseline row unless a sweep setting is asked for (`DIFFICULTY_SWEEP`).
* Accuracy is reported both per position (`accuracy`) and class-averaged (`macro_accuracy`, what
  mad-lab's torchmetrics `MulticlassAccuracy(average="macro")` computes); the MAD score is the
  mean of the per-task `accuracy`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from zoo import registry
from zoo.configuration import HybridConfig, ZooConfig, parse_layer_pattern
from zoo.training import IGNORE_INDEX as IGNORE
from zoo.training import supervised_step

Instance = tuple[np.ndarray, np.ndarray]


# ---------------------------------------------------------------------------------------------
# Generators


def in_context_recall(
    rng: np.random.Generator,
    vocab_size: int = 16,
    seq_len: int = 128,
    noise_vocab_size: int = 0,
    frac_noise: float = 0.0,
    is_training: bool = True,
) -> Instance:
    """Key-value pairs; a repeated key must be followed by its value (multi-query).

    Content tokens [0, V') with V' = V − noise_vocab_size: keys the lower half, values the upper.
    S/2 slots of (key, value): the first S/2 − 1 draw keys with replacement, a key's value is drawn
    at its first use and then fixed; the last slot repeats a key already seen. With
    `frac_noise`, each slot but one random real one becomes two noise tokens [V', V) with that
    probability (noisy recall). Inputs are the first S − 1 tokens. Training targets: every next
    token (noise targets ignored); test targets: the value after each repeated key.
    """
    if seq_len % 2:
        raise ValueError(f"seq_len={seq_len} must be even")
    content = vocab_size - noise_vocab_size
    keys = np.arange(content // 2)
    values = np.arange(content // 2, content)
    slots = seq_len // 2
    kv: dict[int, int] = {}
    real_slot = int(rng.integers(slots - 1))
    seq, is_noise, is_repeat = [], [], []
    for slot in range(slots - 1):
        if frac_noise > 0 and slot != real_slot and rng.random() < frac_noise:
            noise = rng.integers(content, vocab_size, size=2)
            seq += noise.tolist()
            is_noise += [True, True]
            is_repeat += [False, False]
            continue
        key = int(rng.choice(keys))
        repeat = key in kv
        if not repeat:
            kv[key] = int(rng.choice(values))
        seq += [key, kv[key]]
        is_noise += [False, False]
        is_repeat += [repeat, False]
    key = int(rng.choice(list(kv)))
    seq += [key, kv[key]]
    is_noise += [False, False]
    is_repeat += [True, False]
    seq_arr = np.array(seq)
    inputs = seq_arr[:-1]
    if is_training:
        targets = seq_arr[1:].copy()
        targets[np.array(is_noise[1:])] = IGNORE
    else:
        targets = np.full(seq_len - 1, IGNORE)
        repeats = np.flatnonzero(np.array(is_repeat[:-1]))
        targets[repeats] = seq_arr[repeats + 1]
    return inputs, targets


def noisy_in_context_recall(
    rng: np.random.Generator,
    vocab_size: int = 32,
    seq_len: int = 128,
    noise_vocab_size: int = 16,
    frac_noise: float = 0.2,
    is_training: bool = True,
) -> Instance:
    """In-context recall with noise tokens between the pairs (MAD baseline: V 32 incl. 16 noise)."""
    return in_context_recall(rng, vocab_size, seq_len, noise_vocab_size, frac_noise, is_training)


def fuzzy_in_context_recall(
    rng: np.random.Generator,
    vocab_size: int = 16,
    seq_len: int = 128,
    k_motif_size: int = 3,
    v_motif_size: int = 3,
    is_training: bool = True,
) -> Instance:
    """Recall where keys and values are motifs: tuples of 1..k (1..v) distinct tokens.

    Pad token V − 1; key tokens [0, (V−1)/2), value tokens the rest below the pad. A probe pair
    (a key of full length k at test time) is inserted at a random point and repeated at the end;
    the sequence is left-padded to S + 1. Training targets: every next token but padding; test
    targets: every value token that follows a repeated key.
    """
    pad = vocab_size - 1
    key_tokens = np.arange((vocab_size - 1) // 2)
    value_tokens = np.arange((vocab_size - 1) // 2, vocab_size - 1)

    def motif(tokens: np.ndarray, max_len: int, length: int | None = None) -> tuple[int, ...]:
        n = length if length is not None else int(rng.integers(1, max_len + 1))
        return tuple(int(t) for t in rng.choice(tokens, size=n, replace=False))

    kv: dict[tuple[int, ...], tuple[int, ...]] = {}

    def pair(key: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...], bool]:
        repeat = key in kv
        if not repeat:
            kv[key] = motif(value_tokens, v_motif_size)
        return key, kv[key], repeat

    probe_key = motif(key_tokens, k_motif_size, k_motif_size if not is_training else None)
    probe = pair(probe_key)
    probe_len = len(probe[0]) + len(probe[1])
    pairs = []
    # Room for the inserted probe, its repeat at the end and one more pair of maximal length.
    while sum(len(k) + len(v) for k, v, _ in pairs) < seq_len - 2 * probe_len - (
        k_motif_size + v_motif_size
    ):
        pairs.append(pair(motif(key_tokens, k_motif_size)))
    pairs.insert(int(rng.integers(len(pairs) + 1)), (probe[0], probe[1], False))
    pairs.append((probe[0], probe[1], True))
    tokens, scored = [], []
    for key, value, repeat in pairs:
        tokens += [*key, *value]
        scored += [False] * len(key) + [repeat] * len(value)
    padding = seq_len + 1 - len(tokens)
    tokens = [pad] * padding + tokens
    scored = [False] * padding + scored
    seq = np.array(tokens)
    inputs, targets = seq[:-1], seq[1:].copy()
    if is_training:
        targets[: max(0, padding - 1)] = IGNORE
    else:
        targets[~np.array(scored[1:])] = IGNORE
    return inputs, targets


def selective_copying(
    rng: np.random.Generator,
    vocab_size: int = 16,
    seq_len: int = 256,
    num_tokens_to_copy: int = 16,
    is_training: bool = True,
) -> Instance:
    """Copy the content tokens, in order, once the copy token appears; blanks sit between them.

    Copy token V − 1, blank V − 2, content [0, V − 2). n tokens (with replacement) with S − 2n − 1
    blanks at random positions among them, then the copy token, then n blanks whose targets are
    the n tokens in order; all earlier targets are ignored. The same for train and test.
    """
    n = num_tokens_to_copy
    if seq_len <= 2 * n + 1:
        raise ValueError(f"seq_len={seq_len} must exceed 2 · num_tokens_to_copy + 1 = {2 * n + 1}")
    copy_token, blank = vocab_size - 1, vocab_size - 2
    to_copy = rng.integers(0, vocab_size - 2, size=n)
    region = np.full(seq_len - n - 1, blank)
    positions = np.sort(rng.choice(seq_len - n - 1, size=n, replace=False))
    region[positions] = to_copy
    inputs = np.concatenate([region, [copy_token], np.full(n, blank)])
    targets = np.concatenate([np.full(seq_len - n, IGNORE), to_copy])
    return inputs, targets


def compression(
    rng: np.random.Generator, vocab_size: int = 16, seq_len: int = 32, is_training: bool = True
) -> Instance:
    """S − 1 random tokens and a compression token V − 1; the target is the whole input, decoded
    from the last position's state alone (see `AutoEncoder`)."""
    inputs = np.concatenate([rng.integers(0, vocab_size - 1, size=seq_len - 1), [vocab_size - 1]])
    return inputs, inputs.copy()


def memorization_map(vocab_size: int, seed: int) -> dict[int, int]:
    """The fixed fact table of the memorization task: keys [0, (V−1)/2) to a shuffled upper half."""
    rng = np.random.default_rng(seed)
    keys = np.arange((vocab_size - 1) // 2)
    values = rng.permutation(np.arange((vocab_size - 1) // 2, vocab_size - 1))[: len(keys)]
    return dict(zip(keys.tolist(), values.tolist(), strict=True))


def memorization(
    rng: np.random.Generator,
    vocab_size: int = 256,
    seq_len: int = 32,
    kv_map: dict[int, int] | None = None,
    is_training: bool = True,
) -> Instance:
    """Recall facts stored in the weights: S/2 pairs [key, insert]; the target at each insert token
    V − 1 is the key's value in a table fixed for the whole dataset (`memorization_map`)."""
    kv_map = kv_map if kv_map is not None else memorization_map(vocab_size, 0)
    keys = rng.choice(np.array(list(kv_map)), size=seq_len // 2)
    inputs = np.stack([keys, np.full_like(keys, vocab_size - 1)], axis=1).reshape(-1)
    values = np.array([kv_map[int(k)] for k in keys])
    targets = np.stack([np.full_like(keys, IGNORE), values], axis=1).reshape(-1)
    return inputs, targets


# name -> (generator, baseline settings of the MAD paper's table)
TASKS: dict[str, tuple[Callable[..., Instance], dict[str, Any]]] = {
    "in_context_recall": (in_context_recall, {"vocab_size": 16, "seq_len": 128}),
    "fuzzy_in_context_recall": (
        fuzzy_in_context_recall,
        {"vocab_size": 16, "seq_len": 128, "k_motif_size": 3, "v_motif_size": 3},
    ),
    "noisy_in_context_recall": (
        noisy_in_context_recall,
        {"vocab_size": 32, "seq_len": 128, "noise_vocab_size": 16, "frac_noise": 0.2},
    ),
    "selective_copying": (
        selective_copying,
        {"vocab_size": 16, "seq_len": 256, "num_tokens_to_copy": 16},
    ),
    "compression": (compression, {"vocab_size": 16, "seq_len": 32}),
    "memorization": (memorization, {"vocab_size": 256, "seq_len": 32}),
}
BASELINE_TRAIN_SIZE = {name: 12_800 for name in TASKS} | {"memorization": 256}


def _sweep() -> dict[str, list[dict[str, Any]]]:
    """MAD's difficulty sweep (shared/papers/mad.md §3): the baseline, then one change at a time."""
    sizes = [6400, 3200, 1600, 800]
    sweep: dict[str, list[dict[str, Any]]] = {}
    for name in ("in_context_recall", "fuzzy_in_context_recall"):
        sweep[name] = (
            [{}]
            + [{"vocab_size": v} for v in (32, 64, 128)]
            + [{"seq_len": s} for s in (256, 512, 1024)]
            + [{"train_size": n} for n in sizes]
        )
    sweep["noisy_in_context_recall"] = (
        [{}]
        + [{"vocab_size": v} for v in (48, 80, 144)]
        + [{"seq_len": s} for s in (256, 512, 1024)]
        + [{"train_size": n} for n in sizes]
        + [{"frac_noise": f} for f in (0.4, 0.6, 0.8)]
    )
    sweep["selective_copying"] = (
        [{}]
        + [{"vocab_size": v} for v in (32, 64, 128)]
        + [{"seq_len": s} for s in (512, 1024)]
        + [{"train_size": n} for n in sizes]
        + [{"num_tokens_to_copy": n} for n in (32, 64, 96)]
    )
    sweep["compression"] = (
        [{}]
        + [{"vocab_size": v} for v in (32, 64, 128)]
        + [{"seq_len": s} for s in (64, 128, 256)]
        + [{"train_size": n} for n in sizes]
    )
    sweep["memorization"] = [{}] + [{"vocab_size": v} for v in (512, 1024, 2048, 4096, 8192)]
    return sweep


DIFFICULTY_SWEEP = _sweep()


def make_dataset(
    task: str, num_train: int, num_test: int, seed: int = 12345, **settings: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train inputs, train targets, test inputs, test targets) of `task` with the baseline
    settings updated by `settings`; train is drawn first, then test, from one seeded stream."""
    if task not in TASKS:
        raise ValueError(f"unknown MAD task {task!r}; known: {sorted(TASKS)}")
    generator, baseline = TASKS[task]
    kwargs = {**baseline, **settings}
    if task == "memorization":
        kwargs.setdefault("kv_map", memorization_map(kwargs["vocab_size"], seed))
    rng = np.random.default_rng(seed)

    def draw(n: int, training: bool) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [generator(rng, **kwargs, is_training=training) for _ in range(n)]
        return (
            torch.from_numpy(np.stack([r[0] for r in rows])).long(),
            torch.from_numpy(np.stack([r[1] for r in rows])).long(),
        )

    return (*draw(num_train, True), *draw(num_test, False))


# ---------------------------------------------------------------------------------------------
# Architectures and the protocol


# MAD's standard model: 2 blocks of [sequence mixer, channel mixer] at width 128 (4 MAD layers),
# each zoo block one such pair with a SwiGLU channel mixer: every registered sequence mixer is
# an architecture of that shape, under its own name. The striped hybrids put attention in the
# second block; the -moe ones use MoE channel mixers (mad-lab's moe-mlp).
STRIPES: dict[str, str] = {
    "striped-hyena": "hyena:swiglu attention:swiglu",
    "striped-hyena-moe": "hyena:moe attention:moe",
    "striped-mamba-moe": "mamba:moe attention:moe",
}


def architectures() -> list[str]:
    """The named architectures: every registered sequence mixer, then the stripes. Any layer
    pattern (`"lightning:swiglu attention:moe"`) is an architecture too."""
    return [*registry.sequence_mixers(), *STRIPES]


def architecture_config(architecture: str, vocab: int, width: int) -> ZooConfig:
    """The model of an architecture (a name of `architectures()` or a layer pattern) for a task
    with `vocab` tokens at MAD width `width`; MoE layers get mad-lab's expert settings."""
    if architecture in registry.sequence_mixers():
        pattern = f"{architecture}:swiglu*2"
    else:
        pattern = STRIPES.get(architecture, architecture)
    try:
        _, channel_mixers = parse_layer_pattern(pattern)
        moe = any(registry.channel_mixer(c).routed for c in channel_mixers)
        return HybridConfig.from_pattern(
            pattern, **_base(vocab, width), **(_moe(width) if moe else {})
        )
    except ValueError as error:
        raise ValueError(
            f"unknown architecture {architecture!r}: not one of {architectures()} and not a "
            f"layer pattern ({error})"
        ) from None


def _base(vocab: int, width: int) -> dict[str, Any]:
    return {
        "vocab_size": vocab,
        "hidden_size": width,
        "num_attention_heads": 4,
        "intermediate_size": 16 * math.ceil(int(8 * width / 3) / 16),  # mad-lab's SwiGLU width
        "max_position_embeddings": 2048,
        "hyena_filter_order": 32,
        "tie_word_embeddings": False,  # an unembedding of its own, as mad-lab's models have
        "pad_token_id": None,
        "bos_token_id": None,
        "eos_token_id": None,
    }


def _moe(width: int) -> dict[str, Any]:
    # mad-lab's moe-mlp: 8 experts, top-2, expert width 16 at d=128 (scaled with the width).
    return {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": width // 8}


class AutoEncoder(nn.Module):
    """mad-lab's compression backbone: the layer stack encodes, the last position's state is the
    code, and a small decoder reads it back at every position (code + fixed sin-cos position
    embedding → [norm, Linear, GELU] × 2 → norm → unembed)."""

    def __init__(self, config: ZooConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = AutoModelForCausalLM.from_config(config)
        d = config.hidden_size
        layers: list[nn.Module] = []
        for _ in range(2):
            layers += [nn.LayerNorm(d), nn.Linear(d, d), nn.GELU()]
        self.decoder = nn.Sequential(*layers, nn.LayerNorm(d), nn.Linear(d, config.vocab_size))

    @staticmethod
    def positions(length: int, width: int, device: torch.device) -> torch.Tensor:
        pos = torch.arange(length, device=device, dtype=torch.float32)[:, None]
        freq = torch.exp(torch.arange(0, width, 2, device=device) * (-math.log(1e4) / width))
        table = torch.zeros(length, width, device=device)
        table[:, 0::2] = torch.sin(pos * freq)
        table[:, 1::2] = torch.cos(pos * freq[: width // 2])
        return table

    def forward(self, input_ids: torch.Tensor, **kwargs: Any) -> MoeCausalLMOutputWithPast:
        """The decoded logits, and the encoder's router logits (MoE layers) for their losses."""
        outputs = self.encoder.model(input_ids=input_ids, use_cache=False)
        hidden = outputs.last_hidden_state
        code = hidden[:, -1:]
        length, width = input_ids.shape[1], hidden.shape[-1]
        logits = self.decoder(code + self.positions(length, width, input_ids.device))
        return MoeCausalLMOutputWithPast(
            logits=logits, router_logits=getattr(outputs, "router_logits", None)
        )


@dataclass
class MADSettings:
    """The protocol, scaled to a CPU. mad-lab: width 128, batch 128, AdamW with lr in
    {1e-4, 5e-4, 1e-3} × wd in {0, 0.1}, cosine to 1e-6, up to 200 epochs, 12,800 / 1,280."""

    width: int = 64
    num_train: int = 2_000
    num_test: int = 256
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.1
    seed: int = 12345
    task_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per-task generator settings on top of the baseline (e.g. shorter sequences on a CPU)."""


# Protocol scales: "paper" is mad-lab's (one point of its lr × wd grid), "cpu" fits the whole
# suite over nine architectures in well under an hour on 2 cores (shorter sequences, fewer and
# shorter runs), "quick" is a smoke test.
MAD_SCALES: dict[str, MADSettings] = {
    "paper": MADSettings(
        width=128, num_train=12_800, num_test=1_280, epochs=200, batch_size=128, lr=5e-4
    ),
    "cpu": MADSettings(
        width=64,
        num_train=1_000,
        num_test=200,
        epochs=20,
        batch_size=32,
        lr=1e-3,
        weight_decay=0.0,
        task_overrides={
            "in_context_recall": {"seq_len": 64},
            "fuzzy_in_context_recall": {"seq_len": 64},
            "noisy_in_context_recall": {"seq_len": 64},
            "selective_copying": {"seq_len": 96, "num_tokens_to_copy": 8},
            "memorization": {"train_size": 256},
        },
    ),
    "quick": MADSettings(width=32, num_train=64, num_test=16, epochs=1, batch_size=32),
}


def score(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, vocab: int) -> dict:
    """Accuracy over the scored (non-ignored) positions: per position and class-averaged."""
    correct, total = 0, 0
    per_class_hit = torch.zeros(vocab)
    per_class_n = torch.zeros(vocab)
    model.eval()
    with torch.no_grad():
        for start in range(0, inputs.shape[0], 64):
            x, y = inputs[start : start + 64], targets[start : start + 64]
            pred = model(input_ids=x, use_cache=False).logits.argmax(-1)
            mask = y != IGNORE
            hits = (pred == y) & mask
            correct += int(hits.sum())
            total += int(mask.sum())
            per_class_n += torch.bincount(y[mask], minlength=vocab)[:vocab].float()
            per_class_hit += torch.bincount(y[hits], minlength=vocab)[:vocab].float()
    present = per_class_n > 0
    macro = float((per_class_hit[present] / per_class_n[present]).mean()) if total else 0.0
    return {"accuracy": correct / max(total, 1), "macro_accuracy": macro, "scored": total}


def train_task(
    architecture: str, task: str, settings: MADSettings, progress: bool = False, **task_settings
) -> dict[str, Any]:
    """Train `architecture` on `task` and score it on the test set (see the module docstring).

    The training loss is the cross-entropy on the scored positions plus, for MoE architectures,
    the router losses the recipe loop adds (`zoo.training.supervised_step`)."""
    overrides = {**settings.task_overrides.get(task, {}), **task_settings}
    num_train = overrides.pop("train_size", settings.num_train)
    vocab = {**TASKS[task][1], **overrides}["vocab_size"]
    config = architecture_config(architecture, vocab, settings.width)  # before any data
    x_train, y_train, x_test, y_test = make_dataset(
        task, num_train, settings.num_test, settings.seed, **overrides
    )
    torch.manual_seed(settings.seed)
    model = (
        AutoEncoder(config) if task == "compression" else AutoModelForCausalLM.from_config(config)
    )
    steps = settings.epochs * math.ceil(num_train / settings.batch_size)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps, eta_min=1e-6)
    generator = torch.Generator().manual_seed(settings.seed)
    bar = tqdm(total=steps, desc=f"{architecture} / {task}", disable=not progress, leave=False)
    model.train()
    for _ in range(settings.epochs):
        order = torch.randperm(num_train, generator=generator)
        for start in range(0, num_train, settings.batch_size):
            batch = order[start : start + settings.batch_size]
            loss = supervised_step(model, optimizer, x_train[batch], y_train[batch], scheduler)
            bar.update()
    bar.close()
    result = score(model, x_test, y_test, vocab)
    return {
        "architecture": architecture,
        "task": task,
        "settings": {**TASKS[task][1], **overrides, "train_size": num_train},
        "params": sum(p.numel() for p in model.parameters()),
        "final_train_loss": float(loss),
        **result,
    }


def run_mad(
    architectures: list[str],
    tasks: list[str] | None = None,
    settings: MADSettings | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Every architecture on every task; per-architecture MAD score (mean task accuracy)."""
    settings = settings or MADSettings()
    tasks = tasks or list(TASKS)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown MAD tasks {unknown}; known: {sorted(TASKS)}")
    runs = [
        train_task(arch, task, settings, progress=progress)
        for arch, task in itertools.product(architectures, tasks)
    ]
    scores = {
        arch: float(np.mean([r["accuracy"] for r in runs if r["architecture"] == arch]))
        for arch in architectures
    }
    return {"settings": asdict(settings), "runs": runs, "mad_score": scores}


def mad_table(result: dict[str, Any]) -> str:
    """Markdown: one row per architecture, one column per task, then the MAD score."""
    tasks = list(dict.fromkeys(r["task"] for r in result["runs"]))
    lines = [
        "| architecture | " + " | ".join(t.replace("_", " ") for t in tasks) + " | MAD score |",
        "|---|" + "---:|" * (len(tasks) + 1),
    ]
    ranked = sorted(result["mad_score"], key=result["mad_score"].get, reverse=True)
    for arch in ranked:
        accs = {r["task"]: r["accuracy"] for r in result["runs"] if r["architecture"] == arch}
        cells = " | ".join(f"{accs[t]:.3f}" for t in tasks)
        lines.append(f"| {arch} | {cells} | {result['mad_score'][arch]:.3f} |")
    return "\n".join(lines)


def mad_plot(result: dict[str, Any], path: Any) -> Any:
    """Grouped bars: accuracy per task for each architecture (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in result["runs"]))
    archs = sorted(result["mad_score"], key=result["mad_score"].get, reverse=True)
    fig, ax = plt.subplots(figsize=(12, 4.5))
    width = 0.8 / len(archs)
    for i, arch in enumerate(archs):
        accs = {r["task"]: r["accuracy"] for r in result["runs"] if r["architecture"] == arch}
        xs = [j + i * width for j in range(len(tasks))]
        label = f"{arch} ({result['mad_score'][arch]:.2f})"
        ax.bar(xs, [accs[t] for t in tasks], width, label=label)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))])
    ax.set_xticklabels([t.replace("_", "\n") for t in tasks], fontsize=8)
    ax.set_ylabel("test accuracy (scored positions)")
    ax.set_ylim(0, 1)
    ax.legend(
        fontsize=7,
        title="architecture (MAD score)",
        title_fontsize=7,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


__all__ = [
    "DIFFICULTY_SWEEP",
    "IGNORE",
    "STRIPES",
    "TASKS",
    "AutoEncoder",
    "MADSettings",
    "architecture_config",
    "architectures",
    "compression",
    "fuzzy_in_context_recall",
    "in_context_recall",
    "mad_plot",
    "mad_table",
    "make_dataset",
    "memorization",
    "noisy_in_context_recall",
    "run_mad",
    "selective_copying",
    "train_task",
]
