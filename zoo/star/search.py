"""STAR's evolution: NSGA-II (pymoo) over genomes, each scored by a short training run.

    zoo star search benchmarks/results/star/search.yaml runs/star    # resumable
    zoo star report runs/star --out benchmarks/results/star          # fronts, best genomes

The search file (`SearchConfig`) fixes the backbone (depth, width, sharing groups), the recipe
every candidate trains with, the objectives and the evolution's sizes. Objectives, all
minimised: `loss` (held-out loss of the recipe's short run on its validation split), `params`
(parameters, shared weights once) and `cache` (decode-cache elements after `cache_context`
tokens at batch 1, `ZooPreTrainedModel.state_size`).

Each candidate is keyed by `Genome.digest` (the hash of the architecture it decodes to) and
trained in `<run>/evals/<digest>/` by a worker process; its `result.json` (written atomically at
the end of training) is the evaluation cache. The run folder also holds the search file it was
started with, `generations.jsonl` (one line per generation: every member's genome and
objectives, and the first front) and `population.json` (the latest population, atomic).

Resume: the algorithm is a pure function of its seed and the evaluations, so `search` on an
existing run folder replays the evolution from generation 0, taking every evaluation it already
has from the cache (no training) and training only the missing ones. A search killed anywhere,
mid-generation included, continues to exactly the population an uninterrupted run reaches;
replayed generations are checked against the log. The same replay extends a finished search:
rerun it with a larger `generations` (every other field must match).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field

from zoo.atomic import write_json_atomic, write_text_atomic
from zoo.configuration import parse_layer_pattern
from zoo.recipe import (
    RecipeError,
    import_modules,
    load_settings_file,
    merge_fields,
    recipe_fields,
)
from zoo.star.genome import (
    CHANNEL_CLASSES,
    TOKEN_CLASSES,
    Backbone,
    Genome,
    LIVClass,
    crossover,
    decode,
    from_layers,
    mutate,
    random_vector,
)
from zoo.star.genome import repair as repair_vector
from zoo.training import RESULT_FILE, train_recipe_file

logger = logging.getLogger(__name__)

OBJECTIVES = ("loss", "params", "cache")
SEARCH_FILE = "search.yaml"
LOG_FILE = "generations.jsonl"
POPULATION_FILE = "population.json"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LIVClassSection(_Section):
    """A class added to the pool: a mixer registered outside the zoo (see `zoo.star.LIVClass`)."""

    name: str
    operator: str = Field(description="the registered sequence or channel mixer")
    kind: Literal["token", "channel"] = "token"
    code: tuple[int, int, int, int, int] = Field(
        description="STAR's operator code: featurizer, token mixing, sparsity, nonlinearity, "
        "channel mixing"
    )
    expansion: list[tuple[str, Any]] = Field(default_factory=list)
    repeat: list[int] = Field(default_factory=list)


class BackboneSection(_Section):
    blocks: int = Field(4, gt=0, description="(token, channel) pairs: 2·blocks LIV positions")
    hidden_size: int = Field(64, gt=0)
    num_attention_heads: int = Field(4, gt=0)
    groups: int = Field(2, gt=0, le=9, description="sharing groups per kind of sharing")
    num_experts: int = Field(4, gt=0, description="experts of the MoE class")
    num_experts_per_tok: int = Field(2, gt=0)
    config: dict[str, Any] = Field(default_factory=dict, description="other HybridConfig fields")
    classes: list[LIVClassSection] = Field(
        default_factory=list, description="classes added to the zoo's pool"
    )


class SearchConfig(_Section):
    imports: list[str] = Field(
        default_factory=list,
        description="modules to import first: they register the mixers `backbone.classes` name",
    )
    base: Path = Field(description="the recipe every candidate trains with (relative to this file)")
    overrides: dict[str, Any] = Field(default_factory=dict, description="recipe keys, nested")
    backbone: BackboneSection = BackboneSection()
    objectives: list[Literal["loss", "params", "cache"]] = ["loss", "params", "cache"]
    cache_context: int = Field(2048, gt=0, description="tokens at which `cache` is counted")
    population: int = Field(12, gt=1)
    generations: int = Field(6, gt=0, description="including the random first one")
    mutation_rate: float = Field(0.1, ge=0, le=1, description="per-gene probability (STAR: 10%)")
    crossover_points: int = Field(2, gt=0, description="k of k-point crossover (STAR: 2)")
    crossover_prob: float = Field(0.9, ge=0, le=1)
    seed: int = 0
    baselines: dict[str, str] = Field(
        default_factory=dict,
        description="name → layer pattern of a hand-made model on the same backbone",
    )


def load_search(path: str | Path) -> SearchConfig:
    return load_settings_file(SearchConfig, path)


def backbone_of(config: SearchConfig) -> Backbone:
    """The search space: the backbone with the zoo's pool plus the search's own classes."""
    import_modules(config.imports)
    fields = config.backbone.model_dump(exclude={"classes"})
    extra = {"token": [], "channel": []}
    for cls in config.backbone.classes:
        extra[cls.kind].append(
            LIVClass(
                cls.name,
                cls.operator,
                cls.code,
                tuple(tuple(option) for option in cls.expansion),
                tuple(cls.repeat),
            )
        )
    return Backbone(
        **fields,
        token_classes=TOKEN_CLASSES + tuple(extra["token"]),
        channel_classes=CHANNEL_CLASSES + tuple(extra["channel"]),
    )


def baseline_genomes(config: SearchConfig) -> dict[str, Genome]:
    """The hand-made baselines as genomes (MLPs at the 8/3 expansion, as in LLaMA)."""
    space = backbone_of(config)
    out = {}
    for name, pattern in config.baselines.items():
        try:
            mixers, channels = parse_layer_pattern(pattern)
            out[name] = from_layers(mixers, channels, space, {"SwiGLU": (1, 0), "GLU": (1, 0)})
        except ValueError as error:
            raise RecipeError(f"baselines.{name}: {error}") from None
    return out


# -- evaluation ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Evaluation:
    genome: str
    digest: str
    loss: float
    params: int
    cache: int

    def objectives(self, names: Sequence[str]) -> list[float]:
        return [float(getattr(self, name)) for name in names]


Quality = Callable[[list[tuple[str, dict[str, Any]]], Callable[[str, float], None]], None]
"""Scores candidates: `quality(todo, done)` with todo = [(digest, HybridConfig fields)] calls
`done(digest, held-out loss)` as each candidate finishes (so a kill loses only those in flight)."""


def model_size(genome: Genome, space: Backbone, cache_context: int) -> tuple[int, int]:
    """(parameters, cache elements at `cache_context` tokens), on the meta device: no memory."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(decode(genome, space))
    return model.num_parameters(), model.state_size(1, cache_context)


