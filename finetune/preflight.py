"""Pre-flight checks: what would fail hours into a run, checked before a model is loaded or anything is written.

Entry point: `preflight(cfg) -> list[Finding]`. It checks free disk space in the output folder against an
estimate of what the run writes, that the data source files exist, that the requested quantization works on this
device, and that `data.max_length` fits the model's context. Blocking problems raise one `FinetuneError` listing
each of them with its fix; the findings that pass (or could not be checked) are returned to be printed.

The model is described from its config and weight-file headers only (`config.json`, safetensors headers, GGUF
metadata), never by loading weights.
"""

from __future__ import annotations

import functools
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune import model_source
from finetune.config import DataSource, ModelConfig, RecipeConfig
from finetune.errors import FinetuneError

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
_HIDDEN_KEYS = ("hidden_size", "n_embd", "d_model")


@dataclass(frozen=True)
class Finding:
    """The outcome of one pre-flight check.

    Attributes:
        check: Which check: disk, data, quantization, context, safety or trackers.
        ok: True when it passed, False when the run cannot go on, None when it could not be checked here.
        message: What was found, with the fix when it failed.
    """

    check: str  # disk, data, quantization, context, safety or trackers
    ok: bool | None  # None: could not be checked here (the run goes on)
    message: str


@dataclass(frozen=True)
class ModelFacts:
    """What the checks need to know about a model, read without loading it; None where it cannot be known offline."""

    context: int | None
    parameters: int | None
    hidden: int | None
    dtype_bytes: int  # of the weights as saved, which a merge with merge_dtype: auto keeps
    conversion_bytes: int = 0  # a GGUF file not yet converted is written once to the cache as float32
    cache_dir: Path | None = None


def preflight(cfg: RecipeConfig) -> list[Finding]:
    """Check, before anything is loaded or written, what would make a run fail later: data files, quantization on this
    device, the context length, disk space, and the packages safety and trackers need.

    Args:
        cfg: The recipe.

    Returns:
        Every check's Finding (none failed).

    Raises:
        FinetuneError: A check failed; the message lists each failure with its fix.
    """
    facts = model_facts(cfg.model)
    findings = [
        *check_data_files(cfg),
        check_quantization(cfg.model),
        check_context(cfg, facts),
        check_disk(cfg, facts),
        check_safety(cfg),
        check_trackers(cfg),
    ]
    problems = [finding.message for finding in findings if finding.ok is False]
    if problems:
        raise FinetuneError("pre-flight checks failed; nothing was loaded or written:\n  " + "\n  ".join(problems))
    return findings


# ---------------------------------------------------------------- safety


def check_safety(cfg: RecipeConfig) -> Finding:
    """The packages evaluation.safety, data.safety_mix and data.clean.toxicity read (prompt sets, the classifier).

    Args:
        cfg: The recipe.

    Returns:
        A Finding: ok, not ok (the run stops), or None when it cannot be checked here.
    """
    from finetune.safety import missing_packages

    problems = missing_packages(cfg)
    if problems:
        return Finding("safety", False, " ".join(problems))
    on = cfg.evaluation.safety or cfg.data.safety_mix or cfg.data.clean.toxicity is not None
    return Finding("safety", True, "safety: prompt sets and classifier installed" if on else "safety: nothing needed")


def check_trackers(cfg: RecipeConfig) -> Finding:
    """The packages of the experiment trackers in training.report_to.

    Args:
        cfg: The recipe (`training.report_to`).

    Returns:
        A Finding: ok, not ok (the run stops), or None when it cannot be checked here.
    """
    from finetune.trackers import missing_packages

    problems = missing_packages(cfg)
    if problems:
        return Finding("trackers", False, " ".join(problems))
    names = ", ".join(cfg.training.report_to)
    return Finding("trackers", True, f"trackers: {names} installed" if names else "trackers: none")


# ---------------------------------------------------------------- data


def check_data_files(cfg: RecipeConfig) -> list[Finding]:
    """Whether every local data source (`data.sources`, validation and test sources) exists and can be read.

    Args:
        cfg: The recipe.

    Returns:
        One Finding per source.
    """
    from finetune.data import source_files  # lazy: finetune.data imports datasets and transformers

    findings = []
    for key in ("sources", "validation_sources", "test_sources"):
        sources: list[DataSource] = getattr(cfg.data, key) or []
        for index, source in enumerate(sources):
            if source.type == "hub":  # read through `datasets`, which needs the network; nothing local to check
                continue
            try:
                files = source_files(source)
            except FinetuneError as exc:
                findings.append(Finding("data", False, f"data.{key}[{index}]: {exc}"))
                continue
            findings.append(Finding("data", True, f"data.{key}[{index}]: {len(files)} file(s) found"))
    return findings


# ---------------------------------------------------------------- quantization


