"""Stage 1: load the tokenizer and the model (4-bit, 8-bit or full precision) from wherever the source points.

Entry points: `load_tokenizer(cfg)` and `load_model(cfg, quantized=...)`; `finetune.model_source` says where the
files are, without loading anything. GGUF files are converted once into a cached safetensors folder, because a GGUF-loaded model cannot be quantized with bitsandbytes nor saved
(`save_pretrained` refuses its GGUF quantizer), and re-dequantizing costs ~20 s per load.
"""

from __future__ import annotations

import os
import shutil
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from finetune import distributed, model_source, precision
from finetune.config import ModelConfig
from finetune.errors import FinetuneError
from finetune.model_source import ResolvedSource

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Tokens that can pad without being the end-of-sequence token, in order of preference.
_PAD_CANDIDATES = ("<|pad|>", "<pad>", "[PAD]", "<|finetune_right_pad_id|>", "<|endoftext|>", "<unk>")


def weights_path(source: ResolvedSource) -> str:
    """What `from_pretrained` takes for a resolved source: GGUF files are converted once into the cache first.

    Args:
        source: The resolved `model.source`.

    Returns:
        A folder or Hub id.
    """
    return str(_converted_gguf(source)) if source.gguf is not None else source.location


def _converted_gguf(source: ResolvedSource) -> Path:
    """Dequantize a GGUF file once into a safetensors folder in the cache."""
    gguf, target = source.gguf, source.converted
    if (target / "config.json").is_file():
        return target
    distributed.state().print(f"Converting {gguf.name} to safetensors once (cached in {target}) ...")
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are already dequantized floats; only the GGUF marker blocks save_pretrained.
    model.hf_quantizer.remove_quantization_config(model)
    model.save_pretrained(partial)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(partial)
    try:
        partial.rename(target)  # atomic: a half-written conversion is never picked up
    except OSError:  # another process finished first
        shutil.rmtree(partial, ignore_errors=True)
    return target


def compute_dtype(cfg: ModelConfig) -> torch.dtype:
    """The dtype the model computes in: `model.compute_dtype`, with `auto` resolved for this machine
    (`finetune.precision`: bf16 on a GPU, and on a CPU that computes bf16 natively and measurably faster).

    Args:
        cfg: The `model:` section.

    Returns:
        The compute dtype.
    """
    return precision.choose_compute_dtype(cfg.compute_dtype, quantization=cfg.quantization).dtype


def quant_storage(cfg: ModelConfig) -> torch.dtype:
    """The dtype 4-bit weights are packed into. FSDP and DeepSpeed shard only floating-point tensors, all of one
    dtype, so `auto` packs them into the compute dtype when `accelerate launch` runs with an FSDP or DeepSpeed
    config (it sets the variables read here), and into bitsandbytes' default, uint8, otherwise.

    Args:
        cfg: The `model:` section (`quant_storage`, `compute_dtype`).

    Returns:
        The storage dtype.
    """
    if cfg.quant_storage != "auto":
        return getattr(torch, cfg.quant_storage)
    return compute_dtype(cfg) if distributed.weights_sharded() else torch.uint8


def load_tokenizer(cfg: ModelConfig, folder: str | Path | None = None) -> PreTrainedTokenizerBase:
    """Tokenizer with a chat template and a pad token distinct from EOS whenever the vocabulary has one.

    `folder` loads the tokenizer saved beside an adapter instead of the base model's, so the exact chat
    template used in training is the one used afterwards.

    Args:
        cfg: The `model:` section: source, revision, chat_template, trust_remote_code.
        folder: A folder with a saved tokenizer (a run's adapter/) to load instead of the base model's.

    Returns:
        The tokenizer, padding on the right; `model.chat_template`, when set, replaces its own template and any turn
        markers the vocabulary lacks are added as special tokens.

    Raises:
        FinetuneError: The tokenizer cannot be loaded, is not a fast tokenizer, or has no chat template and
            `model.chat_template` is unset (`model.source`).
    """
    path = str(folder) if folder is not None else weights_path(model_source.resolve(cfg))
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, revision=None if folder else cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except OSError as exc:
        raise FinetuneError(f"model.source `{cfg.source}`: could not load its tokenizer ({exc}).") from exc
    if not tokenizer.is_fast:
        raise FinetuneError(
            f"model.source `{cfg.source}`: needs a fast tokenizer (character offsets build the loss masks)."
        )
    if cfg.chat_template:
        tokenizer.chat_template = _read_template(cfg.chat_template)
        _add_turn_markers(tokenizer)
    if not tokenizer.chat_template:
        raise FinetuneError(
            f"model.source `{cfg.source}`: the tokenizer has no chat template. Set model.chat_template to 'chatml', "
            "a .jinja file, or a Jinja string."
        )
    _set_pad_token(tokenizer)
    tokenizer.padding_side = "right"  # training; generation code pads left explicitly
    return tokenizer


# The turn markers `_add_turn_markers` gave each tokenizer, whose embedding rows the base model never trained.
_added_markers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _add_turn_markers(tokenizer: PreTrainedTokenizerBase) -> None:
    """Make the template's turn markers special tokens. A base model given ChatML has no <|im_start|>/<|im_end|>:
    as text they split into pieces no turn could end on, so the model could never learn to stop. Tokens the
    vocabulary lacks are appended (`fit_vocabulary` gives them embedding rows, which training learns)."""
    from finetune.data.masks import missing_turn_markers  # the data stage owns what a template writes

    markers = missing_turn_markers(tokenizer)
    if markers:
        tokenizer.add_special_tokens({"additional_special_tokens": markers}, replace_extra_special_tokens=False)
        _added_markers[tokenizer] = markers


