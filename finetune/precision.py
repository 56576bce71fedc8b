"""Which dtype a model computes in: `model.compute_dtype`, and on CPU what `auto` resolves to.

On a GPU `auto` is bfloat16 (float16 where the GPU has no bf16). On CPU it is bfloat16 only where the CPU computes
bf16 natively and a short matmul probe shows it is faster: Intel Xeons with AMX run torch's bf16 matmul at about 10x
float32, AMD Zen 4 (AVX512-BF16, no AMX) at 2.2x, and a CPU without either emulates bf16, slower than float32. The
probe runs once per machine (about a second) and is cached in the finetune cache folder, keyed by CPU model, flags,
threads and torch version, so every run, `finetune eval`, `chat` and `serve` on the machine make the same choice.

On CPU `auto` picks bf16 only for a 4-bit or 8-bit base (`choose_compute_dtype` says why). Training in bf16 on CPU
is mixed precision: the quantized layers' products run in bf16 under `torch.autocast("cpu", bfloat16)`, while the
other weights, the output layer (so the logits) and the LoRA weights with their optimizer state stay float32
(`keep_output_layer_float32`, `training.trainer.Float32Adapters`); evaluation and generation run under the same
autocast (`autocast_like`), and merging still writes the base checkpoint's dtype.

Entry points: `choose_compute_dtype(setting)` (a `DtypeChoice`: the dtype and why) and `autocast(dtype)`.
"""

from __future__ import annotations

import contextlib
import json
import platform
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from finetune import model_source

# bf16 must beat float32 by this much on the probe's matmuls before auto picks it. The step speeds up less than the
# matmul (norms, attention softmax, the loss and the optimizer stay float32-bound): on an AMD EPYC (Zen 4) with a
# 2.2x bf16 matmul, a SmolLM2-135M LoRA step (4 x 256 tokens, one thread) ran 1.45x faster in 4-bit and 1.78x
# unquantized; a CPU whose bf16 matmul gains less than 1.5x would gain little and lose float32's precision.
MIN_MATMUL_SPEEDUP = 1.5
# CPU flags (Linux /proc/cpuinfo) for bf16 arithmetic in hardware; without them torch emulates bf16 in float32.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# SmolLM2-135M's projection shapes for a batch of 512 tokens: the matmuls LoRA training spends most of its time in.
_PROBE_SHAPES = ((512, 576, 1536), (512, 1536, 576))
_PROBE_SECONDS = 0.25  # per shape and dtype, after a warm-up


@dataclass(frozen=True)
class MatmulProbe:
    """torch's float32 and bf16 matmul rates on this CPU, as measured once and cached.

    Attributes:
        cpu: The CPU's model name.
        native_bf16: The CPU flags for native bf16 arithmetic it reports (empty: none).
        threads: torch's intra-op threads during the probe.
        torch_version: The torch that was measured.
        float32_gflops: Float32 matmul rate (GFLOP/s) over the probe's shapes.
        bfloat16_gflops: Bf16 matmul rate (GFLOP/s) over the same shapes.
    """

    cpu: str
    native_bf16: tuple[str, ...]
    threads: int
    torch_version: str
    float32_gflops: float
    bfloat16_gflops: float

    @property
    def speedup(self) -> float:
        return self.bfloat16_gflops / self.float32_gflops


