"""Memory planner: estimate a recipe's peak training memory from the model's config.json, before loading weights.

Entry point: `plan(config, device)`. The estimate is split into what holds memory during a training step:
framework overhead, base weights (by precision), LoRA weights, their gradients, optimizer state, activations
kept for backward (with or without gradient checkpointing) and the output-layer logits, for the worst case a
recipe allows (every batch full of `data.max_length`-token conversations). It says whether that fits the device
and, when not, the cheapest change that does. `docs/performance.md` compares estimates with measured peaks.

Why by hand: no library estimates LoRA training memory from a config. accelerate's `estimate-memory` counts
weights only, while for small models with large vocabularies activations and logits dominate.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from finetune import precision
from finetune.config import RecipeConfig
from finetune.errors import FinetuneError, argument

GiB = 1024**3

# Activations kept for backward, per token and layer, for Llama-type blocks (RMSNorm, rotary attention through
# sdpa, gated MLP), measured with saved-tensor hooks on three Llama configurations (hidden 64, 256, 576, LoRA on
# all linear layers): `_activation_bytes_per_token` matches them within 2%. LoRA dropout keeps a 1-byte mask and a
# dropped float32 copy of each adapted input (adapters are float32, see finetune.training._SFTTrainer): 5 bytes per
# adapted input value while they live (CUDA).
_DROPOUT_BYTES = {"cuda": 5.0, "cpu": 2.9}
# GPT-2-type blocks (LayerNorm, fused qkv, 4x MLP, dropout after attention and MLP), measured the same way.
_GPT2_VALUES_PER_HIDDEN = 33
_GPT2_DROPOUT_VALUES_PER_HIDDEN = 6.6
# With attention dropout, sdpa takes its math path and keeps probabilities, dropout mask and dropped
# probabilities: 12 bytes per head and (query, key) pair (measured on GPT-2).
_ATTENTION_PROBABILITY_BYTES = 12
# On CPU, glibc keeps freed blocks for reuse: the gradients flowing back through each block interleave with the
# activations still kept, so the resident peak exceeds the live tensors by about 1.17x the dropout-free activations
# a step would keep without checkpointing, while the dropout masks and copies, which reuse such blocks, add only
# ~2.9 bytes per value instead of 5 (both fitted on nine SmolLM2 configurations with and without dropout and
# checkpointing, benchmarks/results/memory_plan.md; MALLOC_MMAP_THRESHOLD_=1048576 returns big blocks at once and
# brings the peak close to the live estimate, but costs ~30% time).
_CPU_HEAP_RETENTION = 1.17
# Resident memory of a process that imported torch, transformers, TRL, peft and datasets and holds a tokenizer
# and a tokenized dataset (measured on CPU), and the CUDA context plus allocator slack on a GPU.
_OVERHEAD = {"cpu": 0.6 * GiB, "cuda": 0.8 * GiB}
# The loss runs the output layer over at most this many (position x vocabulary) logits at once (finetune.chunked_loss):
# 256 MiB in float32, 256 positions of Gemma 3's 262k vocabulary, 1365 of SmolLM2's 49k.
LOGITS_PER_CHUNK = 1 << 26


# batch_size: auto keeps the estimate within this share of the device's free memory. The largest underestimate
# measured is Gemma 3 270M with trained added-token rows, 4.30 GiB estimated for 5.97 GiB measured (0.72 of the peak,
# benchmarks/results/memory_gemma.md); nine SmolLM2-135M configurations were within -10% to +5% (memory_plan.md).
AUTO_BATCH_MEMORY_SHARE = 0.7
# The largest batch auto considers when no effective_batch_size bounds it: beyond this, a batch mostly shortens the
# run by step count rather than speeding it up, and changes the training more than it helps.
AUTO_BATCH_LIMIT = 64


def loss_chunk_positions(vocab: int) -> int:
    """How many positions one chunk of the output layer computes at a time (`finetune.chunked_loss`): LOGITS_PER_CHUNK
    logits, so a chunk's float32 logits stay at 256 MiB whatever the vocabulary.

    Args:
        vocab: The vocabulary size.

    Returns:
        Positions per chunk, at least 1.
    """
    return max(1, LOGITS_PER_CHUNK // vocab)


# Families whose MLP has two matrices (fc, proj) instead of Llama's three (gate, up, down).
_TWO_MATRIX_MLP = {"gpt2", "gpt_neox", "gptj", "gpt_bigcode", "opt", "phi", "falcon", "bloom", "starcoder2"}


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a decoder-only transformer that memory depends on, read from its config."""

    model_type: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool
    attention_dropout: float
    added_tokens: int = 0  # tokens added to the vocabulary, whose embedding rows train (models.fit_vocabulary)

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """The shape the planner needs from a transformers model config (its text config, for multimodal ones).

        Args:
            config: A transformers PretrainedConfig.

        Returns:
            The ModelShape.

        Raises:
            FinetuneError: The config lacks a size the plan needs.
        """
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        try:
            hidden = int(text.hidden_size)
            heads = int(text.num_attention_heads)
            layers = int(text.num_hidden_layers)
            vocab = int(text.vocab_size)
        except AttributeError as exc:
            raise FinetuneError(
                f"model config ({getattr(text, 'model_type', '?')}): cannot plan memory, {exc}."
            ) from exc
        intermediate = getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * hidden
        return cls(
            model_type=str(getattr(text, "model_type", "")),
            layers=layers,
            hidden=hidden,
            intermediate=int(intermediate),
            heads=heads,
            kv_heads=int(getattr(text, "num_key_value_heads", None) or heads),
            head_dim=int(getattr(text, "head_dim", None) or hidden // heads),
            vocab=vocab,
            tied_embeddings=bool(getattr(config, "tie_word_embeddings", getattr(text, "tie_word_embeddings", True))),
            attention_dropout=float(
                getattr(text, "attention_dropout", None) or getattr(text, "attn_pdrop", None) or 0.0
            ),
        )

    @property
    def gpt2_like(self) -> bool:
        return self.model_type in _TWO_MATRIX_MLP

    def block_linears(self) -> list[tuple[str, int, int]]:
        """(module name, in features, out features) of each linear layer in one block."""
        h, i, q, kv = self.hidden, self.intermediate, self.heads * self.head_dim, self.kv_heads * self.head_dim
        if self.gpt2_like:
            return [("c_attn", h, q + 2 * kv), ("c_proj", q, h), ("c_fc", h, i), ("c_proj", i, h)]
        return [
            ("q_proj", h, q),
            ("k_proj", h, kv),
            ("v_proj", h, kv),
            ("o_proj", q, h),
            ("gate_proj", h, i),
            ("up_proj", h, i),
            ("down_proj", i, h),
        ]

    @property
    def linear_params(self) -> int:
        """Weights of the blocks' linear layers (what 4-bit and 8-bit quantize)."""
        return self.layers * sum(n_in * n_out for _, n_in, n_out in self.block_linears())

    @property
    def other_params(self) -> int:
        """Embeddings, an untied output layer and norms: kept in 16/32 bits even in quantized runs."""
        embeddings = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return embeddings + self.layers * 2 * self.hidden + self.hidden

    @property
    def params(self) -> int:
        return self.linear_params + self.other_params

    @property
    def matmul_params(self) -> int:
        """Parameters that take part in a matmul per token: block linears and the output layer (not the embedding lookup)."""
        return self.linear_params + self.vocab * self.hidden


@dataclass
class MemoryPlan:
    """A peak-memory estimate in bytes by part, against what the device has."""

    device: str
    budget: int | None  # bytes available; None when unknown
    parts: dict[str, int]
    details: dict[str, str]
    settings: dict[str, Any]
    suggestion: list[str] = field(default_factory=list)  # `key=value` overrides that make it fit
    suggestion_total: int | None = None
    notes: list[str] = field(default_factory=list)  # how `auto` settings were decided (batch_size: auto)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def fits(self) -> bool:
        return self.budget is None or self.total <= self.budget

    def summary(self) -> str:
        """One line: the estimated peak and, when known, the memory available.

        Returns:
            e.g. "peak ~3.20 GiB of 15.50 GiB available on cpu".
        """
        available = f" of {gib(self.budget)} available on {self.device}" if self.budget is not None else ""
        return f"peak ~{gib(self.total)}{available}"

    def lines(self, show_change: Callable[[str], str] = str) -> list[str]:
        """The table a person reads; `show_change` words each suggested `key=value` override (the CLI adds --set).

        Args:
            show_change: Words a `key=value` override for the reader.

        Returns:
            The lines of the table: each part, the peak, what is available, and suggested changes when it does not fit.
        """
        width = max(len(name) for name in self.parts)
        out = [f"{name:<{width}}  {gib(value):>9}  {self.details.get(name, '')}" for name, value in self.parts.items()]
        out.append(f"{'peak':<{width}}  {gib(self.total):>9}  estimated, batches of {self.settings['tokens']} tokens")
        out += self.notes
        if self.budget is None:
            out.append(f"{self.device}: available memory unknown")
            return out
        verdict = "fits" if self.fits else "does NOT fit"
        out.append(f"{self.device}: {gib(self.budget)} available: {verdict}")
        if self.suggestion:
            out.append(
                f"cheapest change that fits ({gib(self.suggestion_total or 0)}): "
                + " ".join(show_change(s) for s in self.suggestion)
            )
        elif not self.fits:
            out.append(
                "no combination of smaller batches, checkpointing, 4-bit and shorter conversations fits this device"
            )
        return out


@dataclass(frozen=True)
class Batch:
    """The largest micro-batch: tokens in it, the sum of its conversations' squared lengths, the share carrying loss."""

    tokens: int
    squared_lengths: int
    trained_share: float = 1.0

    @classmethod
    def worst_case(cls, config: RecipeConfig) -> Batch:
        """The largest micro-batch a config allows: `batch_size` conversations of `data.max_length` tokens.

        Args:
            config: The recipe.

        Returns:
            The Batch.
        """
        size, length = config.training.batch_size * _sequences_per_row(config), config.data.max_length
        return cls(tokens=size * length, squared_lengths=size * length**2)

    @classmethod
    def from_data(cls, split: Any, config: RecipeConfig) -> Batch:
        """The batch of this split's longest conversations (packed: their sum; padded: all as long as the longest).
        A preference method's row runs as two sequences (chosen and rejected; KTO: a reply and its KL mismatch).

        Args:
            split: A tokenized split (input_ids and labels).
            config: The recipe (batch size, packing, method).

        Returns:
            The Batch.
        """
        return cls.from_rows(longest_rows(split), config)

    @classmethod
    def from_rows(cls, rows: list[tuple[int, int]], config: RecipeConfig) -> Batch:
        """The batch of the longest rows, given (length, trained tokens) pairs longest first (`longest_rows`).

        Args:
            rows: (length, trained tokens) pairs, longest first.
            config: The recipe (batch size, packing, method).

        Returns:
            The Batch; the worst case when there are no rows.
        """
        size = config.training.batch_size * _sequences_per_row(config)
        rows = [row for row in rows[: config.training.batch_size] for _ in range(_sequences_per_row(config))]
        if not rows:
            return cls.worst_case(config)
        lengths = [length for length, _ in rows]
        trained = sum(count for _, count in rows)
        tokens = sum(lengths) if config.training.packing and config.method == "sft" else size * lengths[0]
        return cls(
            tokens=tokens, squared_lengths=sum(n * n for n in lengths), trained_share=min(1.0, trained / sum(lengths))
        )


def longest_rows(split: Any) -> list[tuple[int, int]]:
    """(length, tokens carrying loss) of every row of a tokenized split (input_ids, labels), longest first.

    Args:
        split: A tokenized split with input_ids and labels.

    Returns:
        (length, trained tokens) pairs, longest first.
    """
    rows = [
        (len(ids), sum(1 for label in labels if label != -100))
        for ids, labels in zip(split["input_ids"], split["labels"])
    ]
    return sorted(rows, key=lambda row: row[0], reverse=True)


def _sequences_per_row(config: RecipeConfig) -> int:
    return 1 if config.method == "sft" else 2


def gib(value: float) -> str:
    """A byte count as GiB text.

    Args:
        value: Bytes.

    Returns:
        e.g. "1.50 GiB".
    """
    return f"{value / GiB:.2f} GiB"


def parse_device(device: str | None) -> tuple[str, int | None]:
    """'cpu', 'cuda' or a size such as '24GB' (a GPU of that size) -> (kind, budget in bytes or None if unknown).

    Args:
        device: "cpu", "cuda", a GPU memory size such as "24GB", or "cpu:16GB"; None for this machine.

    Returns:
        (kind, memory available in bytes or None).

    Raises:
        FinetuneError: `device` is none of these.
    """
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    size = re.fullmatch(r"\s*(?:(cpu|cuda):)?\s*(\d+(?:\.\d+)?)\s*(GB|GiB|G)\s*", device, flags=re.IGNORECASE)
    if size:  # '24GB' is a GPU of that size; 'cpu:16GB' a CPU machine with that much free memory
        return (size.group(1) or "cuda").lower(), int(float(size.group(2)) * GiB)
    if device == "cpu":
        import psutil

        return "cpu", int(psutil.virtual_memory().available)
    if device == "cuda":
        if not torch.cuda.is_available():
            return "cuda", None
        free, _ = torch.cuda.mem_get_info()
        return "cuda", int(free)
    raise FinetuneError(
        f"{argument('device', device)}: use cpu, cuda, a GPU memory size such as 24GB, or cpu:16GB (a CPU machine "
        "with that much free memory)."
    )


def estimate(
    shape: ModelShape, config: RecipeConfig, device: str, *, batch: Batch | None = None
) -> tuple[dict[str, int], dict[str, str], dict[str, Any]]:
    """Peak training memory by part for `config` on a device of kind `device` ('cpu' or 'cuda').

    `batch` is the largest micro-batch; by default the worst case the config allows: `batch_size` conversations
    of `data.max_length` tokens, every token carrying loss.

    Args:
        shape: The model's shape.
        config: The recipe.
        device: "cpu" or "cuda".
        batch: The largest micro-batch; None for the worst case.

    Returns:
        (bytes by part, how each part was computed, the settings the plan assumed).
    """
    model, lora, training = config.model, config.lora, config.training
    batch = batch or Batch.worst_case(config)
    compute_bytes = _compute_bytes(model.compute_dtype, model.quantization, device)
    tokens, trained_share = batch.tokens, batch.trained_share
    checkpointing = training.gradient_checkpointing is True

    # Weights. Quantized runs keep embeddings and norms in fp32 (peft's prepare_model_for_kbit_training casts them).
    if model.quantization == "4bit":
        linear_bytes = 0.5 + (1 / 64 + 4 / (64 * 256) if model.double_quant else 4 / 64)  # NF4 + blockwise scales
        weights = shape.linear_params * linear_bytes + shape.other_params * 4
        weights_detail = f"{shape.linear_params / 1e6:.0f}M NF4 + {shape.other_params / 1e6:.0f}M fp32"
    elif model.quantization == "8bit":
        weights = shape.linear_params * 1.0 + shape.other_params * 4
        weights_detail = f"{shape.linear_params / 1e6:.0f}M int8 + {shape.other_params / 1e6:.0f}M fp32"
    else:
        weights = shape.params * compute_bytes
        weights_detail = f"{shape.params / 1e6:.0f}M x {compute_bytes} bytes"

    # LoRA: r x (in + out) per adapted linear, in float32 whatever the base (peft's default, kept by our trainer).
    adapted = [
        (name, n_in, n_out) for name, n_in, n_out in shape.block_linears() if _adapted(name, lora.target_modules)
    ]
    lora_params = shape.layers * sum(lora.r * (n_in + n_out) for _, n_in, n_out in adapted)
    lora_bytes = 4
    optimizer_bytes = {"adamw_8bit": 2, "paged_adamw_8bit": 2, "paged_adamw_32bit": 8}.get(
        training.optimizer, 2 * lora_bytes
    )

    # Activations kept for backward.
    per_layer = _activation_bytes_per_token(shape, adapted, lora.r, lora.dropout, compute_bytes, _DROPOUT_BYTES[device])
    quadratic = 0
    if shape.attention_dropout > 0:  # sdpa's math path keeps the attention probabilities of each conversation
        quadratic = batch.squared_lengths * shape.heads * _ATTENTION_PROBABILITY_BYTES
    if checkpointing:  # each block's input, plus one block recomputed during backward
        activations = tokens * shape.hidden * compute_bytes * shape.layers + tokens * per_layer + quadratic
        activations_detail = f"{tokens} tokens, checkpointed: {shape.layers} block inputs + 1 block"
    else:
        activations = (tokens * per_layer + quadratic) * shape.layers
        activations_detail = f"{tokens} tokens x {shape.layers} layers x {per_layer / 1024:.0f} KiB"
    activations += 3 * tokens * shape.hidden * compute_bytes  # embedding output and final norm

    # Logits: the (positions x vocabulary) output-layer product.
    if training.skip_untrained_logits:
        labelled = int(tokens * trained_share)
        positions = min(labelled, loss_chunk_positions(shape.vocab))  # one chunk at a time, recomputed in backward
        # fp32 logits, log-softmax kept for backward, and their gradient (plus the 16-bit head output on GPU)
        logits = positions * shape.vocab * (12 + (compute_bytes if compute_bytes < 4 else 0))
        logits_detail = f"{positions} of {labelled} labelled positions at a time x {shape.vocab} vocabulary"
    elif device == "cuda":  # TRL's tiled log-probabilities: one (4096 x 32768) tile at a time
        logits = min(int(tokens * trained_share), 4096) * min(shape.vocab, 32768) * max(compute_bytes, 4) * 2
        logits_detail = "TRL's tiled log-probabilities"
    else:  # off CUDA TRL tiles every position and keeps ~5 tile-sized temporaries
        logits = min(tokens, 4096) * min(shape.vocab, 32768) * 4 * 5
        logits_detail = "TRL's tiled log-probabilities over every position"

    # Trained rows of added tokens (peft's trainable tokens): each forward writes them into a copy of the whole
    # (vocabulary x hidden) output layer, kept for backward with its dense gradient, and the input embedding's dense
    # gradient overlaps them. 2.5 matrices of float32, fitted on Gemma 3 270M (benchmarks/results/memory_gemma.md).
    tokens_rows = int(2.5 * shape.vocab * shape.hidden * 4) if shape.added_tokens else 0

    if device == "cpu":
        without_dropout = _activation_bytes_per_token(shape, adapted, lora.r, 0.0, compute_bytes, 0.0)
        retained = _CPU_HEAP_RETENTION * tokens * without_dropout * shape.layers
    else:
        retained = 0
    parts = {
        "overhead": int(_OVERHEAD[device]),
        "weights": int(weights),
        "lora": lora_params * lora_bytes,
        "gradients": lora_params * lora_bytes,
        "optimizer": lora_params * optimizer_bytes,
        "activations": int(activations),
        "logits": int(logits),
        **({"added tokens": tokens_rows} if tokens_rows else {}),
        "allocator": int(retained),
    }
    details = {
        "overhead": "framework, tokenizer, data" if device == "cpu" else "CUDA context, allocator slack",
        "weights": weights_detail,
        "lora": f"{lora_params / 1e6:.2f}M parameters, r={lora.r}",
        "gradients": "one per LoRA parameter",
        "optimizer": f"{training.optimizer}",
        "activations": activations_detail,
        "logits": logits_detail,
        "added tokens": f"{shape.added_tokens} trained embedding rows: copies of the {shape.vocab} x {shape.hidden} output layer",
        "allocator": "freed blocks glibc keeps for reuse" if device == "cpu" else "in overhead",
    }
    settings = {"tokens": tokens, "checkpointing": checkpointing, "compute_bytes": compute_bytes}
    return parts, details, settings


def plan(
    config: RecipeConfig, device: str | None = None, *, shape: ModelShape | None = None, batch: Batch | None = None
) -> MemoryPlan:
    """Estimate `config`'s peak training memory on `device` ('cpu', 'cuda', '24GB'; default: this machine).

    With `gradient_checkpointing: auto` the plan is the one auto picks: without checkpointing if that fits.

    Args:
        config: The recipe.
        device: "cpu", "cuda", "24GB" or "cpu:16GB"; None for this machine.
        shape: The model's shape; None to read it from the model's config (`model_shape`).
        batch: The largest micro-batch; None for the worst case.

    Returns:
        The MemoryPlan.

    Raises:
        FinetuneError: `device` is not understood, or the model's config cannot be read.
    """
    kind, budget = parse_device(device)
    shape = shape or model_shape(config)
    notes: list[str] = []
    if config.training.batch_size == "auto":
        choice = choose_batch_size(config, device, shape=shape)
        config, notes = choice.config, choice.lines()
    auto = config.training.gradient_checkpointing == "auto"
    config = _resolved(config, checkpointing=config.training.gradient_checkpointing is True)

    def total(candidate: RecipeConfig) -> int:
        same_batches = (candidate.training.batch_size, candidate.data.max_length) == (
            config.training.batch_size,
            config.data.max_length,
        )
        return sum(estimate(shape, candidate, kind, batch=batch if same_batches else None)[0].values())

    if auto and budget is not None and total(config) > budget:
        config = _resolved(config, checkpointing=True)
    parts, details, settings = estimate(shape, config, kind, batch=batch)
    if auto:
        details["activations"] += " (auto)"
    result = MemoryPlan(
        device=device or kind, budget=budget, parts=parts, details=details, settings=settings, notes=notes
    )
    if not result.fits:
        for overrides in _cheaper_configs(config):
            candidate = config.with_overrides(overrides, source="memory plan")
            if total(candidate) <= budget:
                result.suggestion, result.suggestion_total = overrides, total(candidate)
                break
    return result


def plan_without_checkpointing(
    config: RecipeConfig, device: str | None = None, *, train: Any = None, added_tokens: int = 0
) -> MemoryPlan:
    """The memory plan of training without gradient checkpointing: `gradient_checkpointing: auto` turns it on
    exactly when this plan does not fit.

    `train` (a tokenized split with input_ids and labels) replaces the worst case by this data's largest batch;
    `added_tokens` counts the tokens `models.fit_vocabulary` gave new, trained rows.

    Args:
        config: The recipe.
        device: As for `plan`; None for this machine.
        train: The tokenized training split; None for the worst case.
        added_tokens: How many new, trained embedding rows.

    Returns:
        The MemoryPlan without checkpointing.
    """
    batch = Batch.from_data(train, config) if train is not None else None
    shape = dataclasses.replace(model_shape(config), added_tokens=added_tokens)
    return plan(_resolved(config, checkpointing=False), device, batch=batch, shape=shape)


@dataclass(frozen=True)
class BatchChoice:
    """What `training.batch_size: auto` became, and why.

    Attributes:
        batch_size: Conversations per forward pass.
        gradient_accumulation_steps: Forward passes per optimizer step (effective_batch_size / batch_size when that
            is set, else the recipe's own).
        gradient_checkpointing: Whether the batch needs recomputed activations (decided with it when the recipe
            leaves gradient_checkpointing at auto).
        config: The recipe with these three settings applied.
        estimate: The estimated peak of training at this batch, in bytes.
        budget: The device's free memory, in bytes.
        usable: The share of it the estimate had to stay within (`AUTO_BATCH_MEMORY_SHARE`).
        device: The device planned for ('cpu', 'cuda' or a size).
        limit: The largest batch considered (effective_batch_size, the training rows or `AUTO_BATCH_LIMIT`).
        larger: The next larger batch considered and its estimate, when there was one (why it was not taken).
        fits: False when even the smallest batch is estimated over `usable` (the run goes on at batch 1).
    """

    batch_size: int
    gradient_accumulation_steps: int
    gradient_checkpointing: bool
    config: RecipeConfig
    estimate: int
    budget: int
    usable: int
    device: str
    limit: int
    larger: tuple[int, int] | None
    fits: bool

    def lines(self) -> list[str]:
        """The choice and its reason, as the run and `finetune plan` print them.

        Returns:
            Two or three lines: the batch and effective batch, the estimate against the memory, the larger batch
            that did not fit (or what bounded the search).
        """
        effective = self.batch_size * self.gradient_accumulation_steps
        kept = " (training.effective_batch_size)" if self.config.training.effective_batch_size else ""
        checkpointing = ", gradient checkpointing on" if self.gradient_checkpointing else ""
        steps = "step" if self.gradient_accumulation_steps == 1 else "steps"
        out = [
            f"batch size auto: {self.batch_size} conversations per batch x {self.gradient_accumulation_steps} "
            f"accumulation {steps} = {effective} per optimizer step{kept}{checkpointing}",
            f"  estimated peak {gib(self.estimate)} within {AUTO_BATCH_MEMORY_SHARE:.0%} of the {gib(self.budget)} "
            f"free on {self.device} ({gib(self.usable)}; the margin covers the planner's largest measured "
            "underestimate)"
            if self.fits
            else f"  even {self.batch_size} conversation per batch is estimated at {gib(self.estimate)}, over "
            f"{AUTO_BATCH_MEMORY_SHARE:.0%} of the {gib(self.budget)} free on {self.device}: training may run out "
            "of memory (finetune plan names changes that fit)",
        ]
        if self.larger is not None:
            size, total = self.larger
            out.append(f"  a batch of {size} would need {gib(total)}")
        elif self.fits:
            out.append(f"  {self.batch_size} is the largest batch considered (limit {self.limit})")
        return out


def choose_batch_size(
    config: RecipeConfig,
    device: str | None = None,
    *,
    train: Any = None,
    added_tokens: int = 0,
    shape: ModelShape | None = None,
) -> BatchChoice:
    """The largest batch whose estimated training peak fits `AUTO_BATCH_MEMORY_SHARE` of the device's free memory.

    With `training.effective_batch_size` set, only batches that divide it are considered, and the accumulation steps
    make up the rest, so the optimizer sees the same number of conversations per step on any device. Without it the
    accumulation steps stay as the recipe sets them and batches up to `AUTO_BATCH_LIMIT` are considered. Batches
    larger than the training split are not. With `gradient_checkpointing: auto`, a batch without checkpointing is
    preferred (no recomputation); checkpointing is turned on only when not even one conversation fits without it.

    Args:
        config: The recipe (its training.batch_size may be auto or a number; it is replaced).
        device: 'cpu', 'cuda' or a GPU memory size such as '24GB'; default this machine's device.
        train: The tokenized training split (input_ids, labels): each batch is then its longest conversations, not
            the worst case of data.max_length tokens each.
        added_tokens: Tokens `models.fit_vocabulary` added to the vocabulary, whose embedding rows train.
        shape: The model's shape, when already read (default: from its config.json).

    Returns:
        The chosen batch, accumulation and checkpointing, with the estimate and the reason.

    Raises:
        FinetuneError: The device's free memory is unknown (a CUDA device asked for where none is available).
    """
    kind, budget = parse_device(device)
    if budget is None:
        raise FinetuneError(
            f"training.batch_size: auto needs the free memory of {device or kind}, which is unknown here: set "
            "training.batch_size to a number (`finetune plan` can size it for a device of a stated memory, e.g. 24GB)."
        )
    shape = dataclasses.replace(shape or model_shape(config), added_tokens=added_tokens)
    usable = int(budget * AUTO_BATCH_MEMORY_SHARE)
    training = config.training
    effective = training.effective_batch_size
    limit = effective or AUTO_BATCH_LIMIT
    rows = longest_rows(train) if train is not None else None
    if rows:
        limit = min(limit, len(rows))
    sizes = [size for size in range(limit, 0, -1) if effective is None or effective % size == 0]
    if training.gradient_checkpointing == "auto":
        options = [False, True]
    else:
        options = [training.gradient_checkpointing is True]

    def candidate(size: int, checkpointing: bool) -> tuple[RecipeConfig, int]:
        overrides: dict[str, Any] = {"training.batch_size": size, "training.gradient_checkpointing": checkpointing}
        if effective is not None:
            overrides["training.gradient_accumulation_steps"] = effective // size
        chosen = config.with_overrides(overrides, source="batch_size: auto")
        batch = Batch.from_rows(rows, chosen) if rows else None
        return chosen, sum(estimate(shape, chosen, kind, batch=batch)[0].values())

    for checkpointing in options:
        larger = None
        for size in sizes:  # largest first: the estimate grows with the batch
            chosen, total = candidate(size, checkpointing)
            if total <= usable:
                return _choice(chosen, total, budget, usable, device or kind, limit, larger, fits=True)
            larger = (size, total)
    chosen, total = candidate(1, options[-1])
    return _choice(chosen, total, budget, usable, device or kind, limit, None, fits=False)


def _choice(
    config: RecipeConfig,
    total: int,
    budget: int,
    usable: int,
    device: str,
    limit: int,
    larger: tuple[int, int] | None,
    *,
    fits: bool,
) -> BatchChoice:
    training = config.training
    return BatchChoice(
        batch_size=int(training.batch_size),
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        gradient_checkpointing=training.gradient_checkpointing is True,
        config=config,
        estimate=total,
        budget=budget,
        usable=usable,
        device=device,
        limit=limit,
        larger=larger,
        fits=fits,
    )


def model_shape(config: RecipeConfig) -> ModelShape:
    """The model's shape from its config.json, or a GGUF file's metadata: no weights are loaded or converted.

    Args:
        config: The recipe (its `model:` section).

    Returns:
        The ModelShape.

    Raises:
        FinetuneError: The model's config cannot be read (`model.source`).
    """
    from transformers import AutoConfig

    from finetune.model_source import resolve

    source = resolve(config.model)
    folder = source.config_folder
    where = (
        {"pretrained_model_name_or_path": folder}
        if folder
        else {"pretrained_model_name_or_path": source.gguf.parent, "gguf_file": source.gguf.name}
    )
    try:
        hf_config = AutoConfig.from_pretrained(
            **where, revision=config.model.revision, trust_remote_code=config.model.trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise FinetuneError(f"model.source `{config.model.source}`: could not read its config ({exc}).") from exc
    return ModelShape.from_config(hf_config)


# ---------------------------------------------------------------- helpers


def _compute_bytes(dtype: str, quantization: str, device: str) -> int:
    if dtype == "auto":  # as the run will decide it: on CPU, bf16 for a quantized base where the CPU computes it fast
        if device == "cuda":
            return 2
        return precision.choose_compute_dtype("auto", quantization=quantization, cuda=False).dtype.itemsize
    return 4 if dtype == "float32" else 2


def _adapted(name: str, targets: list[str] | str) -> bool:
    return targets == "all-linear" or name in targets


def _activation_bytes_per_token(
    shape: ModelShape,
    adapted: list[tuple[str, int, int]],
    r: int,
    dropout: float,
    value_bytes: int,
    dropout_bytes: float,
) -> float:
    """Bytes kept for backward per token in one block (see the constants at the top for how they were measured)."""
    h, i, kv = shape.hidden, shape.intermediate, shape.kv_heads * shape.head_dim
    adapted_inputs = sum(n_in for _, n_in, _ in adapted)
    if shape.gpt2_like:
        values = _GPT2_VALUES_PER_HIDDEN * h + len(adapted) * r
        if dropout > 0:
            values += _GPT2_DROPOUT_VALUES_PER_HIDDEN * h * adapted_inputs / (7 * h)
        return values * value_bytes
    # norm inputs and outputs, q/k/v and attention output, gate/up outputs, activation and product, LoRA A outputs
    values = 4 * i + 6 * h + 2 * kv + len(adapted) * r
    dropped = dropout_bytes * (adapted_inputs + h) if dropout > 0 else 0
    return values * value_bytes + dropped


def _resolved(config: RecipeConfig, *, checkpointing: bool) -> RecipeConfig:
    return config.with_overrides({"training.gradient_checkpointing": checkpointing}, source="memory plan")


def _cheaper_configs(config: RecipeConfig) -> list[list[str]]:
    """Changes in order of cost: the same training with smaller micro-batches, then recomputation (~1/3 more
    compute), then 4-bit base weights (slightly different numerics), then shorter conversations (less data)."""
    training = config.training
    options: list[list[str]] = []
    batch, accumulation = training.batch_size, training.gradient_accumulation_steps
    smaller_batches = []
    while batch > 1:
        batch, accumulation = max(1, batch // 2), accumulation * 2
        smaller_batches.append([f"training.batch_size={batch}", f"training.gradient_accumulation_steps={accumulation}"])
    options += smaller_batches
    checkpoint = [] if training.gradient_checkpointing is True else ["training.gradient_checkpointing=true"]
    if checkpoint:
        options += [checkpoint] + [checkpoint + b for b in smaller_batches]
    quantize = [] if config.model.quantization == "4bit" else ["model.quantization=4bit"]
    if quantize:
        options += [checkpoint + quantize] + [checkpoint + quantize + b for b in smaller_batches]
    length = config.data.max_length
    while length > 256:
        length //= 2
        shorter = checkpoint + quantize + [f"data.max_length={length}"]
        options += [shorter] + [shorter + b for b in smaller_batches]
    return options
