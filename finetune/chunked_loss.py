"""Next-token loss through the output layer a chunk of positions at a time, so the (positions x vocabulary) logits
are never all in memory: Gemma 3's 262k-token vocabulary makes them 1 MiB per position in float32, ten times the
rest of a training step's activations on its 270M model. Used by training (`training.speed.trained_logits_loss`) and
by evaluation's perplexity; `finetune.planning` sets how many positions a chunk holds.

The model's own forward runs up to its final norm (through any DDP or peft wrapper, whose hooks stay in place) with
its head on one position only; the head then runs here, per chunk, with the same scaling and softcapping as the
model's forward. In backward each chunk is recomputed (activation checkpointing), so its logits and their gradient
exist for one chunk at a time there too.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from peft import PeftModel
from torch.utils.checkpoint import checkpoint

from finetune.planning import loss_chunk_positions


def bare_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside DDP (`.module`) and peft wrappers.

    Args:
        model: A transformers model, possibly wrapped in DDP and/or a peft model.

    Returns:
        The innermost transformers model.
    """
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model.get_base_model() if isinstance(model, PeftModel) else model


def final_hidden_states(model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """(batch, tokens, hidden) states after the final norm, from the model's own forward with its head on one position.

    Args:
        model: The (possibly wrapped) causal language model.
        inputs: The keyword inputs of its forward (input_ids, attention_mask, ...).

    Returns:
        The decoder's output hidden states, (batch, tokens, hidden).
    """
    captured: list[torch.Tensor] = []
    decoder = bare_model(model).get_decoder()
    hook = decoder.register_forward_hook(lambda module, args, output: captured.append(output[0]))
    try:
        model(**inputs, use_cache=False, logits_to_keep=1)
    finally:
        hook.remove()
    return captured[-1]


def output_logits(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """What the model's forward computes from final hidden states: its output layer (as wrapped, e.g. by peft's
    trainable tokens), then the scaling (Granite, Cohere) and softcapping (Gemma 2) some families apply, in float32.

    Args:
        model: The (possibly wrapped) causal language model.
        hidden: Final hidden states, (..., hidden).

    Returns:
        Float32 logits, (..., vocabulary).
    """
    base = bare_model(model)
    config = base.config.get_text_config()
    logits = base.get_output_embeddings()(hidden)
    if getattr(config, "logits_scaling", None):
        logits = logits / config.logits_scaling
    if isinstance(getattr(base, "logit_scale", None), (int, float)):
        logits = logits * base.logit_scale
    logits = logits.float()
    if getattr(config, "final_logit_softcapping", None):
        logits = torch.tanh(logits / config.final_logit_softcapping) * config.final_logit_softcapping
    return logits


def chunk_size(model: torch.nn.Module) -> int:
    """How many positions a chunk of the output layer holds for this model's vocabulary (the planner's rule).

    Args:
        model: The (possibly wrapped) causal language model.

    Returns:
        Positions per chunk (`finetune.planning.loss_chunk_positions` of the vocabulary size).
    """
    return loss_chunk_positions(bare_model(model).get_output_embeddings().weight.shape[0])


def cross_entropy_sum(
    model: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, positions: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy, number of argmax hits) of `targets` (K,) predicted from `hidden` (K, hidden), `positions`
    at a time (default: the planner's chunk for this vocabulary). With gradients on and more than one chunk, each
    chunk is recomputed in backward instead of keeping its logits.

    Args:
        model: The (possibly wrapped) causal language model whose output layer computes the logits.
        hidden: Final hidden states of the positions that are scored, (K, hidden).
        targets: The token each position should predict, (K,).
        positions: Positions per chunk; None for `chunk_size(model)`.

    Returns:
        The summed cross-entropy (a scalar tensor, differentiable) and the number of positions whose most likely token
        is the target.
    """
    positions = positions or chunk_size(model)

    def chunk(states: torch.Tensor, wanted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = output_logits(model, states)
        return F.cross_entropy(logits, wanted, reduction="sum"), (logits.argmax(-1) == wanted).sum()

    if len(targets) <= positions or not torch.is_grad_enabled():
        parts = [
            chunk(hidden[i : i + positions], targets[i : i + positions])
            for i in range(0, max(len(targets), 1), positions)
        ]
    else:
        parts = [
            checkpoint(chunk, hidden[i : i + positions], targets[i : i + positions], use_reentrant=False)
            for i in range(0, len(targets), positions)
        ]
    return torch.stack([loss for loss, _ in parts]).sum(), torch.stack([hits for _, hits in parts]).sum()


def token_nll(
    model: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, positions: int | None = None
) -> torch.Tensor:
    """Each target's negative log-likelihood (K,) from `hidden` (K, hidden), a chunk of positions at a time (no backward).

    Args:
        model: The (possibly wrapped) causal language model whose output layer computes the logits.
        hidden: Final hidden states of the positions that are scored, (K, hidden).
        targets: The token each position should predict, (K,).
        positions: Positions per chunk; None for `chunk_size(model)`.

    Returns:
        The negative log-likelihood of each target, (K,); empty when there are no targets.
    """
    positions = positions or chunk_size(model)
    parts = [
        F.cross_entropy(output_logits(model, hidden[i : i + positions]), targets[i : i + positions], reduction="none")
        for i in range(0, len(targets), positions)
    ]
    return torch.cat(parts) if parts else hidden.new_zeros(0)
