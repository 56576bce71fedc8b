"""Stage 2: attach LoRA adapters (peft) to a loaded base model.

Entry point: `attach_lora(model, cfg, gradient_checkpointing=...)`.
"""

from __future__ import annotations

from dataclasses import dataclass

from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import PreTrainedModel

from finetune.config import LoraConfig


@dataclass(frozen=True)
class TrainableParameters:
    trainable: int
    total: int

    def __str__(self) -> str:
        return f"{self.trainable:,} trainable of {self.total:,} parameters ({100 * self.trainable / self.total:.2f}%)"


def peft_config(cfg: LoraConfig) -> PeftLoraConfig:
    return PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        use_dora=cfg.use_dora,
        use_rslora=cfg.use_rslora,
        bias="none",
        task_type="CAUSAL_LM",
    )


def attach_lora(model: PreTrainedModel, cfg: LoraConfig, *, gradient_checkpointing: bool) -> tuple[PeftModel, TrainableParameters]:
    if getattr(model, "is_quantized", False):
        # Casts norms to fp32 and enables input grads; without the latter, checkpointed quantized models
        # fail with "element 0 of tensors does not require grad".
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    peft_model = get_peft_model(model, peft_config(cfg))
    trainable, total = peft_model.get_nb_trainable_parameters()
    return peft_model, TrainableParameters(trainable=trainable, total=total)
