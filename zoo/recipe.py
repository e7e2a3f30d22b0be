"""Training recipes: one YAML file per run, validated on load, errors naming file and key.

A recipe names a model (a family preset, a named size or a layer pattern, plus config
overrides), the data, the tokenizer, the optimizer and its schedule, the token budget, batch and
sequence length, precision, the log/eval/checkpoint intervals, and how the processes split
(`parallel:`, `zoo.parallel.mesh`). `base: other.yaml` (relative to the file) inherits another
recipe; keys given here win, nested sections merge key by key.
Command-line overrides are dotted `key=value` pairs parsed as YAML scalars, e.g.
`training.steps=20 optimizer.lr=1e-3 model.overrides.hidden_size=64`.

    recipe = load_recipe("recipes/configs/tiny-tnl.yaml", ["training.steps=20"])
    config = recipe.build_config()          # a validated ZooConfig
    plan = recipe.plan(world_size=2)        # steps, gradient accumulation, tokens
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from zoo import registry
from zoo.configuration import HybridConfig, ZooConfig
from zoo.data import CorpusConfig
from zoo.parallel.mesh import ParallelSizes, resolve_sizes

M = TypeVar("M", bound=BaseModel)


class RecipeError(ValueError):
    """A recipe that cannot run; the message names the file and the key."""


class _Section(BaseModel):
    # No setting of a run may be NaN or infinite (`optimizer.lr: .inf` is a typo, not a choice).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def import_modules(modules: list[str]) -> list[str]:
    """Import `modules` (they register mixers or families with `zoo.register_mixer`, ...)."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise ValueError(f"cannot import {module!r}: {error}") from None
    return modules


class ModelSection(_Section):
    imports: list[str] = Field(
        default_factory=list,
        description="modules to import first: they register your own mixers or families",
    )
    preset: str = Field(description="family: a registered family (zoo.registry.families())")
    size: str | None = Field(None, description="a named size of the family")
    pattern: str | None = Field(None, description="hybrid layer pattern (preset: hybrid)")
    overrides: dict[str, Any] = Field(default_factory=dict, description="ZooConfig fields")

    @field_validator("imports")
    @classmethod
    def _import_first(cls, modules: list[str]) -> list[str]:
        return import_modules(modules)

    @model_validator(mode="after")
    def _known_preset(self) -> ModelSection:
        if self.preset not in registry.families():
            raise ValueError(f"preset={self.preset!r} is not one of {sorted(registry.families())}")
        if self.pattern is not None and self.preset != "hybrid":
            raise ValueError("pattern needs preset: hybrid")
        if self.pattern is not None and self.size is not None:
            raise ValueError("give a size or a pattern, not both")
        return self


class SyntheticData(_Section):
    """The embedded corpus (zoo.data.CorpusConfig fields)."""

    seed: int = 0
    train_docs: int = Field(CorpusConfig.train_docs, gt=0)
    validation_docs: int = Field(CorpusConfig.validation_docs, gt=0)


class HFData(_Section):
    """A `datasets` dataset, streamed (needs `datasets` and the network)."""

    path: str
    name: str | None = None
    split: str = "train"
    validation_split: str | None = None
    text_field: str = "text"
    shuffle_buffer: int = Field(10_000, gt=0)


class DataSection(_Section):
    source: Literal["synthetic", "files", "hf"] = "synthetic"
    train_files: list[Path] = Field(
        default_factory=list, description="text or .jsonl files, or folders of text files"
    )
    validation_files: list[Path] = Field(default_factory=list)
    text_field: str = "text"
    documents: Literal["file", "blank_lines"] = Field(
        "file", description="a text file is one document, or one per blank-line-separated part"
    )
    synthetic: SyntheticData = SyntheticData()
    hf: HFData | None = None
    cache_dir: Path = Field(
        Path("~/.cache/hybrid-zoo/tokens"), description="memory-mapped token caches"
    )

    @model_validator(mode="after")
    def _source_has_what_it_needs(self) -> DataSection:
        if self.source == "files" and not self.train_files:
            raise ValueError("source: files needs train_files")
        if self.source == "hf" and self.hf is None:
            raise ValueError("source: hf needs an hf section (path, split, ...)")
        return self


