"""Command line: every command is a thin wrapper over the Python API."""

from __future__ import annotations

import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Annotated

import typer

from finetune.config import Dtype, EvaluationConfig, ExportFormat, ExportQuant, MergeStrategy, Quantization
from finetune.errors import FinetuneError, Interrupted

# Python arguments named in error messages -> this CLI's flags (see finetune.errors.argument).
FLAGS = {
    "adapter": "--adapter",
    "adapter_only": "--adapter-only",
    "api_key": "--api-key",
    "device": "--device",
    "dry_run": "--dry-run",
    "format": "--format",
    "max_batch_size": "--max-batch-size",
    "max_queue": "--max-queue",
    "merged": "--merged",
    "metric": "--metric",
    "num_processes": "--num-processes",
    "out": "--out",
    "overrides": "--set",
    "overwrite": "--overwrite",
    "quant": "--quant",
    "repetition_guard_strength": "--repetition-guard-strength",
    "safety_prompts": "--safety-prompts",
    "repo_id": "--repo",
    "request_timeout": "--request-timeout",
    "resume": "--resume",
    "space": "--space",
    "temperature": "--temperature",
    "top_p": "--top-p",
    "trials": "--trials",
}

app = typer.Typer(
    help="Fine-tune a pretrained chat model with LoRA/QLoRA, evaluate it, merge it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# `finetune --debug ...` or FINETUNE_DEBUG=1: an error also prints its whole traceback, causes included.
DEBUG_VARIABLE = "FINETUNE_DEBUG"


@app.callback()
def _options(
    debug: Annotated[
        bool, typer.Option("--debug", help=f"On an error, print the full traceback too (or set {DEBUG_VARIABLE}=1).")
    ] = False,
) -> None:
    if debug:
        os.environ[DEBUG_VARIABLE] = "1"


# The repetition guard's options say what the evaluation config says (one description for both).
_EVALUATION = EvaluationConfig.model_fields
ComputeDtypeOption = Annotated[
    Dtype | None,
    typer.Option(
        help="Compute dtype: auto (bf16 where this CPU computes it natively and faster, finetune.precision), float32, "
        "bfloat16, float16. Default: what the run ran with, else auto."
    ),
]
GuardOption = Annotated[
    bool, typer.Option("--repetition-guard/--no-repetition-guard", help=_EVALUATION["repetition_guard"].description)
]
GuardStrengthOption = Annotated[float, typer.Option(help=_EVALUATION["repetition_guard_strength"].description)]
_GUARD_STRENGTH = _EVALUATION["repetition_guard_strength"].default


@app.command()
def run(
    recipe: Annotated[Path, typer.Argument(help="YAML recipe, e.g. recipes/quickstart.yaml.")],
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a config value: --set training.max_steps=20 (repeatable)."),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run folder.")] = False,
    resume: Annotated[
        bool, typer.Option(help="Continue an interrupted run of this recipe from its newest complete checkpoint.")
    ] = False,
    num_processes: Annotated[
        int,
        typer.Option(
            min=1, help="Train in N processes through Accelerate: one per GPU, or N CPU processes (gloo) without one."
        ),
    ] = 1,
    report_to: Annotated[
        list[str] | None,
        typer.Option(
            "--report-to",
            help="Also send metrics to this experiment tracker: tensorboard, wandb, mlflow or trackio (repeatable; "
            "sets training.report_to).",
        ),
    ] = None,
) -> None:
    """Run a recipe end to end: load, attach LoRA, prepare data, train, evaluate before/after, merge, report.

    Ctrl-C (SIGINT) or SIGTERM while training saves a checkpoint and exits 130 / 143; --resume continues from it."""
    if resume and overwrite:
        raise FinetuneError("--resume continues the run in its folder and --overwrite deletes it: pass one of them.")
    overrides = list(set_ or [])
    if overwrite:
        overrides.append("output.overwrite=true")
    if report_to:
        overrides.append(f"training.report_to={','.join(report_to)}")
    if num_processes > 1:
        from finetune import distributed

        if not distributed.launched():
            from finetune.config import RecipeConfig

            RecipeConfig.from_yaml(recipe, overrides)  # a bad recipe fails here, before any process starts
            forwarded = [arg for override in overrides for arg in ("--set", override)] + (
                ["--resume"] if resume else []
            )
            distributed.launch(["run", str(recipe), *forwarded], num_processes)
            return
        if distributed.state().num_processes != num_processes:
            raise FinetuneError(
                f"--num-processes {num_processes}, but the launcher started {distributed.state().num_processes} processes: "
                "under `accelerate launch` or `torchrun`, leave --num-processes out."
            )
    from finetune.recipes import Recipe  # imported here: a launching parent process never needs it

    Recipe.from_yaml(recipe, overrides).run(resume=resume)


