"""The `zoo` command line (typer). Only this module prints; the library logs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help="hybrid-zoo: efficient sequence models, their kernels, recipes and evals.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)


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
            help="Comma-separated families: llama, tnl, hgrn2, cosformer2, mamba, hyena, hybrid.",
        ),
    ] = "llama,tnl",
    threads: Annotated[int, typer.Option(help="torch CPU threads (0 = torch's default).")] = 0,
) -> None:
    """Train tiny models (default: LLaMA, TNL) on the embedded corpus; save, reload, generate."""
    import torch
    from rich.console import Console
    from rich.table import Table

    from zoo.demo import DEMO_FAMILIES, DemoSettings, run_demo

    names = [name.strip() for name in families.split(",") if name.strip()]
    unknown = [name for name in names if name not in DEMO_FAMILIES]
    if unknown or not names:
        raise typer.BadParameter(
            f"unknown families {unknown}; allowed: {list(DEMO_FAMILIES)}", param_hint="--families"
        )
    if steps <= 0:
        raise typer.BadParameter(f"steps={steps} must be positive", param_hint="--steps")
    if threads > 0:
        torch.set_num_threads(threads)
    console = Console()
    results = run_demo(out, DemoSettings(steps=steps), names, echo=console.print)
    table = Table(
        title=f"hybrid-zoo demo ({steps} steps each, CPU, {torch.get_num_threads()} threads)"
    )
    columns = ("model", "params", "held-out loss", "unigram H", "train tok/s", "cache B/tok @2K")
    for column in columns:
        table.add_column(column, justify="left" if column == "model" else "right", no_wrap=True)
    for r in results:
        table.add_row(
            r.family,
            f"{r.params / 1e6:.2f}M",
            f"{r.heldout_loss:.3f}",
            f"{r.unigram_entropy:.3f}",
            f"{r.train_tokens_per_s:,.0f}",
            f"{r.cache_bytes_per_token_2k:,.0f}",
        )
    console.print(table)
    console.print(f"Saved to {out}/ (one Hub-style folder per model) and {out}/summary.json")
    failed = [r.family for r in results if r.heldout_loss >= r.unigram_entropy]
    if failed:
        console.print(f"[red]held-out loss did not beat the unigram entropy: {failed}[/red]")
        raise typer.Exit(1)


@app.command()
def generate(
    path: Annotated[str, typer.Argument(help="A checkpoint folder or Hub id.")],
    prompt: Annotated[str, typer.Option(help="Text to continue.")] = "the cat",
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 40,
    trust_remote_code: Annotated[
        bool, typer.Option(help="Load through the checkpoint's auto_map shim instead of zoo.")
    ] = False,
) -> None:
    """Load a checkpoint with AutoModelForCausalLM and print a greedy continuation."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not trust_remote_code:
        import zoo  # noqa: F401  (registers the zoo families with the Auto classes)

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code)
    inputs = tokenizer(prompt, return_tensors="pt")
    output = model.eval().generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new_tokens = output[0, inputs["input_ids"].shape[1] :]
    typer.echo(prompt + tokenizer.decode(new_tokens, skip_special_tokens=True))


@app.command()
def convert(
    src: Annotated[Path, typer.Argument(help="Checkpoint folder to read.")],
    dst: Annotated[Path, typer.Argument(help="Folder to write.")],
) -> None:
    """Convert a checkpoint between transformers' Llama/Mamba and zoo's LLaMA/Mamba (both ways)."""
    from zoo.convert import convert_checkpoint

    try:
        direction = convert_checkpoint(src, dst)
    except (ValueError, FileNotFoundError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"converted {src} -> {dst} ({direction})")


if __name__ == "__main__":
    app()
