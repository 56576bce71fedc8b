"""Command line: every command is a thin wrapper over the Python API."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from finetune.errors import FinetuneError

app = typer.Typer(
    help="Fine-tune a pretrained chat model with LoRA/QLoRA, evaluate it, merge it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.command()
def run(
    recipe: Annotated[Path, typer.Argument(help="YAML recipe, e.g. recipes/quickstart.yaml.")],
    set_: Annotated[
        Optional[list[str]], typer.Option("--set", help="Override a config value: --set training.max_steps=20 (repeatable).")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run folder.")] = False,
) -> None:
    """Run a recipe end to end: load, attach LoRA, prepare data, train, evaluate before/after, merge, report."""
    from finetune.recipes import ChatSFTRecipe

    overrides = list(set_ or [])
    if overwrite:
        overrides.append("output.overwrite=true")
    ChatSFTRecipe.from_yaml(recipe, overrides).run()


@app.command()
def validate(
    recipe: Annotated[Path, typer.Argument(help="YAML recipe to check.")],
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a config value (repeatable).")] = None,
) -> None:
    """Check a recipe's keys and values without loading anything, and print the resolved config."""
    from finetune.config import RecipeConfig

    config = RecipeConfig.from_yaml(recipe, list(set_ or []))
    typer.echo(f"{recipe}: valid. Run folder: {config.run_dir}")


def main() -> None:
    try:
        app()
    except FinetuneError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.secho("interrupted", fg=typer.colors.RED, err=True)
        sys.exit(130)