def check_quantization(cfg: ModelConfig) -> Finding:
    """Whether `model.quantization` works on this device (bitsandbytes runs a small test layer).

    Args:
        cfg: The `model:` section.

    Returns:
        A Finding: ok, not ok (the run stops), or None when it cannot be checked here.
    """
    if cfg.quantization == "none":
        return Finding("quantization", True, "quantization: none (full precision)")
    from finetune import distributed  # lazy: imports torch and accelerate

    device = str(distributed.state().device)  # this process's device, as the model will be loaded onto
    problem = quantization_problem(cfg.quantization, device)
    if problem is None:
        return Finding("quantization", True, f"quantization: {cfg.quantization} works on {device}")
    fallback = "8bit" if cfg.quantization == "4bit" and quantization_problem("8bit", device) is None else "none"
    cost = (
        "about twice the memory of 4bit"
        if fallback == "8bit"
        else "full precision: about 4x the memory of 4bit, 2x of 8bit"
    )
    return Finding(
        "quantization",
        False,
        f"model.quantization: {cfg.quantization} is not available on {device}: bitsandbytes {problem}. Use "
        f"model.quantization: {fallback} instead ({cost}), or install a bitsandbytes build with {cfg.quantization} "
        "support for this device (pip install -U bitsandbytes).",
    )


@functools.cache
def quantization_problem(kind: str, device: str) -> str | None:
    """None if bitsandbytes quantizes and runs a small layer of this kind on `device`; else what went wrong.

    Args:
        kind: "4bit" or "8bit".
        device: The torch device, e.g. "cpu" or "cuda".

    Returns:
        None, or the problem.
    """
    try:
        import bitsandbytes as bnb
        import torch
    except ImportError as exc:
        return f"cannot be imported ({exc})"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. 8-bit on CPU warns that it casts inputs; it still works
            if kind == "4bit":
                layer = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32, quant_type="nf4")
            else:
                layer = bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False)
            layer = layer.to(device)  # quantizes the weights
            with torch.no_grad():
                output = layer(torch.randn(2, 64, device=device))
        if not torch.isfinite(output).all():
            return f"{bnb.__version__} returned non-finite values from a {kind} test layer"
    except (
        Exception
    ) as exc:  # whatever bitsandbytes raises, it means the same here: this kind cannot run on this device
        return f"{bnb.__version__} failed a {kind} test layer ({type(exc).__name__}: {exc})"
    return None


# ---------------------------------------------------------------- context length


def check_context(cfg: RecipeConfig, facts: ModelFacts) -> Finding:
    """Whether `data.max_length` fits the model's context length.

    Args:
        cfg: The recipe.
        facts: What is known of the model.

    Returns:
        A Finding: ok, not ok (the run stops), or None when it cannot be checked here.
    """
    if facts.context is None:
        return Finding(
            "context",
            None,
            f"context: could not read the context length of `{cfg.model.source}` here; data.max_length not checked",
        )
    if cfg.data.max_length > facts.context:
        return Finding(
            "context",
            False,
            f"data.max_length ({cfg.data.max_length}) is longer than the context of `{cfg.model.source}` ({facts.context} "
            f"tokens): set data.max_length to {facts.context} or less.",
        )
    return Finding(
        "context", True, f"context: data.max_length {cfg.data.max_length} fits the model's {facts.context} tokens"
    )


# ---------------------------------------------------------------- disk space


def estimate_bytes(cfg: RecipeConfig, facts: ModelFacts) -> dict[str, int]:
    """What the run writes to its folder, by item; an upper estimate (adapter and optimizer state in float32).

    Args:
        cfg: The recipe.
        facts: What is known of the model (its parameter count).

    Returns:
        Item -> bytes; empty when the model's size is not known.
    """
    if facts.parameters is None:
        return {}
    # A rank-r adapter on a (d_in x d_out) layer has r(d_in + d_out) weights: at most 2r/hidden of the layer's own.
    share = min(1.0, 2 * cfg.lora.r / facts.hidden) if facts.hidden else 0.1
    adapter = int(facts.parameters * share) * 4
    # Each checkpoint: the adapter plus Adam's two moments. Kept: save_total_limit, the best one, and the one being
    # written before the oldest is deleted.
    estimate = {"checkpoints": 3 * adapter * (cfg.training.save_total_limit + 2), "adapter": adapter}
    if cfg.output.merge:
        dtype_bytes = _DTYPE_BYTES.get(cfg.output.merge_dtype, facts.dtype_bytes)
        estimate["merged model"] = facts.parameters * dtype_bytes
    return estimate


