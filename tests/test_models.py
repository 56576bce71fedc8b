import pytest
import torch

from finetune.config import ModelConfig
from finetune.errors import FinetuneError
from finetune.models import load_model, load_tokenizer
from tests.conftest import build_chatml_tokenizer


def test_pad_token_is_distinct_from_eos_when_possible(tiny_llama_dir):
    tokenizer = load_tokenizer(ModelConfig(source=str(tiny_llama_dir)))
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.padding_side == "right"


def test_pad_falls_back_to_eos_only_when_nothing_else_exists(tmp_path):
    tokenizer = build_chatml_tokenizer(eos_token="<|endoftext|>")
    tokenizer.unk_token = None
    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    loaded = load_tokenizer(ModelConfig(source=str(tmp_path)))
    assert loaded.pad_token == loaded.eos_token


def test_chat_template_overrides(tiny_llama_dir, tmp_path):
    assert (
        "<|im_start|>" in load_tokenizer(ModelConfig(source=str(tiny_llama_dir), chat_template="chatml")).chat_template
    )
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert (
        load_tokenizer(ModelConfig(source=str(tiny_llama_dir), chat_template=str(template))).chat_template
        == template.read_text()
    )
    with pytest.raises(FinetuneError, match="neither 'chatml', a Jinja string, nor an existing file"):
        load_tokenizer(ModelConfig(source=str(tiny_llama_dir), chat_template="missing.jinja"))


def test_tokenizer_without_template_is_refused(tmp_path):
    tokenizer = build_chatml_tokenizer()
    tokenizer.chat_template = None
    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FinetuneError, match="has no chat template"):
        load_tokenizer(ModelConfig(source=str(tmp_path)))


@pytest.mark.parametrize(
    ("quantization", "layer_type"), [("4bit", "Linear4bit"), ("8bit", "Linear8bitLt"), ("none", "Linear")]
)
def test_quantization_modes(tiny_llama_dir, quantization, layer_type):
    model = load_model(ModelConfig(source=str(tiny_llama_dir), quantization=quantization))
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == layer_type
    logits = model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()
    full = load_model(ModelConfig(source=str(tiny_llama_dir), quantization=quantization), quantized=False)
    assert type(full.model.layers[0].self_attn.q_proj).__name__ == "Linear" and full.dtype == torch.float32


def test_4bit_weights_still_pass_gradients_after_an_evaluation(tiny_llama_dir):
    """bitsandbytes repacks 4-bit weights for a CPU inference kernel without backward on their first no-grad eval
    forward (on AVX512-BF16 CPUs); load_model turns that off, so a model scored before training trains the same."""
    from bitsandbytes.nn import Linear4bit

    from finetune.adapters import attach_lora
    from finetune.config import LoraConfig

    ids = torch.tensor([[5, 17, 300, 42, 9, 1000, 7, 64]])

    def first_layer_lora_gradients(evaluate_first: bool) -> list[torch.Tensor]:
        model = load_model(ModelConfig(source=str(tiny_llama_dir), quantization="4bit"))
        assert all(not m.support_avx512bf16_for_cpu for m in model.modules() if isinstance(m, Linear4bit))
        if evaluate_first:
            model.eval()
            with torch.no_grad():
                model(input_ids=ids)
        torch.manual_seed(0)
        model = attach_lora(model, LoraConfig(r=4, dropout=0.0), gradient_checkpointing=False)
        for name, param in model.named_parameters():
            if "lora_B" in name:  # B starts at zero, which would leave every gradient but B's at zero
                torch.nn.init.normal_(param, std=0.1)
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        return [p.grad for n, p in model.named_parameters() if "layers.0." in n and "lora_A" in n]

    fresh, evaluated = first_layer_lora_gradients(False), first_layer_lora_gradients(True)
    assert fresh and all(g.abs().sum() > 0 for g in fresh)
    for a, b in zip(fresh, evaluated):
        torch.testing.assert_close(a, b)
