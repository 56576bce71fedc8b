"""Stage 6: merge a LoRA adapter into a full-precision copy of its base, verify it, and save it.

Entry point: `merge_adapter(...)`. The base is always reloaded unquantized from its source, whatever precision
training used: merging into 4-bit weights re-rounds every updated weight (peft warns per layer; in one probe
logits moved by up to 36), which is the most reported way a good QLoRA fine-tune turns bad.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoConfig, PreTrainedTokenizerBase

from finetune.config import ModelConfig
from finetune.errors import FinetuneError
from finetune.models import configure_generation, load_model, resolve_source


@dataclass(frozen=True)
class MergeReport:
    merged_dir: Path
    dtype: str
    max_logit_diff: float  # merged vs base+adapter, both float32, on the probe inputs


def _target_dtype(model_cfg: ModelConfig, requested: str) -> torch.dtype:
    if requested != "auto":
        return getattr(torch, requested)
    source = resolve_source(model_cfg)
    saved = getattr(AutoConfig.from_pretrained(source.path, revision=model_cfg.revision), "dtype", None)
    if isinstance(saved, str):
        saved = getattr(torch, saved, None)
    return saved if isinstance(saved, torch.dtype) else torch.float32


@torch.inference_mode()
def _logits(model: torch.nn.Module, probes: list[list[int]]) -> list[torch.Tensor]:
    device = next(model.parameters()).device
    return [model(input_ids=torch.tensor([ids], device=device)).logits.float().cpu() for ids in probes]


def merge_adapter(
    model_cfg: ModelConfig,
    adapter_dir: Path,
    out_dir: Path,
    tokenizer: PreTrainedTokenizerBase,
    *,
    probes: list[list[int]],
    stop_ids: list[int],
    dtype: str = "auto",
    tolerance: float = 1e-3,
) -> MergeReport:
    """Merge, check merged logits against base+adapter on `probes`, then save a plain transformers folder."""
    base = load_model(model_cfg, quantized=False)
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    model.eval()
    expected = _logits(model, probes)
    merged = model.merge_and_unload()
    diff = max((a - b).abs().max().item() for a, b in zip(_logits(merged, probes), expected)) if probes else 0.0
    if diff > tolerance:
        raise FinetuneError(
            f"merge check failed: merged logits differ from base+adapter by {diff:.3g} (tolerance {tolerance}). "
            f"The adapter in {adapter_dir} is intact; it can still be used unmerged."
        )
    target = _target_dtype(model_cfg, dtype)
    merged = merged.to(target)
    configure_generation(merged, tokenizer, stop_ids)
    # Written beside the target and renamed into place, so an interrupted save never leaves a half folder.
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    merged.save_pretrained(partial, max_shard_size="2GB")
    tokenizer.save_pretrained(partial)
    shutil.rmtree(out_dir, ignore_errors=True)
    partial.rename(out_dir)
    return MergeReport(merged_dir=out_dir, dtype=str(target).removeprefix("torch."), max_logit_diff=diff)
