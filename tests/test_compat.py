"""Each private part of a pinned library that finetune/compat.py touches is still there and still does what compat
assumes; an upgrade that changes one fails here, naming the library, the version compat was written against and
what to look at, instead of failing somewhere inside a training run."""

from __future__ import annotations

import inspect

import pytest
import torch
import transformers
import trl

from finetune import compat


def _changed(library, what: str) -> str:
    return (
        f"{library.__name__} {library.__version__} changed {what} (finetune/compat.py was written against "
        f"{library.__name__} {compat.WRITTEN_AGAINST[library.__name__]}): update finetune/compat.py and this test."
    )


@pytest.mark.parametrize(
    ("method", "parameters"),
    [("_save", ["self", "output_dir", "state_dict"]), ("_get_train_sampler", ["self", "train_dataset"])],
)
def test_the_trainer_methods_the_hooks_override_exist_with_their_parameters(method, parameters):
    found = getattr(transformers.Trainer, method, None)
    assert found is not None, _changed(transformers, f"Trainer.{method} (it is gone)")
    assert list(inspect.signature(found).parameters) == parameters, _changed(
        transformers, f"Trainer.{method}'s parameters"
    )


def test_the_hooks_are_called_where_the_trainer_saves_and_samples(tiny_llama_dir, facts_jsonl, tmp_path):
    """A real (tiny) training run through finetune's trainer: the sampler hook chose the sampler and the save hook
    wrapped the checkpoint's write."""
    from finetune import ChatSFTRecipe
    from finetune.training import trainer as trainer_module
    from tests.conftest import tiny_recipe

    calls = []
    original_saving, original_sampler = (
        trainer_module._SFTTrainer.checkpoint_saving,
        trainer_module._SFTTrainer.train_sampler,
    )

    def saving(self):
        calls.append("save")
        return original_saving(self)

    def sampler(self, chosen):
        calls.append("sampler")
        return original_sampler(self, chosen)

    config = tiny_recipe(tiny_llama_dir, facts_jsonl, tmp_path / "run", training__max_steps=2, training__save_steps=1)
    recipe = ChatSFTRecipe(**config)
    recipe.setup()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer_module._SFTTrainer, "checkpoint_saving", saving)
        patch.setattr(trainer_module._SFTTrainer, "train_sampler", sampler)
        recipe.train()
    assert "sampler" in calls, _changed(transformers, "where Trainer chooses its train sampler (_get_train_sampler)")
    assert "save" in calls, _changed(transformers, "how Trainer writes a checkpoint's model (_save)")
    logged = recipe.trainer.state.log_history[0]
    assert "mean_token_accuracy" in logged and logged["num_tokens"] > 0, _changed(trl, "SFTTrainer's _metrics")
    recipe.cleanup()


def test_trl_keeps_its_metrics_and_token_count_where_compat_adds_to_them(tiny_llama_dir, facts_jsonl, tmp_path):
    from finetune import ChatSFTRecipe
    from tests.conftest import tiny_recipe

    recipe = ChatSFTRecipe(**tiny_recipe(tiny_llama_dir, facts_jsonl, tmp_path / "run", training__max_steps=1))
    recipe.setup()
    recipe.train()
    trainer = recipe.trainer
    before = compat.train_tokens(trainer)
    assert isinstance(before, int) and before > 0, _changed(trl, "SFTTrainer._total_train_tokens")
    compat.add_train_tokens(trainer, 5)
    assert compat.train_tokens(trainer) == before + 5
    compat.log_metric(trainer, "train", "probe", 1.0)
    compat.set_logged_metric(trainer, "eval", "probe", 2.0)
    assert trainer._metrics["train"]["probe"][-1] == 1.0 and trainer._metrics["eval"]["probe"] == [2.0], _changed(
        trl, "SFTTrainer._metrics (mode -> name -> list of values)"
    )
    recipe.cleanup()


def test_the_attention_implementation_is_read_from_the_config(tiny_llama_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, attn_implementation="eager")
    assert compat.attention_implementation(model) == "eager", _changed(transformers, "config._attn_implementation")
    model.set_attn_implementation("sdpa")
    assert compat.attention_implementation(model) == "sdpa"
    assert torch.is_tensor(model(input_ids=torch.tensor([[1, 2, 3]])).logits)


def test_the_pins_are_what_compat_was_written_against():
    assert transformers.__version__ == compat.WRITTEN_AGAINST["transformers"], _changed(transformers, "its version")
    assert trl.__version__ == compat.WRITTEN_AGAINST["trl"], _changed(trl, "its version")


@pytest.mark.parametrize("trainer", ["DPOTrainer", "KTOTrainer"])
def test_trl_still_prepares_preference_data_in_the_method_compat_replaces(trainer):
    """compat.TokenizedPreferenceData overrides `_prepare_dataset` so TRL does not tokenize finetune's tokens again."""
    found = getattr(getattr(trl, trainer), "_prepare_dataset", None)
    assert found is not None, _changed(trl, f"{trainer}._prepare_dataset (it is gone)")
    assert list(inspect.signature(found).parameters) == [
        "self",
        "dataset",
        "processing_class",
        "args",
        "dataset_name",
    ], _changed(trl, f"{trainer}._prepare_dataset's parameters")


def test_kto_keeps_its_kl_switch_and_dpo_and_kto_their_reference_adapter_name():
    source = inspect.getsource(trl.KTOTrainer.__init__)
    assert "self.calculate_KL =" in source, _changed(trl, "KTOTrainer.calculate_KL")
    for trainer in (trl.DPOTrainer, trl.KTOTrainer):
        assert 'add_adapter("ref"' in inspect.getsource(trainer.__init__), _changed(
            trl, f"{trainer.__name__}'s reference adapter name (finetune.adapters.REFERENCE_ADAPTER is 'ref')"
        )