@dataclass(frozen=True)
class DtypeChoice:
    """The dtype a model computes in and why, as a run prints it.

    Attributes:
        dtype: The compute dtype.
        reason: Why: the setting, or what the probe measured.
    """

    dtype: torch.dtype
    reason: str

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def cpu_description() -> tuple[str, tuple[str, ...]]:
    """The CPU's model name and the native-bf16 flags it reports (Linux; elsewhere the processor name and none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine(), ()
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "")
    flags_line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    flags = set(flags_line.split(":", 1)[-1].split())
    return name or platform.machine(), tuple(flag for flag in NATIVE_BF16_FLAGS if flag in flags)


def measure_matmuls() -> MatmulProbe:
    """Time torch's float32 and bf16 matmuls on the probe's shapes, with torch's current threads.

    Returns:
        MatmulProbe: Both rates, with the CPU they were measured on.
    """
    cpu, native = cpu_description()
    rates = {}
    generator = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        flops, seconds = 0.0, 0.0
        for m, k, n in _PROBE_SHAPES:
            a = torch.randn(m, k, generator=generator).to(dtype)
            b = torch.randn(k, n, generator=generator).to(dtype)
            a @ b  # warm-up: the first call picks and builds the kernel
            started, calls = time.perf_counter(), 0
            while time.perf_counter() - started < _PROBE_SECONDS:
                a @ b
                calls += 1
            seconds += time.perf_counter() - started
            flops += 2.0 * m * k * n * calls
        rates[dtype] = flops / seconds / 1e9
    return MatmulProbe(
        cpu=cpu,
        native_bf16=native,
        threads=torch.get_num_threads(),
        torch_version=torch.__version__,
        float32_gflops=round(rates[torch.float32], 1),
        bfloat16_gflops=round(rates[torch.bfloat16], 1),
    )


def cached_probe(cache: Path | None = None) -> MatmulProbe:
    """The matmul probe of this machine: read from the cache when the CPU, its flags, the thread count and torch
    are the ones measured, else measured now and cached.

    Args:
        cache: The cache file (default: cpu_matmul_probe.json in the finetune cache folder, $FINETUNE_CACHE).

    Returns:
        MatmulProbe: The (cached) measurement.
    """
    path = cache or model_source.cache_dir() / "cpu_matmul_probe.json"
    cpu, native = cpu_description()
    key = {"cpu": cpu, "native_bf16": list(native), "threads": torch.get_num_threads(), "torch": torch.__version__}
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        entry = json.loads(path.read_text())
        if entry["key"] == key:
            probe = entry["probe"]
            return MatmulProbe(**{**probe, "native_bf16": tuple(probe["native_bf16"])})
    probe = measure_matmuls()
    with contextlib.suppress(OSError):  # a read-only cache only costs the next run another second
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        partial.write_text(json.dumps({"key": key, "probe": asdict(probe)}, indent=1))
        partial.replace(path)
    return probe


def choose_compute_dtype(
    setting: str, *, quantization: str = "4bit", cuda: bool | None = None, probe: MatmulProbe | None = None
) -> DtypeChoice:
    """What `model.compute_dtype` resolves to here.

    On CPU, `auto` keeps an unquantized base in float32: bf16 would store the base's own weights rounded to 8
    significant bits, and a tied output layer in bf16 computes the logits in bf16 (Gemma 3 270M's chatml run then
    ran past `<|im_end|>`). A 4-bit or 8-bit base keeps its other weights and its output layer in float32 and only
    multiplies in bf16, at the quality of float32 (docs/performance.md#bf16-on-cpu).

    Args:
        setting: The `model.compute_dtype` value: auto, float32, bfloat16 or float16.
        quantization: The `model.quantization` value: none, 8bit or 4bit.
        cuda: Whether the model runs on a CUDA device (default: whether one is available).
        probe: The CPU's matmul probe (default: `cached_probe()`, measured when needed; only read for auto on CPU).

    Returns:
        DtypeChoice: The dtype and the reason, e.g. `bfloat16 (auto: bf16 matmul 2.2x float32's on this CPU ...)`.
    """
    if setting != "auto":
        return DtypeChoice(getattr(torch, setting), f"model.compute_dtype: {setting}")
    if cuda if cuda is not None else torch.cuda.is_available():
        if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
            return DtypeChoice(torch.float16, "auto: this GPU has no bf16")
        return DtypeChoice(torch.bfloat16, "auto: GPU")
    if quantization == "none":
        return DtypeChoice(torch.float32, "auto: an unquantized base computes in float32 on CPU")
    probe = probe or cached_probe()
    measured = (
        f"bf16 matmul {probe.speedup:.1f}x float32's on this CPU ({probe.bfloat16_gflops:.0f} vs "
        f"{probe.float32_gflops:.0f} GFLOP/s, {probe.threads} threads"
    )
    if not probe.native_bf16:
        return DtypeChoice(torch.float32, f"auto: this CPU has no native bf16 ({' or '.join(NATIVE_BF16_FLAGS)})")
    if probe.speedup < MIN_MATMUL_SPEEDUP:
        return DtypeChoice(torch.float32, f"auto: {measured}), under the {MIN_MATMUL_SPEEDUP}x worth its precision")
    return DtypeChoice(torch.bfloat16, f"auto: {measured}, {', '.join(probe.native_bf16)}); LoRA weights float32")


@contextlib.contextmanager
def autocast(dtype: torch.dtype, device_type: str = "cpu") -> Iterator[None]:
    """Run the block's matmuls in `dtype` as training does (mixed precision); float32 runs it unchanged.

    Args:
        dtype: The compute dtype (`choose_compute_dtype(...).dtype`).
        device_type: "cpu" or "cuda".
    """
    if dtype == torch.float32:
        yield
        return
    with torch.autocast(device_type, dtype=dtype):
        yield


def loaded_dtype(model: torch.nn.Module) -> torch.dtype:
    """The compute dtype a model was loaded with (`models.load_model` passes it; its config records it).

    Args:
        model: A transformers model, a peft model included.

    Returns:
        The dtype in its config, float32 when none is recorded.
    """
    dtype = model.config.dtype
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return dtype or torch.float32


def autocast_like(model: torch.nn.Module) -> contextlib.AbstractContextManager[None]:
    """`autocast` in the dtype `model` was loaded to compute in, on its device: evaluation and generation compute
    as training did.

    Args:
        model: A transformers model, a peft model included.

    Returns:
        The context manager.
    """
    return autocast(loaded_dtype(model), next(model.parameters()).device.type)


def keep_output_layer_float32(model: torch.nn.Module) -> None:
    """Compute a quantized model's output layer (the logits) in float32 even under bf16 autocast.

    bf16 keeps 8 significant bits: at logits of 16-32 its step is 0.125, enough to swap a greedy choice or to drown
    the margin a few training steps give a newly added end-of-turn token (SFT then DPO on SmolLM2 left held-out
    preference accuracy unchanged with bf16 logits and raised it with float32 ones). The model's unquantized weights
    (embeddings, norms, the output layer) become float32, as peft's prepare_model_for_kbit_training makes them for
    training, so evaluation and serving compute what training computed; only the quantized layers' matrix products
    run in bf16. transformers and peft call the output module, so its forward is wrapped in place (a replacement
    module would rename the weights that adapters and merging refer to).

    Args:
        model: A transformers causal LM with 4-bit or 8-bit layers, before peft wraps it.
    """
    from bitsandbytes.nn import Params4bit

    for parameter in model.parameters():  # not the packed 4-bit weights, whatever dtype they are packed in
        if parameter.dtype in (torch.bfloat16, torch.float16) and not isinstance(parameter, Params4bit):
            parameter.data = parameter.data.float()
    head = model.get_output_embeddings()
    plain_forward = head.forward

    def forward_in_float32(hidden: torch.Tensor) -> torch.Tensor:
        with torch.autocast(hidden.device.type, enabled=False):
            return plain_forward(hidden.float())

    head.forward = forward_in_float32
