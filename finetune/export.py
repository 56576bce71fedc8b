"""Stage 7: export a run for local inference as GGUF (llama.cpp, Ollama, LM Studio), verified before it is kept.

Entry point: `export_gguf(...)`. Pure Python: the `gguf` package writes the file and quantizes in numpy, so no
compiler or llama.cpp checkout is needed to export. Every file is checked before it is kept, by two independent
readers of GGUF:

- transformers reloads it (`gguf_file=`) and its last-position logits on the check prompts are compared with the
  model it was made from (merged/, or the base + adapter): this bounds what quantization changed.
- llama.cpp (llama-cpp-python) runs it: it must tokenize the prompts as the run's tokenizer does, give the same
  last-position logits as transformers on the same file, reply greedily with the very tokens transformers picks on
  that file, and end a reply with the end-of-turn token. transformers' GGUF reader undoes the q/k row permutation
  that llama.cpp's rotary layout needs, so a mistake there would survive a transformers round trip; llama.cpp
  running the file is what proves the layout.

Files are written into a temporary folder inside the run folder and moved into export/ only when every check
passed; a failed check deletes them and raises `FinetuneError` naming the check and by how much it missed.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from finetune import atomic
from finetune.adapters import load_adapter
from finetune.config import ExportQuant, ModelConfig, choices
from finetune.errors import FinetuneError, argument
from finetune.model_source import resolve
from finetune.models import load_model, no_loading_bar
from finetune.run_folder import RunFolder

QUANTS = choices(ExportQuant)
ARCHITECTURES = ("llama",)  # config.model_type values the tensor layout below is written for
LLAMA_CPP_PIN = "llama-cpp-python==0.3.36"

# Allowed differences, in units of the reference logits' standard deviation (so they mean the same for a random
# tiny model and a trained one). `reload`: transformers on the GGUF vs the model it was made from (the
# quantization error). `runtime`: llama.cpp vs transformers on the same file: llama.cpp rounds activations (to
# 8 bits before a quantized matmul) and keeps its KV cache in f16, so a token where transformers' top two logits
# are closer than this may legitimately go either way. Set with margin from what was measured: q8_0 0.29 reload / 0.34 runtime on the tiny models of
# tests/test_export.py (small hidden sizes make 32-value blocks coarse); q5_1 1.43 reload on SmolLM2-135M (the
# maximum over 49k logits; top-1 still agreed). benchmarks/results/export_quality.md has the perplexity per type.
BOUNDS: dict[str, dict[str, float]] = {
    "f16": {"reload": 0.02, "runtime": 0.05},
    "bf16": {"reload": 0.5, "runtime": 0.5},
    "q8_0": {"reload": 0.5, "runtime": 0.5},
    "q5_0": {"reload": 3.0, "runtime": 1.0},
    "q5_1": {"reload": 3.0, "runtime": 1.0},
    "q4_0": {"reload": 5.0, "runtime": 1.5},
    "q4_1": {"reload": 5.0, "runtime": 1.5},
}
# Byte-level BPE pre-tokenizers (tokenizer.json) -> the name llama.cpp knows the same splitting by.
_PRE_TOKENIZERS = {
    ("ByteLevel",): "gpt-2",
    ("Digits", "ByteLevel"): "smollm",
}


@dataclass(frozen=True)
class ExportResult:
    path: Path  # the GGUF file written: the model, or with adapter_only the LoRA adapter
    modelfile: Path
    quant: str
    adapter_only: bool
    size_bytes: int
    base: Path | None  # adapter_only: the base GGUF the adapter applies to
    checks: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def lines(self) -> list[str]:
        out = [f"{self.path} ({self.size_bytes / 2**20:.1f} MiB, {self.quant}) and {self.modelfile.name}"]
        if self.base is not None:
            out.append(f"  base for the adapter: {self.base}")
        out += [f"  check {name}: {_describe(value)}" for name, value in self.checks.items()]
        out += [f"  warning: {warning}" for warning in self.warnings]
        return out


def export_gguf(
    folder: RunFolder,
    model_cfg: ModelConfig,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    *,
    stop_ids: list[int],
    quant: str = "f16",
    adapter_only: bool = False,
    system_prompt: str | None = None,
    max_new_tokens: int = 96,
) -> ExportResult:
    """Write `folder`/export/model-<quant>.gguf (or adapter.gguf with `adapter_only`), a Modelfile and export.json.

    `prompts` are rendered chat prompts (the run's held-out conversations, through the generation prompt) that the
    checks run on; `stop_ids` the template's end-of-turn token(s).
    """
    if quant not in QUANTS:
        raise FinetuneError(f"{argument('quant', quant)}: unknown GGUF type; choose one of {', '.join(QUANTS)}.")
    if not prompts:
        raise FinetuneError(f"{folder.path}: no held-out conversation to check the export on.")
    if not stop_ids:
        raise FinetuneError("the chat template has no end-of-turn token, so llama.cpp could not stop a reply.")
    started = time.perf_counter()
    folder.require_adapter()
    if not adapter_only and not folder.has_merged():
        raise FinetuneError(
            f"{folder.path} has no merged/ model to export. Merge it first (`finetune merge {folder.path}`), or export "
            f"only the adapter with {argument('adapter_only')}."
        )
    ids = [list(tokenizer(text, add_special_tokens=False).input_ids) for text in prompts]
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=folder.path))
    try:
        if adapter_only:
            result = _export_adapter(
                folder, model_cfg, tokenizer, prompts, ids, stop_ids, quant, staging, max_new_tokens
            )
        else:
            result = _export_merged(folder, tokenizer, prompts, ids, stop_ids, quant, staging, max_new_tokens)
        gguf_file, base, checks, warnings = result
        if checks["llama_cpp_reply"]["stopped_at_end_of_turn"].startswith("0/"):
            warnings.append(
                f"no check reply reached the end-of-turn token within {max_new_tokens} tokens (in transformers neither, which "
                "agreed token by token): the stop itself is checked in llama.cpp's vocabulary, but not seen in a reply"
            )
        written_base = base is not None and base.parent == staging  # else the base's own GGUF, referred to where it is
        model_from = (
            f"./{gguf_file.name}" if base is None else f"./{base.name}" if written_base else str(base.resolve())
        )
        modelfile, template_warning = modelfile_text(
            tokenizer,
            stop_ids,
            model_from,
            adapter=f"./{gguf_file.name}" if base is not None else None,
            system_prompt=system_prompt,
        )
        warnings += [template_warning] if template_warning else []
        (staging / folder.modelfile.name).write_text(modelfile, encoding="utf-8")
        folder.export.mkdir(exist_ok=True)
        kept = [gguf_file.name, *([base.name] if written_base else []), folder.modelfile.name]
        for name in kept:
            os.replace(staging / name, folder.export / name)  # each file appears whole, only once every check passed
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    final = folder.export / gguf_file.name
    final_base = (folder.export / base.name if written_base else base) if base is not None else None
    exported = ExportResult(
        path=final,
        modelfile=folder.modelfile,
        quant=quant,
        adapter_only=adapter_only,
        size_bytes=final.stat().st_size,
        base=final_base,
        checks=checks,
        warnings=warnings,
        seconds=round(time.perf_counter() - started, 1),
    )
    _record(folder, exported)
    return exported


# ---------------------------------------------------------------------------------------------- the two exports


def _export_merged(folder, tokenizer, prompts, ids, stop_ids, quant, staging, max_new_tokens):
    merged = _load(folder.merged)
    path = staging / f"model-{quant}.gguf"
    warnings = write_model_gguf(path, merged, tokenizer, stop_ids, quant, name=folder.path.name)
    checks = {"transformers_reload": _reload_check(path, merged, ids, quant)}
    del merged
    on_file = _load_gguf(path)
    checks.update(_llama_cpp_checks(path, None, on_file, tokenizer, prompts, ids, stop_ids, quant, max_new_tokens))
    return path, None, checks, warnings


def _export_adapter(folder, model_cfg, tokenizer, prompts, ids, stop_ids, quant, staging, max_new_tokens):
    adapter_path = staging / "adapter.gguf"
    source = resolve(model_cfg)
    base_model = load_model(model_cfg, quantized=False)
    checks: dict[str, Any] = {}
    if source.gguf is not None:  # the base already is a GGUF: the adapter applies to that very file
        base, warnings = source.gguf, []
    else:
        base = staging / f"base-{quant}.gguf"
        warnings = write_model_gguf(base, base_model, tokenizer, stop_ids, quant, name=f"{folder.path.name}-base")
        checks["transformers_reload"] = _reload_check(base, base_model, ids, quant)
        base_model = _load_gguf(base)  # the adapter is then checked on the very base weights llama.cpp runs
    write_adapter_gguf(adapter_path, folder.adapter, base_model)
    reference = load_adapter(base_model, folder.adapter).eval()
    checks.update(
        _llama_cpp_checks(base, adapter_path, reference, tokenizer, prompts, ids, stop_ids, quant, max_new_tokens)
    )
    return adapter_path, base, checks, warnings


# ---------------------------------------------------------------------------------------------- writing GGUF


def _llama_layout(config: Any) -> dict[str, int | float]:
    # model_type, not `architectures`: a config built in code (or by some converters) leaves the latter empty.
    if getattr(config, "model_type", None) not in ARCHITECTURES:
        architecture = (getattr(config, "architectures", None) or [type(config).__name__])[0]
        raise FinetuneError(
            f"GGUF export supports the Llama architecture (model_type {', '.join(ARCHITECTURES)}: SmolLM2, Llama 2/3 without rope "
            f"scaling, TinyLlama, ...); this model is {architecture}. Its merged/ folder loads in llama.cpp's own "
            "convert_hf_to_gguf.py."
        )
    rope = getattr(config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise FinetuneError(
            f"GGUF export: rope scaling `{rope_type}` is not supported yet (only unscaled rotary embeddings)."
        )
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise FinetuneError("GGUF export: Llama models with attention or MLP biases are not supported.")
    heads = config.num_attention_heads
    return {
        "heads": heads,
        "kv_heads": config.num_key_value_heads or heads,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads,
        "rope_theta": float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))),
    }


def _permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """Rows of a q/k projection from Hugging Face's rotary layout (each head's two halves rotate together) to
    llama.cpp's (neighbouring rows rotate together): the reordering llama.cpp's convert_hf_to_gguf.py applies."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def _gguf_tensors(state: dict[str, torch.Tensor], config: Any) -> list[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array) for every weight, q/k rows permuted, the output head left out when tied."""
    import gguf

    layout = _llama_layout(config)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tied = getattr(config, "tie_word_embeddings", False)
    out = []
    for hf_name, tensor in state.items():
        if tied and hf_name == "lm_head.weight":
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise FinetuneError(f"GGUF export: no llama.cpp name for tensor `{hf_name}`.")
        array = tensor.detach().float().cpu().numpy()
        if name.endswith("attn_q.weight"):
            array = _permute(array, layout["heads"])
        elif name.endswith("attn_k.weight"):
            array = _permute(array, layout["kv_heads"])
        out.append((name, array))
    return out


