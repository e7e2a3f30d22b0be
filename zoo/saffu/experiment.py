"""The SAFFU experiment: explicit warm start + backprop against backprop alone, at equal data.

    zoo saffu run experiments/saffu/experiment.yaml experiments/saffu   # train what is missing
    zoo report experiments/saffu                                        # the report again

The experiment file (`ExperimentConfig`) names the embedded synthetic corpus, a grid of training
data sizes × context radii × embeddings, and one training budget. Every grid point trains two
arms from the same seed on the same first `tokens` training tokens for the same steps and
batches: **warm** (`solve`, then AdamW) and **cold** (random init, then AdamW). Held-out loss on
the validation documents is logged at step 0 and every `eval_every` steps.

Each run writes `runs/<name>/metrics.jsonl` and, when it ends, `runs/<name>/result.json`
(atomically): running the command again skips finished runs, so a killed experiment resumes.
`runs/` is a cache. At the end every finished run goes into the summary `results.jsonl` (final
and best losses, the held-out curve), and `report.md`, `loss_vs_data.png` and `curves.png` are
made from it alone, so a folder without `runs/` (a clean clone) still regenerates its report.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from zoo.atomic import write_json_atomic, write_text_atomic
from zoo.recipe import load_settings_file
from zoo.saffu.model import (
    SAFFUConfig,
    SAFFUForCausalLM,
    TokenDocuments,
    assign_features,
    check_context,
    check_vocabulary,
    solve,
)
from zoo.training import supervised_step

ARMS = ("warm", "cold")
SUMMARY_FILE = "results.jsonl"


class ExperimentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    corpus_seed: int = 0
    train_docs: int = Field(6000, gt=0, description="documents of the synthetic train split")
    validation_docs: int = Field(300, gt=0)
    data_tokens: list[int] = Field(description="training tokens per grid point (a prefix)")
    context_radius: list[int] = Field(description="window sizes K")
    embeddings: list[str] = Field(["onehot"], description='"onehot" or "bits<b>", e.g. bits12')
    steps: int = Field(300, gt=0, description="AdamW steps of both arms")
    batch_size: int = Field(16, gt=0, description="document pieces per step")
    seq_len: int = Field(64, gt=1, description="tokens per piece")
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    eval_every: int = Field(50, gt=0)
    seed: int = 0

    @field_validator("embeddings")
    @classmethod
    def _known_embeddings(cls, value: list[str]) -> list[str]:
        for name in value:
            if name != "onehot" and not (name.startswith("bits") and name[4:].isdigit()):
                raise ValueError(f"embedding {name!r}: write onehot or bits<b> (e.g. bits12)")
        return value


def load_experiment(path: str | Path) -> ExperimentConfig:
    return load_settings_file(ExperimentConfig, path)


def model_config(embedding: str, radius: int, vocab_size: int) -> SAFFUConfig:
    if embedding == "onehot":
        return SAFFUConfig(vocab_size=vocab_size, context_radius=radius, embedding="onehot")
    return SAFFUConfig(
        vocab_size=vocab_size,
        context_radius=radius,
        embedding="bitcipher",
        embedding_bits=int(embedding[4:]),
    )


def corpus(config: ExperimentConfig) -> tuple[TokenDocuments, TokenDocuments]:
    """(train, validation) documents of the embedded synthetic corpus, byte-tokenized."""
    from zoo.data import CorpusConfig, synthetic_documents
    from zoo.tokenizer import byte_tokenizer

    spec = CorpusConfig(
        seed=config.corpus_seed,
        train_docs=config.train_docs,
        validation_docs=config.validation_docs,
    )
    tokenizer = byte_tokenizer()
    return (
        TokenDocuments.from_texts(synthetic_documents("train", spec), tokenizer),
        TokenDocuments.from_texts(synthetic_documents("validation", spec), tokenizer),
    )


def _batches(pieces: list[torch.Tensor], size: int, pad: int) -> list[tuple[torch.Tensor, ...]]:
    """Right-padded (ids, labels) batches; padding is never a label nor inside a real window."""
    out = []
    for start in range(0, len(pieces), size):
        group = pieces[start : start + size]
        length = max(len(p) for p in group)
        ids = torch.full((len(group), length), pad)
        labels = torch.full((len(group), length), -100)
        for row, piece in enumerate(group):
            ids[row, : len(piece)] = piece
            labels[row, : len(piece)] = piece
        out.append((ids, labels))
    return out


@torch.no_grad()
def held_out_loss(model: SAFFUForCausalLM, batches: list[tuple[torch.Tensor, ...]]) -> float:
    total, count = 0.0, 0
    for ids, labels in batches:
        n = int((labels[:, 1:] != -100).sum())
        total += model(ids, labels=labels).loss.item() * n
        count += n
    return total / count


def train_arm(
    config: ExperimentConfig,
    arm: str,
    model_settings: SAFFUConfig,
    train: TokenDocuments,
    validation: TokenDocuments,
    log: Path | None = None,
) -> dict[str, Any]:
    """One arm of one grid point: (solve,) then AdamW for `steps`; returns the losses."""
    if arm not in ARMS:
        raise ValueError(f"arm={arm!r} is not one of {list(ARMS)}")
    check_context(model_settings, train)
    torch.manual_seed(config.seed)
    model = SAFFUForCausalLM(model_settings)
    if arm == "warm":
        solve(model, train)
    else:
        assign_features(model, train)
        model.config.vocab_fingerprint = train.fingerprint
    check_vocabulary(model.config, validation, "validation")
    pad = model_settings.pad_token_id or 0
    evaluation = _batches(validation.windows(config.seq_len), 64, pad)
    pieces = train.windows(config.seq_len)
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(
        [model.attention, model.feed_forward], lr=config.lr, weight_decay=config.weight_decay
    )
    curve = [{"step": 0, "eval_loss": held_out_loss(model, evaluation)}]
    records = []
    for step in range(1, config.steps + 1):
        picks = torch.randint(len(pieces), (config.batch_size,), generator=generator)
        ((ids, labels),) = _batches([pieces[i] for i in picks], config.batch_size, pad)
        loss = supervised_step(model, optimizer, ids, labels, shift=True)
        record: dict[str, Any] = {"step": step, "train_loss": loss.item()}
        if step % config.eval_every == 0 or step == config.steps:
            record["eval_loss"] = held_out_loss(model, evaluation)
            curve.append({"step": step, "eval_loss": record["eval_loss"]})
        records.append(record)
    if log is not None:
        log.write_text("".join(json.dumps(r) + "\n" for r in [curve[0], *records]))
    return {
        "initial_eval_loss": curve[0]["eval_loss"],
        "final_eval_loss": curve[-1]["eval_loss"],
        "best_eval_loss": min(c["eval_loss"] for c in curve),
        "curve": curve,
        "parameters": model.attention.numel() + model.feed_forward.numel(),
    }


def grid(config: ExperimentConfig) -> list[dict[str, Any]]:
    return [
        {"tokens": tokens, "radius": radius, "embedding": embedding, "arm": arm,
         "name": f"{embedding}-K{radius}-{tokens}-{arm}"}
        for embedding in config.embeddings
        for radius in config.context_radius
        for tokens in config.data_tokens
        for arm in ARMS
    ]  # fmt: skip


def run_experiment(config: ExperimentConfig, out_dir: str | Path, progress: bool = True) -> Path:
    """Train every grid point's two arms (skipping finished ones), then write the report."""
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    train_all, validation = corpus(config)
    points = grid(config)
    bar = tqdm(points, desc="SAFFU runs", unit="run", disable=not progress)
    for point in bar:
        folder = out_dir / "runs" / point["name"]
        if (folder / "result.json").is_file():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        train = train_all.truncated(point["tokens"])
        settings = model_config(point["embedding"], point["radius"], train.vocab_size)
        result = train_arm(
            config, point["arm"], settings, train, validation, folder / "metrics.jsonl"
        )
        result = {**point, "train_tokens": train.tokens, **result}
        write_json_atomic(folder / "result.json", result)
        bar.set_postfix_str(f"{point['name']}: {result['final_eval_loss']:.3f}")
    return write_report(config, out_dir)