@app.command()
def sweep(
    recipe: Annotated[Path, typer.Argument(help="YAML recipe whose hyperparameters to search.")],
    trials: Annotated[
        int, typer.Option(min=1, help="Finished trials wanted (an interrupted sweep counts those already done).")
    ],
    space: Annotated[
        Path | None,
        typer.Option(
            help="YAML search space (docs/tuning.md); default: learning rate, LoRA r/alpha/dropout, epochs, weight decay."
        ),
    ] = None,
    metric: Annotated[
        str, typer.Option(help="What ranks trials, on the validation split: eval_loss, perplexity, rougeL, bleu, ...")
    ] = "eval_loss",
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a config value of every trial (repeatable).")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Sweep folder (default: the run folder + '-sweep').")] = None,
) -> None:
    """Search hyperparameters with Optuna: short trials, bad ones pruned early; writes a results table, plots and
    best_recipe.yaml. Run it again to continue an interrupted sweep."""
    from finetune.config import RecipeConfig
    from finetune.sweeps import sweep as run_sweep

    run_sweep(RecipeConfig.from_yaml(recipe, list(set_ or [])), trials=trials, space=space, metric=metric, out=out)


@app.command()
def validate(
    recipe: Annotated[Path, typer.Argument(help="YAML recipe to check.")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a config value (repeatable).")] = None,
    preflight: Annotated[
        bool, typer.Option(help="Also run the pre-flight checks: disk space, data files, quantization, context length.")
    ] = False,
) -> None:
    """Check a recipe's keys and values without loading anything, and print the resolved config."""
    from finetune.config import RecipeConfig

    config = RecipeConfig.from_yaml(recipe, list(set_ or []))
    if preflight:
        from finetune.preflight import preflight as check

        for finding in check(config):  # blocking problems raise, and exit 2 with each one and its fix
            typer.echo(f"  {finding.message}" + ("" if finding.ok else " (not checked)"))
    typer.echo(f"{recipe}: valid. Run folder: {config.run_dir}")


@app.command()
def plan(
    recipe: Annotated[Path, typer.Argument(help="YAML recipe to plan.")],
    device: Annotated[
        str | None,
        typer.Option(help="cpu, cuda, a GPU memory size such as 24GB, or cpu:16GB (default: this machine)."),
    ] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a config value (repeatable).")] = None,
) -> None:
    """Estimate peak training memory (weights, LoRA, gradients, optimizer, activations, logits) from the model's
    config alone, say whether it fits, and suggest the cheapest change that does. Exit status 1 if it does not fit."""
    from finetune.config import RecipeConfig
    from finetune.planning import plan as plan_memory

    result = plan_memory(RecipeConfig.from_yaml(recipe, list(set_ or [])), device)
    for line in result.lines(show_change=lambda override: f"--set {override}"):
        typer.echo(line)
    if not result.fits:
        raise typer.Exit(1)


@app.command()
def merge(
    run_dir: Annotated[Path, typer.Argument(help="A finished run folder (runs/NAME).")],
    dtype: Annotated[Dtype, typer.Option(help="Dtype of the merged weights; auto keeps the base's.")] = "auto",
    strategy: Annotated[MergeStrategy, typer.Option(help="Base to merge into (docs/merging.md).")] = "auto",
    out: Annotated[Path | None, typer.Option(help="Output folder (default RUN_DIR/merged).")] = None,
) -> None:
    """Merge a run's adapter into a full-precision base, verify the logits, and save a plain transformers folder.
    Merging into the run's own merged/ refreshes its model cards and run.json."""
    from finetune.recipes import Recipe

    Recipe.from_run_dir(run_dir).merge(strategy=strategy, dtype=dtype, out_dir=out)


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="A finished run folder (runs/NAME).")],
    format: Annotated[
        ExportFormat, typer.Option(help="Export format; gguf: one file for llama.cpp, Ollama and LM Studio.")
    ] = "gguf",
    quant: Annotated[
        ExportQuant, typer.Option(help="GGUF weight type: f16 and bf16 keep the weights, q8_0 ... q4_0 shrink them.")
    ] = "f16",
    adapter_only: Annotated[
        bool, typer.Option(help="Write the LoRA adapter as a llama.cpp LoRA GGUF instead of the merged model.")
    ] = False,
) -> None:
    """Write RUN_DIR/export/: model-<quant>.gguf (or adapter.gguf), an Ollama Modelfile and export.json, each file
    kept only after transformers and llama.cpp both ran it and agreed with the run's model (docs/deployment.md)."""
    from finetune.recipes import Recipe

    Recipe.from_run_dir(run_dir).export(format=format, quant=quant, adapter_only=adapter_only)