def check_disk(cfg: RecipeConfig, facts: ModelFacts) -> Finding:
    """Whether the run folder's disk has room for what the run writes (`estimate_bytes`).

    Args:
        cfg: The recipe.
        facts: What is known of the model.

    Returns:
        A Finding: ok, not ok (the run stops), or None when it cannot be checked here.
    """
    run_dir = cfg.run_dir.expanduser().resolve()
    volume = _existing_parent(run_dir)
    free = shutil.disk_usage(volume).free
    if cfg.output.overwrite and run_dir.is_dir():  # its space comes back before anything new is written
        free += sum(p.stat().st_size for p in run_dir.rglob("*") if p.is_file())
    estimate = estimate_bytes(cfg, facts)
    if not estimate:
        return Finding(
            "disk",
            None,
            f"disk: {_gb(free)} free in {volume}; the model's size is unknown here, so nothing was estimated",
        )
    if facts.conversion_bytes and facts.cache_dir is not None:
        cache = _existing_parent(facts.cache_dir)
        if os.stat(cache).st_dev == os.stat(volume).st_dev:
            estimate["one-time GGUF conversion"] = facts.conversion_bytes
        elif shutil.disk_usage(cache).free < facts.conversion_bytes:
            return Finding(
                "disk",
                False,
                f"disk: converting the GGUF model once needs about {_gb(facts.conversion_bytes)} in {facts.cache_dir}, "
                f"where {_gb(shutil.disk_usage(cache).free)} is free. Free some space there or set FINETUNE_CACHE to a larger disk.",
            )
    needed = sum(estimate.values())
    parts = ", ".join(f"{name} {_gb(size)}" for name, size in estimate.items())
    # 10% margin: the estimate leaves out logs, reports and the tokenizer files.
    if free < needed * 1.1:
        return Finding(
            "disk",
            False,
            f"disk: the run writes about {_gb(needed)} to {run_dir} ({parts}) but {volume} has {_gb(free)} free. Free "
            "some space, point output.dir at a larger disk, lower training.save_total_limit, or set output.merge: false.",
        )
    return Finding("disk", True, f"disk: about {_gb(needed)} needed ({parts}), {_gb(free)} free")


def _existing_parent(path: Path) -> Path:
    path = path.expanduser().resolve()
    while not path.exists():
        path = path.parent
    return path


def _gb(size: float) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"


# ---------------------------------------------------------------- model facts


def model_facts(cfg: ModelConfig) -> ModelFacts:
    """What the checks need to know about the model, read from its config or GGUF metadata without loading it.

    Args:
        cfg: The `model:` section.

    Returns:
        The ModelFacts (context length, parameter count, ...), None where it cannot be known offline.
    """
    source = model_source.resolve(cfg)
    if source.kind == "hub":
        return _hub_facts(cfg)
    folder = source.config_folder
    return _folder_facts(Path(folder)) if folder else _gguf_facts(source.gguf, model_source.cache_dir())


def _folder_facts(folder: Path) -> ModelFacts:
    from transformers import PretrainedConfig

    config, _ = PretrainedConfig.get_config_dict(str(folder))  # the raw dict: no model class, no remote code
    return _facts_from_config(config, _parameters_in(folder, config))


def _hub_facts(cfg: ModelConfig) -> ModelFacts:
    """A Hub model's config from the local cache (or the Hub when online); weights are never fetched here."""
    from transformers import PretrainedConfig

    try:
        config, _ = PretrainedConfig.get_config_dict(cfg.source, revision=cfg.revision)
    except (OSError, ValueError):  # offline and not cached, or no such repository: the model loader reports that
        return ModelFacts(context=None, parameters=None, hidden=None, dtype_bytes=4)
    return _facts_from_config(config, None)


def _facts_from_config(config: dict[str, Any], parameters: int | None) -> ModelFacts:
    text = config.get("text_config") or config  # multimodal configs nest the language model's settings
    context = next((text[key] for key in _CONTEXT_KEYS if isinstance(text.get(key), int)), None)
    hidden = next((text[key] for key in _HIDDEN_KEYS if isinstance(text.get(key), int)), None)
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "float32").removeprefix("torch.")
    return ModelFacts(context=context, parameters=parameters, hidden=hidden, dtype_bytes=_DTYPE_BYTES.get(dtype, 4))


def _parameters_in(folder: Path, config: dict[str, Any]) -> int | None:
    """Parameter count from the safetensors headers (shapes only), or from .bin sizes and the saved dtype."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if files:
        total = 0
        for file in files:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():
                    shape = handle.get_slice(name).get_shape()
                    total += functools.reduce(lambda a, b: a * b, shape, 1)
        return total
    binaries = list(folder.glob("*.bin"))
    if binaries:
        dtype = str(config.get("torch_dtype") or "float32")
        return sum(p.stat().st_size for p in binaries) // _DTYPE_BYTES.get(dtype, 4)
    return None


def _gguf_facts(gguf: Path, cache: Path) -> ModelFacts:
    """From the GGUF metadata (memory-mapped, nothing dequantized)."""
    from gguf import GGUFReader

    reader = GGUFReader(gguf)

    def field(name: str) -> Any:
        value = reader.fields.get(name)
        return value.contents() if value is not None else None

    arch = field("general.architecture")
    parameters = sum(int(tensor.n_elements) for tensor in reader.tensors)
    return ModelFacts(
        context=field(f"{arch}.context_length"),
        parameters=parameters,
        hidden=field(f"{arch}.embedding_length"),
        dtype_bytes=4,  # the conversion writes float32
        conversion_bytes=parameters * 4,
        cache_dir=cache,
    )
