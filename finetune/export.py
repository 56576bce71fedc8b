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
import zlib
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from finetune import atomic
from finetune.adapters import load_trained
from finetune.config import ExportQuant, ModelConfig, choices
from finetune.errors import FinetuneError, argument
from finetune.llama_cpp_runner import LLAMA_QUANTIZER_TYPES, Inspection, inspect_gguf, quantize_gguf
from finetune.model_source import resolve
from finetune.models import load_model, no_loading_bar
from finetune.run_folder import RunFolder

QUANTS = choices(ExportQuant)
ARCHITECTURES = ("llama",)  # config.model_type values the tensor layout below is written for

# How far the logits may move, as a multiple of how far the format's own rounding moves them in this very model (its
# rounding twin, see the checks below). Measured over tiny random and over-trained models (4 seeds each) and
# SmolLM2-135M, f16 to q4_0: the measured deviation was 0.6-2.4 x the twin's (the mean of TWIN_DRAWS random draws;
# benchmarks/results/export_quality.md; q4_1 of SmolLM2 is the exception docs/deployment.md describes);
# MARGIN leaves room over the worst of those, and tests/test_export.py checks every export keeps 1.5x of it.
MARGIN = 5.0
TWIN_DRAWS = 4
# llama.cpp and transformers also sum in different orders: float32 accumulation noise, in units of the logits' spread.
ACCUMULATION_FLOOR = 1e-3
# Byte-level BPE pre-tokenizers (tokenizer.json) -> the name llama.cpp knows the same splitting by.
_PRE_TOKENIZERS = {
    ("ByteLevel",): "gpt-2",
    ("Digits", "ByteLevel"): "smollm",
}


@dataclass(frozen=True)
class ExportResult:
    """What `export_gguf` wrote and the checks the file passed.

    Attributes:
        path: The GGUF file written: the model, or with adapter_only the LoRA adapter.
        modelfile: The Ollama Modelfile beside it.
        quant: The GGUF weight type.
        adapter_only: Whether `path` is a LoRA adapter GGUF.
        size_bytes: The file's size.
        base: For an adapter, the base GGUF it applies to; else None.
        checks: Check name -> its outcome (tokens, logits, replies compared with transformers).
        warnings: What the export could not reproduce exactly (e.g. a chat template Ollama cannot render).
        seconds: How long the export took.
    """

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
        """What `finetune export` prints: the file, its size and type, the base, each check and any warning.

        Returns:
            The lines to print.
        """
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

    Args:
        folder: the finished run (its merged/ model, or with `adapter_only` its adapter/).
        model_cfg: the run's model settings (the base an adapter applies to).
        tokenizer: the run's tokenizer, chat template included.
        prompts: rendered chat prompts (held-out conversations through the generation prompt) the checks run on.
        stop_ids: the template's end-of-turn token(s).
        quant: the GGUF type (`finetune.config.ExportQuant`).
        adapter_only: write the LoRA adapter as a llama.cpp LoRA GGUF (and the base's GGUF if it has none).
        system_prompt: the recipe's system prompt, written into the Modelfile.
        max_new_tokens: the longest check reply.

    Returns:
        What was written and every check's numbers.

    Raises:
        FinetuneError: an unknown type, nothing to export, or a failed check (nothing is then left behind).
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
    probe = _Probe(
        tokenizer=tokenizer,
        prompts=prompts,
        ids=[list(tokenizer(text, add_special_tokens=False).input_ids) for text in prompts],
        stop_ids=stop_ids,
        max_new_tokens=max_new_tokens,
    )
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=folder.path))
    try:
        if adapter_only:
            written = _export_adapter(folder, model_cfg, probe, quant=quant, staging=staging)
        else:
            written = _export_merged(folder, probe, quant=quant, staging=staging)
        if written.checks["llama_cpp_reply"]["stopped_at_end_of_turn"].startswith("0/"):
            written.warnings.append(
                f"no check reply reached the end-of-turn token within {max_new_tokens} tokens (in transformers neither, which "
                "agreed token by token): the stop itself is checked in llama.cpp's vocabulary, but not seen in a reply"
            )
        gguf_file, base = written.gguf_file, written.base
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
        warnings = written.warnings + ([template_warning] if template_warning else [])
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
        checks=written.checks,
        warnings=warnings,
        seconds=round(time.perf_counter() - started, 1),
    )
    _record(folder, exported)
    return exported