class OptimizerSection(_Section):
    """AdamW; weight decay on matrices only (never norms, biases or a mixer's exempt params)."""

    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    fused: bool | None = Field(None, description="None: fused where the device supports it")


class ScheduleSection(_Section):
    """Learning rate as a function of the optimizer step."""

    kind: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int | None = Field(None, ge=0)
    warmup_fraction: float = Field(0.01, ge=0, le=1)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="floor of cosine / end of WSD decay")
    decay_fraction: float = Field(0.2, gt=0, le=1, description="WSD: share of steps decaying")


class TrainingSection(_Section):
    steps: int | None = Field(None, gt=0, description="optimizer steps (or give tokens)")
    tokens: int | None = Field(None, gt=0, description="token budget (or give steps)")
    global_batch_tokens: int = Field(gt=0, description="tokens per optimizer step, all ranks")
    micro_batch_size: int = Field(gt=0, description="sequences per forward, per process")
    seq_len: int = Field(gt=0)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    grad_clip: float | None = Field(1.0, gt=0)
    compile: bool = Field(
        False, description="torch.compile the model in place (nn.Module.compile: same "
        "parameters, same checkpoints); the first steps pay the compilation",
    )  # fmt: skip
    seed: int = 0
    peak_tflops: float | None = Field(
        None, gt=0, description="device peak for MFU; None: known GPUs only"
    )

    @model_validator(mode="after")
    def _one_budget(self) -> TrainingSection:
        if (self.steps is None) == (self.tokens is None):
            raise ValueError("give exactly one of steps and tokens")
        return self


class ParallelSection(_Section):
    """How the processes of a run split (`zoo.parallel.mesh`), in accelerate's
    `ParallelismConfig` names: dp_replicate × dp_shard × cp must equal the world size, and
    ep_size divides dp_shard × cp. The defaults are plain data parallelism over every process.
    The mesh only changes how the same step is computed, so a resumed run may change it freely
    (a sharded checkpoint then needs `python -m zoo.train_state reshard` first)."""

    dp_replicate_size: int | None = Field(
        None, ge=1, description="data-parallel replicas; None: what the other dims leave"
    )
    dp_shard_size: int = Field(
        1, ge=1, description="FSDP2: ranks each replica shards parameters, gradients and "
        "optimizer state over (> 1 turns it on; HSDP with dp_replicate_size > 1)",
    )  # fmt: skip
    cp_size: int = Field(1, ge=1, description="context parallel: ranks one sequence is split over")
    ep_size: int = Field(
        1, ge=1, description="expert parallel: ranks the experts of a MoE layer are split over "
        "(taken from the dp_shard × cp ranks)",
    )  # fmt: skip


class LoggingSection(_Section):
    log_every: int = Field(10, gt=0)
    eval_every: int | None = Field(None, gt=0, description="None: only at the end")
    eval_batches: int = Field(8, gt=0)
    checkpoint_every: int | None = Field(None, gt=0, description="None: no checkpoints")
    keep_last: int = Field(2, gt=0)
    tensorboard: bool = Field(True, description="when tensorboard is installed")


