"""Every touch of transformers' and peft's non-public parts that batched serving needs, in one place.

Written against transformers 5.23.0 and peft 0.21.2 (tests/test_batching.py::
test_hf_internals_are_written_against_the_pinned_versions names them, and the parity tests beside it fail when a new
version decodes differently):

- `decoding_processors`: the logits processors `generate()` would build for one request, made by the same private
  methods `generate()` calls (`_prepare_generation_config`, `_prepare_special_tokens`, `_prepare_generated_length`,
  `_get_logits_processor`). transformers has no public way to get them, and copying its list by hand would drift
  from `generate()` (defaults such as top_k=50, min_new_tokens, the model's own suppress or bad-words settings).
- the KV cache: a `DynamicCache` whose layers are plain `DynamicLayer`s holds `keys`/`values` tensors of shape
  (rows, heads, columns, head_dim); `join_rows`, `keep_rows` and `drop_columns` rebuild them. transformers offers
  `batch_select_indices` but nothing to add rows to a running cache.
- `AdapterRouter`: each row's LoRA adapter, passed as `adapter_names` to every LoRA layer, as peft's own
  `model(..., adapter_names=[...])` does. peft registers those hooks anew on every forward pass and removes them only
  when it returns: a forward pass that raises leaves them behind, and every later pass then runs with the failed
  batch's adapter list (seen as "Length of `adapter_names` should be the same as the number of inputs"). These hooks
  are registered once and pass names only inside `rows(...)`, whatever happens there.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.utils.other import AuxiliaryTrainingWrapper
from transformers import DynamicCache, LogitsProcessorList, PreTrainedModel
from transformers.cache_utils import DynamicLayer

WRITTEN_AGAINST = {"transformers": "5.23.0", "peft": "0.21.2"}


def base_model(model: PreTrainedModel | PeftModel) -> PreTrainedModel:
    """The transformers model under any peft wrapper (its generate() is the one peft calls)."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def decoding_processors(
    model: PreTrainedModel | PeftModel, generate_kwargs: dict[str, Any], prompt_ids: torch.Tensor
) -> tuple[LogitsProcessorList, bool]:
    """The logits processors and warpers, in order, that `model.generate(prompt_ids, **generate_kwargs)` applies at
    each step, and whether it samples (else greedy). `prompt_ids`: (1, prompt length)."""
    base = base_model(model)
    kwargs = dict(generate_kwargs)
    custom = kwargs.pop("logits_processor", None)
    config, _ = base._prepare_generation_config(None, **kwargs)
    base._prepare_special_tokens(config, kwargs_has_attention_mask=True, device=prompt_ids.device, batch_size=1)
    # As generate() works them out when called without a generation_config.
    own = base.generation_config
    config = base._prepare_generated_length(
        generation_config=config,
        has_default_max_length=kwargs.get("max_length") is None and own.max_length is None,
        has_default_min_length=kwargs.get("min_length") is None and own.min_length is None,
        model_input_name="input_ids",
        input_ids_length=prompt_ids.shape[1],
        inputs_tensor=prompt_ids,
    )
    processors = base._get_logits_processor(
        generation_config=config,
        input_ids_seq_length=prompt_ids.shape[1],
        encoder_input_ids=prompt_ids,
        logits_processor=custom,
        device=prompt_ids.device,
        model_kwargs={},
    )
    return processors, bool(config.do_sample)


def new_cache(model: PreTrainedModel | PeftModel) -> DynamicCache:
    return DynamicCache(config=base_model(model).config)


def rows_can_share_a_cache(model: PreTrainedModel | PeftModel) -> str | None:
    """None when requests can be batched in one cache (every layer a plain, growing `DynamicLayer`); otherwise why
    not, e.g. sliding-window layers (Gemma 3), which drop their oldest columns and so cannot be left-padded."""
    kinds = sorted({type(layer).__name__ for layer in new_cache(model).layers if type(layer) is not DynamicLayer})
    return f"its cache has {', '.join(kinds)} layers" if kinds else None


def width(cache: DynamicCache) -> int:
    return cache.get_seq_length()


def join_rows(caches: list[DynamicCache]) -> DynamicCache:
    """One cache holding every row of `caches`, each left-padded with zero columns to the widest; the padding is
    masked out by the attention mask, so it never changes a row's attention."""
    widest = max(width(cache) for cache in caches)
    joined = caches[0]
    for index, layer in enumerate(joined.layers):
        keys, values = [], []
        for cache in caches:
            other = cache.layers[index]
            pad = widest - other.keys.shape[-2]
            keys.append(torch.nn.functional.pad(other.keys, (0, 0, pad, 0)) if pad else other.keys)
            values.append(torch.nn.functional.pad(other.values, (0, 0, pad, 0)) if pad else other.values)
        layer.keys, layer.values = torch.cat(keys), torch.cat(values)
    return joined


def keep_rows(cache: DynamicCache, rows: list[int]) -> None:
    index = torch.tensor(rows, device=cache.layers[0].keys.device)
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys.index_select(0, index), layer.values.index_select(0, index)


def drop_columns(cache: DynamicCache, columns: int) -> None:
    """Drops the `columns` leftmost columns, padding in every row once the longest rows have left."""
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[..., columns:, :], layer.values[..., columns:, :]


class AdapterRouter:
    """Routes each row of a batch through its own LoRA adapter (peft's name `__base__`: none) in a peft model."""

    def __init__(self, model: PeftModel) -> None:
        self.names: list[str] | None = None
        self.handles = [
            module.register_forward_pre_hook(self._pass_names, with_kwargs=True)
            for module in model.modules()
            if isinstance(module, (LoraLayer, AuxiliaryTrainingWrapper))
        ]

    def _pass_names(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict]:
        if self.names is not None:
            kwargs["adapter_names"] = self.names
        return args, kwargs

    @contextmanager
    def rows(self, names: list[str]) -> Iterator[None]:
        """Forward passes inside run row i through adapter names[i]; outside, the model is untouched."""
        self.names = names
        try:
            yield
        finally:
            self.names = None

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
