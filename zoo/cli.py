"""The `zoo` command line (typer). Only this module prints; the library logs.

`main` is the console script: every expected failure of any command (bad input, a missing or
corrupt file, a refused checkpoint, a diverged run, no network) ends as one line on stderr and
exit status 2; a run stopped by SIGTERM or Ctrl-C exits 128 + the signal. Commands import what
they need when they run, so `zoo --help` starts without torch.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup


def _expected_errors() -> tuple[type[BaseException], ...]:
    """What a user can cause: bad values and files (ValueError, OSError: missing, corrupt or
    refused checkpoints, a full disk, no network), a diverged run, a run folder in use."""
    from zoo.run_guard import RunInUseError

    errors: list[type[BaseException]] = [ValueError, OSError, RunInUseError]
    if "zoo.training" in sys.modules:
        errors.append(sys.modules["zoo.training"].NonFiniteLossError)
    return tuple(errors)


class _OneLineErrors(TyperGroup):
    """The one handler of every command (and subcommand) for the failures a user can cause."""

    def invoke(self, ctx: Any) -> Any:
        from zoo.run_guard import TrainingStopped

        try:
            return super().invoke(ctx)
        except TrainingStopped as stopped:
            typer.echo(str(stopped), err=True)
            raise typer.Exit(128 + stopped.signal) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None
        except _expected_errors() as error:
            typer.echo(f"error: {_one_line(error)}", err=True)
            raise typer.Exit(2) from None


app = typer.Typer(
    cls=_OneLineErrors,
    help="hybrid-zoo: efficient sequence models, their kernels, recipes and evals.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def main() -> None:
    """The `zoo` console script."""
    app()


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= 600 else text[:599] + "…"


def _register_models() -> None:
    """Register every zoo family (and SAFFU) with transformers' Auto classes, as `import zoo`
    does outside this command line."""
    import zoo.modeling
    import zoo.saffu.model  # noqa: F401


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Where the trained models are saved.")] = Path(
        "runs/demo"
    ),
    steps: Annotated[int, typer.Option(help="Training steps per model.")] = 300,
    families: Annotated[
        str,
        typer.Option(
            "--families",
            "--family",
            help="Comma-separated families (zoo describe --list shows them).",
        ),
    ] = "llama,tnl",
    threads: Annotated[int, typer.Option(help="torch CPU threads (0 = torch's default).")] = 0,
) -> None:
    """Train tiny models (default: LLaMA, TNL) on the embedded corpus; save, reload, generate."""
    import torch
    from rich.console import Console
    from rich.table import Table

    from zoo import registry
    from zoo.demo import DemoSettings, run_demo

    names = [name.strip() for name in families.split(",") if name.strip()]
    unknown = [name for name in names if name not in registry.families()]
    if unknown or not names:
        raise typer.BadParameter(
            f"unknown families {unknown}; allowed: {list(registry.families())}",
            param_hint="--families",
        )
    if steps <= 0:
        raise typer.BadParameter(f"steps={steps} must be positive", param_hint="--steps")
    if threads > 0:
        torch.set_num_threads(threads)
    console = Console(width=max(Console().width, 110))  # the table stays whole in logs
    results = run_demo(out, DemoSettings(steps=steps), names, echo=console.print)
    table = Table(
        title=f"hybrid-zoo demo ({steps} steps each, CPU, {torch.get_num_threads()} threads)"
    )
    columns = (
        "model",
        "params (active)",
        "held-out loss",
        "unigram H",
        "train tok/s",
        "cache B/tok @2K",
        "NIAH acc",
    )
    for column in columns:
        table.add_column(column, justify="left" if column == "model" else "right", no_wrap=True)
    for r in results:
        table.add_row(
            r.family,
            f"{r.params / 1e6:.2f}M"
            + (f" ({r.active_params / 1e6:.2f}M)" if r.active_params != r.params else ""),
            f"{r.heldout_loss:.3f}",
            f"{r.unigram_entropy:.3f}",
            f"{r.train_tokens_per_s:,.0f}",
            f"{r.cache_bytes_per_token_2k:,.0f}",
            f"{r.niah_accuracy:.2f}",
        )
    console.print(table)
    console.print(f"Saved to {out}/ (one Hub-style folder per model) and {out}/summary.json")
    failed = [r.family for r in results if r.heldout_loss >= r.unigram_entropy]
    if failed:
        console.print(f"[red]held-out loss did not beat the unigram entropy: {failed}[/red]")
        raise typer.Exit(1)


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def train(
    ctx: typer.Context,
    recipe: Annotated[
        Path, typer.Argument(help="A YAML recipe, e.g. recipes/configs/tiny-tnl.yaml.")
    ],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print parameters, tokens, FLOPs and steps only.")
    ] = False,
    resume: Annotated[
        str,
        typer.Option(help="auto (newest checkpoint that verifies), never, or a folder."),
    ] = "auto",
    allow_changes: Annotated[
        bool,
        typer.Option(
            "--allow-changes",
            help="Resume although optimizer, schedule, batch, steps or data settings changed.",
        ),
    ] = False,
    world_size: Annotated[
        int | None, typer.Option(help="Processes to plan for in --dry-run.")
    ] = None,
) -> None:
    """Train from a recipe in this process (key=value arguments override recipe keys).

    Several processes or GPUs: `accelerate launch -m zoo.train RECIPE ...` runs the same loop.
    """
    from zoo.training import main as train_main

    argv = [str(recipe), *ctx.args, "--resume", resume]
    if dry_run:
        argv.append("--dry-run")
    if allow_changes:
        argv.append("--allow-changes")
    if world_size is not None:
        argv += ["--world-size", str(world_size)]
    train_main(argv)


@app.command(name="eval")
def eval_(
    model: Annotated[
        str | None,
        typer.Argument(help="A checkpoint folder or Hub id (for mqar, niah, commonsense tasks)."),
    ] = None,
    tasks: Annotated[
        str,
        typer.Option(help="Comma-separated: mad, mqar, niah, perplexity, piqa, hellaswag, ..."),
    ] = "mqar,niah",
    architectures: Annotated[
        str | None,
        typer.Option(help="Train-from-scratch protocols (mad, mqar) for these architectures."),
    ] = None,
    output: Annotated[Path, typer.Option(help="Folder for results.json, tables, plots.")] = Path(
        "runs/eval"
    ),
    data_dir: Annotated[
        Path | None, typer.Option(help="Folder of <task>.jsonl files for commonsense tasks.")
    ] = None,
    text: Annotated[Path | None, typer.Option(help="A .txt/.jsonl file for perplexity.")] = None,
    niah_style: Annotated[str, typer.Option(help="passkey, or corpus (the demo's format).")] = (
        "passkey"
    ),
    quick: Annotated[bool, typer.Option(help="Tiny grids and training runs (smoke test).")] = False,
    mad_scale: Annotated[
        str, typer.Option(help="MAD protocol scale: cpu (under an hour), paper, quick.")
    ] = "cpu",
) -> None:
    """Evaluate a model (or train-and-score architectures) and write lm-eval-style results."""
    from zoo.eval.runner import EvalRequest, run_eval

    request = EvalRequest(
        model=model,
        tasks=[t.strip() for t in tasks.split(",") if t.strip()],
        architectures=[a.strip() for a in architectures.split(",")] if architectures else [],
        output=output,
        data_dir=data_dir,
        text=text,
        niah_style=niah_style,
        quick=quick,
        mad_scale=mad_scale,
    )
    payload = run_eval(request, echo=typer.echo)
    from zoo.results import results_table

    typer.echo(results_table(payload))
    typer.echo(f"wrote {output / 'results.json'}")


@app.command()
def card(
    run_dir: Annotated[Path, typer.Argument(help="A training run folder or a model folder.")],
    repo_id: Annotated[
        str | None, typer.Option(help="The Hub id the card names (default: the folder name).")
    ] = None,
) -> None:
    """Render the model card (README.md) of a run: architecture, recipe, eval results."""
    from zoo.card import card_for_run

    path = card_for_run(run_dir, repo_id)
    typer.echo(f"wrote {path}")


@app.command()
def push(
    run_dir: Annotated[Path, typer.Argument(help="A training run folder or a model folder.")],
    repo_id: Annotated[str, typer.Argument(help="org/name on the Hub.")],
    private: Annotated[bool, typer.Option(help="Create the repo private.")] = False,
) -> None:
    """Upload a run (weights, tokenizer, card, recipe, metrics, eval results) in one commit."""
    from zoo.hub import push_run

    info = push_run(run_dir, repo_id, private=private)
    typer.echo(f"pushed {run_dir} to {info.commit_url}")


@app.command()
def generate(
    path: Annotated[str, typer.Argument(help="A checkpoint folder or Hub id.")],
    prompt: Annotated[str, typer.Option(help="Text to continue.")] = "the cat",
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate.", min=1)] = 40,
    sample: Annotated[
        bool, typer.Option("--sample", help="Sample instead of greedy decoding.")
    ] = False,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.", min=0.0)] = 1.0,
    top_k: Annotated[int, typer.Option(help="Sample among the k likeliest (0: all).", min=0)] = 0,
    top_p: Annotated[
        float, typer.Option(help="Sample within this probability mass.", min=0.0, max=1.0)
    ] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed of the sampling.")] = 0,
    trust_remote_code: Annotated[
        bool, typer.Option(help="Load through the checkpoint's auto_map shim instead of zoo.")
    ] = False,
    compiled: Annotated[
        bool,
        typer.Option(
            "--compile",
            help="The fast decode path (zoo.decode): a static cache and a compiled per-token "
            "step. Worth its compile time (seconds) on long outputs; same greedy tokens.",
        ),
    ] = False,
    ahead_of_time: Annotated[
        bool,
        typer.Option(
            "--aot",
            help="The fast decode path with its step compiled ahead of time (AOTInductor, CPU "
            "only): a faster step for a longer compile (tens of seconds). Implies --compile.",
        ),
    ] = False,
) -> None:
    """Load a checkpoint and print a continuation of the prompt (greedy, or --sample)."""
    import torch
    from transformers import AutoModelForCausalLM

    from zoo.tokenizer import load_tokenizer

    if trust_remote_code:
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
    else:
        _register_models()
        from zoo.modeling import load_pretrained

        model = load_pretrained(path)
    tokenizer = load_tokenizer(path)
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(
            f"{path}: the tokenizer has {len(tokenizer)} tokens but the model's "
            f"vocab_size={model.config.vocab_size}; they were not saved together"
        )
    inputs = tokenizer(prompt, return_tensors="pt")
    options: dict[str, Any] = {"do_sample": False}
    if sample:
        torch.manual_seed(seed)
        options = {"do_sample": True, "temperature": temperature, "top_k": top_k, "top_p": top_p}
    if compiled or ahead_of_time:
        options["cache_implementation"] = "static"
    if ahead_of_time:
        from zoo.decode import ahead_of_time_config

        options["compile_config"] = ahead_of_time_config()
    output = model.eval().generate(**inputs, max_new_tokens=max_new_tokens, **options)
    new_tokens = output[0, inputs["input_ids"].shape[1] :]
    typer.echo(prompt + tokenizer.decode(new_tokens, skip_special_tokens=True))


@app.command()
def convert(
    src: Annotated[str, typer.Argument(help="Checkpoint folder to read, or a Hub id (org/name).")],
    dst: Annotated[Path | None, typer.Argument(help="Folder to write.")] = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Only check config.json and count the converted model (parameters, decode "
            "state, FLOPs per token) on the meta device; no weight is read or written.",
        ),
    ] = False,
    seq_len: Annotated[
        int, typer.Option(help="Context of the --dry-run's state and FLOPs counts.", min=1)
    ] = 2048,
) -> None:
    """Convert a checkpoint between transformers' Llama/Mixtral/Mamba and zoo's (both ways), or
    a released model of another project (mamba_ssm's Mamba, TransNormerLLM, fla's HGRN2,
    safari's Hyena) into zoo's; what the zoo cannot express is refused from config.json alone."""
    from zoo.convert import convert_checkpoint, plan_conversion

    if dry_run:
        typer.echo(plan_conversion(src, seq_len=seq_len).table())
        return
    if dst is None:
        raise typer.BadParameter("DST is required unless --dry-run", param_hint="DST")
    direction = convert_checkpoint(src, dst)
    typer.echo(f"converted {src} -> {dst} ({direction})")


@app.command()
def reshard(
    checkpoint: Annotated[Path, typer.Argument(help="A run's checkpoint, RUN/checkpoints/step-N.")],
    out: Annotated[Path, typer.Argument(help="The new checkpoint folder (must not exist).")],
    world_size: Annotated[int, typer.Option(help="Processes the run will resume on.")],
) -> None:
    """Rewrite a training checkpoint (sharded or full) as a full one for another number of
    processes; resume the run from it with `--resume OUT` (`python -m zoo.train_state
    reshard` is the same)."""
    from zoo.train_state import reshard as reshard_checkpoint

    written = reshard_checkpoint(checkpoint, out, world_size)
    typer.echo(f"wrote {written}: a full checkpoint for {world_size} process(es); resume with "
               f"--resume {written}")  # fmt: skip


@app.command()
def describe(
    model: Annotated[
        str | None,
        typer.Argument(
            help="A family (see --list) or a layer pattern such as "
            "'(lightning:moe*3 attention:moe)*2'."
        ),
    ] = None,
    size: Annotated[str | None, typer.Option(help="A named size of the family.")] = None,
    hidden_size: Annotated[int | None, typer.Option(help="Width (default: the size's).")] = None,
    vocab_size: Annotated[int | None, typer.Option(help="Vocabulary (default: bytes).")] = None,
    save: Annotated[Path | None, typer.Option(help="Write the config.json here.")] = None,
    list_registry: Annotated[
        bool,
        typer.Option(
            "--list", help="List the registered families, mixers and their settings instead."
        ),
    ] = False,
) -> None:
    """Layers, parameters (total and active), MoE sparsity and decode state of a config."""
    import torch
    from rich.console import Console
    from rich.table import Table
    from transformers import AutoModelForCausalLM

    from zoo import registry
    from zoo.configuration import HybridConfig

    _register_models()
    console = Console(width=max(Console().width, 100))
    if list_registry or model is None:
        _print_registry(console)
        return

    families = {name: entry.config_class() for name, entry in registry.families().items()}
    overrides = {
        name: value
        for name, value in (("hidden_size", hidden_size), ("vocab_size", vocab_size))
        if value is not None
    }
    try:
        if model in families:
            cls = families[model]
            config = cls.from_size(size, **overrides) if size else cls(**overrides)
        else:
            if size:
                raise ValueError("--size names a size of a family, not of a layer pattern")
            config = HybridConfig.from_pattern(model, **overrides)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="MODEL / --size") from None
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(config)
    table = Table(title=f"{type(config).__name__}: {config.num_hidden_layers} layers")
    for column in ("layer", "sequence mixer", "channel mixer", "cache"):
        table.add_column(column)
    for i, (mixer, channel) in enumerate(zip(config.mixers, config.channel_mixers, strict=True)):
        table.add_row(str(i), mixer, channel, config.layer_types[i])
    console.print(table)
    total, active = lm.num_parameters(), lm.num_parameters(active=True)
    console.print(f"pattern     {config.layer_pattern}")
    console.print(f"width       {config.hidden_size}, vocab {config.vocab_size}")
    console.print(f"parameters  {total / 1e6:,.2f}M total, {active / 1e6:,.2f}M active")
    if config.has_moe:
        console.print(
            f"MoE         {config.num_experts} experts of width {config.moe_intermediate_size}, "
            f"top-{config.num_experts_per_tok}, sparsity 1 - k/E = {config.sparsity:.3f}"
        )
    state = [lm.state_size(1, n) for n in (1024, 8192)]
    console.print(f"decode state {state[0]:,} elements at 1K tokens, {state[1]:,} at 8K")
    if save is not None:
        config.save_pretrained(save)
        console.print(f"wrote {save / 'config.json'}")


def _print_registry(console: Any) -> None:
    """The registry as tables: families, sequence mixers (with their cache and settings) and
    channel mixers."""
    from rich.table import Table

    from zoo import registry

    families = Table(title="families (zoo describe FAMILY --size SIZE)")
    for column in ("family", "preset", "default layers", "named sizes"):
        families.add_column(column)
    for name, entry in registry.families().items():
        cls = entry.config_class()
        layers = f"{cls.default_mixer}:{cls.default_channel_mixer}" if cls.default_mixer else "-"
        families.add_row(name, cls.__name__, layers, ", ".join(cls.named_sizes) or "-")
    console.print(families)
    for kind, entries in (
        ("sequence mixers", registry.sequence_mixers()),
        ("channel mixers", registry.channel_mixers()),
    ):
        table = Table(title=kind)
        for column in ("name", "what", "settings (default)"):
            table.add_column(column)
        for name, entry in entries.items():
            cache = f" [{entry.cache}]" if hasattr(entry, "cache") else ""
            settings = ", ".join(f"{k}={v.default!r}" for k, v in entry.settings.items())
            table.add_row(name, entry.doc + cache, settings or "-")
        console.print(table)


scaling_app = typer.Typer(
    help="Scaling laws: plan an IsoFLOP / MoE sweep, train it, fit and plot the laws.",
    no_args_is_help=True,
)
app.add_typer(scaling_app, name="scaling")


@scaling_app.command("plan")
def scaling_plan(
    sweep: Annotated[Path, typer.Argument(help="The sweep file (families, budgets, sizes).")],
    out_dir: Annotated[Path, typer.Argument(help="Where recipes/, plan.json and plan.md go.")],
) -> None:
    """Write the recipes of a sweep, each sized to its FLOP budget by the zoo's FLOP count."""
    from zoo.scaling.plan import plan_table
    from zoo.scaling.sweep import plan_sweep

    runs = plan_sweep(sweep, out_dir)
    typer.echo(plan_table(runs))
    typer.echo(f"wrote {len(runs)} recipes under {out_dir / 'recipes'} and {out_dir / 'plan.json'}")


@scaling_app.command("run")
def scaling_run(
    plan_dir: Annotated[Path, typer.Argument(help="A folder written by `zoo scaling plan`.")],
    workers: Annotated[int, typer.Option(help="Runs trained at once, one process each.")] = 1,
    threads: Annotated[
        int | None, typer.Option(help="torch threads per run (default: cores / workers).")
    ] = None,
) -> None:
    """Train every planned run that has no result yet (a killed sweep resumes here)."""
    from zoo.scaling.sweep import run_sweep

    count = run_sweep(plan_dir, workers=workers, threads=threads)
    typer.echo(f"trained {count} runs" if count else "every planned run has a result")


@scaling_app.command("fit")
def scaling_fit(
    runs: Annotated[Path, typer.Argument(help="A `zoo scaling plan` folder, or a CSV of runs.")],
    out: Annotated[Path, typer.Option(help="Where fits.json, report.md and plots go.")] = Path(
        "scaling-report"
    ),
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for the intervals.")] = 200,
    seed: Annotated[int, typer.Option(help="Bootstrap seed.")] = 0,
    full_grid: Annotated[
        bool, typer.Option(help="Approach 3 from Chinchilla's whole 4,500-start grid.")
    ] = False,
) -> None:
    """Fit the scaling laws of a sweep and write tables, fits and plots."""
    from zoo.scaling.report import write_report
    from zoo.scaling.runs import load_runs

    found, missing = load_runs(runs)
    if not found:
        raise ValueError(f"{runs}: no finished runs to fit ({len(missing)} unfinished)")
    results = write_report(found, missing, out, bootstrap=bootstrap, seed=seed, full_grid=full_grid)
    if missing:
        typer.echo(f"warning: {len(missing)} planned runs have no result yet", err=True)
    typer.echo((out / "report.md").read_text())
    typer.echo(f"wrote {out / 'fits.json'}, {out / 'report.md'} and {len(results['plots'])} plots")


star_app = typer.Typer(
    help="STAR: architecture genomes, NSGA-II search over them, fronts and exports.",
    no_args_is_help=True,
)
app.add_typer(star_app, name="star")


@star_app.command("search")
def star_search(
    config: Annotated[Path, typer.Argument(help="The search file (backbone, recipe, sizes).")],
    run_dir: Annotated[Path, typer.Argument(help="Where evaluations and logs go (resumable).")],
    workers: Annotated[int, typer.Option(help="Candidates trained at once, one process each.")] = 1,
    threads: Annotated[
        int | None, typer.Option(help="torch threads per candidate (default: cores / workers).")
    ] = None,
) -> None:
    """Evolve genomes with NSGA-II; run it again on the same folder to resume after a kill."""
    from zoo.star.genome import Genome, describe
    from zoo.star.search import backbone_of, load_search, search

    settings = load_search(config)
    population = search(settings, run_dir, workers=workers, threads=threads)
    space = backbone_of(settings)
    typer.echo(f"final population of {run_dir} (first front first):")
    for member in population:
        typer.echo(
            f"{member.genome}  loss {member.loss:.4f}  params {member.params:,}  "
            f"cache {member.cache:,}"
        )
        for line in describe(Genome.parse(member.genome, space), space):
            typer.echo(f"    {line}")


@star_app.command("report")
def star_report(
    run_dir: Annotated[
        Path, typer.Argument(help="A `zoo star search` run folder (or a study folder).")
    ],
    out: Annotated[
        Path, typer.Option(help="The study folder: summary, report.md, fronts, best configs.")
    ] = Path("star-report"),
) -> None:
    """Summarize a search run into a study folder, then its Pareto fronts (loss vs params, loss
    vs cache), the best genomes and the baselines."""
    from zoo.star.report import summarize, write_report

    if (run_dir / "evals").is_dir():
        summarize(run_dir, out)
    written = write_report(out)
    typer.echo((out / "report.md").read_text())
    typer.echo(f"wrote {len(written)} files under {out}")


@star_app.command("export")
def star_export(
    genome: Annotated[str, typer.Argument(help='A genome, e.g. "11111-11111-...|00 ...|...".')],
    search_file: Annotated[
        Path, typer.Option("--search", help="The search file whose backbone and recipe it uses.")
    ],
    out: Annotated[Path, typer.Option(help="Folder for config.json and recipe.yaml.")] = Path(
        "star-export"
    ),
) -> None:
    """Write a genome as a model config and as a recipe that `zoo train` runs."""
    from zoo.star.report import export_genome

    recipe = export_genome(genome, search_file, out)
    typer.echo(f"wrote {out / 'config.json'} and {recipe}; train it with: zoo train {recipe}")


saffu_app = typer.Typer(
    help="SAFFU: explicit-solution warm start + backprop against backprop alone.",
    no_args_is_help=True,
)
app.add_typer(saffu_app, name="saffu")


@saffu_app.command("run")
def saffu_run(
    config: Annotated[Path, typer.Argument(help="The experiment file (grid, budget, corpus).")],
    out_dir: Annotated[Path, typer.Argument(help="Where runs/, report.md and plots go.")],
    threads: Annotated[int, typer.Option(help="torch threads.")] = 1,
) -> None:
    """Train both arms of every grid point (finished runs are skipped), then report."""
    import torch

    from zoo.saffu.experiment import load_experiment, run_experiment

    torch.set_num_threads(threads)
    report = run_experiment(load_experiment(config), out_dir)
    typer.echo(report.read_text())
    typer.echo(f"wrote {report}, {out_dir / 'loss_vs_data.png'} and {out_dir / 'curves.png'}")


@app.command()
def report(
    folders: Annotated[
        list[Path] | None,
        typer.Argument(help="Study folders (default: every study under experiments/)."),
    ] = None,
) -> None:
    """Make a study's report again from its tracked summary (MAD, scaling, STAR, SAFFU)."""
    from zoo.studies import regenerate_report, study_folders

    for folder in folders or study_folders():
        typer.echo(f"wrote {regenerate_report(folder)}")


mad_app = typer.Typer(
    help="MAD studies: the synthetic tasks over many architectures, resumable.",
    no_args_is_help=True,
)
app.add_typer(mad_app, name="mad")


@mad_app.command("run")
def mad_run(
    folder: Annotated[Path, typer.Argument(help="The study folder (its study.yaml).")],
    workers: Annotated[int, typer.Option(help="Runs trained at once (one process each).")] = 1,
) -> None:
    """Train every (architecture, task) run runs.jsonl lacks, then write report.md and mad.png."""
    from zoo.eval.mad_study import run_study

    report = run_study(folder, workers=workers, echo=typer.echo)
    typer.echo(report.read_text())


if __name__ == "__main__":
    main()