class Recipe(_Section):
    model: ModelSection
    tokenizer: str | None = Field(None, description="None: the embedded byte tokenizer")
    data: DataSection = DataSection()
    optimizer: OptimizerSection = OptimizerSection()
    schedule: ScheduleSection = ScheduleSection()
    training: TrainingSection
    logging: LoggingSection = LoggingSection()
    parallel: ParallelSection = ParallelSection()
    output_dir: Path
    source: str | None = Field(None, description="the file it was read from (set on load)")

    def build_config(self, tokenizer: Any = None) -> ZooConfig:
        """The validated model config; unknown override fields and bad values name the key.

        With the run's `tokenizer`, the tokenizer decides the vocabulary and the special-token
        ids (bos, eos, pad), so config.json, generation_config.json and the tokenizer agree;
        `model.overrides.vocab_size` may still widen the vocabulary (e.g. to a multiple of 64),
        never narrow it below the tokenizer's.
        """
        section = self.model
        cls = registry.family(section.preset).config_class()
        known = cls.field_names()
        for key in section.overrides:
            if key not in known:
                raise RecipeError(
                    f"{self.source}: model.overrides.{key}: not a field of {cls.__name__}"
                )
        fields = dict(section.overrides)
        if tokenizer is not None:
            size = len(tokenizer)
            if fields.get("vocab_size", size) < size:
                raise RecipeError(
                    f"{self.source}: model.overrides.vocab_size={fields['vocab_size']} is smaller "
                    f"than the tokenizer's {size} tokens; remove it (the tokenizer sets it) or "
                    f"make it at least {size}"
                )
            fields.setdefault("vocab_size", size)
            for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
                fields.setdefault(name, getattr(tokenizer, name))
        try:
            if section.pattern is not None:
                return HybridConfig.from_pattern(section.pattern, **fields)
            if section.size is not None:
                return cls.from_size(section.size, **fields)
            return cls(**fields)
        except (ValueError, TypeError) as error:
            raise RecipeError(f"{self.source}: model: {error}") from None

    def parallel_sizes(self, world_size: int, config: ZooConfig | None = None) -> ParallelSizes:
        """The `parallel:` sizes for `world_size` processes, checked against the world size,
        `training.seq_len` and, with the model's `config`, its number of experts; a misfit is
        a one-line `RecipeError` naming the key."""
        p = self.parallel
        num_experts = None
        if config is not None:
            num_experts = config.num_experts if config.has_moe else 0
        try:
            sizes = resolve_sizes(
                world_size, p.dp_replicate_size, p.dp_shard_size, p.cp_size, p.ep_size,
                num_experts,
            )  # fmt: skip
        except ValueError as error:
            raise RecipeError(f"{self.source}: {error}") from None
        if self.training.seq_len % sizes.cp:
            raise RecipeError(
                f"{self.source}: parallel.cp_size={sizes.cp}: training.seq_len="
                f"{self.training.seq_len} is not divisible by it"
            )
        return sizes

    def plan(self, world_size: int = 1) -> TrainingPlan:
        """Steps, gradient accumulation and token counts for `world_size` processes (of which
        world_size ÷ parallel.cp_size read different batches)."""
        t = self.training
        data_parallel = self.parallel_sizes(world_size).dp
        per_micro_step = t.micro_batch_size * t.seq_len * data_parallel
        if t.global_batch_tokens % per_micro_step:
            raise RecipeError(
                f"{self.source}: training.global_batch_tokens={t.global_batch_tokens} is not a "
                f"multiple of training.micro_batch_size × training.seq_len × data-parallel "
                f"processes = {t.micro_batch_size} × {t.seq_len} × {data_parallel} = "
                f"{per_micro_step}"
            )
        steps = t.steps if t.steps is not None else math.ceil(t.tokens / t.global_batch_tokens)
        s = self.schedule
        warmup = s.warmup_steps if s.warmup_steps is not None else round(s.warmup_fraction * steps)
        return TrainingPlan(
            steps=steps,
            accumulation=t.global_batch_tokens // per_micro_step,
            world_size=world_size,
            warmup_steps=min(warmup, steps),
            tokens=steps * t.global_batch_tokens,
            sequences_per_step=t.global_batch_tokens // t.seq_len,
        )


@dataclasses.dataclass(frozen=True)
class TrainingPlan:
    steps: int
    accumulation: int
    """Micro-batches per process per optimizer step."""
    world_size: int
    """Processes (ranks of a context-parallel group share each micro-batch)."""
    warmup_steps: int
    tokens: int
    sequences_per_step: int


