"""Typed recipe configuration: one pydantic model per stage, loaded from YAML and validated at load.

Every field has a default that works and a description; `docs/configuration.md` explains the defaults
and the CLI's `--set key=value` reaches any of them.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from finetune.errors import FinetuneError


class _Section(BaseModel):
    # Unknown keys are errors, never silently ignored: a typo must not train with a default instead.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    source: str = Field(
        "smollm2-135m-instruct",
        description="Bundled alias, Hub id, local folder, or path to a .gguf file.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to load.")
    quantization: Literal["none", "8bit", "4bit"] = Field(
        "4bit", description="Base weights while training: 4bit (NF4, QLoRA), 8bit, or none (full precision)."
    )
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Dtype of activations and unquantized weights; auto = bfloat16 on CUDA, float32 on CPU."
    )
    double_quant: bool = Field(True, description="4-bit only: quantize the quantization constants too (saves ~0.4 bit/param).")
    chat_template: str | None = Field(
        None,
        description="Override the tokenizer's chat template: 'chatml', a path to a .jinja file, or a Jinja string.",
    )
    trust_remote_code: bool = Field(False, description="Allow model code from the Hub repository to run.")


class LoraConfig(_Section):
    r: int = Field(16, ge=1, le=1024, description="LoRA rank.")
    alpha: float | None = Field(
        None, gt=0, description="LoRA alpha; default 2 x r, so changing r keeps the update scale (alpha/r) at 2."
    )
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt, or 'all-linear' (every linear layer except the output head)."
    )
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA): often better at low rank, ~2x slower.")
    use_rslora: bool = Field(False, description="Rank-stabilised scaling alpha/sqrt(r) instead of alpha/r.")

    @property
    def lora_alpha(self) -> float:
        return self.alpha if self.alpha is not None else 2.0 * self.r


class DataSource(_Section):
    type: Literal["file", "chatterbot"] = Field(
        "file", description="file: a local .jsonl/.json file; chatterbot: the chatterbot-corpus package."
    )
    path: str | None = Field(None, description="file: path to the data file.")
    format: Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion"] = Field(
        "auto", description="Row format; auto detects it from the columns of the first row."
    )
    language: str = Field("english", description="chatterbot: corpus language folder.")
    categories: list[str] | None = Field(None, description="chatterbot: category files to use (default: all).")

    @model_validator(mode="after")
    def _path_for_files(self) -> DataSource:
        if self.type == "file" and not self.path:
            raise ValueError("a source of type 'file' needs `path`")
        return self


class DataConfig(_Section):
    sources: list[DataSource] = Field(
        default_factory=lambda: [DataSource(type="chatterbot")], min_length=1, description="Where conversations come from."
    )
    validation_sources: list[DataSource] | None = Field(
        None, description="Separate validation data; when set, validation_split is not taken from `sources`."
    )
    test_sources: list[DataSource] | None = Field(
        None, description="Separate held-out test data; when set, test_split is not taken from `sources`."
    )
    system_prompt: str | None = Field(None, description="System message prepended to every conversation without one.")
    max_length: int = Field(1024, ge=16, description="Longest tokenized conversation kept, in tokens.")
    too_long: Literal["drop", "truncate", "error"] = Field(
        "drop", description="What to do with a conversation longer than max_length."
    )
    validation_split: float = Field(0.05, ge=0, lt=1, description="Share of conversations held out for validation.")
    test_split: float = Field(0.1, ge=0, lt=1, description="Share held out for before/after evaluation.")
    max_rows: int | None = Field(None, ge=1, description="Use at most this many conversations (after shuffling).")
    max_bad_fraction: float = Field(
        0.05, ge=0, le=1, description="Fail if more than this share of rows is invalid (invalid rows are skipped and counted)."
    )
    strict: bool = Field(False, description="Fail on the first invalid row instead of skipping it.")
    seed: int = Field(42, description="Seed for shuffling and splitting.")

    @model_validator(mode="after")
    def _splits_leave_training_data(self) -> DataConfig:
        if self.validation_split + self.test_split >= 0.9:
            raise ValueError("validation_split + test_split must leave at least 10% of the data for training")
        return self


class TrainingConfig(_Section):
    learning_rate: float = Field(2e-4, gt=0, lt=1, description="Peak learning rate of the LoRA weights.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training split (ignored when max_steps is set).")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps.")
    batch_size: int = Field(4, ge=1, description="Conversations per forward pass.")
    gradient_accumulation_steps: int = Field(4, ge=1, description="Forward passes per optimizer step.")
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate schedule after warmup."
    )
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Share of steps spent warming up the learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay on LoRA weights.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping threshold.")
    optimizer: Literal["adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"] = Field(
        "adamw_torch", description="Optimizer (8-bit and paged variants need CUDA)."
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward: less memory, ~1/3 more compute. Off unless memory is short."
    )
    group_by_length: bool = Field(
        True, description="Batch conversations of similar length together: far less padding, same data per epoch."
    )
    logging_steps: int = Field(5, ge=1, description="Log the training loss every N steps.")
    eval_steps: int | None = Field(
        None, ge=1, description="Validation loss every N steps; default about four times per run."
    )
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop after this many validations in a row without a lower validation loss."
    )
    keep_best: bool = Field(
        True, description="With a validation split, end with the adapter of the lowest validation loss, not the last."
    )
    seed: int = Field(42, description="Seed for LoRA initialisation, dropout and data order.")


class EvaluationConfig(_Section):
    before_and_after: bool = Field(True, description="Score the held-out split before and after training.")
    max_rows: int | None = Field(200, ge=1, description="Score at most this many held-out conversations (perplexity).")
    batch_size: int = Field(8, ge=1, description="Conversations per scoring or generation batch.")
    generation: bool = Field(
        True, description="Also generate replies to held-out prompts and score BLEU, ROUGE-1/2/L, token F1, exact match."
    )
    generation_rows: int = Field(50, ge=1, description="Held-out prompts to generate for (generation is the slow part).")
    max_new_tokens: int = Field(64, ge=1, description="Longest generated reply, in tokens.")
    do_sample: bool = Field(False, description="Sample instead of greedy decoding.")
    temperature: float = Field(0.7, gt=0, description="Sampling temperature (with do_sample).")
    top_p: float = Field(0.9, gt=0, le=1, description="Nucleus sampling mass (with do_sample).")


class OutputConfig(_Section):
    dir: str = Field("runs/{name}", description="Run folder; {name} is replaced by the recipe name.")
    merge: bool = Field(True, description="Merge the adapter into a full-precision copy of the base and save it.")
    merge_strategy: Literal["auto", "full_precision", "nf4_roundtrip"] = Field(
        "auto",
        description="Base to merge into: original weights, or the dequantized 4-bit weights the adapter trained on; "
        "auto merges both (4-bit runs) and keeps the one closer to the adapter on held-out perplexity.",
    )
    merge_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Dtype of the merged model's weights; auto keeps the base checkpoint's dtype."
    )
    overwrite: bool = Field(False, description="Replace an existing run folder.")


class RecipeConfig(_Section):
    name: str = Field("run", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Run name, used in the run folder.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    @model_validator(mode="after")
    def _early_stopping_needs_validation(self) -> RecipeConfig:
        if self.training.early_stopping_patience and not (self.data.validation_split or self.data.validation_sources):
            raise ValueError(
                "training.early_stopping_patience needs validation data: set data.validation_split > 0 "
                "or data.validation_sources"
            )
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output.dir.format(name=self.name))

    def to_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False))

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RecipeConfig:
        path = Path(path)
        if not path.is_file():
            raise FinetuneError(f"{path}: recipe file not found. Pass the path of a YAML recipe, e.g. recipes/quickstart.yaml.")
        text = path.read_text()
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else str(path)
            raise FinetuneError(f"{where}: not valid YAML ({getattr(exc, 'problem', exc)}).") from None
        if not isinstance(raw, dict):
            raise FinetuneError(f"{path}: a recipe must be a YAML mapping of sections (model, lora, data, ...).")
        apply_overrides(raw, overrides)
        return cls.from_dict(raw, source=str(path), key_lines=_key_lines(text))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config", key_lines: dict[str, int] | None = None) -> RecipeConfig:
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise FinetuneError(_explain(exc, source, key_lines or {})) from None


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> None:
    """Apply `section.key=value` strings in place; values are parsed as YAML (so 20 is an int, true a bool)."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise FinetuneError(f"--set {item!r}: expected KEY=VALUE, e.g. --set training.max_steps=20.")
        node = raw
        *parents, leaf = key.strip().split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise FinetuneError(f"--set {item!r}: `{part}` is a value, not a section.")
            node = child
        node[leaf] = yaml.safe_load(value) if value.strip() else None


