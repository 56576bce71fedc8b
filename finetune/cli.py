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


@app.command()
def merge(
    run_dir: Annotated[Path, typer.Argument(help="A finished run folder (runs/NAME).")],
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.")] = "auto",
    strategy: Annotated[str, typer.Option(help="auto, full_precision or nf4_roundtrip.")] = "auto",
    out: Annotated[Optional[Path], typer.Option(help="Output folder (default RUN_DIR/merged).")] = None,
) -> None:
    """Merge a run's adapter into a full-precision base, verify the logits, and save a plain transformers folder."""
    from finetune.recipes import ChatSFTRecipe

    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise FinetuneError(f"--dtype {dtype!r}: choose auto, float32, bfloat16 or float16.")
    from finetune import hub

    ChatSFTRecipe.from_run_dir(run_dir).merge(strategy=strategy, dtype=dtype, out_dir=out)
    if out is None:  # the run's own merged/ was replaced: refresh its card and the manifest's hashes
        hub.write_model_card(run_dir)
        hub.write_manifest(run_dir)


@app.command("eval")
def eval_(
    model: Annotated[str, typer.Option(help="Model: bundled alias, Hub id, folder (e.g. a run's merged/) or .gguf file.")],
    data: Annotated[Path, typer.Option(help="Conversations to score (.jsonl/.json; any supported row format).")],
    adapter: Annotated[Optional[Path], typer.Option(help="LoRA adapter folder to apply (e.g. runs/NAME/adapter).")] = None,
    quantization: Annotated[str, typer.Option(help="Load the model as none, 8bit or 4bit.")] = "none",
    max_rows: Annotated[int, typer.Option(help="Conversations scored for perplexity.")] = 200,
    generation_rows: Annotated[int, typer.Option(help="Conversations whose last reply is generated and scored.")] = 50,
    max_new_tokens: Annotated[int, typer.Option(help="Longest generated reply.")] = 64,
    max_length: Annotated[int, typer.Option(help="Longest conversation scored, in tokens.")] = 1024,
    out: Annotated[Optional[Path], typer.Option(help="Write the metrics (and sample replies) to this JSON file.")] = None,
) -> None:
    """Score any model or adapter on any file: perplexity (assistant and all tokens), BLEU, ROUGE, F1, exact match."""
    import json

    from rich.console import Console
    from rich.table import Table

    from finetune.config import RecipeConfig
    from finetune.evaluation import evaluate_checkpoint

    config = RecipeConfig.from_dict(
        {
            "model": {"source": model, "quantization": quantization},
            "data": {"sources": [{"type": "file", "path": str(data)}], "max_length": max_length, "too_long": "drop"},
            "evaluation": {"max_rows": max_rows, "generation_rows": generation_rows, "max_new_tokens": max_new_tokens},
        },
        source="finetune eval",
    )
    result = evaluate_checkpoint(config.model, config.data, config.evaluation, adapter)
    table = Table(title=f"{model}{' + ' + str(adapter) if adapter else ''} on {data}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for metric, value in result.metrics.items():
        table.add_row(metric, f"{value:.4g}")
    Console().print(table)
    if out:
        out.write_text(json.dumps({"metrics": result.metrics, "samples": result.samples}, indent=2))


_TARGET_HELP = "Run folder (runs/NAME), model folder, .gguf file, bundled alias or Hub id."


@app.command()
def chat(
    target: Annotated[str, typer.Argument(help=_TARGET_HELP)],
    adapter: Annotated[Optional[str], typer.Option(help="LoRA adapter folder (or run folder) to apply over the model.")] = None,
    system: Annotated[Optional[str], typer.Option(help="System prompt that opens the conversation.")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Longest reply, in tokens.")] = 256,
    temperature: Annotated[float, typer.Option(min=0, help="Sampling temperature; 0 = greedy, the same reply every time.")] = 0.7,
    top_p: Annotated[float, typer.Option(min=0, max=1, help="Nucleus sampling mass.")] = 0.9,
    quantization: Annotated[str, typer.Option(help="Load the model as none, 8bit or 4bit.")] = "none",
) -> None:
    """Chat in the terminal with the model's own chat template, replies streamed; /reset starts over, /exit quits."""
    from finetune import serving

    model = serving.load_chat_model(target, [adapter] if adapter else [], quantization=quantization)
    serving.chat_loop(model, system=system, decoding=serving.Decoding(max_new_tokens, temperature, top_p))


@app.command()
def serve(
    target: Annotated[str, typer.Argument(help=_TARGET_HELP)],
    adapter: Annotated[
        Optional[list[str]],
        typer.Option(help="LoRA adapter over the same base, PATH or NAME=PATH (repeatable); requests pick one by `model`."),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to bind; 0.0.0.0 exposes the server to the network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    api_key: Annotated[
        Optional[str], typer.Option(envvar="FINETUNE_API_KEY", help="Require `Authorization: Bearer KEY` on /v1/ routes.")
    ] = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="Most tokens a request may ask for; also the default.")] = 512,
    max_messages: Annotated[int, typer.Option(min=1, help="Most messages in one request.")] = 100,
    max_body_bytes: Annotated[int, typer.Option(min=1, help="Largest request body, in bytes.")] = 1_000_000,
    temperature: Annotated[float, typer.Option(min=0, help="Temperature when a request gives none; 0 = greedy.")] = 0.7,
    top_p: Annotated[float, typer.Option(min=0, max=1, help="top_p when a request gives none.")] = 0.9,
    quantization: Annotated[str, typer.Option(help="Load the model as none, 8bit or 4bit.")] = "none",
) -> None:
    """Serve an OpenAI-compatible API (/v1/chat/completions, /v1/models) and a web chat page at /."""
    from finetune import serving

    model = serving.load_chat_model(target, adapter or [], quantization=quantization)
    serving.serve(
        model,
        host=host,
        port=port,
        api_key=api_key,
        limits=serving.Limits(max_tokens=max_tokens, max_messages=max_messages, max_body_bytes=max_body_bytes),
        decoding=serving.Decoding(max_tokens, temperature, top_p),
    )


@app.command()
def push(
    run_dir: Annotated[Path, typer.Argument(help="Run folder made by `finetune run`, e.g. runs/quickstart.")],
    repo: Annotated[str, typer.Option(help="Hub repository, owner/name; created if missing.")],
    private: Annotated[bool, typer.Option(help="Create the repository as private.")] = False,
    merged: Annotated[bool, typer.Option(help="Push merged/ (the full model) instead of adapter/.")] = False,
    dry_run: Annotated[bool, typer.Option(help="List exactly what would be uploaded; contact nothing.")] = False,
    revision: Annotated[Optional[str], typer.Option(help="Branch to commit to, created from main if missing.")] = None,
) -> None:
    """Publish a run's adapter (or merged model) with its model card and manifest; tag the commit with the run name."""
    from finetune import hub

    report = hub.push(run_dir, repo, private=private, merged=merged, dry_run=dry_run, revision=revision)
    for line in report.lines():
        typer.echo(line)


def main() -> None:
    try:
        app()
    except FinetuneError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.secho("interrupted", fg=typer.colors.RED, err=True)
        sys.exit(130)