@dataclass(frozen=True)
class _Probe:
    """What every check runs: the prompts (text and the run tokenizer's ids), the stop and the reply length."""

    tokenizer: PreTrainedTokenizerBase
    prompts: list[str]
    ids: list[list[int]]
    stop_ids: list[int]
    max_new_tokens: int


@dataclass
class _Written:
    gguf_file: Path  # in the staging folder
    base: Path | None  # adapter_only: the base GGUF the adapter applies to (staged, or the source's own file)
    checks: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- the two exports


def _export_merged(folder: RunFolder, probe: _Probe, *, quant: str, staging: Path) -> _Written:
    merged = _load(folder.merged)
    path = staging / f"model-{quant}.gguf"
    _write_as(path, merged, probe, quant=quant, staging=staging, name=folder.path.name)
    stored = _stored_tensors(path)
    on_file = _load_gguf(path)
    checks = {"transformers_reload": _reload_check(on_file, merged, stored, probe)}
    del merged
    checks.update(_llama_cpp_checks(path, lora=None, reference=on_file, stored=stored, probe=probe))
    return _Written(gguf_file=path, base=None, checks=checks)


def _export_adapter(folder: RunFolder, model_cfg: ModelConfig, probe: _Probe, *, quant: str, staging: Path) -> _Written:
    adapter_path = staging / "adapter.gguf"
    source = resolve(model_cfg)
    base_model = load_model(model_cfg, quantized=False)
    checks: dict[str, Any] = {}
    if source.gguf is not None:  # the base already is a GGUF: the adapter applies to that very file
        base = source.gguf
        stored = _stored_tensors(base)
    else:
        base = staging / f"base-{quant}.gguf"
        _write_as(base, base_model, probe, quant=quant, staging=staging, name=f"{folder.path.name}-base")
        stored = _stored_tensors(base)
        on_file = _load_gguf(base)
        checks["transformers_reload"] = _reload_check(on_file, base_model, stored, probe)
        base_model = on_file  # the adapter is then checked on the very base weights llama.cpp runs
    write_adapter_gguf(adapter_path, folder.adapter, base_model)
    reference = load_trained(base_model, probe.tokenizer, folder.adapter).eval()
    checks.update(_llama_cpp_checks(base, lora=adapter_path, reference=reference, stored=stored, probe=probe))
    return _Written(gguf_file=adapter_path, base=base, checks=checks)


def _write_as(path: Path, model: PreTrainedModel, probe: _Probe, *, quant: str, staging: Path, name: str) -> None:
    """`model` as a GGUF of type `quant`: f16 and bf16 written here, quantized types written in float32 and
    quantized by llama.cpp's own quantizer (which picks each tensor's type)."""
    if quant not in LLAMA_QUANTIZER_TYPES:
        write_model_gguf(path, model, probe.tokenizer, probe.stop_ids, quant, name=name)
        return
    source = staging / f"{path.stem}-source-f32.gguf"
    write_model_gguf(source, model, probe.tokenizer, probe.stop_ids, "f32", name=name)
    try:
        quantize_gguf(source, path, quant, what=f"GGUF export: quantizing to {quant} in llama.cpp")
    finally:
        source.unlink()


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


@dataclass(frozen=True)
class _Tensor:
    hf_name: str  # in the transformers state dict
    name: str  # in the GGUF file
    array: np.ndarray  # float32, q/k rows already in llama.cpp's rotary layout


def _gguf_tensors(state: dict[str, torch.Tensor], config: Any) -> list[_Tensor]:
    """Every weight under its GGUF name, as float32 with q/k rows permuted; the output head left out when tied."""
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
        out.append(_Tensor(hf_name=hf_name, name=name, array=array))
    return out


