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
    """The transformers model inside DDP (`.module`) and peft wrappers."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model.get_base_model() if isinstance(model, PeftModel) else model


def final_hidden_states(model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """(batch, tokens, hidden) states after the final norm, from the model's own forward with its head on one position."""
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
    trainable tokens), then the scaling (Granite, Cohere) and softcapping (Gemma 2) some families apply, in float32."""
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
    return loss_chunk_positions(bare_model(model).get_output_embeddings().weight.shape[0])


def cross_entropy_sum(
    model: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, positions: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy, number of argmax hits) of `targets` (K,) predicted from `hidden` (K, hidden), `positions`
    at a time (default: the planner's chunk for this vocabulary). With gradients on and more than one chunk, each
    chunk is recomputed in backward instead of keeping its logits."""
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
    """Each target's negative log-likelihood (K,) from `hidden` (K, hidden), a chunk of positions at a time (no backward)."""
    positions = positions or chunk_size(model)
    parts = [
        F.cross_entropy(output_logits(model, hidden[i : i + positions]), targets[i : i + positions], reduction="none")
        for i in range(0, len(targets), positions)
    ]
    return torch.cat(parts) if parts else hidden.new_zeros(0)
