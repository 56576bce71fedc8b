"""Shared pieces of the benchmarks: the machine's description, its measured matmul rate, peak memory of a phase,
the plain TRL script every comparison runs against (`plain_trl_trainer`),
and writing results as JSON plus a Markdown table under benchmarks/results/."""

from __future__ import annotations

import json
import os
import platform
import resource
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def machine() -> dict[str, Any]:
    """CPU model, cores, memory, library versions and GPU, so a result says where it was measured."""
    import psutil
    import transformers
    import trl

    from finetune.precision import cpu_description

    cpu, native_bf16 = cpu_description()
    info = {
        "cpu": cpu,
        "native_bf16": list(native_bf16),  # the CPU's bf16 flags: where `compute_dtype: auto` may pick bf16
        "cores": psutil.cpu_count(logical=False) or os.cpu_count(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(psutil.virtual_memory().total / 1024**3, 1),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info


def matmul_tflops(dtype: torch.dtype, device: str, size: int = 1024, seconds: float = 1.0) -> float:
    """Best sustained (size x size) @ (size x size) rate in TFLOP/s: the physical limit utilisation is measured against."""
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        _sync(device)
        start = time.perf_counter()
        for _ in range(10):
            torch.mm(a, b)
        _sync(device)
        best = max(best, 10 * 2 * size**3 / (time.perf_counter() - start))
    return best / 1e12


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class PeakMemory:
    """Peak resident memory (and peak CUDA memory) of chosen phases of a process.

    On Linux, writing 5 to /proc/self/clear_refs resets the kernel's high-water mark (VmHWM), so a phase's
    peak excludes model loading before it; `pause()`/`resume()` leave out phases such as validation.
    """

    def __init__(self) -> None:
        self.peak_rss = 0
        self.peak_cuda = 0
        self.resume()

    def resume(self) -> None:
        clear = Path("/proc/self/clear_refs")
        if clear.exists():
            clear.write_text("5")
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def pause(self) -> None:
        self.peak_rss = max(self.peak_rss, _rss_high_water_mark())
        if torch.cuda.is_available():
            self.peak_cuda = max(self.peak_cuda, torch.cuda.max_memory_allocated())


def _rss_high_water_mark() -> int:
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux; no reset possible


def write(name: str, payload: dict[str, Any], markdown: str, out: Path = RESULTS) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{name}.json", out / f"{name}.md"
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    md_path.write_text(markdown)
    return json_path, md_path


def machine_markdown(info: dict[str, Any]) -> str:
    gpu = info["gpu"] or "none"
    return (
        f"Machine: {info['cpu']} (bf16 flags: {', '.join(info.get('native_bf16', [])) or 'none'}), {info['cores']} cores ({info['torch_threads']} torch threads), {info['memory_gib']} GiB RAM, "
        f"GPU: {gpu}; load average at start {info['load_average_1min']}. Python {info['python']}, torch {info['torch']}, "
        f"transformers {info['transformers']}, TRL {info['trl']}."
    )


def plain_trl_trainer(
    source: Any,
    messages: list[list[dict[str, str]]],
    output_dir: Path,
    *,
    quantization: str,
    max_steps: int,
    batch_size: int,
    learning_rate: float,
    lr_scheduler: str,
    warmup_steps: int,
    max_length: int,
    lora_r: int,
    lora_alpha: float,
    lora_dropout: float,
    seed: int,
    callbacks: tuple[Any, ...] = (),
) -> Any:
    """The plain script the benchmarks compare against: TRL's SFTTrainer given a model path, a `messages` dataset
    and a peft LoraConfig, as TRL's documentation writes it. Everything not passed is TRL's default (gradient
    checkpointing on, padding per batch, no packing, loss on every token since SmolLM2's template has no
    `{% generation %}` markers for `assistant_only_loss`). `source` is a resolved model source
    (`finetune.model_source.resolve`); a GGUF file is read from the library's cached conversion."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    from finetune import models

    on_cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if on_cuda else torch.float32
    init: dict[str, Any] = {"dtype": dtype}
    if quantization == "4bit":
        init["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )
    elif quantization == "8bit":
        init["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    return SFTTrainer(
        model=models.weights_path(source),
        args=SFTConfig(
            output_dir=str(output_dir),
            max_steps=max_steps,
            per_device_train_batch_size=batch_size,
            learning_rate=learning_rate,
            lr_scheduler_type=lr_scheduler,
            warmup_steps=warmup_steps,
            max_length=max_length,
            logging_steps=max_steps,
            save_strategy="no",
            report_to="none",
            seed=seed,
            use_cpu=not on_cuda,
            bf16=on_cuda,
            model_init_kwargs=init,
        ),
        train_dataset=Dataset.from_dict({"messages": messages}),
        peft_config=LoraConfig(
            r=lora_r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        ),
        callbacks=list(callbacks),
    )
