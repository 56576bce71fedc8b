"""Stage 6: merge a LoRA adapter into a full-precision copy of its base, verify it, and save it.

Entry point: `merge_adapter(...)`. The base is always reloaded unquantized, whatever precision training used:
merging into 4-bit weights re-rounds every updated weight (peft warns per layer; in one probe logits moved by
up to 36), which is the most reported way a good QLoRA fine-tune turns bad.

An adapter trained on a 4-bit base was fitted to the *quantized* weights, so for 4-bit runs two bases are
candidates: the original full-precision weights, or the dequantized NF4 weights the adapter actually saw (an NF4
round trip). The NF4 round trip computes exactly what the adapter on its 4-bit base computes (the logit check
proves it on probes), so its held-out perplexity is the adapter's own and needs no second scoring; only the
full-precision merge is scored. By default (`select="perplexity"`) the one with the lower held-out perplexity is
kept, and the NF4 round trip is only built when it wins; `select="fidelity"` keeps the NF4 round trip, the merge
closest to the model that was trained and evaluated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoConfig, PreTrainedModel, PreTrainedTokenizerBase

from finetune import atomic
from finetune.adapters import load_trained
from finetune.config import MergeSelect, MergeStrategy, ModelConfig, choices
from finetune.errors import FinetuneError, argument
from finetune.evaluation import perplexity
from finetune.model_source import resolve
from finetune.models import configure_generation, load_model, weights_path

STRATEGIES = choices(MergeStrategy)


@dataclass(frozen=True)
class MergeReport:
    """What `merge_adapter` did and how faithful the merged model is.

    Attributes:
        merged_dir: The folder of the merged model.
        dtype: The merged weights' dtype.
        strategy: The base merged into: "full_precision" or "nf4_roundtrip".
        max_logit_diff: Largest logit difference between the merged model and its base + adapter (both float32) on
            the probe inputs.
        fidelity: Held-out perplexity of each merged candidate, and of the adapter on the training-time base.
        reason: Why this candidate was kept.
    """

    merged_dir: Path
    dtype: str
    strategy: str
    max_logit_diff: float  # merged vs its base+adapter, both float32, on the probe inputs
    # Held-out perplexity of each merged candidate, and of the adapter on the training-time (quantized) base.
    fidelity: dict[str, float] = field(default_factory=dict)
    reason: str = ""  # why this candidate was kept


def _target_dtype(model_cfg: ModelConfig, requested: str) -> torch.dtype:
    if requested != "auto":
        return getattr(torch, requested)
    saved = getattr(
        AutoConfig.from_pretrained(weights_path(resolve(model_cfg)), revision=model_cfg.revision), "dtype", None
    )
    if isinstance(saved, str):
        saved = getattr(torch, saved, None)
    return saved if isinstance(saved, torch.dtype) else torch.float32


@torch.inference_mode()
def _logits(model: torch.nn.Module, probes: list[list[int]]) -> list[torch.Tensor]:
    device = next(model.parameters()).device
    return [model(input_ids=torch.tensor([ids], device=device)).logits.float().cpu() for ids in probes]


def _nf4_roundtrip_base(model_cfg: ModelConfig) -> PreTrainedModel:
    """Full-precision model whose quantized layers hold exactly the dequantized 4-bit weights used in training."""
    import bitsandbytes as bnb

    base = load_model(model_cfg, quantized=False)
    quantized = load_model(model_cfg.model_copy(update={"quantization": "4bit"}))
    layers = {name: module for name, module in quantized.named_modules() if isinstance(module, bnb.nn.Linear4bit)}
    for name, module in base.named_modules():
        if name in layers:
            weight = layers[name].weight
            dequantized = bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
            if dequantized.shape != module.weight.shape:  # GPT-2 Conv1D stores the transpose
                dequantized = dequantized.t()
            module.weight.data = dequantized.contiguous().to(module.weight.device)
    del quantized
    return base


def _merged(
    base: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    adapter_dir: Path,
    probes: list[list[int]],
    tolerance: float,
) -> tuple[PreTrainedModel, float]:
    model = load_trained(base, tokenizer, adapter_dir)
    model.eval()
    expected = _logits(model, probes)
    merged = model.merge_and_unload()
    diff = max((a - b).abs().max().item() for a, b in zip(_logits(merged, probes), expected)) if probes else 0.0
    if diff > tolerance:
        raise FinetuneError(
            f"merge check failed: merged logits differ from base+adapter by {diff:.3g} (tolerance {tolerance}). "
            f"The adapter in {adapter_dir} is intact; it can still be used unmerged."
        )
    return merged, diff


def merge_adapter(
    model_cfg: ModelConfig,
    adapter_dir: Path,
    out_dir: Path,
    tokenizer: PreTrainedTokenizerBase,
    *,
    probes: list[list[int]],
    stop_ids: list[int],
    heldout: Dataset | None = None,
    reference_perplexity: float | None = None,
    strategy: str = "auto",
    select: str = "perplexity",
    dtype: str = "auto",
    tolerance: float = 1e-3,
) -> MergeReport:
    """Merge, check merged logits against base+adapter on `probes`, then save a plain transformers folder.

    `reference_perplexity` is the adapter-on-training-base perplexity on `heldout`, when the caller has it.

    Args:
        model_cfg: The `model:` section of the run (the base, and whether training was 4-bit).
        adapter_dir: The trained adapter folder.
        out_dir: Where the merged model is written (replaced atomically).
        tokenizer: The run's tokenizer, saved with the merged model.
        probes: Token id sequences the merged logits are checked on.
        stop_ids: End-of-turn token ids for the merged model's generation config.
        heldout: Held-out conversations to choose between candidates by perplexity; None to skip that.
        reference_perplexity: The adapter's perplexity on its training-time base on `heldout`, when known.
        strategy: "auto", "full_precision" or "nf4_roundtrip" (`output.merge_strategy`).
        select: How "auto" chooses: "perplexity" or "fidelity" (`output.merge_select`).
        dtype: The merged weights' dtype (`output.merge_dtype`); "auto" keeps the base's.
        tolerance: The largest logit difference the check accepts.

    Returns:
        The MergeReport.

    Raises:
        FinetuneError: `strategy` or `select` is unknown, nf4_roundtrip is asked for an adapter not trained on a
            4-bit base, or the merged logits differ from base + adapter by more than `tolerance`.
    """
    if strategy not in STRATEGIES:
        raise FinetuneError(
            f"{argument('strategy', strategy)}: unknown merge strategy; choose one of {', '.join(STRATEGIES)}."
        )
    if select not in choices(MergeSelect):
        raise FinetuneError(f"{argument('select', select)}: choose one of {', '.join(choices(MergeSelect))}.")
    if strategy == "nf4_roundtrip" and model_cfg.quantization != "4bit":
        raise FinetuneError("merge strategy nf4_roundtrip only applies to adapters trained on a 4-bit base.")
    candidates = (
        [strategy]
        if strategy != "auto"
        else (["full_precision", "nf4_roundtrip"] if model_cfg.quantization == "4bit" else ["full_precision"])
    )
    fidelity: dict[str, float] = {}

    def score(model: torch.nn.Module) -> float:
        return perplexity(model, heldout, pad_token_id=tokenizer.pad_token_id, desc="Merge check")["perplexity"]

    if len(candidates) == 1 or heldout is None:
        name = candidates[0]
        merged, diff = _merged(_base(model_cfg, name), tokenizer, adapter_dir, probes, tolerance)
        reason = (
            f"{name}: {'the only candidate' if len(candidates) == 1 else 'no held-out rows to compare candidates on'}"
        )
    else:
        if reference_perplexity is None:  # a run already scored the adapter on its training base; reuse that
            reference = load_trained(load_model(model_cfg), tokenizer, adapter_dir)
            reference_perplexity = score(reference)
            del reference
        fidelity["adapter_on_training_base"] = reference_perplexity
        merged, diff = _merged(_base(model_cfg, "full_precision"), tokenizer, adapter_dir, probes, tolerance)
        fidelity["full_precision"] = score(merged)
        better = fidelity["full_precision"] <= reference_perplexity
        if select == "perplexity" and better:
            name = "full_precision"
            reason = (
                f"full_precision: held-out perplexity {fidelity['full_precision']:.4f} <= {reference_perplexity:.4f}, "
                "the adapter on its 4-bit base (which nf4_roundtrip reproduces)"
            )
        else:
            del merged
            name = "nf4_roundtrip"
            merged, diff = _merged(_base(model_cfg, name), tokenizer, adapter_dir, probes, tolerance)
            fidelity[name] = reference_perplexity  # the same function, by the logit check just passed
            reason = (
                f"nf4_roundtrip: held-out perplexity {reference_perplexity:.4f} (the adapter on its 4-bit base, reproduced) "
                f"{'vs' if select == 'fidelity' else '<'} {fidelity['full_precision']:.4f} for full_precision"
                + ("; kept for fidelity (output.merge_select: fidelity)" if select == "fidelity" else "")
            )
    target = _target_dtype(model_cfg, dtype)
    merged = merged.to(target)
    configure_generation(merged, tokenizer, stop_ids)
    # Written beside the target and renamed into place: an interrupted save leaves the previous merged model.
    with atomic.replacing_dir(out_dir) as partial:
        merged.save_pretrained(partial, max_shard_size="2GB")
        tokenizer.save_pretrained(partial)
    return MergeReport(
        merged_dir=out_dir,
        dtype=str(target).removeprefix("torch."),
        strategy=name,
        max_logit_diff=diff,
        fidelity=fidelity,
        reason=reason,
    )


def _base(model_cfg: ModelConfig, strategy: str) -> PreTrainedModel:
    """The base to merge into; `load_trained` gives it rows for any tokens training added, so the merged model is
    saved with that vocabulary and the tokenizer that has them."""
    return _nf4_roundtrip_base(model_cfg) if strategy == "nf4_roundtrip" else load_model(model_cfg, quantized=False)
