"""Stage 2: attach LoRA adapters (peft) to a loaded base model.

Entry points: `attach_lora(model, cfg, gradient_checkpointing=...)` for training; `load_trained(base, tokenizer,
folder)` puts a trained adapter (and the rows of any tokens training added) on a loaded base: merging, evaluation,
serving, export and a reopened run all load adapters through it.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from peft.tuners.lora import LoraLayer
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from finetune import models
from finetune.config import LoraConfig


@dataclass(frozen=True)
class TrainableParameters:
    """How many of a model's parameters train (str: "N trainable of M parameters (P%)").

    Attributes:
        trainable: Parameters that receive gradients (the adapter's, and any trainable token rows).
        total: All parameters of the model.
    """

    trainable: int
    total: int

    def __str__(self) -> str:
        return f"{self.trainable:,} trainable of {self.total:,} parameters ({100 * self.trainable / self.total:.2f}%)"


def peft_config(cfg: LoraConfig, trainable_tokens: dict[str, list[int]] | None = None) -> PeftLoraConfig:
    """The peft LoraConfig of the `lora:` section, for a causal LM, with no bias trained.

    Args:
        cfg: The `lora:` section: r, alpha (or its default 2 x r), dropout, target_modules, use_dora, use_rslora.
        trainable_tokens: Layer name -> token ids whose rows train as whole rows (peft's trainable tokens); None for
            none.

    Returns:
        The peft LoraConfig.
    """
    return PeftLoraConfig(
        trainable_token_indices=trainable_tokens or None,
        r=cfg.r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        use_dora=cfg.use_dora,
        use_rslora=cfg.use_rslora,
        bias="none",
        task_type="CAUSAL_LM",
    )


@contextmanager
def _peft_quietly() -> Iterator[None]:
    # peft still reads transformers' deprecated `is_gradient_checkpointing` whenever it wraps a model; the warning
    # is about peft's code, not the user's, and would print on every run.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
        yield


def load_trained(
    base: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    folder: Path | str,
    *,
    adapter_name: str = "default",
) -> PeftModel:
    """`base` with the trained adapter in `folder`: first an embedding row for every token of `tokenizer` that the
    base lacks (chatml's turn markers on a base model; the adapter holds their trained values, so the rows only need
    to exist), then the adapter. `base` is whatever the caller needs: quantized as in training, full precision for a
    merge, the weights read back from a GGUF file.

    Args:
        base: The base model to load the adapter over.
        tokenizer: The tokenizer saved with the adapter (it may have more tokens than the base).
        folder: The adapter folder (a run's adapter/).
        adapter_name: The name peft gives the adapter.

    Returns:
        The peft model with the adapter active.
    """
    models.fit_vocabulary(base, tokenizer, for_adapter=True)
    with _peft_quietly():
        return PeftModel.from_pretrained(base, str(folder), adapter_name=adapter_name)


# A frozen copy of the adapter a run continues (model.adapter) is kept under this name: the model as it was before
# this run, which before/after evaluation compares with, and which TRL's DPO and KTO trainers take as the reference.
REFERENCE_ADAPTER = "ref"


def as_before_training(model: PeftModel) -> AbstractContextManager[Any]:
    """While inside, `model` computes as it did before training: its reference adapter where the run continued one,
    else the base with every adapter off.

    Args:
        model: The peft model being trained or evaluated.

    Returns:
        A context manager.
    """
    from trl.trainer.utils import use_adapter  # TRL's own switch, the one its trainers use for the reference

    return use_adapter(model, REFERENCE_ADAPTER if REFERENCE_ADAPTER in model.peft_config else None)


def keep_reference(model: PeftModel) -> None:
    """A frozen copy of the adapter `model` is about to train further, as `REFERENCE_ADAPTER`: the model as it was
    before this run. (TRL's DPO and KTO trainers make the same copy, under the same name, when they are built.)

    Args:
        model: The peft model whose "default" adapter is about to train; it stays the active one.
    """
    with _peft_quietly():
        model.add_adapter(REFERENCE_ADAPTER, model.peft_config["default"])
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".default." in name:
                model.get_parameter(name.replace(".default.", f".{REFERENCE_ADAPTER}.")).copy_(parameter)
    model.set_adapter("default")  # training updates the default adapter; the copy stays frozen


def add_trained(model: PeftModel, folder: Path | str, *, adapter_name: str) -> None:
    """One more trained adapter beside those of `model` (from `load_trained`), over the same base and vocabulary.

    Args:
        model: A peft model from `load_trained`.
        folder: The other adapter's folder.
        adapter_name: The name it is loaded under (selected with `set_adapter`).
    """
    with _peft_quietly():
        model.load_adapter(str(folder), adapter_name=adapter_name)


def attach_lora(
    model: PreTrainedModel,
    cfg: LoraConfig,
    *,
    gradient_checkpointing: bool,
    new_tokens: list[int] = (),
    continue_from: Path | None = None,
) -> PeftModel:
    """A fresh LoRA adapter (`cfg`) on `model` to train, or with `continue_from` a trained adapter folder to train
    further (see `keep_reference` for keeping the model as it was).

    `new_tokens`: ids whose embedding rows the base never trained (`models.fit_vocabulary`), trained as whole rows
    beside LoRA (peft's trainable tokens, saved in the adapter), in the output layer too unless it is tied to the
    input embeddings (peft then trains the shared rows once). A continued adapter brings its own.

    A quantized model is first prepared for k-bit training; otherwise gradient checkpointing is switched on when
    asked. With `lora.fast_dropout`, the dropout modules become FastCPUDropout.

    Args:
        model: The base model from `models.load_model`.
        cfg: The `lora:` section.
        gradient_checkpointing: Whether to recompute activations in backward (`training.gradient_checkpointing`).
        new_tokens: Token ids whose rows the base never trained (from `models.fit_vocabulary`).
        continue_from: A trained adapter folder to continue training (`model.adapter`); None for a fresh adapter.

    Returns:
        The peft model, ready to train.
    """
    if getattr(model, "is_quantized", False):
        # Casts norms to fp32 and enables input grads; without the latter, checkpointed quantized models
        # fail with "element 0 of tensors does not require grad".
        with _peft_quietly():
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    with _peft_quietly():
        if continue_from is None:
            peft_model = get_peft_model(model, peft_config(cfg, _token_layers(model, list(new_tokens))))
        else:
            peft_model = PeftModel.from_pretrained(model, str(continue_from), is_trainable=True)
    if cfg.fast_dropout:
        use_fast_cpu_dropout(peft_model)
    return peft_model


def trainable_parameters(model: PeftModel) -> TrainableParameters:
    """Count the trainable and total parameters of a peft model.

    Args:
        model: The peft model.

    Returns:
        TrainableParameters.
    """
    trainable, total = model.get_nb_trainable_parameters()
    return TrainableParameters(trainable=trainable, total=total)


def _token_layers(model: PreTrainedModel, tokens: list[int]) -> dict[str, list[int]]:
    """{embedding module name: token ids} for peft's trainable_token_indices: the input embeddings, and the output
    layer when it has weights of its own (a head left at its mean rows would never predict the new tokens)."""
    if not tokens:
        return {}
    names = {id(module): name for name, module in model.named_modules()}
    layers = {names[id(model.get_input_embeddings())]: tokens}
    output = model.get_output_embeddings()
    if output is not None and output.weight is not model.get_input_embeddings().weight:
        layers[names[id(output)]] = tokens
    return layers


# ---------------------------------------------------------------- speed: cheaper dropout masks on CPU


class FastCPUDropout(torch.nn.Dropout):
    """LoRA's input dropout, with masks drawn 16 random bits per element from 64-bit random words on CPU.

    On CPU, torch's dropout draws one Bernoulli sample per element, which made LoRA dropout 14-16% of a SmolLM2-135M
    training step (profiled, 2 cores): 210 masks per step over every adapted layer's input. Four 16-bit draws per
    random word make a mask ~3x cheaper. Each element is dropped with probability round(p * 32768) / 32768 (p to
    within 1.6e-5), independently, from torch's seeded generator, so runs stay reproducible and resumable. GPUs,
    evaluation and p = 0 use torch's dropout unchanged.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Drop elements of `x` with this module's probability, scaling the rest by 1 / (1 - p).

        Off in eval mode, at p = 0 and on other devices than CPU, where torch's own dropout runs.

        Args:
            x: The input tensor.

        Returns:
            A tensor of the same shape.
        """
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return super().forward(x)
        # autograd keeps only the boolean mask for backward, as torch's dropout does
        return x * _cpu_keep_mask(x, self.p) * (1.0 / (1.0 - self.p))


def _cpu_keep_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    count = x.numel()
    words = torch.empty((count + 3) // 4, dtype=torch.int64).random_()
    # random_() fills an int64 with [0, 2**63): every 16-bit quarter has 15 uniform low bits.
    draws = words.view(torch.int16)[:count].view(x.shape) & 0x7FFF
    return draws >= round(p * 32768)


def use_fast_cpu_dropout(model: PeftModel) -> None:
    """Replace peft's LoRA dropout modules by FastCPUDropout of the same probability.

    Args:
        model: The peft model; changed in place.
    """
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name, dropout in module.lora_dropout.items():
                if type(dropout) is torch.nn.Dropout:
                    module.lora_dropout[name] = FastCPUDropout(dropout.p)