def base_recipe(config: SearchConfig) -> dict[str, Any]:
    """The recipe fields every candidate of `config` shares (its base file and overrides)."""
    fields = merge_fields(recipe_fields(config.base), config.overrides)
    fields.pop("source", None)
    return fields


def candidate_recipe(
    base: dict[str, Any], model_fields: dict[str, Any], output_dir: Path
) -> dict[str, Any]:
    """The recipe a candidate trains with: the base recipe, the decoded model."""
    top = {
        "model": {"preset": "hybrid", "size": None, "pattern": None},
        "output_dir": str(output_dir),
    }
    fields = merge_fields(base, top)
    fields["model"]["overrides"] = model_fields
    return fields


class TrainingQuality:
    """The default quality: train the search's recipe with the candidate model in a worker
    process (`workers` at a time, `threads` torch threads each) and read its held-out loss."""

    def __init__(self, config: SearchConfig, run_dir: Path, workers: int, threads: int) -> None:
        self.base = base_recipe(config)
        self.run_dir = run_dir
        self.workers = workers
        self.threads = threads

    def __call__(
        self, todo: list[tuple[str, dict[str, Any]]], done: Callable[[str, float], None]
    ) -> None:
        import concurrent.futures

        from zoo.workers import process_pool

        paths = {}
        for digest, model_fields in todo:
            folder = self.run_dir / "evals" / digest
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / "recipe.yaml"
            recipe = candidate_recipe(self.base, model_fields, folder)
            path.write_text(yaml.safe_dump(recipe, sort_keys=False))
            paths[digest] = str(path)
        if self.workers <= 1:
            for digest, path in paths.items():
                done(digest, train_recipe_file(path, self.threads)["eval_loss"])
            return
        with process_pool(self.workers) as pool:
            futures = {pool.submit(train_recipe_file, p, self.threads): d for d, p in paths.items()}
            for future in concurrent.futures.as_completed(futures):
                done(futures[future], future.result()["eval_loss"])