def added_tokens(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The turn markers `load_tokenizer` added to this tokenizer (none for a template the model already knows).

    Args:
        tokenizer: A tokenizer from `load_tokenizer`.

    Returns:
        The added marker strings.
    """
    return list(_added_markers.get(tokenizer, []))


def fit_vocabulary(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, for_adapter: bool = False
) -> list[int]:
    """Give the model an embedding row for every token of `tokenizer`; returns the ids whose rows it never trained
    (the turn markers `load_tokenizer` added, and any rows this appends), which LoRA then trains.

    Call it after `load_model` wherever a tokenizer with added tokens meets a base: before training, where new rows
    start at the mean of the existing ones (transformers' `mean_resizing`: a new token's logit starts near the average
    token's instead of at random), and before loading or merging an adapter (`for_adapter=True`), which holds the
    trained rows, so the rows only need to exist (the mean's covariance takes ~7 s over Gemma 3's 262k rows).

    Args:
        model: The base model; its embeddings are resized in place when the tokenizer is longer.
        tokenizer: The tokenizer training or the adapter uses.
        for_adapter: True before loading or merging a trained adapter: new rows are not mean-initialised.

    Returns:
        The sorted ids of the rows the base never trained.
    """
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=not for_adapter)
    added = {tokenizer.convert_tokens_to_ids(token) for token in added_tokens(tokenizer)}
    return sorted(added | set(range(rows, len(tokenizer))))


def _read_template(value: str) -> str:
    if value == "chatml":
        return CHATML_TEMPLATE
    if "{{" in value or "{%" in value:
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise FinetuneError(
            f"model.chat_template: `{value}` is neither 'chatml', a Jinja string, nor an existing file."
        )
    return path.read_text()


def _set_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    # pad == eos is the classic cause of models that never stop: collators that mask pad ids also mask the
    # real EOS. Our labels are built from positions, so EOS stays trained either way; a distinct pad token
    # additionally keeps generation configs and other tools from confusing the two.
    if tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return
    vocab = tokenizer.get_vocab()
    for candidate in (tokenizer.unk_token, *_PAD_CANDIDATES):
        if (
            candidate
            and candidate in vocab
            and vocab[candidate] not in (tokenizer.eos_token_id, tokenizer.bos_token_id)
        ):
            tokenizer.pad_token = candidate
            return
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def load_model(cfg: ModelConfig, *, quantized: bool = True) -> PreTrainedModel:
    """Load the causal LM onto this process's device; `quantized=False` forces full precision (for merging).

    Quantization follows `model.quantization` (4-bit NF4 or 8-bit through bitsandbytes) unless `quantized` is False.

    Args:
        cfg: The `model:` section.
        quantized: False to load in float32 whatever `model.quantization` says.

    Returns:
        The model, on this process's device.

    Raises:
        FinetuneError: The weights cannot be loaded, or `model.source` cannot be resolved.
    """
    path = weights_path(model_source.resolve(cfg))
    dtype = compute_dtype(cfg)
    kwargs: dict = {"dtype": dtype}
    if quantized and cfg.quantization == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=cfg.double_quant,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=quant_storage(cfg),
        )
    elif quantized and cfg.quantization == "8bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    elif not quantized:
        kwargs["dtype"] = torch.float32
    # One device per process (never "auto"): quantized weights cannot be trained across devices.
    device = distributed.state().device
    try:
        with no_loading_bar():
            model = AutoModelForCausalLM.from_pretrained(
                path,
                revision=cfg.revision,
                trust_remote_code=cfg.trust_remote_code,
                device_map={"": device},
                **kwargs,
            )
    except OSError as exc:
        raise FinetuneError(f"model.source `{cfg.source}`: could not load weights ({exc}).") from exc
    disable_4bit_cpu_repacking(model)
    if "quantization_config" in kwargs and dtype == torch.bfloat16 and torch.device(device).type == "cpu":
        precision.keep_output_layer_float32(model)
    return model


@contextmanager
def no_loading_bar() -> Iterator[None]:
    """transformers draws a bar over every tensor it loads (hundreds of lines in a log file for a second's work);
    a run already says what it loads. The caller's setting is put back."""
    from transformers.utils import logging as transformers_logging

    shown = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            transformers_logging.enable_progress_bar()


def disable_4bit_cpu_repacking(model: PreTrainedModel) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 rewrites a Linear4bit's weights in place into the layout of a bf16
    inference kernel the first time the layer runs in eval mode without gradients, and keeps them so. That kernel
    has no backward: a model evaluated before training (as every run is) then passes no gradient through its base
    weights, and LoRA learns only along the residual stream. SmolLM2-135M in 4-bit, 4 steps: held-out loss
    4.244 -> 4.244 after an evaluation before training, 4.246 -> 3.820 without the repacking. The packed kernel
    also computes in bf16, so evaluation would not see the arithmetic training sees. Without it, evaluation,
    training and merging all use the same weights and compute dtype.

    Args:
        model: The loaded model; its Linear4bit layers are changed in place (others are left alone).
    """
    from bitsandbytes.nn import Linear4bit

    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False


def configure_generation(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, stop_ids: list[int]) -> None:
    """Make generate() stop at the template's end-of-turn token and pad with the (distinct) pad token.

    Args:
        model: The model; its generation config and config are changed in place.
        tokenizer: Its tokenizer (EOS and pad token).
        stop_ids: The end-of-turn token ids of the chat template (`data.masks.end_of_turn_ids`).
    """
    eos = [tokenizer.eos_token_id, *stop_ids]
    model.generation_config.eos_token_id = sorted({i for i in eos if i is not None})
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