def _key_lines(text: str) -> dict[str, int]:
    """Map dotted key paths to their 1-based line in the YAML text, so errors can point at the line."""
    lines: dict[str, int] = {}

    def walk(node: yaml.Node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                dotted = f"{prefix}{key_node.value}"
                lines[dotted] = key_node.start_mark.line + 1
                walk(value_node, dotted + ".")
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                lines[f"{prefix}{index}"] = item.start_mark.line + 1
                walk(item, f"{prefix}{index}.")

    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, "")
    return lines


def _section_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The config class that owns the field at `loc`, to list its allowed keys."""
    model: type[BaseModel] = RecipeConfig
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        nested = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if nested is None:
            return None
        model = nested
    return model


def _explain(exc: ValidationError, source: str, key_lines: dict[str, int]) -> str:
    problems = []
    for error in exc.errors():
        loc = tuple(error["loc"])
        dotted = ".".join(str(p) for p in loc)
        where = f"{source}:{key_lines[dotted]}" if dotted in key_lines else source
        if error["type"] == "extra_forbidden":
            owner = _section_at(loc[:-1])
            allowed = sorted(owner.model_fields) if owner else []
            hint = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            message = f"unknown key `{dotted}`."
            if hint:
                message += f" Did you mean `{hint[0]}`?"
            if allowed:
                message += f" Allowed keys here: {', '.join(allowed)}."
        else:
            given = error.get("input")
            shown = "" if isinstance(given, dict) else f" (got {given!r})"
            message = f"`{dotted or 'recipe'}`: {error['msg']}{shown}."
        problems.append(f"{where}: {message}")
    return "Invalid recipe:\n  " + "\n  ".join(problems)


def reference_markdown() -> str:
    """The key/default/meaning tables of docs/configuration.md, generated from the fields (a test keeps them in sync)."""

    def rows(model: type[BaseModel], prefix: str) -> list[str]:
        out = ["| key | default | meaning |", "|---|---|---|"]
        for key, field in model.model_fields.items():
            default = "see below" if field.default_factory is not None else yaml.safe_dump(field.default, default_flow_style=True).strip().removesuffix("\n...")
            out.append(f"| `{prefix}{key}` | `{default}` | {field.description} |")
        return out

    lines = [f"| `name` | `{RecipeConfig.model_fields['name'].default}` | {RecipeConfig.model_fields['name'].description} |"]
    for section, field in RecipeConfig.model_fields.items():
        if section != "name":
            lines += ["", f"### `{section}`", "", *rows(field.annotation, f"{section}.")]
    lines += ["", "### `data.sources[]` entries", "", *rows(DataSource, "")]
    return "\n".join(lines)
