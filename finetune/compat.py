"""Every touch of a pinned library's private parts, in one place.

transformers' Trainer has no public hook for how a checkpoint's model is written or which sampler orders the training
data, TRL's SFTTrainer none for adding to the metrics it logs, and a model's attention implementation is read from a
private config field. Each use is here, named for what it does; tests/test_compat.py checks each one against the
installed version and fails with the library, the version it was written against and this file when an upgrade
changes it. The one other module that does is finetune/serving/hf_internals.py, for batched serving alone (its
generation processors, KV-cache rows and per-row adapters), guarded by the parity tests in tests/test_batching.py;
nothing else in finetune touches a private attribute of transformers, TRL, peft or llama-cpp-python.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

# What the uses below were written and tested against (pyproject.toml pins the same).
WRITTEN_AGAINST = {"transformers": "5.23.0", "trl": "1.16.0"}


class TrainerHooks:
    """Mixed in before transformers' Trainer (SFTTrainer): its private `_save` and `_get_train_sampler` call two
    hooks a subclass defines, so the subclass itself names no private method."""

    def checkpoint_saving(self) -> AbstractContextManager[Any]:
        """Entered around every write of the model into a checkpoint (or `save_model`).

        Returns:
            A context manager; a subclass must define it.
        """
        raise NotImplementedError

    def train_sampler(self, sampler: Any) -> Any:
        """The sampler to order training data by, given the one the Trainer chose.

        Args:
            sampler: The sampler transformers' Trainer built for the training data.

        Returns:
            The sampler to use instead (or `sampler` itself); a subclass must define it.
        """
        raise NotImplementedError

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        with self.checkpoint_saving():
            super()._save(output_dir, state_dict)

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        return self.train_sampler(super()._get_train_sampler(train_dataset))


class TokenizedPreferenceData:
    """Mixed in before TRL's DPOTrainer or KTOTrainer, whose private `_prepare_dataset` tokenizes text: finetune's
    preference data arrive tokenized already (finetune.data.preference), so the datasets pass through as they are.
    For KTO, the mismatched completions its KL estimate needs are added exactly as TRL adds them: each batch of
    `per_device_train_batch_size` completions rotated by one."""

    def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
        if getattr(self, "calculate_KL", False) and "KL_completion_ids" not in dataset.column_names:

            def rotated(batch: dict[str, list]) -> dict[str, list]:
                batch["KL_completion_ids"] = [batch["completion_ids"][-1], *batch["completion_ids"][:-1]]
                return batch

            dataset = dataset.map(rotated, batched=True, batch_size=args.per_device_train_batch_size)
        return dataset


def read_reference_from_batches(trainer: Any) -> None:
    """Make TRL's DPO or KTO loss read the reference log-probs from each batch (its columns for precomputed ones)
    without TRL precomputing them: `finetune.training.preference.ReferenceCache` puts them there.

    Args:
        trainer: A DPOTrainer or KTOTrainer built with `precompute_ref_log_probs=False`.
    """
    trainer.precompute_ref_logps = True


def log_metric(trainer: Any, mode: str, name: str, value: float) -> None:
    """Add a value to what TRL's SFTTrainer averages and logs under `name` ("train" or "eval" mode).

    Args:
        trainer: A TRL SFTTrainer (or a subclass).
        mode: "train" or "eval": which of TRL's metric tables.
        name: The metric's logged name.
        value: One value to average in with the others logged since the last log step.
    """
    trainer._metrics[mode][name].append(value)


def set_logged_metric(trainer: Any, mode: str, name: str, value: float) -> None:
    """Replace what TRL logs under `name` with one value (e.g. the running count of tokens).

    Args:
        trainer: A TRL SFTTrainer (or a subclass).
        mode: "train" or "eval": which of TRL's metric tables.
        name: The metric's logged name.
        value: The value logged from now on in place of whatever was collected.
    """
    trainer._metrics[mode][name] = [value]


def add_train_tokens(trainer: Any, tokens: int) -> None:
    """Add to TRL's running count of processed training tokens (padding excluded).

    Args:
        trainer: A TRL SFTTrainer (or a subclass).
        tokens: How many real (non-padding) tokens a step processed.
    """
    trainer._total_train_tokens += tokens


def train_tokens(trainer: Any) -> int:
    """TRL's running count of processed training tokens.

    Args:
        trainer: A TRL SFTTrainer (or a subclass).

    Returns:
        The number of training tokens processed so far.
    """
    return trainer._total_train_tokens


def attention_implementation(model: Any) -> str:
    """The attention implementation a transformers model runs ("sdpa", "eager", ...); set with the public
    `set_attn_implementation`, read only from the config's private field.

    Args:
        model: A transformers model (or a peft model wrapping one).

    Returns:
        The name of the attention implementation in its config.
    """
    return model.config._attn_implementation