class Evaluations:
    """Every evaluation of a run, cached on disk by digest (`evals/<digest>/result.json`)."""

    def __init__(self, run_dir: Path, space: Backbone, cache_context: int, quality: Quality):
        self.run_dir = run_dir
        self.space = space
        self.cache_context = cache_context
        self.quality = quality
        self._sizes: dict[str, tuple[int, int]] = {}

    def cached_loss(self, digest: str) -> float | None:
        path = self.run_dir / "evals" / digest / RESULT_FILE
        if not path.is_file():
            return None
        return float(json.loads(path.read_text())["eval_loss"])

    def store(self, digest: str, loss: float) -> None:
        """Record a loss computed outside `TrainingQuality` (which writes result.json itself)."""
        path = self.run_dir / "evals" / digest / RESULT_FILE
        if not path.is_file():
            write_json_atomic(path, {"eval_loss": loss})

    def __call__(self, genomes: list[Genome], progress: Callable[[int], None]) -> list[Evaluation]:
        from zoo.star.genome import decode_fields

        digests = [g.digest(self.space) for g in genomes]
        losses = {d: self.cached_loss(d) for d in digests}
        todo = {d: g for d, g in zip(digests, genomes, strict=True) if losses[d] is None}
        progress(len(genomes) - len(todo))

        def done(digest: str, loss: float) -> None:
            self.store(digest, loss)
            losses[digest] = loss
            progress(1)

        if todo:
            self.quality([(d, decode_fields(g, self.space)) for d, g in todo.items()], done)
        missing = [d for d in todo if losses[d] is None]
        if missing:
            raise RuntimeError(f"the quality function returned no loss for {missing}")
        out = []
        for genome, digest in zip(genomes, digests, strict=True):
            if digest not in self._sizes:
                self._sizes[digest] = model_size(genome, self.space, self.cache_context)
            params, cache = self._sizes[digest]
            out.append(Evaluation(str(genome), digest, losses[digest], params, cache))
        return out


# -- pymoo ----------------------------------------------------------------------------------------


def _algorithm(config: SearchConfig, space: Backbone):
    """NSGA-II with STAR's variation operators, set up for `config`'s seed."""
    from pymoo.algorithms.moo.nsga2 import NSGA2
    from pymoo.core.crossover import Crossover
    from pymoo.core.mutation import Mutation
    from pymoo.core.problem import Problem
    from pymoo.core.repair import Repair
    from pymoo.core.sampling import Sampling

    class GenomeSampling(Sampling):
        def _do(self, problem, n_samples, *args, random_state=None, **kwargs):
            return np.stack([random_vector(space, random_state) for _ in range(n_samples)])

    class GenomeCrossover(Crossover):
        def __init__(self) -> None:
            super().__init__(2, 2, prob=config.crossover_prob)

        def _do(self, problem, X, *args, random_state=None, **kwargs):
            out = np.empty_like(X)
            for k in range(X.shape[1]):
                out[0, k], out[1, k] = crossover(
                    X[0, k], X[1, k], space, random_state, config.crossover_points
                )
            return out

    class GenomeMutation(Mutation):
        def _do(self, problem, X, *args, random_state=None, **kwargs):
            return np.stack([mutate(x, space, random_state, config.mutation_rate) for x in X])

    class GenomeRepair(Repair):
        def _do(self, problem, X, **kwargs):
            return np.stack([repair_vector(x, space) for x in X])

    low, high = space.bounds()
    problem = Problem(n_var=space.length, n_obj=len(config.objectives), xl=low, xu=high, vtype=int)
    algorithm = NSGA2(
        pop_size=config.population,
        sampling=GenomeSampling(),
        crossover=GenomeCrossover(),
        mutation=GenomeMutation(),
        repair=GenomeRepair(),
        eliminate_duplicates=True,
    )
    algorithm.setup(problem, termination=("n_gen", config.generations), seed=config.seed)
    return problem, algorithm