def _types(quant: str):
    import gguf

    q = gguf.GGMLQuantizationType
    return {
        "f32": (q.F32, gguf.LlamaFileType.ALL_F32),  # the source llama.cpp's quantizer reads (never kept)
        "f16": (q.F16, gguf.LlamaFileType.MOSTLY_F16),
        "bf16": (q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    }[quant]


def write_model_gguf(
    path: Path,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    stop_ids: list[int],
    quant: str,
    *,
    name: str,
) -> None:
    """Write a Llama-architecture model as one GGUF file: hyperparameters, tokenizer, chat template, weights
    (2-D ones as `quant`; norms stay float32, as llama.cpp's converter keeps them). Quantized types are made from the
    f32 file this writes by llama.cpp's own quantizer (`llama_cpp_runner.quantize_gguf`): a hand-written quantizer
    (this module's until issue 21) wrote files whose rounding the export's checks could not model, and llama.cpp keeps
    the output head at 6 bits or more, which a hand-written one has to copy rule by rule.

    Args:
        path: The GGUF file to write.
        model: The merged (full-precision) model, of the Llama architecture.
        tokenizer: Its tokenizer, with the chat template.
        stop_ids: End-of-turn token ids, recorded as EOS/EOT.
        quant: The weight type of 2-D weights: f32, f16 or bf16.
        name: The model's name in the file's metadata.
    """
    import gguf

    config = model.config
    layout = _llama_layout(config)
    qtype, file_type = _types(quant)
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
    for tensor in _gguf_tensors(model.state_dict(), config):
        tensor_name, array = tensor.name, tensor.array
        if array.ndim == 1:
            writer.add_tensor(tensor_name, array.astype(np.float32))
            continue
        data = gguf.quants.quantize(array, qtype)
        writer.add_tensor(tensor_name, data, raw_dtype=qtype if qtype == gguf.GGMLQuantizationType.BF16 else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


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
    alpha / r the adapter's own scale (alpha / sqrt(r) with rsLoRA).

    Args:
        path: The GGUF file to write.
        adapter_dir: The peft adapter folder.
        base_model: The model the adapter was trained on (for the modules' shapes and names).

    Raises:
        FinetuneError: The adapter uses DoRA, trains extra modules, has per-module ranks or alphas, or adapts a
            module llama.cpp has no name for.
    """
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
#
# How far may the logits move? Not a number fitted on one machine (a bound fitted on one CPU failed on another):
# the bound is MARGIN times how far the format's own rounding moves them in this very model, on these prompts.
#
# - transformers reloading the file vs the model it was made from: each stored matrix reads back as W + E, with E the
#   format's rounding (for f16 at most 2^-11 of each number, for bf16 2^-8, for a block quantizer half its step).
#   E is measured, not assumed: every tensor of the file is dequantized (numpy; the same numbers on any CPU) and
#   compared with the weight it was made from. The "rounding twin" is the model with an independent random error of
#   the same size (the same root-mean-square per matrix) added to every matrix. What the twin's logits move is what
#   rounding of that size does to this model: it scales with the format and with how sharply the model reacts (an
#   over-trained model moves several times further than a random one under the same rounding). A real fault (rows in
#   the wrong order, a scale written wrongly) is not rounding-sized and lands far past the bound.
# - llama.cpp vs transformers on the same file: the weights are identical; llama.cpp rounds the activations, which
#   transformers keeps in float32: before each matrix product it converts the input to the weight's dot-product type
#   (f16 for f16 weights, bf16 for bf16, 8-bit blocks of 32 values for q8_0/q5/q4, of 256 for K-quants), and keeps the
#   attention keys and values in f16. The twin applies exactly that rounding to the activations in transformers.
# Deviations are in units of the reference logits' standard deviation (so a tiny random model and a trained one read
# alike), as the largest over every logit of every prompt. tests/test_export.py measures the ratio to the twin over
# seeds of random and over-trained tiny models, every type, and on SmolLM2-135M.


def _load(path: Path) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def _load_gguf(path: Path) -> PreTrainedModel:
    """transformers' own reading of a GGUF file, dequantized to float32."""
    try:
        with no_loading_bar():
            return AutoModelForCausalLM.from_pretrained(
                str(path.parent), gguf_file=path.name, dtype=torch.float32
            ).eval()
    except Exception as exc:  # noqa: BLE001 - any failure to read the file back is this check failing
        raise FinetuneError(
            f"GGUF export check `transformers_reload` failed: transformers could not load {path.name} ({exc})."
        ) from exc


def _stored_tensors(path: Path) -> dict[str, Any]:
    """The file's tensors (gguf ReaderTensor: type and raw data) by GGUF name. Read once per export: gguf's reader
    parses the whole vocabulary first (seconds for 50k tokens)."""
    import gguf

    return {tensor.name: tensor for tensor in gguf.GGUFReader(path).tensors}


@torch.inference_mode()
def _last_logits(model: torch.nn.Module, ids: list[list[int]]) -> list[torch.Tensor]:
    """The logits after each prompt's last token, all prompts in one forward pass: padded on the right, so under causal
    attention no prompt token sees the padding and every position is where it is alone."""
    width = max(len(prompt) for prompt in ids)
    batch = torch.tensor([prompt + [prompt[-1]] * (width - len(prompt)) for prompt in ids])
    logits = model(input_ids=batch).logits
    return [logits[row, len(prompt) - 1].float() for row, prompt in enumerate(ids)]


def _deviation(got: list[torch.Tensor], expected: list[torch.Tensor]) -> tuple[float, float]:
    """(largest absolute logit difference, the same in units of the expected logits' standard deviation)."""
    worst = max(float((a - b).abs().max()) for a, b in zip(got, expected))
    return worst, worst / float(torch.stack(expected).std())


def _module_key(name: str) -> str:
    """A module or weight name of a model with or without peft's wrapping, as in the plain transformers model."""
    return name.removeprefix("base_model.model.").replace(".base_layer", "")


def _file_tensors(stored: dict[str, Any], model: PreTrainedModel) -> dict[str, Any]:
    """The stored tensor behind each matrix-multiplying module of `model`, by module key."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
    found = {}
    for name, module in model.named_modules():
        if not isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            continue
        key = _module_key(name)
        gguf_name = names.get_name(f"{key}.weight", try_suffixes=(".weight",))
        if gguf_name == "output.weight" and gguf_name not in stored:  # a tied head is the embedding matrix
            gguf_name = "token_embd.weight"
        if gguf_name in stored:
            found[key] = stored[gguf_name]
    return found


def _rounding_errors(stored: dict[str, Any], model: PreTrainedModel) -> dict[str, float]:
    """Root-mean-square of what the file's rounding changed in each matrix of `model`, by module key."""
    import gguf

    sources = {tensor.name: tensor.array for tensor in _gguf_tensors(model.state_dict(), model.config)}
    errors = {}
    for key, tensor in _file_tensors(stored, model).items():
        source = sources[tensor.name]
        exact = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(source.shape)
        errors[key] = float(np.sqrt(np.mean(np.square(exact.astype(np.float64) - source))))
    return errors


# The type llama.cpp converts a matrix product's input to, by the weight's GGML type (ggml-cpu's vec_dot_type).
def _dot_type(ggml_type: Any) -> str | None:
    name = ggml_type.name
    if name == "F32":
        return None
    if name in ("F16", "BF16"):
        return name.lower()
    return "q8_k" if name.endswith("_K") or name.startswith("IQ") else "q8_0"


def _round_like_llama_cpp(x: torch.Tensor, dot_type: str | None) -> torch.Tensor:
    if dot_type is None:
        return x
    if dot_type == "f16":
        return x.half().to(x.dtype)
    if dot_type == "bf16":
        return x.bfloat16().to(x.dtype)
    block = 256 if dot_type == "q8_k" else 32  # 8-bit integers with one scale per block: the block's largest / 127
    if x.shape[-1] % block:
        return x
    blocks = x.reshape(*x.shape[:-1], -1, block)
    step = blocks.abs().amax(dim=-1, keepdim=True) / 127
    rounded = torch.where(step > 0, torch.round(blocks / step.clamp_min(1e-30)) * step, blocks)
    return rounded.reshape(x.shape)


@contextmanager
def _rounding_twin(
    model: PreTrainedModel,
    *,
    weight_errors: dict[str, float] | None = None,
    dot_types: dict[str, str | None] | None = None,
    draw: int = 0,
):
    """`model` made to compute like its rounded twin while inside: each matrix (module key in `weight_errors`) gets a
    random error of that root-mean-square (seeded by the module and `draw`), and/or each matrix product's input is
    rounded to its `dot_types` type and the attention keys and values to f16, as llama.cpp does."""
    handles = []
    for name, module in model.named_modules():
        key = _module_key(name)
        if weight_errors and key in weight_errors and isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            seed = zlib.crc32(f"{key}:{draw}".encode())
            handles.append(module.register_forward_hook(_weight_noise_hook(seed, weight_errors[key])))
        if dot_types and key in dot_types and isinstance(module, torch.nn.Linear):
            dot_type = dot_types[key]
            handles.append(
                module.register_forward_pre_hook(
                    lambda m, args, t=dot_type: (_round_like_llama_cpp(args[0], t), *args[1:])
                )
            )
        if dot_types and not name.endswith(".base_layer") and key.endswith((".k_proj", ".v_proj")):
            handles.append(module.register_forward_hook(lambda m, args, out: _round_like_llama_cpp(out, "f16")))
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()


def _weight_noise_hook(seed: int, rms: float):
    def add_noise(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        # The same noise on every call: one twin model, not a new one per prompt.
        noise = torch.randn(module.weight.shape, generator=torch.Generator().manual_seed(seed)) * rms
        if isinstance(module, torch.nn.Embedding):
            return output + torch.nn.functional.embedding(args[0], noise).to(output.dtype)
        return output + torch.nn.functional.linear(args[0].float(), noise).to(output.dtype)

    return add_noise


def _twin_deviation(
    model: PreTrainedModel,
    probe: _Probe,
    expected: list[torch.Tensor],
    *,
    weight_errors: dict[str, float] | None = None,
    dot_types: dict[str, str | None] | None = None,
) -> float:
    """How far the rounding twin's logits are from `expected`: for random weight errors the mean over TWIN_DRAWS
    draws (one draw of an over-trained model can land 4x above or below the mean); activation rounding is exact."""
    draws = TWIN_DRAWS if weight_errors else 1
    total = 0.0
    for draw in range(draws):
        with _rounding_twin(model, weight_errors=weight_errors, dot_types=dot_types, draw=draw):
            total += _deviation(_last_logits(model, probe.ids), expected)[1]
    return total / draws


def _bound(twin_deviation: float) -> float:
    return MARGIN * twin_deviation + ACCUMULATION_FLOOR


def _reload_check(
    reloaded: PreTrainedModel, reference: PreTrainedModel, stored: dict[str, Any], probe: _Probe
) -> dict[str, Any]:
    """transformers' reading of the file (`reloaded`) against the model it was made from."""
    expected = _last_logits(reference, probe.ids)
    twin = _twin_deviation(reference, probe, expected, weight_errors=_rounding_errors(stored, reference))
    got = _last_logits(reloaded, probe.ids)
    diff, relative = _deviation(got, expected)
    agree = sum(int(a.argmax() == b.argmax()) for a, b in zip(got, expected))
    bound = _bound(twin)
    result = {
        "max_logit_diff": diff,
        "relative": relative,
        "rounding_twin": twin,
        "bound": bound,
        "top1_agreement": f"{agree}/{len(probe.ids)}",
    }
    if relative > bound:
        raise FinetuneError(
            f"GGUF export check `transformers_reload` failed: logits of the file reloaded by transformers differ from "
            f"the model it was made from by up to {diff:.3g} ({relative:.3g} x their standard deviation); the format's "
            f"rounding accounts for {twin:.3g}, and the bound is {MARGIN:g} x that. Top-1 agreement {agree}/{len(probe.ids)}."
        )
    return result


def _llama_cpp_checks(
    model_path: Path, *, lora: Path | None, reference: PreTrainedModel, stored: dict[str, Any], probe: _Probe
) -> dict[str, Any]:
    """Tokenization, last-position logits, a greedy reply token by token, and its stop, in llama.cpp (run in a child
    process, see `finetune.llama_cpp_runner`) against `reference`: transformers computing on the same weights."""
    seen = inspect_gguf(
        model_path,
        lora=lora,
        prompts=probe.prompts,
        ids=probe.ids,
        stop_id=probe.stop_ids[0],
        max_new_tokens=probe.max_new_tokens,
        what="GGUF export check in llama.cpp",
    )
    for got, expected in zip(seen.tokens, probe.ids):
        if got != expected:
            first = next(i for i, (a, b) in enumerate(zip([*got, None], [*expected, None])) if a != b)
            raise FinetuneError(
                f"GGUF export check `llama_cpp_tokenizer` failed: llama.cpp tokenizes a check prompt differently from the "
                f"run's tokenizer from token {first} on ({got[first : first + 5]} vs {expected[first : first + 5]})."
            )
    checks: dict[str, Any] = {"llama_cpp_tokenizer": f"{len(probe.ids)}/{len(probe.ids)} prompts tokenized identically"}
    expected = _last_logits(reference, probe.ids)
    dot_types = {key: _dot_type(tensor.tensor_type) for key, tensor in _file_tensors(stored, reference).items()}
    twin = _twin_deviation(reference, probe, expected, dot_types=dot_types)
    diff, relative = _deviation([torch.from_numpy(logits) for logits in seen.last_logits], expected)
    bound = _bound(twin)
    checks["llama_cpp_logits"] = {"max_logit_diff": diff, "relative": relative, "rounding_twin": twin, "bound": bound}
    if relative > bound:
        raise FinetuneError(
            f"GGUF export check `llama_cpp_logits` failed: llama.cpp's logits differ from transformers' on the same file by "
            f"up to {diff:.3g} ({relative:.3g} x their standard deviation); its rounding of activations accounts for "
            f"{twin:.3g}, and the bound is {MARGIN:g} x that."
        )
    # With every logit within d of transformers', the top token can only change where the top two are within 2 d.
    tie = 2 * bound * float(torch.stack(expected).std())
    checks["llama_cpp_reply"] = _reply_check(seen, reference, probe, tie=tie)
    return checks


@torch.inference_mode()
def _reply_check(seen: Inspection, reference: PreTrainedModel, probe: _Probe, *, tie: float) -> dict[str, Any]:
    """llama.cpp's greedy replies, each token checked against transformers' choice after the same tokens; a token
    where transformers' top two logits are within `tie` of each other may go either way (counted as a near tie).
    llama.cpp must treat the end-of-turn token as the end of generation, and every reply that ends must end there."""
    tokenizer, stop_ids = probe.tokenizer, probe.stop_ids
    if not seen.stop_is_end_of_generation:
        raise FinetuneError(
            f"GGUF export check `llama_cpp_reply` failed: llama.cpp does not stop generating at the end-of-turn token "
            f"{tokenizer.convert_ids_to_tokens(stop_ids[0])!r} (tokenizer.ggml.eot_token_id is not honoured)."
        )
    replies, near_ties, widest, stopped = [], 0, 0.0, 0
    for prompt, reply, ended in zip(probe.ids, seen.replies, seen.reply_ended):
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
        if ended and reply[-1] not in stop_ids:
            raise FinetuneError(
                f"GGUF export check `llama_cpp_reply` failed: llama.cpp ended a reply at {tokenizer.convert_ids_to_tokens(reply[-1])!r}, "
                f"not at the end-of-turn token {tokenizer.convert_ids_to_tokens(stop_ids[0])!r}."
            )
        stopped += ended
        replies.append(tokenizer.decode(reply))
    return {
        "replies": replies,
        "stopped_at_end_of_turn": f"{stopped}/{len(probe.ids)}",
        "near_ties": near_ties,
        "widest_near_tie": widest,
        "near_tie_bound": tie,
        "max_new_tokens": probe.max_new_tokens,
    }


# ---------------------------------------------------------------------------------------------- Ollama


def chat_template_pieces(tokenizer: PreTrainedTokenizerBase) -> dict[str, str] | None:
    """The chat template as fixed text around each message: {head, <role>_pre, <role>_post, generation}, learnt by
    rendering probes and kept only if it reproduces the template exactly on several conversations; None when the
    template does more than surround messages (merges the system prompt into a user turn, adds a default system
    prompt, rewrites earlier turns, ...).

    Args:
        tokenizer: The tokenizer with its chat template.

    Returns:
        The pieces, or None.
    """
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
    """What the Modelfile's TEMPLATE renders for `messages` (Ollama always asks for the next assistant turn).

    Args:
        pieces: From `chat_template_pieces`.
        messages: The conversation so far.

    Returns:
        The rendered text, ending with the opening of the assistant's turn.
    """
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
    renders, a stop per end-of-turn string, and the recipe's system prompt. Returns (text, warning or None).

    Args:
        tokenizer: The tokenizer with its chat template.
        stop_ids: End-of-turn token ids (each becomes a PARAMETER stop).
        model_from: The FROM line's GGUF file (relative to the Modelfile) or model.
        adapter: The LoRA GGUF for an ADAPTER line; None for none.
        system_prompt: `data.system_prompt`, written as SYSTEM; None for none.

    Returns:
        (Modelfile text, a warning when the template could not be reproduced, else None).
    """
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
