"""The training loop every recipe runs, from one CPU process to many GPUs (accelerate).

    accelerate launch recipes/train.py recipes/configs/tiny-tnl.yaml training.steps=50
    zoo train recipes/configs/tiny-tnl.yaml --dry-run

One optimizer step = `accumulation` micro-batches per process (gradients synchronised only on
the last), the loss averaged over them, gradient clipping, AdamW (weight decay on matrices
only), the learning rate of `zoo.recipe.lr_factor`. accelerate launches the processes and gives
each its rank, world and device; it wraps the model in DDP (or in its own FSDP, with an
accelerate FSDP config) and runs mixed precision.

FSDP2 of our own (`zoo.parallel`): when the recipe's `parallel.dp_shard_size` × `cp_size` is
above 1, on any device, the model is not given to accelerate: `zoo.parallel.fsdp.apply_fsdp`
shards it with `fully_shard` on the recipe's mesh (HSDP with `parallel.dp_replicate_size` > 1),
gradients are reduce-scattered on every micro-batch, clipped over the whole mesh, checkpoints are
written sharded (`zoo.train_state`) and the final model is gathered to rank 0. The parallel
sizes are checked against the world size when the run starts.

Context parallelism (`parallel.cp_size` > 1): the ranks of a context-parallel group read the
same batch, and each runs the model on its span of the sequence (`zoo.parallel.context`; labels
shifted over the whole sequence by `zoo.parallel.batch.shard_causal_batch`); its backward is its
span's share of the loss, scaled by cp so that FSDP's mean over all ranks is the data-parallel
mean. Expert parallelism (`parallel.ep_size` > 1): every MoE layer's experts are sharded over the
expert-parallel group (`zoo.parallel.expert`, inside `apply_fsdp`); the final model gathers
them whole; its checkpoints are not written yet (the run refuses `logging.checkpoint_every`).
Router losses are each micro-batch's own (over its whole sequence under context parallelism),
as in one process with the same micro-batches.

Checkpoints (`zoo.train_state`: safetensors and JSON, nothing pickled) are atomic: written to
`checkpoints/.tmp-step-N` and renamed to `checkpoints/step-N` when complete, then older ones
beyond `keep_last` are removed. A run killed at any moment resumes (`--resume auto`, the
default) from the newest checkpoint that verifies and continues bit for bit as if it had never
stopped (fp32 on CPU, same processes and mesh; the data order, RNG and optimizer state are all
restored). Resuming refuses a checkpoint whose model or batch settings differ, or that another
number of processes wrote: `python -m zoo.train_state reshard` converts it first.

Outputs in `output_dir`: `metrics.jsonl` (one record per logged step and per eval),
`tensorboard/` (when installed), `loss.png`, `checkpoints/`, and `final/`: `save_pretrained`
(safetensors) + tokenizer + generation config, loadable with `AutoModelForCausalLM`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerBase

import zoo.modeling  # noqa: F401  (registers the families with the Auto classes it uses)
from zoo import train_state
from zoo.atomic import write_json_atomic
from zoo.checkpoint import CheckpointError
from zoo.data import (
    CorpusConfig,
    PackedSequences,
    StreamedSequences,
    cached_token_stream,
    pack_tokens,
    sequential_windows,
    synthetic_documents,
)
from zoo.flops import model_flops
from zoo.layers.moe import Experts, expert_load, load_imbalance, router_losses
from zoo.parallel.batch import shard_windows
from zoo.parallel.context import context_parallel
from zoo.parallel.expert import whole_expert_weights
from zoo.parallel.fsdp import apply_fsdp, blocks_of, clip_grad_norm, expert_gradients_to_mean
from zoo.parallel.mesh import Mesh, build_mesh, format_groups, memory_per_rank
from zoo.recipe import Recipe, RecipeError, load_recipe, lr_factor
from zoo.run_guard import RunInUseError, RunLock, StopSignals, TrainingStopped
from zoo.tokenizer import load_tokenizer

# Dense bf16 peak of the GPUs people train on (vendor data sheets, no sparsity), for MFU.
PEAK_TFLOPS_BF16 = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "A10G": 125.0}


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the last checkpoint."""


@dataclasses.dataclass
class TrainResult:
    steps: int
    tokens: int
    train_loss: float
    eval_loss: float | None
    tokens_per_s: float
    mfu: float | None
    output_dir: Path
    final_dir: Path | None
    flops_per_token: int
    """Training FLOPs per token (forward + backward) by `zoo.flops`: the run's C = this × tokens."""