def load_results(out_dir: Path, config: ExperimentConfig) -> list[dict[str, Any]]:
    """The finished runs in grid order: from the run cache `runs/` where it is here, else from
    the summary `results.jsonl`."""
    cached = []
    for point in grid(config):
        path = out_dir / "runs" / point["name"] / "result.json"
        if path.is_file():
            cached.append(json.loads(path.read_text()))
    summary = out_dir / SUMMARY_FILE
    if cached or not summary.is_file():
        return cached
    return [json.loads(line) for line in summary.read_text().splitlines() if line.strip()]


def write_report(config: ExperimentConfig, out_dir: Path) -> Path:
    """`results.jsonl`, `report.md` and the two plots from the finished runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = load_results(out_dir, config)
    if not results:
        raise FileNotFoundError(f"{out_dir}: no finished SAFFU runs and no {SUMMARY_FILE}")
    write_text_atomic(out_dir / SUMMARY_FILE, "".join(json.dumps(r) + "\n" for r in results))
    settings = sorted({(r["embedding"], r["radius"]) for r in results})
    by = {(r["embedding"], r["radius"], r["tokens"], r["arm"]): r for r in results}

    def versus_data(ax, embedding: str, radius: int) -> None:
        for arm, style in (("warm", "o-"), ("cold", "s--")):
            rows = sorted(
                (t, r) for (e, k, t, a), r in by.items() if (e, k, a) == (embedding, radius, arm)
            )
            tokens = [t for t, _ in rows]
            ax.plot(
                tokens, [r["final_eval_loss"] for _, r in rows], style, label=f"{arm} + backprop"
            )
            if arm == "warm":
                explicit = [r["initial_eval_loss"] for _, r in rows]
                ax.plot(tokens, explicit, "^:", label="explicit solution alone")
        ax.set_xscale("log")
        ax.set_title(f"{embedding}, K = {radius}", fontsize=9)
        ax.set_xlabel("training tokens")

    largest = max(config.data_tokens)

    def curves(ax, embedding: str, radius: int) -> None:
        for arm, style in (("warm", "-"), ("cold", "--")):
            run = by.get((embedding, radius, largest, arm))
            if run:
                steps = [c["step"] for c in run["curve"]]
                ax.plot(steps, [c["eval_loss"] for c in run["curve"]], style, label=arm)
        ax.set_title(f"{embedding}, K = {radius}, {largest:,} tokens", fontsize=9)
        ax.set_xlabel("step")

    for draw, name in ((versus_data, "loss_vs_data.png"), (curves, "curves.png")):
        fig, axes = plt.subplots(
            1, len(settings), figsize=(4.2 * len(settings), 3.6), squeeze=False
        )
        for ax, (embedding, radius) in zip(axes[0], settings, strict=True):
            draw(ax, embedding, radius)
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("held-out loss (nats/token)")
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=130)
        plt.close(fig)

    lines = [
        "# SAFFU: explicit warm start + backprop vs backprop alone",
        "",
        f"{config.steps} AdamW steps (lr {config.lr}, batch {config.batch_size} × "
        f"{config.seq_len} tokens) for both arms; held-out loss on {config.validation_docs} "
        "validation documents of the embedded corpus (nats/token, byte tokenizer).",
        "",
        "| embedding | K | train tokens | explicit alone | warm + backprop | cold (backprop) "
        "| warm − cold |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for embedding, radius in settings:
        for tokens in sorted(config.data_tokens):
            warm, cold = (
                by.get((embedding, radius, tokens, "warm")),
                by.get((embedding, radius, tokens, "cold")),
            )
            if not (warm and cold):
                continue
            lines.append(
                f"| {embedding} | {radius} | {warm['train_tokens']:,} | "
                f"{warm['initial_eval_loss']:.3f} | {warm['final_eval_loss']:.3f} | "
                f"{cold['final_eval_loss']:.3f} | "
                f"{warm['final_eval_loss'] - cold['final_eval_loss']:+.3f} |"
            )
    lines += ["", "Plots: `loss_vs_data.png`, `curves.png`.", ""]
    return write_text_atomic(out_dir / "report.md", "\n".join(lines))