def lr_factor(step: int, plan: TrainingPlan, schedule: ScheduleSection) -> float:
    """Multiplier of the peak learning rate before optimizer step `step` (0-based).

    Linear warmup over `warmup_steps`, then: cosine from 1 to `min_lr_ratio` at the last step;
    WSD (warmup-stable-decay, MiniCPM) constant at 1 until the last `decay_fraction` of the
    steps, then linear to `min_lr_ratio`; or constant 1 (the scaling-law paper's schedule).
    """
    warmup, total = plan.warmup_steps, plan.steps
    if step < warmup:
        return (step + 1) / warmup
    if schedule.kind == "constant":
        return 1.0
    floor = schedule.min_lr_ratio
    if schedule.kind == "cosine":
        progress = (step - warmup) / max(1, total - 1 - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    decay_steps = max(1, round(schedule.decay_fraction * total))
    decay_start = total - decay_steps
    if step < decay_start:
        return 1.0
    progress = (step - decay_start + 1) / decay_steps
    return 1.0 - (1.0 - floor) * min(1.0, progress)


# ---------------------------------------------------------------------------------------------
# Loading


def merge_fields(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """`top` over `base`, section by section (model.overrides key by key), as `base:` merges."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "overrides":
            out[key] = merge_fields(out[key], value)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):  # model.overrides
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def recipe_fields(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A recipe file's keys with its `base:` chain merged in, before validation."""
    if not path.is_file():
        raise RecipeError(f"{path}: no such recipe file")
    if path.resolve() in seen:
        raise RecipeError(f"{path}: base recipes form a cycle: {[str(p) for p in seen]}")
    try:
        fields = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise RecipeError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(fields, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of sections, got {type(fields).__name__}")
    base = fields.pop("base", None)
    if base is None:
        return fields
    return merge_fields(recipe_fields(path.parent / base, (*seen, path.resolve())), fields)


def _apply_override(fields: dict[str, Any], assignment: str, source: str) -> None:
    key, sep, text = assignment.partition("=")
    if not sep or not key:
        raise RecipeError(f"{source}: override {assignment!r} is not key=value")
    *parents, leaf = key.split(".")
    node = fields
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RecipeError(f"{source}: override {key}: {part} is not a section")
    node[leaf] = yaml.safe_load(text)


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, merge (`base:`), override and validate a recipe; `RecipeError` names file and key.

    Relative data paths and `output_dir` are taken as given (relative to the working directory,
    where `accelerate launch` runs), like every other training tool.
    """
    path = Path(path)
    fields = recipe_fields(path)
    for assignment in overrides:
        _apply_override(fields, assignment, str(path))
    fields["source"] = str(path)
    return validate_file_fields(Recipe, fields, path)


def load_settings_file(schema: type[M], path: str | Path) -> M:
    """A YAML settings file (a sweep, a search, an experiment) validated by `schema`, with its
    `base` recipe path, where the schema has one, resolved relative to the file."""
    path = Path(path)
    try:
        fields = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise RecipeError(f"{path}: {error}") from None
    settings = validate_file_fields(schema, fields, path)
    base = getattr(settings, "base", None)
    if isinstance(base, Path) and not base.is_absolute():
        settings = settings.model_copy(update={"base": (path.parent / base).resolve()})
    return settings


def validate_file_fields(schema: type[M], fields: Any, path: Path) -> M:
    """`schema` validated from a file's fields; `RecipeError` names the file and every bad key."""
    try:
        return schema.model_validate(fields)
    except ValidationError as error:
        problems = []
        for item in error.errors():
            where = ".".join(str(part) for part in item["loc"]) or "(top level)"
            message = item["msg"]
            if item["type"] == "extra_forbidden":
                message = "unknown key"
            problems.append(f"{path}: {where}: {message}")
        raise RecipeError("\n".join(problems)) from None