# ---------------------------------------------------------------------------------------------
# Building blocks


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only (nanoGPT's rule), never on norms, biases, or the parameters
    a mixer exempts by name (`no_weight_decay_params`, e.g. Mamba's A_log and D)."""
    exempt = {
        id(getattr(module, name))
        for module in model.modules()
        for name in getattr(module, "no_weight_decay_params", ())
    }
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2 and id(p) not in exempt]
    no_decay = [p for p in params if p.dim() < 2 or id(p) in exempt]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def peak_flops(device: torch.device, recipe: Recipe) -> float | None:
    """Peak FLOP/s of one device for MFU: the recipe's `peak_tflops`, else a known GPU's."""
    if recipe.training.peak_tflops is not None:
        return recipe.training.peak_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in PEAK_TFLOPS_BF16.items():
            if key in name:
                return tflops * 1e12
    return None


def build_data(
    recipe: Recipe,
    tokenizer: PreTrainedTokenizerBase,
    accelerator: Accelerator,
    data_rank: tuple[int, int] | None = None,
) -> tuple[PackedSequences | StreamedSequences, Any]:
    """The training micro-batches of this process and the held-out stream (or None);
    `data_rank` = (index, count) among the processes that read different batches (the
    mesh's data-parallel group), by default (process index, number of processes)."""
    data, t = recipe.data, recipe.training
    rank, world = data_rank or (accelerator.process_index, accelerator.num_processes)
    if data.source == "synthetic":
        corpus = CorpusConfig(
            seed=data.synthetic.seed,
            train_docs=data.synthetic.train_docs,
            validation_docs=data.synthetic.validation_docs,
        )
        train = pack_tokens(synthetic_documents("train", corpus), tokenizer)
        heldout = pack_tokens(synthetic_documents("validation", corpus), tokenizer)
    elif data.source == "files":
        with accelerator.main_process_first():  # one process tokenizes, the others map it
            train = cached_token_stream(
                data.train_files, tokenizer, data.cache_dir, data.text_field, data.documents
            )
            heldout = None
            if data.validation_files:
                heldout = cached_token_stream(
                    data.validation_files, tokenizer, data.cache_dir, data.text_field,
                    data.documents,
                )  # fmt: skip
    else:
        return _hf_data(recipe, tokenizer, rank, world)
    batches = PackedSequences(train, t.seq_len, t.micro_batch_size, t.seed, rank, world)
    return batches, heldout


def _hf_data(
    recipe: Recipe, tokenizer: PreTrainedTokenizerBase, rank: int, world: int
) -> tuple[StreamedSequences, Any]:
    try:
        import datasets
    except ImportError:
        raise ImportError(
            f"{recipe.source}: data.source: hf needs the datasets package (pip install datasets)"
        ) from None
    hf, t = recipe.data.hf, recipe.training

    def texts(split: str, shuffle: bool) -> Callable[[], Iterator[str]]:
        def read() -> Iterator[str]:
            stream = datasets.load_dataset(hf.path, hf.name, split=split, streaming=True)
            if shuffle:
                stream = stream.shuffle(seed=t.seed, buffer_size=hf.shuffle_buffer)
            for record in stream:
                yield record[hf.text_field]

        return read

    batches = StreamedSequences(
        texts(hf.split, True), tokenizer, t.seq_len, t.micro_batch_size, rank, world
    )
    heldout = None
    if hf.validation_split is not None:
        documents = [
            text for _, text in zip(range(2000), texts(hf.validation_split, False)(), strict=False)
        ]
        heldout = pack_tokens(documents, tokenizer)
    return batches, heldout


# ---------------------------------------------------------------------------------------------
# Checkpoints


class Checkpoints:
    """`output_dir/checkpoints/step-NNNNNNNN` folders in `zoo.train_state`'s format."""

    STATE = train_state.STATE_FILE

    def __init__(self, output_dir: Path, keep_last: int) -> None:
        self.root = output_dir / "checkpoints"
        self.keep_last = keep_last

    def complete(self) -> list[Path]:
        """Every folder with a state file, oldest first (each still to be verified)."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.glob("step-*") if (p / self.STATE).is_file()]
        return sorted(found, key=lambda p: int(p.name.removeprefix("step-")))

    def latest(self, echo: Callable[[str], None] = lambda _: None) -> Path | None:
        """The newest checkpoint that verifies (files as written, tensors finite); each newer
        one that fails is named with why. None if there is none at all; `CheckpointError` if
        there are some and none verifies (a run must not silently start over)."""
        done = self.complete()
        problems = []
        for path in reversed(done):
            try:
                train_state.verify(path)
            except CheckpointError as error:
                problems.append(str(error))
                echo(f"warning: skipping checkpoint {path}: {error}")
                continue
            return path
        if done:
            raise CheckpointError(
                f"no checkpoint in {self.root} verifies ({'; '.join(problems)}); pass "
                "--resume never to start over"
            )
        return None

    def save(
        self,
        accelerator: Accelerator,
        step: int,
        parts: tuple[torch.nn.Module, torch.optim.Optimizer, Any, Any],
        meta: dict[str, Any],
        mesh: Mesh | None = None,
    ) -> Path:
        """Write (model, optimizer, scheduler, data position) at `step` under a temporary name
        and rename it when whole; then drop checkpoints beyond `keep_last`. With the `mesh` of
        a sharded model, each shard writes its own pieces (`zoo.train_state`)."""
        final = self.root / f"step-{step:08d}"
        tmp = self.root / f".tmp-step-{step:08d}"
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        train_state.save(tmp, accelerator, *parts, meta, mesh=mesh)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)  # the checkpoint exists only once it is whole
            for old in self.complete()[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
            for stale in self.root.glob(".tmp-step-*"):  # a crash's leftovers
                shutil.rmtree(stale, ignore_errors=True)
        accelerator.wait_for_everyone()
        return final


# Recipe sections a resumed run continues with: a change there changes the run (its schedule,
# its batches, its data), so resuming with one needs `allow_changes` (`--allow-changes`). The
# logging intervals, the output folder, the source file and the mesh (`parallel`: how the same
# step is computed) may change freely.
_RESUME_SECTIONS = ("optimizer", "schedule", "training", "data", "tokenizer")
# Settings inside those sections that change how a step is computed, not what it computes.
_FREE_KEYS = {("training", "compile")}


def recipe_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """`section.key: old -> new` for every setting of `_RESUME_SECTIONS` that differs."""
    changes = []
    for section in _RESUME_SECTIONS:
        old, new = saved.get(section), current.get(section)
        if isinstance(old, dict) and isinstance(new, dict):
            for key in sorted(set(old) | set(new)):
                if (section, key) not in _FREE_KEYS and old.get(key) != new.get(key):
                    changes.append(f"{section}.{key}: {old.get(key)!r} -> {new.get(key)!r}")
        elif old != new:
            changes.append(f"{section}: {old!r} -> {new!r}")
    return changes


def check_resumable(
    saved: dict[str, Any],
    recipe: Recipe,
    config: dict,
    world_size: int,
    allow_changes: bool = False,
) -> list[str]:
    """Refuse a checkpoint this recipe cannot continue, naming what differs: another model or
    process count always (naming the re-shard command that converts it), changed recipe
    settings unless `allow_changes`; returns those."""
    where = f"{recipe.source}: cannot resume from {saved.get('path')}"
    if saved["model_config"] != config:
        keys = sorted(
            key
            for key in set(saved["model_config"]) | set(config)
            if saved["model_config"].get(key) != config.get(key)
        )
        raise RecipeError(f"{where}: the model config differs in {keys}")
    if saved["world_size"] != world_size:
        raise RecipeError(
            f"{where}: it was written by {saved['world_size']} processes, this run has "
            f"{world_size} (the data order and the shards depend on it); re-shard it first: "
            f"{train_state.reshard_command(saved.get('path'), world_size)}, then resume with "
            "--resume OUT"
        )
    changes = recipe_changes(saved["recipe"], recipe.model_dump(mode="json"))
    if changes and not allow_changes:
        raise RecipeError(
            f"{where}: the recipe changed ({'; '.join(changes)}); pass --allow-changes to "
            "continue with the new settings, or --resume never to start over"
        )
    return changes


# ---------------------------------------------------------------------------------------------
# Logging


class Metrics:
    """metrics.jsonl (+ TensorBoard when installed), written by the main process only.

    Records are appended and fsynced one by one and the file is never rewritten: a kill loses
    at most the record being written, and a resumed run appends the steps after its checkpoint
    again (`read_metrics` keeps the latest record of each step).
    """

    def __init__(self, output_dir: Path, enabled: bool, tensorboard: bool) -> None:
        self.path = output_dir / "metrics.jsonl"
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        if self.path.is_file() and self.path.stat().st_size:
            with self.path.open("rb") as f:
                f.seek(-1, os.SEEK_END)
                torn = f.read(1) != b"\n"
            if torn:  # a killed write: end its fragment so the next record starts a line
                with self.path.open("a") as f:
                    f.write("\n")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                SummaryWriter = None
            if SummaryWriter is not None:
                self.writer = SummaryWriter(str(output_dir / "tensorboard"))

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl in step order: a line a kill left half-written is
    skipped, and where a resumed run logged a step again its latest record wins."""
    latest: dict[tuple[int, bool], dict[str, Any]] = {}
    for line in Path(path).read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "step" in record:
            latest[(int(record["step"]), "eval_loss" in record)] = record
    return [latest[key] for key in sorted(latest)]


def plot_loss(metrics_path: Path, out: Path, title: str) -> Path | None:
    """Training (and held-out) loss against tokens, as a PNG; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    records = read_metrics(metrics_path)
    train = [(r["tokens"], r["loss"]) for r in records if "loss" in r]
    heldout = [(r["tokens"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train")
    if heldout:
        ax.plot(*zip(*heldout, strict=True), "o-", label="held-out")
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


# ---------------------------------------------------------------------------------------------
# The loop


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    stream: Any,
    recipe: Recipe,
    accelerator: Accelerator,
    mesh: Mesh | None = None,
) -> float:
    """Mean next-token cross-entropy over the first eval_batches × micro_batch_size held-out
    windows (without the MoE aux losses), split across the data-parallel ranks (each
    context-parallel group shares its windows and splits every one over the sequence). Every
    process runs the same number of forwards (a sharded model gathers its parameters in each);
    one with fewer windows repeats its first batch and does not count it."""
    t = recipe.training
    rank, world = accelerator.process_index, accelerator.num_processes
    if mesh is not None:
        rank, world = mesh.data_rank
    cp_group = mesh.groups["cp"] if mesh is not None else None
    windows: list[list[torch.Tensor]] = [[] for _ in range(world)]
    for i, window in enumerate(sequential_windows(torch.as_tensor(stream[:]), t.seq_len)):
        if i == recipe.logging.eval_batches * t.micro_batch_size:
            break
        if window.shape[1] == t.seq_len + 1:
            windows[i % world].append(window[0])
    mine = windows[rank]
    forwards = max(math.ceil(len(w) / t.micro_batch_size) for w in windows)
    total = torch.zeros(2, device=accelerator.device, dtype=torch.float64)
    was_training = model.training
    model.eval()
    for n in range(forwards):
        start = n * t.micro_batch_size
        rows = mine[start : start + t.micro_batch_size] or mine[: t.micro_batch_size]
        if not rows:  # no window at all here: a sharded model still needs this forward
            rows = [w for ws in windows for w in ws][: t.micro_batch_size]
        batch = torch.stack(rows).to(accelerator.device)
        with context_parallel(cp_group) as cp:  # this rank's span of inputs and targets
            window = shard_windows(batch, cp)
            logits = model(input_ids=window["input_ids"], use_cache=False).logits
        targets = window["shift_labels"]
        if start >= len(mine):
            continue
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum")
        total[0] += loss.double()
        total[1] += targets.numel()
    model.train(was_training)
    total = accelerator.reduce(total, reduction="sum")
    return float(total[0] / total[1]) if total[1] > 0 else float("nan")


IGNORE_INDEX = -100
"""Targets with this value are not scored (PyTorch's and transformers' convention)."""


def supervised_loss(
    model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, shift: bool = False
) -> torch.Tensor:
    """Cross-entropy of `model(input_ids=inputs)` against `targets` (`IGNORE_INDEX` unscored),
    plus the router losses of its MoE layers with the config's coefficients, as the recipe loop
    trains. `targets` align with the input positions (MAD, MQAR); with `shift` they are the
    inputs' own next tokens (language modelling: position t is scored on target t + 1).

    The model returns `.logits` (B, T, V) and, if it routes, `.router_logits`; it is called with
    `output_router_logits=True` and without a cache.
    """
    output = model(input_ids=inputs, use_cache=False, output_router_logits=True)
    logits = output.logits
    if shift:
        logits, targets = logits[:, :-1], targets[:, 1:]
    loss = F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX
    )
    router_logits = getattr(output, "router_logits", None)
    if router_logits:
        loss = loss + router_losses(router_logits, model.config)[1].to(loss.device)
    return loss


def supervised_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    shift: bool = False,
) -> torch.Tensor:
    """One optimizer step on `supervised_loss`; returns the loss (detached, no host sync)."""
    loss = supervised_loss(model, inputs, targets, shift)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return loss.detach()


def _model_config_dict(model: torch.nn.Module) -> dict[str, Any]:
    """The model config as trainer_state.json stores it (JSON round trip: int keys -> str)."""
    config = json.loads(json.dumps(model.config.to_dict()))
    for volatile in (
        "transformers_version",
        "dtype",
        "torch_dtype",
        "_name_or_path",
        "architectures",
    ):
        config.pop(volatile, None)
    return config


FINISHED_FILE = "run.json"


def train(
    recipe: Recipe,
    *,
    model: torch.nn.Module | None = None,
    accelerator: Accelerator | None = None,
    resume: str = "auto",
    flops_per_token: int | None = None,
    echo: Callable[[str], None] | None = None,
    save_final: bool = True,
    progress: bool = True,
    allow_changes: bool = False,
) -> TrainResult:
    """Train `recipe` (see the module docstring); `model` replaces the recipe's (a benchmark
    trains transformers' own Llama in this same loop), `resume` is "auto" (the newest checkpoint
    in output_dir that verifies, if any; a finished run is not trained again), "never", or a
    checkpoint folder; `allow_changes` lets a resumed run continue with changed recipe settings.
    `progress=False` hides the step bar (sweeps show one bar for all their runs).

    One process trains in an output folder at a time (`zoo.run_guard.RunLock`). SIGTERM or
    SIGINT stops the run at the end of its step with a checkpoint and raises `TrainingStopped`.
    """
    t = recipe.training
    if accelerator is None:
        precision = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[t.precision]
        accelerator = Accelerator(mixed_precision=precision)
    main = accelerator.is_main_process
    echo = echo if echo is not None else (print if main else lambda _: None)
    output_dir = Path(recipe.output_dir)
    with RunLock(output_dir, enabled=main) as lock, StopSignals() as stop:
        if lock.note:
            echo(f"note: {lock.note}")
        return _train(
            recipe, model, accelerator, resume, flops_per_token, echo, save_final, progress,
            allow_changes, stop,
        )  # fmt: skip


def _finished(output_dir: Path, recipe: Recipe) -> TrainResult | None:
    """The result of a finished run of this same recipe in `output_dir`, if there is one."""
    path = output_dir / FINISHED_FILE
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if recipe_changes(record.get("recipe", {}), recipe.model_dump(mode="json")):
        return None
    fields = {f.name for f in dataclasses.fields(TrainResult)}
    result = {k: v for k, v in record.items() if k in fields}
    result["output_dir"] = Path(result["output_dir"])
    result["final_dir"] = Path(result["final_dir"]) if result.get("final_dir") else None
    return TrainResult(**result)


def _train(
    recipe: Recipe,
    model: torch.nn.Module | None,
    accelerator: Accelerator,
    resume: str,
    flops_per_token: int | None,
    echo: Callable[[str], None],
    save_final: bool,
    progress: bool,
    allow_changes: bool,
    stop: StopSignals,
) -> TrainResult:
    t, log = recipe.training, recipe.logging
    main = accelerator.is_main_process
    output_dir = Path(recipe.output_dir)
    if resume == "auto" and (done := _finished(output_dir, recipe)) is not None:
        echo(
            f"{output_dir}: this run finished (step {done.steps}, loss {done.train_loss:.4f}); "
            "nothing to do (--resume never trains it again)"
        )
        return done
    world = accelerator.num_processes
    sizes = recipe.parallel_sizes(world)
    if sizes.ep > 1 and log.checkpoint_every:
        raise RecipeError(
            f"{recipe.source}: parallel.ep_size={sizes.ep}: checkpoints of expert-parallel runs "
            "are not written yet; set logging.checkpoint_every=null (the final model is saved "
            "whole) or parallel.ep_size=1"
        )
    if sizes.fsdp and t.precision == "fp16" and accelerator.device.type == "cuda":
        raise RecipeError(
            f"{recipe.source}: parallel.dp_shard_size={sizes.dp_shard}: training.precision=fp16 "
            "needs a loss scaler, which the FSDP2 path does not have; use bf16"
        )
    if (
        not sizes.fsdp
        and os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
        and accelerator.distributed_type.value != "FSDP"
    ):
        echo(
            f"warning: FSDP was requested but accelerate runs {accelerator.distributed_type.value}"
            f" on {accelerator.device.type} (accelerate has no FSDP on the CPU; "
            "parallel.dp_shard_size > 1 runs zoo's own FSDP2 there)"
        )
    plan = recipe.plan(world)
    set_seed(t.seed)
    tokenizer = load_tokenizer(recipe.tokenizer)
    if model is None:
        model = AutoModelForCausalLM.from_config(recipe.build_config(tokenizer))
    if hasattr(model.config, "has_moe"):  # a zoo model: check ep_size against its experts
        recipe.parallel_sizes(world, model.config)
    config_dict = _model_config_dict(model)
    if flops_per_token is None:
        flops_per_token = model_flops(model, t.seq_len).train_per_token
    mesh = build_mesh(sizes, accelerator.device.type) if sizes.fsdp else None
    batches, heldout = build_data(recipe, tokenizer, accelerator, mesh and mesh.data_rank)
    cp_group = mesh.groups["cp"] if mesh is not None else None

    checkpoints = Checkpoints(output_dir, log.keep_last)
    resume_from = None
    if resume == "auto":
        resume_from = checkpoints.latest(echo)
    elif resume != "never":
        resume_from = Path(resume)
        train_state.verify(resume_from)
    elif main and (output_dir / FINISHED_FILE).is_file():
        (output_dir / FINISHED_FILE).unlink()

    model_name = type(model).__name__  # fully_shard renames the class (FSDP<name>)
    if mesh is not None:  # sharded before the optimizer sees the parameters
        model = apply_fsdp(model.to(accelerator.device), mesh, t.precision)
    fused = recipe.optimizer.fused
    if fused is None:
        fused = accelerator.device.type == "cuda"
    optimizer = torch.optim.AdamW(
        param_groups(model, recipe.optimizer.weight_decay),
        lr=recipe.optimizer.lr,
        betas=recipe.optimizer.betas,
        eps=recipe.optimizer.eps,
        fused=fused,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, plan, recipe.schedule)
    )
    # The scheduler is ours, not prepared: accelerate's wrapper would step it once per process
    # (it assumes schedules written in single-process steps); ours counts optimizer steps.
    # A model sharded by zoo.parallel is not accelerate's to wrap.
    if t.compile:  # in place, before any wrapper: parameter names and checkpoints unchanged
        model.compile()
    if mesh is None:
        model, optimizer = accelerator.prepare(model, optimizer)
    parts = (model, optimizer, scheduler, batches)

    start_step, tokens_before = 0, 0
    if resume_from is not None:
        saved = train_state.read_state(resume_from)
        saved["path"] = str(resume_from)
        changes = check_resumable(saved, recipe, config_dict, world, allow_changes)
        train_state.load(resume_from, accelerator, *parts, mesh=mesh)
        start_step, tokens_before = saved["step"], saved["tokens"]
        echo(f"resuming from {resume_from} (step {start_step})")
        for change in changes:
            echo(f"  with a changed setting: {change}")

    metrics = Metrics(output_dir, main, log.tensorboard)
    if main:  # the resolved recipe, for the model card and for reproducing the run
        (output_dir / "recipe.yaml").write_text(
            yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
        )
    peak = peak_flops(accelerator.device, recipe)
    unwrapped = accelerator.unwrap_model(model)
    moe_top_k = getattr(unwrapped.config, "num_experts_per_tok", 0)
    has_moe = bool(getattr(unwrapped.config, "has_moe", False))
    echo(
        f"{model_name}: {unwrapped.num_parameters() / 1e6:.2f}M parameters, "
        f"{plan.steps} steps × {t.global_batch_tokens:,} tokens, {plan.accumulation} "
        f"micro-batches of {t.micro_batch_size} × {t.seq_len} on each of "
        f"{accelerator.num_processes} process(es), {flops_per_token / 1e6:.1f} MFLOPs/token"
    )
    if mesh is not None:
        echo(f"FSDP2 (zoo.parallel) on the mesh {sizes.describe()}")

    def checkpoint_meta(step: int, tokens: int) -> dict[str, Any]:
        return {
            "step": step,
            "tokens": tokens,
            "world_size": world,
            "recipe": recipe.model_dump(mode="json"),
            "model_config": config_dict,
        }

    def last_checkpoint() -> str:
        done = checkpoints.complete()
        return done[-1].name if done else "none"

    model.train()
    train_loss, eval_loss = float("nan"), None
    window_start, window_tokens = time.perf_counter(), 0
    run_start, run_tokens = window_start, 0
    bar = tqdm(
        range(start_step, plan.steps),
        initial=start_step,
        total=plan.steps,
        desc=Path(recipe.source or "train").stem,
        unit="step",
        disable=not (progress and accelerator.is_local_main_process),
        dynamic_ncols=True,
    )
    for step in bar:
        logging_step = (step + 1) % log.log_every == 0 or step + 1 == plan.steps
        step_loss = torch.zeros((), device=accelerator.device)
        aux_loss = None
        router_logits = None
        for micro in range(plan.accumulation):
            batch = next(batches).to(accelerator.device)
            last = micro == plan.accumulation - 1
            want_router = has_moe and logging_step and last
            # DDP all-reduces gradients on the last micro-batch only; FSDP2 reduce-scatters
            # them on every one (they stay sharded).
            context = contextlib.nullcontext()
            if not last and mesh is None:
                context = accelerator.no_sync(model)
            with context, context_parallel(cp_group) as cp:
                kwargs = {"output_router_logits": True} if want_router else {}
                # T inputs, T targets (this rank's span of both under context parallelism)
                out = model(**shard_windows(batch, cp), use_cache=False, **kwargs)
                if mesh is None:
                    accelerator.backward(out.loss / plan.accumulation)
                else:  # a context-parallel rank's backward is its span's share: × cp (fsdp.py)
                    (out.loss * sizes.cp / plan.accumulation).backward()
            step_loss += out.loss.detach() / plan.accumulation
            if want_router:
                aux_loss, router_logits = out.aux_loss, out.router_logits
        step_loss = accelerator.reduce(step_loss, reduction="mean")
        if not torch.isfinite(step_loss):
            raise NonFiniteLossError(
                f"loss is {step_loss.item()} at step {step + 1}; nothing was updated with it "
                f"(last checkpoint: {last_checkpoint()}; lower optimizer.lr and rerun to resume)"
            )
        if mesh is not None:
            expert_gradients_to_mean(model, mesh)
        grad_norm = None
        if t.grad_clip is not None and mesh is not None:  # the norm over the whole mesh
            grad_norm = clip_grad_norm(model, t.grad_clip, mesh)
        elif t.grad_clip is not None:
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        window_tokens += t.global_batch_tokens
        run_tokens += t.global_batch_tokens
        tokens = tokens_before + (step + 1 - start_step) * t.global_batch_tokens

        if logging_step:
            train_loss = step_loss.item()
            elapsed = time.perf_counter() - window_start
            tokens_per_s = window_tokens / elapsed
            record = {
                "step": step + 1,
                "tokens": tokens,
                "loss": train_loss,
                "lr": scheduler.get_last_lr()[0],
                "tokens_per_s": tokens_per_s,
            }
            if grad_norm is not None:
                record["grad_norm"] = float(grad_norm)
            if peak is not None:
                record["mfu"] = flops_per_token * tokens_per_s / (peak * accelerator.num_processes)
            if router_logits is not None:
                imbalance = load_imbalance(expert_load(router_logits, moe_top_k))
                record["aux_loss"] = float(aux_loss.detach())
                record["expert_load_max_over_mean"] = imbalance.tolist()
            metrics.log(record)
            postfix = {"loss": f"{train_loss:.3f}", "tok/s": f"{tokens_per_s:,.0f}"}
            if "mfu" in record:
                postfix["mfu"] = f"{record['mfu']:.1%}"
            bar.set_postfix(postfix, refresh=False)
            window_start, window_tokens = time.perf_counter(), 0

        last_step = step + 1 == plan.steps
        if heldout is not None and (
            (log.eval_every and (step + 1) % log.eval_every == 0) or last_step
        ):
            eval_loss = evaluate(model, heldout, recipe, accelerator, mesh)
            metrics.log({"step": step + 1, "tokens": tokens, "eval_loss": eval_loss})
        stopping = _stop_requested(stop, accelerator)
        due = log.checkpoint_every and ((step + 1) % log.checkpoint_every == 0 or last_step)
        if due or stopping:
            if not parameters_finite(model):
                raise NonFiniteLossError(
                    f"weights are NaN or infinite after step {step + 1}; no checkpoint was "
                    f"written after {last_checkpoint()} (lower optimizer.lr and rerun to resume)"
                )
            written = checkpoints.save(
                accelerator, step + 1, parts, checkpoint_meta(step + 1, tokens), mesh
            )
            if stopping:
                bar.close()
                metrics.close()
                name = StopSignals.name(stopping)
                raise TrainingStopped(
                    f"stopped by {name} after step {step + 1}: checkpoint {written} written; "
                    "run the same command again to resume",
                    stopping,
                )
    bar.close()
    run_time = time.perf_counter() - run_start
    tokens_per_s = run_tokens / run_time if run_tokens else 0.0
    mfu = flops_per_token * tokens_per_s / (peak * accelerator.num_processes) if peak else None

    final_dir = None
    accelerator.wait_for_everyone()
    if save_final:
        final_dir = output_dir / "final"
        if mesh is None:
            state_dict = accelerator.get_state_dict(model)
        else:  # every rank sends its shards; rank 0 gets the whole model, on the CPU
            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            state_dict = get_model_state_dict(model, options=options)
            if sizes.ep > 1:  # each expert-parallel rank's experts, gathered whole
                whole = {k: v.cpu() for k, v in whole_expert_weights(model).items()}
                state_dict.update(whole if main else {})
        if main:
            unwrapped = accelerator.unwrap_model(model)
            unwrapped.generation_config = GenerationConfig(
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
            unwrapped.save_pretrained(final_dir, state_dict=state_dict)
            tokenizer.save_pretrained(final_dir)
    if main and metrics.path.is_file():
        plot_loss(metrics.path, output_dir / "loss.png", Path(recipe.source or "run").stem)
    metrics.close()
    result = TrainResult(
        steps=plan.steps,
        tokens=plan.tokens,
        train_loss=train_loss,
        eval_loss=eval_loss,
        tokens_per_s=tokens_per_s,
        mfu=mfu,
        output_dir=output_dir,
        final_dir=final_dir,
        flops_per_token=flops_per_token,
    )
    if main:
        record = {**dataclasses.asdict(result), "recipe": recipe.model_dump(mode="json")}
        record["output_dir"] = str(output_dir)
        record["final_dir"] = str(final_dir) if final_dir else None
        write_json_atomic(output_dir / FINISHED_FILE, record)
    accelerator.wait_for_everyone()
    return result


def parameters_finite(model: torch.nn.Module) -> bool:
    """Whether every parameter is finite (one reduction per tensor, one host sync in all). A
    sharded model's processes check their own shards and agree over the whole job, so all of
    them answer the same (every process must call this)."""
    params = [p for p in model.parameters() if p.is_floating_point()]
    sharded = any(isinstance(p, DTensor) for p in params)
    local = [p.to_local() if isinstance(p, DTensor) else p for p in params]
    finite = torch.stack([torch.isfinite(p).all() for p in local]).all() if local else None
    if not sharded:
        return True if finite is None else bool(finite)
    flag = finite.to(torch.int32)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag)


def _stop_requested(stop: StopSignals, accelerator: Accelerator) -> int | None:
    """The signal any process was asked to stop by (all stop at the same step), or None."""
    if accelerator.num_processes == 1:
        return stop.requested
    flag = torch.tensor([stop.requested or 0], device=accelerator.device)
    return int(accelerator.reduce(flag, reduction="sum").item()) and (stop.requested or 15)


# ---------------------------------------------------------------------------------------------
# Dry run and entry point


RESULT_FILE = "result.json"


def train_recipe_file(recipe_path: str, threads: int) -> dict[str, Any]:
    """Train one recipe file (the job of a sweep's worker process) and write its
    `result.json` (losses, tokens, FLOPs, speed) atomically beside its outputs."""
    torch.set_num_threads(threads)
    recipe = load_recipe(recipe_path)
    result = train(recipe, resume="auto", save_final=False, echo=lambda _: None, progress=False)
    record = {
        "recipe": recipe_path,
        "eval_loss": result.eval_loss,
        "train_loss": result.train_loss,
        "tokens": result.tokens,
        "steps": result.steps,
        "flops": result.flops_per_token * result.tokens,
        "tokens_per_s": result.tokens_per_s,
    }
    write_json_atomic(Path(recipe.output_dir) / RESULT_FILE, record)
    return record


def memory_plan(
    recipe: Recipe, world_size: int, model: torch.nn.Module | None = None
) -> dict[str, Any]:
    """Bytes per rank of `recipe` trained by `world_size` processes on its `parallel:` mesh:
    parameters, gradients and optimizer state (sharded over dp_shard × cp under FSDP, experts
    over ep), activations at the recipe's seq_len / cp_size and micro-batch, FSDP's gathered
    blocks (`zoo.parallel.mesh.memory_per_rank` states the formula); `model` defaults to the
    recipe's, built on the meta device (free). E.g. a long-context plan:

        recipe = load_recipe(path, ["training.seq_len=131072", "parallel.cp_size=8"])
        memory_plan(recipe, world_size=8)["total_gib"]
    """
    t = recipe.training
    if model is None:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(recipe.build_config())
    config = model.config
    sizes = recipe.parallel_sizes(world_size, config)

    def count(params: Iterator[torch.nn.Parameter]) -> int:
        return sum(p.numel() for p in {id(p): p for p in params}.values())

    experts = [m.parameters() for m in model.modules() if isinstance(m, Experts)]
    return memory_per_rank(
        sizes,
        parameters=model.num_parameters(),
        expert_parameters=count(p for params in experts for p in params),
        largest_block_parameters=max(count(b.parameters()) for b in blocks_of(model)),
        hidden_size=config.hidden_size,
        num_layers=config.num_hidden_layers,
        vocab_size=config.vocab_size,
        seq_len=t.seq_len,
        micro_batch_size=t.micro_batch_size,
        precision=t.precision,
    )


def dry_run(recipe: Recipe, world_size: int = 1) -> dict[str, Any]:
    """What a recipe would do, without data or training: parameters, tokens, FLOPs, steps, the
    mesh of its `parallel:` sizes (checked against `world_size`; each group's ranks) and the
    memory per rank (`memory_plan`). The model is built on the meta device, so a 7B recipe
    costs nothing."""
    plan = recipe.plan(world_size)
    config = recipe.build_config()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    sizes = recipe.parallel_sizes(world_size, config)
    flops = model_flops(model, recipe.training.seq_len)
    total_flops = flops.train_per_token * plan.tokens
    return {
        "recipe": recipe.source,
        "model": type(model).__name__,
        "layers": config.layer_pattern,
        "parameters": model.num_parameters(),
        "active_parameters": model.num_parameters(active=True),
        "non_embedding_parameters": model.num_parameters(exclude_embeddings=True),
        "sparsity": config.sparsity,
        "plan": dataclasses.asdict(plan),
        "forward_flops_per_token": flops.forward_per_token,
        "train_flops_per_token": flops.train_per_token,
        "train_flops": total_flops,
        "train_pflops_days": total_flops / 8.64e19,
        "state_size": model.state_size(1, recipe.training.seq_len),
        "mesh": {**dataclasses.asdict(sizes), "fsdp": sizes.fsdp},
        "mesh_groups": format_groups(sizes),
        "memory": memory_plan(recipe, world_size, model),
        "tokens_per_step": recipe.training.global_batch_tokens,
    }


def format_dry_run(report: dict[str, Any]) -> str:
    plan = report["plan"]
    lines = [
        f"recipe        {report['recipe']}",
        f"model         {report['model']}: {report['layers']}",
        f"parameters    {report['parameters'] / 1e6:,.1f}M total, "
        f"{report['active_parameters'] / 1e6:,.1f}M active, "
        f"{report['non_embedding_parameters'] / 1e6:,.1f}M non-embedding"
        + (f", sparsity {report['sparsity']:.3f}" if report["sparsity"] else ""),
        f"tokens        {plan['tokens']:,} in {plan['steps']:,} steps of "
        f"{plan['sequences_per_step']:,} sequences ({plan['accumulation']} micro-batches per "
        f"process × {plan['world_size'] // report['mesh']['cp']} data-parallel processes), "
        f"warmup {plan['warmup_steps']:,} steps",
        f"FLOPs/token   {report['forward_flops_per_token'] / 1e9:,.3f} G forward, "
        f"{report['train_flops_per_token'] / 1e9:,.3f} G training",
        f"train FLOPs   {report['train_flops']:.3e} ({report['train_pflops_days']:,.2f} PF-days)",
    ]
    mesh, memory = report["mesh"], report["memory"]
    sharding = f"FSDP2 over {mesh['dp_shard'] * mesh['cp']} ranks" if mesh["fsdp"] else "no FSDP"
    lines.append(f"mesh          {memory['mesh']}: {sharding}")
    lines += [f"  {line}" for line in report["mesh_groups"]]
    gib = {k: v / 2**30 for k, v in memory["bytes"].items()}
    lines += [
        f"memory/rank   {memory['total_gib']:,.2f} GiB: "
        + ", ".join(f"{k.replace('_', ' ')} {v:,.2f}" for k, v in gib.items())
        + " (GiB; no activation checkpointing)",
        f"tokens/step   {report['tokens_per_step']:,} in all; {memory['tokens_per_rank']:,} per "
        "rank per micro-batch",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> TrainResult | dict[str, Any]:
    """`zoo train`, `python -m zoo.train` and `recipes/train.py` (what `accelerate launch`
    runs): RECIPE [key=value ...] [--dry-run] [--resume ...] [--allow-changes]. Expected
    failures print one line and exit 2; a signal stops the run with a checkpoint and exits
    128 + the signal."""
    parser = argparse.ArgumentParser(
        prog="zoo.train", description="Train a zoo model from a YAML recipe (accelerate)."
    )
    parser.add_argument("recipe", type=Path, help="recipes/configs/<name>.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted key=value, e.g. training.steps=20")
    parser.add_argument("--dry-run", action="store_true", help="plan only: params, FLOPs, steps")
    parser.add_argument(
        "--resume",
        default="auto",
        help="auto (newest checkpoint in output_dir that verifies, if any), never, or a "
        "checkpoint folder",
    )
    parser.add_argument(
        "--allow-changes",
        action="store_true",
        help="resume even though optimizer, schedule, batch, steps or data settings changed",
    )
    parser.add_argument(
        "--world-size",
        type=int,
        default=None,
        help="processes to plan for in --dry-run (default: this launch's)",
    )
    args = parser.parse_intermixed_args(argv)  # overrides may follow the flags
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        if args.dry_run:
            world = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
            report = dry_run(recipe, world)
            print(format_dry_run(report))
            return report
        result = train(recipe, resume=args.resume, allow_changes=args.allow_changes)
    except TrainingStopped as stopped:
        print(stopped, file=sys.stderr)
        raise SystemExit(128 + stopped.signal) from None
    except (ValueError, OSError, NonFiniteLossError, RunInUseError) as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        raise SystemExit(2) from None
    if result.final_dir is not None and Accelerator().is_main_process:
        summary = f"done: loss {result.train_loss:.4f}"
        if result.eval_loss is not None and not math.isnan(result.eval_loss):
            summary += f", held-out {result.eval_loss:.4f}"
        print(f"{summary}; {result.tokens_per_s:,.0f} tokens/s; model in {result.final_dir}")
    return result


if __name__ == "__main__":  # python -m zoo.training RECIPE
    main()
