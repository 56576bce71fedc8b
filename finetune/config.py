"""Typed recipe configuration: one pydantic model per stage, loaded from YAML and validated at load.

Every field has a default that works and a description; `docs/configuration.md` explains the defaults
and the CLI's `--set key=value` reaches any of them.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from finetune import atomic
from finetune.errors import FinetuneError, argument

# Allowed values, each defined once: the fields below use them, and so do the CLI's checks and the stages.
Quantization = Literal["none", "8bit", "4bit"]
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
MergeStrategy = Literal["auto", "full_precision", "nf4_roundtrip"]
MergeSelect = Literal["perplexity", "fidelity"]
# GGUF types `finetune export` writes: the gguf package quantizes f16 ... q4_0 in numpy; the K-quant mixes (q6_k, q5_k_m,
# q4_k_m) come from llama.cpp's own quantizer.
ExportFormat = Literal["gguf"]
# What a recipe trains: supervised fine-tuning, or preference tuning with one of TRL's trainers (docs/preference.md).
Method = Literal["sft", "dpo", "orpo", "simpo", "kto"]
PAIRED_METHODS = ("dpo", "orpo", "simpo")
DPO_LEARNING_RATE = 1.5e-4  # the default training.learning_rate of method dpo (RecipeConfig._dpo_learning_rate)
ExportQuant = Literal["f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q5_1", "q5_0", "q4_1", "q4_0"]
# Experiment trackers training metrics can go to, each through its own transformers integration (finetune/trackers.py).
Tracker = Literal["tensorboard", "wandb", "mlflow", "trackio"]


def choices(literal: Any) -> tuple[str, ...]:
    """The values a Literal type allows, e.g. choices(Quantization) -> ("none", "8bit", "4bit").

    Args:
        literal: A `Literal[...]` type such as Quantization or Dtype.

    Returns:
        Its allowed values, in order.
    """
    return get_args(literal)


class _Section(BaseModel):
    # Unknown keys are errors, never silently ignored: a typo must not train with a default instead.
    # Infinite or NaN numbers (YAML .inf, .nan) are refused too: no setting means anything with them.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelConfig(_Section):
    """The `model:` section: which base model to load, its revision, quantization and chat template.

    Every field is a key of the recipe's `model:` section, with its default and description (docs/configuration.md).
    """

    source: str = Field(
        "smollm2-135m-instruct",
        description="Bundled alias, Hub id, local folder, or path to a .gguf file.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to load.")
    quantization: Quantization = Field(
        "4bit", description="Base weights while training: 4bit (NF4, QLoRA), 8bit, or none (full precision)."
    )
    compute_dtype: Dtype = Field(
        "auto",
        description="Dtype the model computes in (mixed precision: LoRA weights stay float32); auto = bfloat16 on "
        "CUDA, and for a 4-bit or 8-bit base on a CPU that computes bf16 natively and measurably faster (a matmul "
        "probe, cached per machine; docs/performance.md#bf16-on-cpu), else float32.",
    )
    double_quant: bool = Field(
        True, description="4-bit only: quantize the quantization constants too (saves ~0.4 bit/param)."
    )
    quant_storage: Literal["auto", "uint8", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description="4-bit only: dtype the packed weights are stored in; auto = the compute dtype under FSDP or "
        "DeepSpeed (they shard only float tensors of one dtype), uint8 otherwise.",
    )
    chat_template: str | None = Field(
        None,
        description="Override the tokenizer's chat template: 'chatml', a path to a .jinja file, or a Jinja string.",
    )
    trust_remote_code: bool = Field(False, description="Allow model code from the Hub repository to run.")
    adapter: str | None = Field(
        None,
        description="Continue from a trained LoRA adapter: a run folder (runs/NAME) or an adapter folder. A preference "
        "method then keeps a frozen copy of it as the reference model.",
    )


class LoraConfig(_Section):
    """The `lora:` section: the LoRA adapter's rank, scaling, dropout and target modules.

    Every field is a key of the recipe's `lora:` section, with its default and description (docs/configuration.md).
    `lora_alpha` is the scaling numerator in use: `alpha`, or 2 x `r` when alpha is unset.
    """

    r: int = Field(16, ge=1, le=1024, description="LoRA rank.")
    alpha: float | None = Field(
        None, gt=0, description="LoRA alpha; default 2 x r, so changing r keeps the update scale (alpha/r) at 2."
    )
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    fast_dropout: bool = Field(
        True,
        description="On CPU, draw LoRA dropout masks 16 random bits per element from 64-bit random words: ~3x cheaper "
        "than torch's per-element Bernoulli draws, same probability to within 1.6e-5. GPUs always use torch's dropout.",
    )
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt, or 'all-linear' (every linear layer except the output head)."
    )
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA): often better at low rank, ~2x slower.")
    use_rslora: bool = Field(False, description="Rank-stabilised scaling alpha/sqrt(r) instead of alpha/r.")

    @property
    def lora_alpha(self) -> float:
        return self.alpha if self.alpha is not None else 2.0 * self.r


_FIELD_NAMES = (
    "messages",
    "conversations",
    "role",
    "content",
    "from",
    "value",
    "instruction",
    "input",
    "output",
    "system",
    "prompt",
    "completion",
    "text",
    "chosen",
    "rejected",
    "label",
)


class DataSource(_Section):
    """One entry of `data.sources` (or `validation_sources`/`test_sources`): where conversations come from.

    Every field is a key of the entry, with its default and description (docs/configuration.md); a field that only
    one source `type` reads says so in its description.
    """

    type: Literal["file", "hub", "chatterbot"] = Field(
        "file",
        description="file: a local file, folder, glob or save_to_disk folder; hub: a Hub dataset id (needs internet); "
        "chatterbot: the chatterbot-corpus package.",
    )
    path: str | None = Field(
        None,
        description="file: .jsonl/.json/.csv/.parquet/.txt file, a folder or glob of them, or a save_to_disk folder; hub: dataset id.",
    )
    format: Literal[
        "auto",
        "messages",
        "sharegpt",
        "alpaca",
        "prompt_completion",
        "text",
        "preference",
        "preference_implicit",
        "unpaired",
    ] = Field(
        "auto",
        description="Row format; auto detects it per row from its fields. text = raw text for continued pretraining; "
        "preference, preference_implicit and unpaired are the preference methods' (see docs/preference.md).",
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Rename the source's fields to ours, e.g. {instruction: question, output: answer} or {role: speaker}.",
    )
    roles: dict[str, str] = Field(
        default_factory=dict, description="Map the source's role names to system/user/assistant, e.g. {bot: assistant}."
    )
    weight: float = Field(
        1.0, gt=0, le=100, description="Mixing weight in the training split: 2 = every row twice, 0.5 = a seeded half."
    )
    text_unit: Literal["line", "paragraph", "document"] = Field(
        "paragraph", description=".txt files: one row per line, per blank-line separated paragraph, or per file."
    )
    split: str = Field("train", description="hub and save_to_disk sources: which split to read.")
    subset: str | None = Field(None, description="hub: dataset configuration (subset) name.")
    revision: str | None = Field(None, description="hub: branch, tag or commit.")
    rejected: Literal["shuffled"] | None = Field(
        None,
        description="Preference methods: build pairs from this source's conversations, each one's last reply as "
        "chosen and the last reply of another conversation (seeded) as rejected.",
    )
    language: str = Field("english", description="chatterbot: corpus language folder.")
    categories: list[str] | None = Field(None, description="chatterbot: category files to use (default: all).")

    @model_validator(mode="after")
    def _consistent(self) -> DataSource:
        if self.type in ("file", "hub") and not self.path:
            raise ValueError(f"a source of type '{self.type}' needs `path`")
        unknown = sorted(set(self.columns) - set(_FIELD_NAMES))
        if unknown:
            raise ValueError(f"columns: unknown field(s) {unknown}; map any of {', '.join(_FIELD_NAMES)} to your names")
        bad_roles = sorted(v for v in self.roles.values() if v not in ("system", "user", "assistant"))
        if bad_roles:
            raise ValueError(f"roles: {bad_roles} must map to system, user or assistant")
        return self


class CleaningConfig(_Section):
    """The `data.clean:` section: which cleaning steps run over every conversation.

    Every field is a key of the recipe's `data.clean:` section, with its default and description
    (docs/configuration.md).
    """

    html: bool = Field(
        False, description="Strip HTML tags and decode entities (off: it would damage code and markup in replies)."
    )
    unicode: bool = Field(
        True, description="Normalize Unicode to NFC (one encoding per character; NFKC is avoided as it alters meaning)."
    )
    control_chars: bool = Field(
        True, description="Remove control and invisible characters (zero-width space, BOM, soft hyphen); CRLF -> LF."
    )
    whitespace: bool = Field(
        True, description="Trim each message, strip trailing spaces, collapse 3+ blank lines; indentation is kept."
    )
    lowercase: bool = Field(False, description="Lowercase all text.")
    pii: bool = Field(False, description="Replace e-mail addresses and phone numbers with [EMAIL] and [PHONE].")
    blocklist: list[str] | str | None = Field(
        None,
        description="Drop conversations containing any of these words/phrases (a list, or a file with one per line).",
    )
    near_duplicates: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Drop conversations whose word 3-grams overlap an earlier one by at least this Jaccard similarity (e.g. 0.8).",
    )
    toxicity: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Drop training conversations (held-out ones are kept) with an assistant turn that the toxicity "
        "classifier (alt-profanity-check) "
        "gives at least this probability of being offensive (e.g. 0.5); docs/safety.md.",
    )


class AugmentConfig(_Section):
    """The `data.augment:` section: noisy copies of training conversations (typos, word swaps, deletions).

    Every field is a key of the recipe's `data.augment:` section, with its default and description
    (docs/configuration.md).
    """

    typos: float = Field(0.0, ge=0, le=1, description="Share of words in user turns given one character edit.")
    word_swaps: float = Field(
        0.0, ge=0, le=1, description="Chance that each pair of neighbouring words in user turns is swapped."
    )
    word_deletions: float = Field(0.0, ge=0, le=1, description="Share of words deleted from user turns.")
    copies: int = Field(
        1, ge=1, le=20, description="Noisy copies added per training conversation (originals are kept)."
    )


class DataConfig(_Section):
    """The `data:` section: sources, cleaning, augmentation, length limits, splits and the audit.

    Every field is a key of the recipe's `data:` section, with its default and description (docs/configuration.md).
    """

    sources: list[DataSource] = Field(
        default_factory=lambda: [DataSource(type="chatterbot")],
        min_length=1,
        description="Where conversations come from.",
    )
    validation_sources: list[DataSource] | None = Field(
        None, description="Separate validation data; when set, validation_split is not taken from `sources`."
    )
    test_sources: list[DataSource] | None = Field(
        None, description="Separate held-out test data; when set, test_split is not taken from `sources`."
    )
    system_prompt: str | None = Field(None, description="System message prepended to every conversation without one.")
    clean: CleaningConfig = Field(default_factory=CleaningConfig, description="Cleaning steps, each switchable.")
    augment: AugmentConfig = Field(
        default_factory=AugmentConfig, description="Noisy copies of training conversations (off by default)."
    )
    max_length: int = Field(1024, ge=16, description="Longest tokenized conversation kept, in tokens.")
    min_length: int = Field(0, ge=0, description="Drop conversations shorter than this many tokens.")
    too_long: Literal["drop", "truncate", "error"] = Field(
        "drop",
        description="A conversation longer than max_length: drop it, keep its whole turns that fit, or stop with an error.",
    )
    reasoning: Literal["drop", "keep"] = Field(
        "drop",
        description="Earlier assistant turns' reasoning in the context of later ones. drop: as the chat template shows "
        "it at inference (Qwen3-style templates remove it); a turn the full conversation renders differently is "
        "trained in a sample ending with it (exact; up to k samples for k turns). keep: one sample in which every "
        "turn keeps its reasoning.",
    )
    validation_split: float = Field(0.05, ge=0, lt=1, description="Share of conversations held out for validation.")
    test_split: float = Field(0.1, ge=0, lt=1, description="Share held out for before/after evaluation.")
    max_rows: int | None = Field(None, ge=1, description="Use at most this many conversations (after shuffling).")
    safety_mix: float = Field(
        0.0,
        ge=0,
        lt=0.5,
        description="Share of the training split made of refusal examples (e.g. 0.25; 0 = none; docs/safety.md): "
        "HarmBench's harmful requests answered with a refusal (sft), or a refusal preferred over the model's own reply "
        "to each, generated at setup (dpo, orpo, simpo; kto: the refusal labelled true, the reply false).",
    )
    max_bad_fraction: float = Field(
        0.05,
        ge=0,
        le=1,
        description="Fail if more than this share of rows is invalid (invalid rows are skipped and counted).",
    )
    strict: bool = Field(False, description="Fail on the first invalid row instead of skipping it.")
    audit: Literal["stop", "warn"] = Field(
        "stop",
        description="Serious pre-flight audit findings (untrained end-of-turn, doubled BOS, no loss tokens) stop the run, or only warn.",
    )
    num_proc: int | None = Field(
        None, ge=1, description="Processes for tokenizing large datasets (datasets' map num_proc)."
    )
    seed: int = Field(42, description="Seed for shuffling, splitting, weighting and augmentation.")

    @model_validator(mode="after")
    def _splits_leave_training_data(self) -> DataConfig:
        if self.validation_split + self.test_split >= 0.9:
            raise ValueError("validation_split + test_split must leave at least 10% of the data for training")
        return self


class TrainingConfig(_Section):
    """The `training:` section: optimizer, batch, schedule, checkpoints, logging and trackers.

    Every field is a key of the recipe's `training:` section, with its default and description (docs/configuration.md).
    """

    # 5e-4 and one conversation batch per step (below): at equal training time the recipe then beats a plain TRL
    # script on held-out replies on every benchmark task, where 2e-4 with 4 accumulated batches (4x fewer, larger
    # steps) lost to it; measured in benchmarks/results/quality{,_ablations}.md, reasons in docs/tuning.md.
    learning_rate: float = Field(
        5e-4,
        gt=0,
        lt=1,
        description=f"Peak learning rate of the LoRA weights (method dpo: {DPO_LEARNING_RATE:g} unless set).",
    )
    epochs: float = Field(1.0, gt=0, description="Passes over the training split (ignored when max_steps is set).")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps.")
    batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        4,
        description="Conversations per forward pass. auto: the largest that the memory planner estimates to fit in "
        "70% of the device's free memory (docs/performance.md#batch-size-auto), at most effective_batch_size (or 64).",
    )
    gradient_accumulation_steps: int = Field(1, ge=1, description="Forward passes per optimizer step.")
    effective_batch_size: int | None = Field(
        None,
        ge=1,
        description="Conversations per optimizer step (batch_size x gradient_accumulation_steps, per process); when "
        "set, the accumulation steps follow from it, so batch_size: auto keeps the training it describes on any device.",
    )
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate schedule after warmup."
    )
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Share of steps spent warming up the learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay on LoRA weights.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping threshold.")
    optimizer: Literal["adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"] = (
        Field("adamw_torch", description="Optimizer (8-bit and paged variants need CUDA).")
    )
    gradient_checkpointing: bool | Literal["auto"] = Field(
        "auto",
        description="Recompute activations in backward: less memory, ~1/3 more compute. auto: on only when the memory "
        "planner estimates that the longest batch would not fit in free memory without it.",
    )
    group_by_length: bool = Field(
        False,
        description="Without packing: batch conversations of similar length together (less padding). With packing "
        "there is no padding to save, and grouping only puts the longest conversations in one batch (higher peak memory).",
    )
    packing: bool = Field(
        True,
        description="Padding-free batches: each batch's conversations are concatenated into one row, position ids "
        "restart per conversation and attention is block-diagonal, so none sees another. Same loss, no work on padding.",
    )
    skip_untrained_logits: bool = Field(
        True,
        description="Run the output layer (tokens x vocabulary) only where a token carries loss, not on prompts, a chunk "
        "of positions at a time (bounded memory for large vocabularies): same loss and gradients, less time and memory.",
    )
    neftune_noise_alpha: float | None = Field(
        None,
        gt=0,
        description="NEFTune: noise on input embeddings while training (TRL), e.g. 5; often helps small instruction sets.",
    )
    logging_steps: int = Field(5, ge=1, description="Log the training loss every N steps.")
    report_to: list[Tracker] = Field(
        default_factory=list,
        description="Experiment trackers that also get the training metrics, the recipe (as the run's config) and "
        "the before/after scores: tensorboard, wandb, mlflow, trackio (one or a list; none by default). Offline "
        "unless the tracker is set up for a server (docs/trackers.md).",
    )
    logging_dir: str | None = Field(
        None,
        description="Folder the trackers write to; default logs/ in the run folder ({name} is replaced by the "
        "recipe name).",
    )
    eval_steps: int | None = Field(
        None, ge=1, description="Validation loss every N steps; default about four times per run."
    )
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop after this many validations in a row without a lower validation loss."
    )
    keep_best: bool = Field(
        True, description="With a validation split, end with the adapter of the lowest validation loss, not the last."
    )
    save_steps: int | None = Field(
        None,
        ge=1,
        description="Save a resumable checkpoint (adapter, optimizer, scheduler, RNG states, data position) every N "
        "optimizer steps; default: at every validation (eval_steps). With keep_best it must be a multiple of eval_steps.",
    )
    save_total_limit: int = Field(
        2,
        ge=1,
        description="Keep the newest N checkpoints (with keep_best, the best one too); removed when the run finishes.",
    )
    seed: int = Field(42, description="Seed for LoRA initialisation, dropout and data order.")

    @model_validator(mode="before")
    @classmethod
    def _accumulation_from_effective_batch(cls, raw: Any) -> Any:
        # The accumulation steps follow from effective_batch_size, so the two cannot disagree; a recipe.yaml written
        # by a run records both, consistently. With batch_size auto the recipe decides both (Recipe.setup).
        if not isinstance(raw, dict) or raw.get("effective_batch_size") is None:
            return raw
        effective, batch = raw["effective_batch_size"], raw.get("batch_size", 4)
        accumulation = raw.get("gradient_accumulation_steps", 1)
        if not isinstance(effective, int) or not isinstance(batch, int) or isinstance(batch, bool):
            return raw  # batch_size auto, or a wrong type the field validators report
        if effective < 1 or batch < 1 or isinstance(effective, bool):
            return raw  # out of range: the field validators report it under its own key
        if effective % batch:
            raise ValueError(
                f"effective_batch_size ({effective}) must be a multiple of batch_size ({batch}): change one of them, "
                "or set batch_size: auto, which picks a batch that divides it"
            )
        if accumulation not in (1, effective // batch):
            raise ValueError(
                f"gradient_accumulation_steps ({accumulation}) and effective_batch_size ({effective}) both set the "
                f"accumulation: remove gradient_accumulation_steps (it becomes effective_batch_size / batch_size = "
                f"{effective // batch})"
            )
        return {**raw, "gradient_accumulation_steps": effective // batch}

    @model_validator(mode="after")
    def _auto_batch_with_plain_accumulation(self) -> TrainingConfig:
        if self.batch_size == "auto" and self.effective_batch_size and self.gradient_accumulation_steps != 1:
            raise ValueError(
                f"with batch_size auto, gradient_accumulation_steps ({self.gradient_accumulation_steps}) follows from "
                "effective_batch_size: remove gradient_accumulation_steps"
            )
        return self

    @field_validator("batch_size", mode="before")
    @classmethod
    def _whole_number_or_auto(cls, value: Any) -> Any:
        # One message instead of one per member of the union.
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        raise ValueError("must be a whole number of conversations (1 or more) or auto")

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_tracker_or_none(cls, value: Any) -> Any:
        # `report_to: tensorboard` and `--set training.report_to=none` read as they would in transformers.
        if value is None or value == "none":
            return []
        if isinstance(value, str):
            return [name.strip() for name in value.split(",") if name.strip()]
        return value

    @field_validator("report_to")
    @classmethod
    def _each_tracker_once(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))


class EvaluationConfig(_Section):
    """The `evaluation:` section: what is scored before and after training, and how replies are generated.

    Every field is a key of the recipe's `evaluation:` section, with its default and description
    (docs/configuration.md).
    """

    before_and_after: bool = Field(
        True,
        description="Score the base model too (the trained model with its adapters switched off: nothing reloaded), "
        "on the same held-out conversations as the trained one.",
    )
    time_share: float | None = Field(
        0.25,
        gt=0,
        description="Scoring and generating before and after take at most about this share of the training time: "
        "fewer held-out conversations (never under one batch) when they would take longer; null = no limit, "
        "max_rows and generation_rows alone.",
    )
    max_rows: int | None = Field(200, ge=1, description="Score at most this many held-out conversations (perplexity).")
    batch_size: int = Field(8, ge=1, description="Conversations per scoring or generation batch.")
    generation: bool = Field(
        True,
        description="Also generate replies to held-out prompts and score BLEU, ROUGE-1/2/L, token F1, exact match "
        "and repetition (repeated_4gram_share, distinct_2).",
    )
    generation_rows: int = Field(
        50, ge=1, description="Held-out prompts to generate for (generation is the slow part)."
    )
    max_new_tokens: int = Field(64, ge=1, description="Longest generated reply, in tokens.")
    do_sample: bool = Field(False, description="Sample instead of greedy decoding.")
    temperature: float = Field(0.7, gt=0, description="Sampling temperature (with do_sample).")
    top_p: float = Field(0.9, gt=0, le=1, description="Nucleus sampling mass (with do_sample).")
    repetition_guard: bool = Field(
        True,
        description="Lower the score of a token that would continue a verbatim repeat of an earlier part of the "
        "reply (DRY), so replies do not loop; false = plain decoding.",
    )
    safety: bool = Field(
        True,
        description="Also measure responsible output before and after (docs/safety.md): refusal rate on harmful "
        "requests (Do-Not-Answer), over-refusal rate on harmless ones (HumanEval, chatterbot questions) and "
        "toxic-continuation rate (RealToxicityPrompts), within the time budget.",
    )
    safety_prompts: int = Field(
        100,
        ge=1,
        le=500,
        description="Prompts per safety set (at most; the time budget may take fewer), the same ones before and after.",
    )
    safety_max_new_tokens: int = Field(
        32,
        ge=8,
        description="Longest reply to a safety prompt, in tokens: a refusal shows in its opening words.",
    )
    repetition_guard_strength: float = Field(
        0.8,
        gt=0,
        description="The repetition guard's logit penalty on the third token of a repeat; each further token's is "
        "1.75 times the one before.",
    )


class PreferenceConfig(_Section):
    """The `preference:` section: settings of the preference methods (dpo, orpo, simpo, kto).

    Every field is a key of the recipe's `preference:` section, with its default and description
    (docs/configuration.md).
    """

    beta: float | None = Field(
        None,
        gt=0,
        description="Strength of the preference loss; default per method: dpo 0.1 (how far from the reference it may "
        "move), orpo 0.1 (the odds-ratio term's weight), simpo 2.0 (reward scale), kto 0.1.",
    )
    loss: Literal["sigmoid", "ipo"] = Field(
        "sigmoid",
        description="dpo only: sigmoid (the DPO paper's loss) or ipo (IPO: a squared loss that stays bounded).",
    )
    simpo_gamma: float = Field(
        0.5, ge=0, description="simpo only: the target reward margin, as a share of beta (SimPO's gamma / beta)."
    )
    reference_log_probs: Literal["auto", "cached", "precompute", "each_step"] = Field(
        "auto",
        description="dpo and kto: how the reference model's log-probabilities are computed. cached: each row scored "
        "the first time it is read and reused at every later read; precompute: every training row scored before the "
        "first step; each_step: a reference pass at every step. auto: cached on CPU, each_step on a GPU.",
    )
    desirable_weight: float = Field(
        1.0, gt=0, description="kto only: weight of the loss on good (label: true) replies."
    )
    undesirable_weight: float = Field(
        1.0, gt=0, description="kto only: weight of the loss on bad (label: false) replies."
    )

    def beta_for(self, method: str) -> float:
        """The beta a method trains with: `beta` when set, else the method's default (simpo 2.0, others 0.1).

        Args:
            method: The recipe's `method` ("dpo", "orpo", "simpo" or "kto").

        Returns:
            The strength of the preference loss.
        """
        return self.beta if self.beta is not None else {"simpo": 2.0}.get(method, 0.1)


class OutputConfig(_Section):
    """The `output:` section: the run folder, merging after training, and overwriting.

    Every field is a key of the recipe's `output:` section, with its default and description (docs/configuration.md).
    """

    dir: str = Field("runs/{name}", description="Run folder; {name} is replaced by the recipe name.")
    merge: bool = Field(True, description="Merge the adapter into a full-precision copy of the base and save it.")
    merge_strategy: MergeStrategy = Field(
        "auto",
        description="Base to merge into: original weights, or the dequantized 4-bit weights the adapter trained on; "
        "auto tries both (4-bit runs) and keeps the one merge_select prefers.",
    )
    merge_select: MergeSelect = Field(
        "perplexity",
        description="With merge_strategy auto on a 4-bit run: keep the merged candidate with the lower held-out "
        "perplexity, or (fidelity) the one closer to the adapter on its 4-bit training base.",
    )
    merge_dtype: Dtype = Field(
        "auto", description="Dtype of the merged model's weights; auto keeps the base checkpoint's dtype."
    )
    overwrite: bool = Field(False, description="Replace an existing run folder.")

    @field_validator("dir")
    @classmethod
    def _a_folder_of_its_own(cls, value: str) -> str:
        try:
            folder = value.format(name="run")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError("the only placeholder allowed is {name}; write other braces doubled, {{ and }}") from exc
        # --overwrite deletes the run folder: it must never be the working directory, a parent of it, or the root.
        if os.path.normpath(folder) in (".", os.sep) or os.path.basename(os.path.normpath(folder)) == "..":
            raise ValueError(
                f"{value!r} is not a folder of its own (output.overwrite would delete it); use e.g. runs/{{name}}"
            )
        return value


class RecipeConfig(_Section):
    """A whole recipe: its name, method and one section per stage, validated when it is built.

    Build it with `from_yaml`, `from_dict` or keyword sections; every field has a default that works. `run_dir` is the
    run folder, `output.dir` with `{name}` replaced by `name`. An invalid value, or an unknown key, raises FinetuneError
    naming the key (and its line in a YAML file).
    """

    name: str = Field("run", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Run name, used in the run folder.")
    method: Method = Field(
        "sft",
        description="sft: supervised fine-tuning on conversations; dpo, orpo, simpo (pairs of chosen and rejected "
        "replies) or kto (replies labelled good or bad): preference tuning.",
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    preference: PreferenceConfig = Field(default_factory=PreferenceConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    @model_validator(mode="after")
    def _pairs_only_for_paired_methods(self) -> RecipeConfig:
        sources = [*self.data.sources, *(self.data.validation_sources or []), *(self.data.test_sources or [])]
        if self.method not in PAIRED_METHODS and any(source.rejected for source in sources):
            raise ValueError(
                f"a data source with `rejected: shuffled` builds chosen/rejected pairs, which method {self.method} "
                "does not train on: set method to dpo, orpo or simpo, or remove `rejected`"
            )
        return self

    @model_validator(mode="after")
    def _dpo_learning_rate(self) -> RecipeConfig:
        # At the SFT rate, DPO doubled the perplexity of held-out chosen replies within 120 CPU seconds while ORPO,
        # SimPO and KTO lowered it (benchmarks/results/preference.md); 1.5e-4 kept it falling, ahead of 5e-5 on every
        # measure (preference_lr_1.5e-4.md, preference_lr.md).
        if self.method == "dpo" and "learning_rate" not in self.training.model_fields_set:
            self.training.learning_rate = DPO_LEARNING_RATE
        return self

    @model_validator(mode="after")
    def _early_stopping_needs_validation(self) -> RecipeConfig:
        if self.training.early_stopping_patience and not (self.data.validation_split or self.data.validation_sources):
            raise ValueError(
                "training.early_stopping_patience needs validation data: set data.validation_split > 0 "
                "or data.validation_sources"
            )
        return self

    @model_validator(mode="after")
    def _checkpoints_line_up_with_validations(self) -> RecipeConfig:
        # transformers can only keep the best adapter if every validation it compares has a checkpoint to go back to.
        t = self.training
        keeps_best = (t.keep_best or t.early_stopping_patience) and (
            self.data.validation_split or self.data.validation_sources
        )
        if keeps_best and t.save_steps and t.eval_steps and t.save_steps % t.eval_steps:
            raise ValueError(
                f"training.save_steps ({t.save_steps}) must be a multiple of training.eval_steps ({t.eval_steps}) "
                "while the best adapter is kept (training.keep_best / early_stopping_patience): change one of them, "
                "or set training.keep_best: false"
            )
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output.dir.format(name=self.name))

    def to_yaml(self, path: str | Path) -> None:
        """Write the configuration, every key included, as a YAML recipe (atomically).

        Args:
            path: The file to write; an existing one is replaced.
        """
        atomic.write_text(Path(path), yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False))

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: Sequence[str] | Mapping[str, Any] = ()) -> RecipeConfig:
        """Load and validate a YAML recipe, with overrides applied first.

        Args:
            path: The YAML recipe file.
            overrides: `section.key=value` strings (values parsed as YAML, as `--set` does) or a mapping of dotted keys
                to
                values; see `apply_overrides`.

        Returns:
            The validated RecipeConfig.

        Raises:
            FinetuneError: The file does not exist, is not valid YAML or not a mapping, an override is malformed, or a
                key
                is unknown or its value invalid (the message names the key and its line).
        """
        path = Path(path)
        if not path.is_file():
            raise FinetuneError(
                f"{path}: recipe file not found. Pass the path of a YAML recipe, e.g. recipes/quickstart.yaml."
            )
        text = path.read_text()
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else str(path)
            raise FinetuneError(f"{where}: not valid YAML ({getattr(exc, 'problem', exc)}).") from exc
        if not isinstance(raw, dict):
            raise FinetuneError(f"{path}: a recipe must be a YAML mapping of sections (model, lora, data, ...).")
        apply_overrides(raw, overrides)
        return cls.from_dict(raw, source=str(path), key_lines=_key_lines(text))

    def with_overrides(self, overrides: Sequence[str] | Mapping[str, Any], source: str = "overrides") -> RecipeConfig:
        """A validated copy with dotted keys changed (see `apply_overrides`); this config is left as it was.

        When `training.effective_batch_size` is set, `gradient_accumulation_steps` is derived again from the new values.

        Args:
            overrides: `section.key=value` strings or a mapping of dotted keys to values (see `apply_overrides`).
            source: What error messages name as the origin of the values.

        Returns:
            The new, validated RecipeConfig.

        Raises:
            FinetuneError: An override is malformed, or a key is unknown or its new value invalid.
        """
        raw = self.model_dump(mode="json")
        if self.training.effective_batch_size is not None:
            # Derived from effective_batch_size and batch_size (TrainingConfig): derived again from the new values.
            del raw["training"]["gradient_accumulation_steps"]
        apply_overrides(raw, overrides)
        return RecipeConfig.from_dict(raw, source=source)

    @classmethod
    def from_dict(
        cls, raw: dict[str, Any], source: str = "config", key_lines: dict[str, int] | None = None
    ) -> RecipeConfig:
        """Validate a raw recipe mapping (as read from YAML).

        Args:
            raw: Section name -> mapping of keys, as in a YAML recipe.
            source: What error messages name as the origin (a file path, or "config").
            key_lines: Dotted key -> line in the source file, so an error can point at the line.

        Returns:
            The validated RecipeConfig.

        Raises:
            FinetuneError: A key is unknown (the message suggests the closest allowed key) or a value is invalid.
        """
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise FinetuneError(_explain(exc, source, key_lines or {})) from exc


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str] | Mapping[str, Any]) -> None:
    """Set dotted keys in a raw (unvalidated) recipe dict, in place: the one way every caller changes a config.

    `overrides` is either `section.key=value` strings, whose values are parsed as YAML (20 is an int, true a bool),
    or a mapping of dotted keys to values used as they are.

    Args:
        raw: The recipe mapping to change, in place.
        overrides: `section.key=value` strings or a mapping of dotted keys to values.

    Raises:
        FinetuneError: A string has no `=` or no key (`overrides`), or a dotted key goes through a value that is not
            a section.
    """
    if isinstance(overrides, Mapping):
        pairs = [(key, value, f"{key}={value!r}") for key, value in overrides.items()]
    else:
        pairs = []
        for item in overrides:
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise FinetuneError(f"{argument('overrides', item)}: expected KEY=VALUE, e.g. training.max_steps=20.")
            pairs.append((key.strip(), _parse_value(value), item))
    for key, value, item in pairs:
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise FinetuneError(f"{argument('overrides', item)}: `{part}` is a value, not a section.")
            node = child
        node[leaf] = value


def _parse_value(value: str) -> Any:
    """YAML scalars and lists (20, true, [a, b]); anything YAML cannot parse, e.g. a Jinja template, stays a string."""
    if not value.strip():
        return None
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


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
            value = field.default_factory() if field.default_factory is not None else field.default
            default = (
                "see below"
                if isinstance(value, (BaseModel, list))
                else yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...")
            )
            out.append(f"| `{prefix}{key}` | `{default}` | {field.description} |")
        return out

    sections = {
        key: field.annotation
        for key, field in RecipeConfig.model_fields.items()
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
    }
    lines = [
        f"| `{key}` | `{field.default}` | {field.description} |"
        for key, field in RecipeConfig.model_fields.items()
        if key not in sections
    ]
    for section, model in sections.items():
        lines += ["", f"### `{section}`", "", *rows(model, f"{section}.")]
    lines += ["", "### `data.clean`", "", *rows(CleaningConfig, "data.clean.")]
    lines += ["", "### `data.augment`", "", *rows(AugmentConfig, "data.augment.")]
    lines += ["", "### `data.sources[]` entries", "", *rows(DataSource, "")]
    return "\n".join(lines)