@app.command("eval")
def eval_(
    model: Annotated[
        str, typer.Option(help="Model: bundled alias, Hub id, folder (e.g. a run's merged/) or .gguf file.")
    ],
    data: Annotated[
        Path | None,
        typer.Option(help="Conversations to score (.jsonl/.json; any supported row format); optional with --safety."),
    ] = None,
    adapter: Annotated[Path | None, typer.Option(help="LoRA adapter folder to apply (e.g. runs/NAME/adapter).")] = None,
    quantization: Annotated[Quantization, typer.Option(help="Load the model as none, 8bit or 4bit.")] = "none",
    max_rows: Annotated[int, typer.Option(help="Conversations scored for perplexity.")] = 200,
    generation_rows: Annotated[int, typer.Option(help="Conversations whose last reply is generated and scored.")] = 50,
    max_new_tokens: Annotated[int, typer.Option(help="Longest generated reply.")] = 64,
    max_length: Annotated[int, typer.Option(help="Longest conversation scored, in tokens.")] = 1024,
    repetition_guard: GuardOption = True,
    repetition_guard_strength: GuardStrengthOption = _GUARD_STRENGTH,
    safety: Annotated[
        bool,
        typer.Option(
            "--safety/--no-safety",
            help="Also measure refusal rate (harmful requests), over-refusal rate (harmless ones) and "
            "toxic-continuation rate (docs/safety.md).",
        ),
    ] = False,
    safety_prompts: Annotated[int, typer.Option(help=_EVALUATION["safety_prompts"].description)] = _EVALUATION[
        "safety_prompts"
    ].default,
    out: Annotated[Path | None, typer.Option(help="Write the metrics (and sample replies) to this JSON file.")] = None,
) -> None:
    """Score any model or adapter on any file: perplexity (assistant and all tokens), BLEU, ROUGE, F1, exact match,
    repetition; with --safety, refusals, over-refusals and toxic continuations (no --data needed)."""
    import json

    from rich.console import Console
    from rich.table import Table

    from finetune.config import RecipeConfig
    from finetune.evaluation import evaluate_checkpoint

    if data is None and not safety:
        raise FinetuneError("finetune eval needs --data (conversations to score), --safety, or both.")
    sources = [{"type": "file", "path": str(data)}] if data else [{"type": "chatterbot"}]  # without --data: unused
    config = RecipeConfig.from_dict(
        {
            "model": {"source": model, "quantization": quantization},
            "data": {"sources": sources, "max_length": max_length, "too_long": "drop"},
            "evaluation": {
                "max_rows": max_rows,
                "generation_rows": generation_rows,
                "max_new_tokens": max_new_tokens,
                "repetition_guard": repetition_guard,
                "repetition_guard_strength": repetition_guard_strength,
                "safety": safety,
                "safety_prompts": safety_prompts,
            },
        },
        source="finetune eval",
    )
    result = evaluate_checkpoint(config.model, config.data if data else None, config.evaluation, adapter)
    on = " and ".join(part for part in (str(data) if data else "", "the safety sets" if safety else "") if part)
    table = Table(title=f"{model}{' + ' + str(adapter) if adapter else ''} on {on}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for metric, value in result.metrics.items():
        table.add_row(metric, f"{value:.4g}")
    Console().print(table)
    if out:
        replies = result.safety.replies if result.safety else {}
        out.write_text(json.dumps({"metrics": result.metrics, "samples": result.samples, "safety": replies}, indent=2))


data_app = typer.Typer(help="Look at training data before training on it.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("inspect")
def data_inspect(
    target: Annotated[
        Path, typer.Argument(help="A YAML recipe, or a data file/folder (.jsonl .json .csv .parquet .txt).")
    ],
    model: Annotated[
        str | None,
        typer.Option(help="Tokenizer and chat template to use (default: the recipe's model, or the bundled SmolLM2)."),
    ] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a config value (repeatable).")] = None,
    rows: Annotated[int, typer.Option(min=0, help="Training rows to render token by token.")] = 3,
    out: Annotated[
        Path | None,
        typer.Option(help="Folder for inspect.md, inspect.json and lengths.png (default: RUN_DIR/inspect)."),
    ] = None,
) -> None:
    """Row counts per format and drop reason, token-length histogram, loss share, the pre-flight audit, and rows
    coloured by which tokens are trained on. Exits 1 if the audit has serious findings."""
    from rich.console import Console

    from finetune import data, models
    from finetune.config import RecipeConfig
    from finetune.run_folder import RunFolder

    overrides = list(set_ or [])
    if target.suffix in (".yaml", ".yml"):
        config = RecipeConfig.from_yaml(target, overrides)
    else:
        config = RecipeConfig.from_dict(
            {"data": {"sources": [{"type": "file", "path": str(target)}]}}, source="finetune data inspect"
        )
        config = config.with_overrides(overrides, source="--set")
    if model:
        config = config.with_overrides({"model.source": model}, source="--model")
    tokenizer = models.load_tokenizer(config.model)
    inspection = data.inspect_data(
        config.data, tokenizer, out or RunFolder.of(config).inspect, show_rows=rows, method=config.method
    )
    console = Console()
    inspection.print(console)
    console.print(f"Written: {', '.join(str(path) for path in inspection.files.values())}")
    if any(finding.level == "serious" for finding in inspection.report.findings):
        raise typer.Exit(1)


_TARGET_HELP = "Run folder (runs/NAME), model folder, .gguf file, bundled alias or Hub id."


@app.command()
def chat(
    target: Annotated[str, typer.Argument(help=_TARGET_HELP)],
    adapter: Annotated[
        str | None, typer.Option(help="LoRA adapter folder (or run folder) to apply over the model.")
    ] = None,
    system: Annotated[str | None, typer.Option(help="System prompt that opens the conversation.")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Longest reply, in tokens.")] = 256,
    temperature: Annotated[
        float | None,
        typer.Option(
            min=0,
            help="Sampling temperature; 0 = greedy, the same reply every time. Default: the model's own "
            "(generation_config.json), else 0.7.",
        ),
    ] = None,
    top_p: Annotated[
        float | None, typer.Option(min=0, max=1, help="Nucleus sampling mass. Default: the model's own, else 0.9.")
    ] = None,
    repetition_guard: GuardOption = True,
    repetition_guard_strength: GuardStrengthOption = _GUARD_STRENGTH,
    quantization: Annotated[Quantization, typer.Option(help="Load the model as none, 8bit or 4bit.")] = "none",
    compute_dtype: ComputeDtypeOption = None,
) -> None:
    """Chat in the terminal with the model's own chat template, replies streamed; /reset starts over, /exit quits."""
    from finetune import serving

    # Checked before the model loads: a bad setting fails in a second, not after the loading.
    decoding = serving.DecodingSettings(max_new_tokens, temperature, top_p, repetition_guard, repetition_guard_strength)
    model = serving.load_chat_model(
        target, [adapter] if adapter else [], quantization=quantization, compute_dtype=compute_dtype
    )
    serving.chat_loop(model, system=system, decoding=decoding)


@app.command()
def serve(
    target: Annotated[str, typer.Argument(help=_TARGET_HELP)],
    adapter: Annotated[
        list[str] | None,
        typer.Option(
            help="LoRA adapter over the same base, PATH or NAME=PATH (repeatable); requests pick one by `model`."
        ),
    ] = None,
    host: Annotated[
        str, typer.Option(help="Address to bind; 0.0.0.0 exposes the server to the network.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(envvar="FINETUNE_API_KEY", help="Require `Authorization: Bearer KEY` on /v1/ routes."),
    ] = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="Most tokens a request may ask for; also the default.")] = 512,
    max_messages: Annotated[int, typer.Option(min=1, help="Most messages in one request.")] = 100,
    max_body_bytes: Annotated[int, typer.Option(min=1, help="Largest request body, in bytes.")] = 1_000_000,
    max_batch_size: Annotated[
        int,
        typer.Option(
            min=1,
            help="Most requests generated together, sharing each decoding step (continuous batching); 1 = one at a time.",
        ),
    ] = 16,
    max_queue: Annotated[
        int,
        typer.Option(
            min=0, help="Most requests waiting for a batch row; one more is refused with 429 and Retry-After."
        ),
    ] = 64,
    request_timeout: Annotated[
        float,
        typer.Option(min=0, help="Seconds a request may take, waiting included, before it gets 504; 0 = no limit."),
    ] = 300.0,
    temperature: Annotated[
        float | None,
        typer.Option(
            min=0, help="Temperature when a request gives none; 0 = greedy. Default: the model's own, else 0.7."
        ),
    ] = None,
    top_p: Annotated[
        float | None,
        typer.Option(min=0, max=1, help="top_p when a request gives none. Default: the model's own, else 0.9."),
    ] = None,
    repetition_guard: GuardOption = True,
    repetition_guard_strength: GuardStrengthOption = _GUARD_STRENGTH,
    quantization: Annotated[Quantization, typer.Option(help="Load the model as none, 8bit or 4bit.")] = "none",
    compute_dtype: ComputeDtypeOption = None,
) -> None:
    """Serve an OpenAI-compatible API (/v1/chat/completions, /v1/models) and a web chat page at /."""
    from finetune import serving

    decoding = serving.DecodingSettings(max_tokens, temperature, top_p, repetition_guard, repetition_guard_strength)
    limits = serving.Limits(
        max_tokens=max_tokens,
        max_messages=max_messages,
        max_body_bytes=max_body_bytes,
        max_batch_size=max_batch_size,
        max_queue=max_queue,
        request_timeout=request_timeout or None,
    )
    model = serving.load_chat_model(target, adapter or [], quantization=quantization, compute_dtype=compute_dtype)
    serving.serve(model, host=host, port=port, api_key=api_key, limits=limits, decoding=decoding)


@app.command()
def push(
    run_dir: Annotated[Path, typer.Argument(help="Run folder made by `finetune run`, e.g. runs/quickstart.")],
    repo: Annotated[str, typer.Option(help="Hub repository, owner/name; created if missing.")],
    private: Annotated[bool, typer.Option(help="Create the repository as private.")] = False,
    merged: Annotated[bool, typer.Option(help="Push merged/ (the full model) instead of adapter/.")] = False,
    dry_run: Annotated[bool, typer.Option(help="List exactly what would be uploaded; contact nothing.")] = False,
    revision: Annotated[str | None, typer.Option(help="Branch to commit to, created from main if missing.")] = None,
) -> None:
    """Publish a run's adapter (or merged model) with its model card and manifest; tag the commit with the run name."""
    from finetune import hub

    report = hub.push(run_dir, repo, private=private, merged=merged, dry_run=dry_run, revision=revision)
    for line in report.lines():
        typer.echo(line)


def _quiet_third_party() -> None:
    """Drop messages that are no news on a normal run: bitsandbytes reports at import that the optional `kernels`
    package (which would fetch a CPU kernel from the Hub) is missing, and finetune switches that kernel off anyway
    (models.disable_4bit_cpu_repacking). Done here, for the command line; Python callers keep their own logging."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        lambda record: "kernels-community" not in record.getMessage()
    )


def main() -> None:
    """The `finetune` command: run the typer app, printing a FinetuneError as one line (exit status 2) instead of a
    traceback (`--debug` or FINETUNE_DEBUG=1 prints it too); an interrupted run exits 128 + the signal's number.
    """
    _quiet_third_party()
    try:
        app()
    except Interrupted as exc:  # a checkpoint was saved; the exit code says which signal, as a shell would
        typer.secho(f"interrupted: {exc.render(FLAGS)}", fg=typer.colors.YELLOW, err=True)
        sys.exit(exc.exit_code)
    except FinetuneError as exc:
        if os.environ.get(DEBUG_VARIABLE) == "1":
            traceback.print_exception(exc, file=sys.stderr)
        typer.secho(f"error: {exc.render(FLAGS)}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.secho("interrupted", fg=typer.colors.RED, err=True)
        sys.exit(130)
