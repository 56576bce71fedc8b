"""Importing the package does no work beyond defining things (docs/architecture.md, import-time rules)."""

import subprocess
import sys

CHECK = """
import logging, sys, warnings
import matplotlib, optuna, peft, transformers, trl  # their own import-time effects are not ours
from transformers import AttentionInterface
filters, optuna_level = list(warnings.filters), optuna.logging.get_verbosity()
import finetune.cli, finetune.data, finetune.evaluation, finetune.generation, finetune.hub, finetune.merging
import finetune.planning
import finetune.recipes, finetune.serving, finetune.sweeps, finetune.training
assert warnings.filters == filters, "a warning filter was added at import"
assert "finetune_packed_sdpa" not in AttentionInterface._global_mapping, "attention registered at import"
assert "matplotlib.pyplot" not in sys.modules, "pyplot imported (it picks a backend)"
assert optuna.logging.get_verbosity() == optuna_level, "optuna's log level changed"
"""


def test_importing_finetune_changes_no_global_state():
    subprocess.run([sys.executable, "-c", CHECK], check=True)


def test_the_packed_attention_kernel_registers_when_first_used(tiny_llama_dir):
    from transformers import AttentionInterface, AutoModelForCausalLM

    from finetune.training import PACKED_ATTENTION, use_packed_attention

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, attn_implementation="sdpa")
    use_packed_attention(model)
    assert (
        PACKED_ATTENTION in AttentionInterface._global_mapping and model.config._attn_implementation == PACKED_ATTENTION
    )
