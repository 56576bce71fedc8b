"""Speed levers inside a training step: attention run per packed conversation, and the output layer run only where
a token carries loss."""

from __future__ import annotations

from typing import Any

import torch
from peft import PeftModel
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from finetune import compat, distributed
from finetune.chunked_loss import cross_entropy_sum, final_hidden_states

# ---------------------------------------------------------------- attention per packed conversation

PACKED_ATTENTION = "finetune_packed_sdpa"


def packed_sdpa_attention(module, query, key, value, attention_mask, **kwargs):
    """sdpa run once per conversation of a packed row, causal within each, so none attends to another.

    For a packed row transformers hands sdpa a block-diagonal (tokens x tokens) mask, which sdpa cannot skip:
    on 2 CPU cores, attention over 8 packed conversations of 256 tokens took 4.7x as long as per conversation
    (measured, forward + backward), and the mask costs memory in every layer. The padding-free collator already
    gives the boundaries (`cu_seq_lens_q`). Anything else (padded batches, generation with a cache) goes to
    transformers' sdpa unchanged.

    Args:
        module: The attention layer (transformers' attention interface).
        query: Queries, (batch, heads, tokens, head size).
        key: Keys, (batch, key-value heads, tokens, head size).
        value: Values, shaped as `key`.
        attention_mask: The mask transformers built; unused for a packed row.
        kwargs: What transformers passes on to sdpa; `cu_seq_lens_q` gives the conversations' boundaries.

    Returns:
        (attention output, None), as transformers' sdpa returns them.
    """
    bounds = kwargs.pop("cu_seq_lens_q", None)
    kwargs.pop("cu_seq_lens_k", None)
    if bounds is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    edges = bounds.tolist()
    parts = [
        sdpa_attention_forward(
            module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None, **{**kwargs, "is_causal": True}
        )[0]
        for a, b in zip(edges[:-1], edges[1:])
    ]
    return torch.cat(parts, dim=1), None


def use_packed_attention(model: torch.nn.Module) -> None:
    """Switch a model that uses sdpa to the per-conversation variant (flash attention already works per conversation).

    The variant is registered with transformers here, when first used, not when this module is imported.

    Args:
        model: The model (or peft model) to switch; changed in place, and left alone unless it runs sdpa.
    """
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    if compat.attention_implementation(base) == "sdpa":
        AttentionInterface.register(PACKED_ATTENTION, packed_sdpa_attention)
        AttentionMaskInterface.register(
            PACKED_ATTENTION, sdpa_mask
        )  # padded batches and generation still need sdpa's mask
        base.set_attn_implementation(PACKED_ATTENTION)


# ---------------------------------------------------------------- logits only where the loss is taken


def trained_logits_loss(
    model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Mean next-token loss over labelled tokens, running the output layer only at the positions that predict one,
    a chunk of them at a time (`finetune.chunked_loss`).

    Returns (loss, argmax hits, labelled tokens), the hits for the token accuracy TRL logs.

    Args:
        model: The model being trained (possibly wrapped by DDP or peft).
        inputs: The batch: input_ids, labels (-100 where no loss is taken), attention_mask or position ids.
        num_items_in_batch: The labelled tokens of the whole optimizer step under gradient accumulation (as the
            Trainer passes it); None to divide by this batch's.
    """
    labels = inputs["labels"]
    keep = labels[:, 1:] != -100  # position i predicts token i + 1
    targets = labels[:, 1:][keep]
    model_inputs = {key: value for key, value in inputs.items() if key != "labels"}
    if distributed.weights_sharded():
        # FSDP and ZeRO-3 make the output layer's weights whole only inside the model's forward: run it there, on
        # every labelled position at once (transformers' boolean `logits_to_keep` selects them before the head).
        selected = torch.nn.functional.pad(keep, (0, 1))
        logits = model(**model_inputs, use_cache=False, logits_to_keep=selected).logits.float()
        total, hits = (
            torch.nn.functional.cross_entropy(logits, targets, reduction="sum"),
            (logits.argmax(-1) == targets).sum(),
        )
    else:
        hidden = final_hidden_states(model, model_inputs)
        total, hits = cross_entropy_sum(model, hidden[:, :-1][keep], targets)
    # Like transformers: with gradient accumulation, divide by the labelled tokens of the whole optimizer step.
    denominator = targets.numel() if num_items_in_batch is None else num_items_in_batch
    return total / torch.as_tensor(denominator, device=total.device).clamp(min=1), hits, targets.numel()