def _types(quant: str):
    import gguf

    q = gguf.GGMLQuantizationType
    return {
        "f16": (q.F16, gguf.LlamaFileType.MOSTLY_F16),
        "bf16": (q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
        "q8_0": (q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
        "q5_0": (q.Q5_0, gguf.LlamaFileType.MOSTLY_Q5_0),
        "q5_1": (q.Q5_1, gguf.LlamaFileType.MOSTLY_Q5_1),
        "q4_0": (q.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
        "q4_1": (q.Q4_1, gguf.LlamaFileType.MOSTLY_Q4_1),
    }[quant]


def write_model_gguf(
    path: Path,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    stop_ids: list[int],
    quant: str,
    *,
    name: str,
) -> list[str]:
    """Write a Llama-architecture model as one GGUF file: hyperparameters, tokenizer, chat template, weights
    (2-D ones as `quant`; norms stay float32, as llama.cpp's converter keeps them). Returns warnings.

    With 4- and 5-bit types the output head (the embedding matrix, when tied) is written as q8_0: every logit goes
    through it, and llama-quantize keeps it at 6 bits for the same reason. On SmolLM2-135M, q4_0 everywhere moved
    logits by up to 2 standard deviations; see benchmarks/results/export_quality.md for what the rule buys."""
    import gguf

    config = model.config
    layout = _llama_layout(config)
    qtype, file_type = _types(quant)
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(layout["heads"])
    writer.add_head_count_kv(layout["kv_heads"])
    writer.add_key_length(layout["head_dim"])
    writer.add_value_length(layout["head_dim"])
    writer.add_rope_dimension_count(layout["head_dim"])
    writer.add_rope_freq_base(layout["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)
    _add_tokenizer(writer, tokenizer, config.vocab_size, stop_ids)
    head = "token_embd.weight" if getattr(config, "tie_word_embeddings", False) else "output.weight"
    low_bits = quant.startswith(("q4", "q5"))
    kept_f16 = []
    for tensor_name, array in _gguf_tensors(model.state_dict(), config):
        if array.ndim == 1:
            writer.add_tensor(tensor_name, array.astype(np.float32))
            continue
        this_type = gguf.GGMLQuantizationType.Q8_0 if low_bits and tensor_name == head else qtype
        if (
            array.shape[-1] % block
        ):  # rows that do not fill whole quantization blocks; llama.cpp falls back the same way
            this_type = gguf.GGMLQuantizationType.F16
            kept_f16.append(tensor_name)
        data = gguf.quants.quantize(array, this_type)
        writer.add_tensor(
            tensor_name, data, raw_dtype=None if this_type == gguf.GGMLQuantizationType.F16 else this_type
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if kept_f16:
        return [
            f"{len(kept_f16)} tensor(s) kept as f16: their rows are not a multiple of {block} ({', '.join(kept_f16[:3])})"
        ]
    return []


def _add_tokenizer(writer: Any, tokenizer: PreTrainedTokenizerBase, vocab_size: int, stop_ids: list[int]) -> None:
    import gguf

    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    model = backend["model"]
    pre = backend.get("pre_tokenizer") or {}
    steps = tuple(step["type"] for step in pre.get("pretokenizers", [pre]) if step)
    if model.get("type") != "BPE" or steps[-1:] != ("ByteLevel",):
        raise FinetuneError(
            f"GGUF export supports byte-level BPE tokenizers (GPT-2 style: SmolLM2, Llama 3, Qwen); this one is "
            f"{model.get('type')} with pre-tokenizer {'+'.join(steps) or 'none'}."
        )
    if steps not in _PRE_TOKENIZERS:
        raise FinetuneError(f"GGUF export: the pre-tokenizer {'+'.join(steps)} has no llama.cpp equivalent known here.")
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    special = set(tokenizer.all_special_ids)
    added = {index for index in tokenizer.added_tokens_decoder}
    tokens, types = [], []
    for index in range(vocab_size):  # embedding rows past the tokenizer's vocabulary are padding, never produced
        token = by_id.get(index)
        if token is None:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(token)
        types.append(
            gguf.TokenType.CONTROL
            if index in special
            else gguf.TokenType.USER_DEFINED
            if index in added
            else gguf.TokenType.NORMAL
        )
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_PRE_TOKENIZERS[steps])
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    if tokenizer.bos_token_id is not None:
        writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id if tokenizer.eos_token_id is not None else stop_ids[0])
    writer.add_eot_token_id(stop_ids[0])  # llama.cpp ends generation at EOS and at EOT
    if tokenizer.pad_token_id is not None:
        writer.add_pad_token_id(tokenizer.pad_token_id)
    probe = tokenizer("a").input_ids
    writer.add_add_bos_token(bool(probe) and probe[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(bool(probe) and probe[-1] == tokenizer.eos_token_id and len(probe) > 1)
    writer.add_chat_template(tokenizer.chat_template)


def write_adapter_gguf(path: Path, adapter_dir: Path, base_model: PreTrainedModel) -> None:
    """A peft LoRA adapter as a llama.cpp LoRA GGUF: `<tensor>.lora_a` (r x in) and `<tensor>.lora_b` (out x r)
    per adapted weight, B's rows permuted like the q/k weight they update, and an alpha that gives llama.cpp's
    alpha / r the adapter's own scale (alpha / sqrt(r) with rsLoRA)."""
    import gguf
    from safetensors.torch import load_file

    settings = json.loads((adapter_dir / "adapter_config.json").read_text())
    if settings.get("use_dora") or settings.get("modules_to_save"):
        raise FinetuneError(
            "GGUF adapter export: DoRA adapters and extra trained modules have no llama.cpp LoRA form; export the merged model instead."
        )
    rank = settings["r"]
    if settings.get("rank_pattern") or settings.get("alpha_pattern"):
        raise FinetuneError(
            "GGUF adapter export: per-module ranks or alphas are not supported; export the merged model instead."
        )
    scale = settings["lora_alpha"] / (math.sqrt(rank) if settings.get("use_rslora") else rank)
    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    config = base_model.config
    layout = _llama_layout(config)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, scale * rank)
    for key in sorted(weights):
        if ".lora_A." not in key:
            if ".lora_B." not in key:
                raise FinetuneError(f"GGUF adapter export: unexpected tensor `{key}` in {adapter_dir}.")
            continue
        module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
        name = names.get_name(f"{module}.weight", try_suffixes=(".weight",))
        if name is None:
            raise FinetuneError(f"GGUF adapter export: no llama.cpp name for adapted module `{module}`.")
        a = weights[key].float().numpy()
        b = weights[key.replace(".lora_A.", ".lora_B.")].float().numpy()
        if name.endswith("attn_q.weight"):
            b = _permute(b, layout["heads"])
        elif name.endswith("attn_k.weight"):
            b = _permute(b, layout["kv_heads"])
        writer.add_tensor(f"{name}.lora_a", np.ascontiguousarray(a))
        writer.add_tensor(f"{name}.lora_b", np.ascontiguousarray(b))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# ---------------------------------------------------------------------------------------------- checks


def _load(path: Path) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def _load_gguf(path: Path) -> PreTrainedModel:
    """transformers' own reading of a GGUF file, dequantized to float32."""
    with no_loading_bar():
        return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


@torch.inference_mode()
def _last_logits(model: torch.nn.Module, ids: list[list[int]]) -> list[torch.Tensor]:
    return [model(input_ids=torch.tensor([prompt])).logits[0, -1].float() for prompt in ids]


def _reload_check(path: Path, reference: PreTrainedModel, ids: list[list[int]], quant: str) -> dict[str, Any]:
    expected = _last_logits(reference, ids)
    try:
        reloaded = _load_gguf(path)
    except Exception as exc:  # noqa: BLE001 - any failure to read the file back is this check failing
        raise FinetuneError(
            f"GGUF export check `transformers_reload` failed: transformers could not load the file ({exc})."
        ) from None
    got = _last_logits(reloaded, ids)
    del reloaded
    scale = float(torch.stack(expected).std())
    diff = max(float((a - b).abs().max()) for a, b in zip(got, expected))
    agree = sum(int(a.argmax() == b.argmax()) for a, b in zip(got, expected))
    result = {
        "max_logit_diff": diff,
        "relative": diff / scale,
        "bound": BOUNDS[quant]["reload"],
        "top1_agreement": f"{agree}/{len(ids)}",
    }
    if diff / scale > BOUNDS[quant]["reload"]:
        raise FinetuneError(
            f"GGUF export check `transformers_reload` failed: logits of the {quant} file reloaded by transformers differ "
            f"from the model it was made from by up to {diff:.3g} ({diff / scale:.3g} x their standard deviation; the "
            f"bound for {quant} is {BOUNDS[quant]['reload']}). Top-1 agreement {agree}/{len(ids)}."
        )
    return result


def _llama_cpp_checks(
    model_path, lora_path, reference, tokenizer, prompts, ids, stop_ids, quant, max_new_tokens
) -> dict[str, Any]:
    """Tokenization, last-position logits, a greedy reply token by token, and its stop, in llama.cpp against
    `reference` (transformers computing on the same weights)."""
    try:
        import llama_cpp
    except ImportError:
        raise FinetuneError(
            f"GGUF export verifies the file in llama.cpp, which needs {LLAMA_CPP_PIN}: pip install 'finetune[export]'."
        ) from None
    longest = max(len(prompt) for prompt in ids) + max_new_tokens + 8
    try:
        llm = llama_cpp.Llama(
            model_path=str(model_path),
            lora_path=str(lora_path) if lora_path else None,
            n_ctx=longest,
            n_threads=1,
            n_batch=min(512, longest),
            seed=0,
            logits_all=True,
            verbose=False,  # logits_all: else no logits are kept
        )
    except Exception as exc:  # noqa: BLE001 - llama.cpp refusing the file is this check failing
        raise FinetuneError(
            f"GGUF export check `llama_cpp_load` failed: llama.cpp could not load {Path(lora_path or model_path).name} ({exc})."
        ) from None
    tol = BOUNDS[quant]["runtime"]
    checks: dict[str, Any] = {}
    try:
        for text, expected in zip(prompts, ids):
            got = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
            if got != expected:
                first = next(i for i, (a, b) in enumerate(zip([*got, None], [*expected, None])) if a != b)
                raise FinetuneError(
                    f"GGUF export check `llama_cpp_tokenizer` failed: llama.cpp tokenizes a check prompt differently from the "
                    f"run's tokenizer from token {first} on ({got[first : first + 5]} vs {expected[first : first + 5]})."
                )
        checks["llama_cpp_tokenizer"] = f"{len(prompts)}/{len(prompts)} prompts tokenized identically"
        expected_logits = _last_logits(reference, ids)
        scale = float(torch.stack(expected_logits).std())
        worst = 0.0
        for prompt, expected in zip(ids, expected_logits):
            llm.reset()
            llm.eval(prompt)
            got = torch.tensor(np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32))
            worst = max(worst, float((got - expected).abs().max()))
        checks["llama_cpp_logits"] = {"max_logit_diff": worst, "relative": worst / scale, "bound": tol}
        if worst / scale > tol:
            raise FinetuneError(
                f"GGUF export check `llama_cpp_logits` failed: llama.cpp's logits differ from transformers' on the same file by "
                f"up to {worst:.3g} ({worst / scale:.3g} x their standard deviation; bound {tol})."
            )
        # With every logit within d of transformers', the top token can only change where the top two are within 2 d.
        checks["llama_cpp_reply"] = _reply_check(
            llm, llama_cpp, reference, tokenizer, ids, stop_ids, 2 * tol * scale, max_new_tokens
        )
    finally:
        llm.close()
    return checks


@torch.inference_mode()
def _reply_check(llm, llama_cpp, reference, tokenizer, ids, stop_ids, tie, max_new_tokens) -> dict[str, Any]:
    """Greedy replies in llama.cpp, each token checked against transformers' choice after the same tokens; a token
    where transformers' top two logits are within `tie` of each other may go either way (counted as a near tie).
    llama.cpp must treat the end-of-turn token as the end of generation, and every reply that ends must end there."""
    vocab = llm._model.vocab
    if not llama_cpp.llama_token_is_eog(vocab, stop_ids[0]):
        raise FinetuneError(
            f"GGUF export check `llama_cpp_reply` failed: llama.cpp does not stop generating at the end-of-turn token "
            f"{tokenizer.convert_ids_to_tokens(stop_ids[0])!r} (tokenizer.ggml.eot_token_id is not honoured)."
        )
    replies, near_ties, widest, stopped = [], 0, 0.0, 0
    for prompt in ids:
        reply: list[int] = []
        for token in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
            reply.append(int(token))
            if llama_cpp.llama_token_is_eog(vocab, token) or len(reply) >= max_new_tokens:
                break
        logits = reference(input_ids=torch.tensor([prompt + reply])).logits[0, len(prompt) - 1 :].float()
        for position, token in enumerate(reply):
            row = logits[position]
            best = int(row.argmax())
            if best != token:
                margin = float(row[best] - row[token])
                if margin > tie:
                    raise FinetuneError(
                        f"GGUF export check `llama_cpp_reply` failed: llama.cpp's greedy reply picked "
                        f"{tokenizer.convert_ids_to_tokens(token)!r} at token {position}, where transformers on the same file "
                        f"picks {tokenizer.convert_ids_to_tokens(best)!r} by a logit margin of {margin:.3g} (near-tie bound {tie:.3g}). "
                        f"Reply so far: {tokenizer.decode(reply[:position])!r}"
                    )
                near_ties += 1
                widest = max(widest, margin)
        ended = bool(reply) and llama_cpp.llama_token_is_eog(vocab, reply[-1])
        if ended and reply[-1] not in stop_ids:
            raise FinetuneError(
                f"GGUF export check `llama_cpp_reply` failed: llama.cpp ended a reply at {tokenizer.convert_ids_to_tokens(reply[-1])!r}, "
                f"not at the end-of-turn token {tokenizer.convert_ids_to_tokens(stop_ids[0])!r}."
            )
        stopped += ended
        replies.append(tokenizer.decode(reply))
    return {
        "replies": replies,
        "stopped_at_end_of_turn": f"{stopped}/{len(ids)}",
        "near_ties": near_ties,
        "widest_near_tie": widest,
        "near_tie_bound": tie,
        "max_new_tokens": max_new_tokens,
    }


# ---------------------------------------------------------------------------------------------- Ollama


def chat_template_pieces(tokenizer: PreTrainedTokenizerBase) -> dict[str, str] | None:
    """The chat template as fixed text around each message: {head, <role>_pre, <role>_post, generation}, learnt by
    rendering probes and kept only if it reproduces the template exactly on several conversations; None when the
    template does more than surround messages (merges the system prompt into a user turn, adds a default system
    prompt, rewrites earlier turns, ...)."""
    mark = {role: f"\x02{role}\x03" for role in ("system", "user", "assistant")}

    def render(messages: list[dict[str, str]], generation: bool = False) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)

    def split(piece: str, role: str) -> tuple[str, str]:
        before, found, after = piece.partition(mark[role])
        if not found or mark[role] in after:
            raise ValueError(role)
        return before, after

    user, assistant, system = ({"role": role, "content": mark[role]} for role in ("user", "assistant", "system"))
    try:
        one = render([user])
        two = render([user, assistant])
        three = render([user, assistant, user])
        user_piece, assistant_piece = three[len(two) :], two[len(one) :]
        if not (three.startswith(two) and two.startswith(one) and one.endswith(user_piece)):
            return None
        head = one[: len(one) - len(user_piece)]
        with_system = render([system, user])
        if not (with_system.startswith(head) and with_system.endswith(user_piece)):
            return None
        system_piece = with_system[len(head) : len(with_system) - len(user_piece)]
        pieces = {"head": head, "generation": render([user], True)[len(one) :]}
        for role, piece in (("system", system_piece), ("user", user_piece), ("assistant", assistant_piece)):
            pieces[f"{role}_pre"], pieces[f"{role}_post"] = split(piece, role)
        probes = [
            [{"role": "user", "content": "Hi there."}],
            [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi."},
                {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Why?\nSay."},
            ],
            [
                {"role": "user", "content": "One"},
                {"role": "assistant", "content": "Two"},
                {"role": "user", "content": "Three"},
            ],
        ]
        for messages in probes:
            if render(messages, True) != render_pieces(pieces, messages):
                return None
    except Exception:  # noqa: BLE001 - a template that refuses a probe (e.g. no system role) is one we cannot translate
        return None
    return pieces


def render_pieces(pieces: dict[str, str], messages: list[dict[str, str]]) -> str:
    """What the Modelfile's TEMPLATE renders for `messages` (Ollama always asks for the next assistant turn)."""
    body = "".join(pieces[f"{m['role']}_pre"] + m["content"] + pieces[f"{m['role']}_post"] for m in messages)
    return pieces["head"] + body + pieces["generation"]


def _go_text(text: str) -> str:
    if "{{" in text or '"""' in text:
        raise ValueError(text)
    return text


def modelfile_text(
    tokenizer: PreTrainedTokenizerBase,
    stop_ids: list[int],
    model_from: str,
    *,
    adapter: str | None = None,
    system_prompt: str | None = None,
) -> tuple[str, str | None]:
    """An Ollama Modelfile: FROM the GGUF (ADAPTER for a LoRA GGUF), TEMPLATE rendering exactly what the chat template
    renders, a stop per end-of-turn string, and the recipe's system prompt. Returns (text, warning or None)."""
    lines = [f"FROM {model_from}"]
    if adapter:
        lines.append(f"ADAPTER {adapter}")
    pieces = chat_template_pieces(tokenizer)
    warning = None
    try:
        if pieces is None:
            raise ValueError("template")
        branches = "".join(
            f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{role}" }}}}{_go_text(pieces[f"{role}_pre"])}{{{{ .Content }}}}{_go_text(pieces[f"{role}_post"])}'
            for i, role in enumerate(("system", "user", "assistant"))
        )
        template = f"{_go_text(pieces['head'])}{{{{ range .Messages }}}}{branches}{{{{ end }}}}{{{{ end }}}}{_go_text(pieces['generation'])}"
        lines.append(f'TEMPLATE """{template}"""')
    except ValueError:
        warning = (
            "the chat template does more than surround each message with fixed text, so the Modelfile has no TEMPLATE: "
            "Ollama falls back on its guess from the GGUF's tokenizer.chat_template. Check replies in Ollama, or write a TEMPLATE."
        )
    stops = dict.fromkeys(tokenizer.convert_ids_to_tokens([*stop_ids, tokenizer.eos_token_id]))
    lines += [f"PARAMETER stop {json.dumps(stop)}" for stop in stops if stop]
    if system_prompt:
        lines.append(f'SYSTEM """{system_prompt}"""')
    return "\n".join(lines) + "\n", warning


# ---------------------------------------------------------------------------------------------- records


def _record(folder: RunFolder, exported: ExportResult) -> None:
    """export.json: one entry per GGUF file in export/, with its checks and numbers."""
    records = json.loads(folder.export_record.read_text()) if folder.export_record.is_file() else {}
    entry = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(exported).items()}
    records[exported.path.name] = entry
    atomic.write_text(folder.export_record, json.dumps(records, indent=2) + "\n")


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(
            f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in value.items() if k != "replies"
        )
    return str(value)
