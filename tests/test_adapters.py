import pytest

from finetune.adapters import attach_lora, trainable_parameters
from finetune.config import LoraConfig, ModelConfig
from finetune.models import load_model


def test_all_linear_layers_get_adapters_and_counts_are_reported(tiny_llama_dir):
    model = load_model(ModelConfig(source=str(tiny_llama_dir), quantization="none"))
    peft_model = attach_lora(model, LoraConfig(r=4), gradient_checkpointing=False)
    params = trainable_parameters(peft_model)
    # 2 layers x (q,k,v,o: 64->64, 64->32, 64->32, 64->64; gate,up: 64->128; down: 128->64), r=4: r*(in+out) each
    shapes = [(64, 64), (64, 32), (64, 32), (64, 64), (64, 128), (64, 128), (128, 64)]
    assert params.trainable == 2 * sum(4 * (i + o) for i, o in shapes)
    assert "trainable of" in str(params)
    assert peft_model.peft_config["default"].lora_alpha == 8  # 2 x r by default
    assert not any("lm_head" in name or "embed" in name for name, p in peft_model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("switch", ["use_dora", "use_rslora"])
def test_dora_and_rslora_switches_reach_peft(tiny_llama_dir, switch):
    model = load_model(ModelConfig(source=str(tiny_llama_dir), quantization="none"))
    peft_model = attach_lora(model, LoraConfig(r=4, **{switch: True}), gradient_checkpointing=False)
    assert getattr(peft_model.peft_config["default"], switch) is True


def test_gpt2_conv1d_and_quantized_bases(tiny_gpt2_dir, tiny_llama_dir):
    gpt2 = load_model(ModelConfig(source=str(tiny_gpt2_dir), quantization="none"))
    peft_gpt2 = attach_lora(gpt2, LoraConfig(r=4), gradient_checkpointing=True)
    params = trainable_parameters(peft_gpt2)
    assert params.trainable > 0 and peft_gpt2.base_model.model.is_gradient_checkpointing
    quantized = load_model(ModelConfig(source=str(tiny_llama_dir), quantization="4bit"))
    peft_q = attach_lora(quantized, LoraConfig(r=4), gradient_checkpointing=False)
    params = trainable_parameters(peft_q)
    assert params.trainable > 0


def test_fast_cpu_dropout_drops_at_the_rate_and_masks_the_gradient():
    import torch

    from finetune.adapters import FastCPUDropout

    torch.manual_seed(0)
    dropout = FastCPUDropout(0.1)
    x = torch.randn(2000, 500, requires_grad=True)
    y = dropout(x)
    dropped = y == 0
    # 1e6 draws: the standard error of the rate is 3e-4
    assert dropped.float().mean().item() == pytest.approx(0.1, abs=2e-3)
    torch.testing.assert_close(y[~dropped], x[~dropped] / 0.9)
    y.sum().backward()
    assert torch.equal(x.grad == 0, dropped) and torch.allclose(x.grad[~dropped], torch.tensor(1 / 0.9))
    # neighbouring elements (quarters of one random word) are independent
    flat = dropped.flatten().float()
    assert abs(torch.corrcoef(torch.stack([flat[:-1], flat[1:]]))[0, 1].item()) < 5e-3
    torch.manual_seed(1)
    first = FastCPUDropout(0.1)(x)
    torch.manual_seed(1)
    assert torch.equal(first, FastCPUDropout(0.1)(x))  # seeded by torch's generator
    assert torch.equal(FastCPUDropout(0.1).eval()(x), x)


@pytest.mark.parametrize("fast", [True, False])
def test_fast_dropout_switch(tiny_llama_dir, fast):
    import torch

    from finetune.adapters import FastCPUDropout

    model = load_model(ModelConfig(source=str(tiny_llama_dir), quantization="none"))
    peft_model = attach_lora(model, LoraConfig(r=4, dropout=0.05, fast_dropout=fast), gradient_checkpointing=False)
    dropouts = [m for m in peft_model.modules() if isinstance(m, torch.nn.Dropout) and m.p == 0.05]
    assert len(dropouts) == 2 * 7
    assert all(isinstance(m, FastCPUDropout) == fast for m in dropouts)