def _first_front(values: np.ndarray) -> list[int]:
    from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

    return sorted(int(i) for i in NonDominatedSorting().do(values, only_non_dominated_front=True))


def _check_run_dir(run_dir: Path, config: SearchConfig) -> list[dict[str, Any]]:
    """The generations logged by an earlier search in `run_dir` (after checking it ran the same
    search file), or [] for a new folder."""
    saved = run_dir / SEARCH_FILE
    fields = json.loads(config.model_dump_json())
    if saved.is_file():
        before = yaml.safe_load(saved.read_text())
        changed = sorted(
            k
            for k in fields.keys() | before.keys()
            if k != "generations" and fields.get(k) != before.get(k)
        )
        if changed:
            raise RecipeError(
                f"{run_dir} holds a different search ({saved}: {', '.join(changed)} differ); "
                "resume with the same search file (only `generations` may grow) or start a new "
                "run folder"
            )
    write_text_atomic(saved, yaml.safe_dump(fields, sort_keys=True))
    log = run_dir / LOG_FILE
    if not log.is_file():
        return []
    lines = log.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise RecipeError(f"{log}:{number}: not a JSON line") from None
            # A line cut by a kill: that generation is replayed and logged again.
    if len(records) > config.generations:
        raise RecipeError(
            f"{log} has {len(records)} generations; generations={config.generations} would "
            "drop some (a search can be extended, not shortened)"
        )
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def search(
    config: SearchConfig,
    run_dir: str | Path,
    *,
    workers: int = 1,
    threads: int | None = None,
    quality: Quality | None = None,
    show_progress: bool = True,
) -> list[Evaluation]:
    """Run (or resume) a search; returns the final population's evaluations, first front first.

    `quality` replaces the training run (tests use cheap deterministic scores)."""
    from pymoo.core.evaluator import Evaluator
    from pymoo.problems.static import StaticProblem
    from tqdm.auto import tqdm

    run_dir = Path(run_dir)
    space = backbone_of(config)
    logged = _check_run_dir(run_dir, config)
    threads = threads or max(1, (os.cpu_count() or 1) // max(1, workers))
    quality = quality or TrainingQuality(config, run_dir, workers, threads)
    evaluations = Evaluations(run_dir, space, config.cache_context, quality)
    problem, algorithm = _algorithm(config, space)

    bar = tqdm(
        total=config.population * config.generations,
        desc="STAR search",
        unit="eval",
        disable=not show_progress,
    )
    for name, genome in baseline_genomes(config).items():
        (baseline,) = evaluations([genome], lambda _: None)
        bar.set_postfix_str(f"baseline {name}: loss {baseline.loss:.3f}")
    population: list[Evaluation] = []
    generation = 0
    while algorithm.has_next():
        offspring = algorithm.ask()
        genomes = [Genome.from_vector(x, space) for x in offspring.get("X")]
        scored = evaluations(genomes, bar.update)
        values = np.array([e.objectives(config.objectives) for e in scored])
        Evaluator().eval(StaticProblem(problem, F=values), offspring)
        algorithm.tell(infills=offspring)

        members = [Genome.from_vector(x, space) for x in algorithm.pop.get("X")]
        population = evaluations(members, lambda _: None)
        front = _first_front(np.array([e.objectives(config.objectives) for e in population]))
        record = {
            "generation": generation,
            "population": [dataclasses.asdict(e) for e in population],
            "front": front,
        }
        if generation < len(logged):
            if logged[generation]["population"] != record["population"]:
                raise RuntimeError(
                    f"replaying generation {generation} of {run_dir} gave another population "
                    "than the log: the evaluations or the search code changed since"
                )
        else:
            with (run_dir / LOG_FILE).open("a") as log:
                log.write(json.dumps(record) + "\n")
        write_json_atomic(run_dir / POPULATION_FILE, record)
        best = min(e.loss for e in population)
        bar.set_postfix_str(f"gen {generation}: best loss {best:.3f}, front {len(front)}")
        generation += 1
    bar.close()
    front = set(_first_front(np.array([e.objectives(config.objectives) for e in population])))
    return sorted(population, key=lambda e: (population.index(e) not in front, e.loss))
