"""llama.cpp (llama-cpp-python), always in a child process.

Entry points: `quantize_gguf`, `inspect_gguf` and `score_gguf`. llama.cpp is native code: a build that uses an
instruction the CPU refuses (AMX tiles from a -march=native build, on a virtual machine that does not allow them)
dies of SIGILL, a malformed file can crash it, and a large model can be killed for memory. In the caller's process
any of those would take the caller down (a user's notebook, the whole test run) with no message. In a child, the
death becomes one `FinetuneError` naming the signal, its likely cause and the fix, and the caller cleans up.

The child imports numpy and llama_cpp only (no torch), and the two sides exchange plain data through pickle files.
`run_in_child(function, request)` runs any module-level function of the form `function(request) -> result` that way.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.errors import FinetuneError

LLAMA_CPP_PIN = "llama-cpp-python==0.3.36"
# The build that runs on every x86-64 CPU with AVX2 (what `make install` does; see the Makefile for why).
PORTABLE_REBUILD = f'CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF" pip install --force-reinstall --no-deps --no-cache-dir {LLAMA_CPP_PIN}'
# GGUF types that llama.cpp's own quantizer writes (`llama-quantize`'s names), every quantized type export offers: the
# K-quant mixes choose a type per tensor (e.g. Q4_K_M keeps half of the attention values and feed-forward outputs at
# 6 bits), and every type keeps the output head at 6 bits or more, since every logit goes through it.
LLAMA_QUANTIZER_TYPES = {
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q5_1": "LLAMA_FTYPE_MOSTLY_Q5_1",
    "q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1",
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
}

_CAUSES = {
    signal.SIGILL: (
        "llama.cpp ran a CPU instruction this machine refuses. llama-cpp-python was built for another CPU (llama.cpp "
        "builds with -march=native by default; AMX and AVX-512 instructions from such a build die on CPUs or virtual "
        f"machines without them). Rebuild it portably: {PORTABLE_REBUILD}"
    ),
    signal.SIGKILL: (
        "the process was killed from outside, most often by the out-of-memory killer. Free memory (close other "
        "programs), or export a smaller type; `dmesg` names the killer."
    ),
    signal.SIGSEGV: (
        "llama.cpp crashed reading or running the file: the file may hold something this llama.cpp cannot read, or "
        f"the build is broken. Reinstall it ({PORTABLE_REBUILD}) and report the file if it still happens."
    ),
}
_CAUSES[signal.SIGBUS] = _CAUSES[signal.SIGSEGV]
_CAUSES[signal.SIGABRT] = (
    "llama.cpp stopped on an internal assertion (GGML_ASSERT): the file or its settings are outside what it supports."
)


class ChildFailed(FinetuneError):
    """llama.cpp's child process died (a signal) or raised; the message names which, the cause and the fix."""


def run_in_child(function: Callable[[Any], Any], request: Any, *, what: str, timeout: float | None = None) -> Any:
    """`function(request)` in a fresh Python process; its return value, or `ChildFailed` naming `what` was running.

    `function` must be a module-level function importable by the child (it is found by module and name).

    Args:
        function: A module-level function taking one argument.
        request: Its argument (picklable).
        what: What is running, for error messages.
        timeout: Seconds before the child is stopped; None for no limit.

    Returns:
        What `function` returned.

    Raises:
        ChildFailed: The child timed out, died by a signal, raised, or llama-cpp-python is not installed.
    """
    target = f"{function.__module__}:{function.__qualname__}"
    with tempfile.TemporaryDirectory(prefix="finetune-llama-cpp-") as folder:
        request_file, response_file = Path(folder, "request.pkl"), Path(folder, "response.pkl")
        request_file.write_bytes(pickle.dumps(request))
        # The child sees the modules this process sees (an editable install, the tests package, a script's folder).
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        command = [sys.executable, "-m", __name__, target, str(request_file), str(response_file)]
        try:
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise ChildFailed(f"{what}: llama.cpp did not finish within {timeout:.0f} s; it was stopped.") from exc
        if done.returncode < 0:
            raise ChildFailed(_signal_message(what, -done.returncode, done.stderr))
        if not response_file.is_file():
            tail = _tail(done.stderr)
            raise ChildFailed(
                f"{what}: the llama.cpp process exited with status {done.returncode} and no result.{tail}"
            )
        outcome = pickle.loads(response_file.read_bytes())
    if outcome["error"] is not None:
        kind, message = outcome["error"]
        if kind == "ModuleNotFoundError" and "llama_cpp" in message:
            raise ChildFailed(f"{what} needs llama.cpp ({LLAMA_CPP_PIN}): pip install 'finetune[export]'.")
        raise ChildFailed(f"{what}: {kind}: {message}")
    return outcome["result"]


def _signal_message(what: str, number: int, stderr: str) -> str:
    try:
        received = signal.Signals(number)
    except ValueError:
        return f"{what}: the llama.cpp process died of signal {number}.{_tail(stderr)}"
    cause = _CAUSES.get(received, "llama.cpp crashed.")
    return f"{what}: the llama.cpp process died of {received.name} ({signal.strsignal(received)}). Likely cause: {cause}{_tail(stderr)}"


def _tail(stderr: str, lines: int = 5) -> str:
    kept = [line for line in stderr.strip().splitlines() if line.strip()][-lines:]
    return ("\nIts last output:\n  " + "\n  ".join(kept)) if kept else ""


def _child_main(target: str, request_file: str, response_file: str) -> None:
    import importlib

    module, name = target.split(":")
    try:
        request = pickle.loads(Path(request_file).read_bytes())
        outcome = {"result": getattr(importlib.import_module(module), name)(request), "error": None}
    except Exception as exc:  # noqa: BLE001 - every failure goes back to the parent, which raises it as FinetuneError
        outcome = {"result": None, "error": (type(exc).__name__, str(exc))}
    partial = Path(response_file + ".partial")
    partial.write_bytes(pickle.dumps(outcome))
    os.replace(partial, response_file)  # a child killed while writing leaves no response, never half of one


# ---------------------------------------------------------------------------------------------- what runs in llama.cpp


@dataclass(frozen=True)
class Inspection:
    """What llama.cpp made of a GGUF file (and LoRA adapter) on some prompts."""

    tokens: list[list[int]]  # each prompt's text tokenized by llama.cpp (special tokens parsed, no BOS added)
    last_logits: list[Any]  # float32 numpy array per prompt: the logits after its last token
    replies: list[list[int]]  # greedy replies, each ending at an end-of-generation token or at max_new_tokens
    reply_ended: list[bool]  # whether each reply's last token is one llama.cpp ends generation at
    stop_is_end_of_generation: bool  # llama.cpp ends generation at the template's end-of-turn token


def inspect_gguf(
    model: Path,
    *,
    lora: Path | None,
    prompts: list[str],
    ids: list[list[int]],
    stop_id: int,
    max_new_tokens: int,
    what: str = "GGUF export check in llama.cpp",
) -> Inspection:
    """Load `model` (with the `lora` adapter GGUF) in llama.cpp and, for each prompt, tokenize its text, take the
    logits after its token `ids` and generate a greedy reply; all in a child process.

    Args:
        model: The GGUF model file.
        lora: A LoRA adapter GGUF to apply; None for none.
        prompts: The prompts' text.
        ids: Each prompt's token ids as transformers tokenizes it.
        stop_id: The token that ends a reply.
        max_new_tokens: The longest reply.
        what: What is running, for error messages.

    Returns:
        The Inspection: llama.cpp's tokens, last logits and replies per prompt.

    Raises:
        ChildFailed: llama.cpp failed (see `run_in_child`).
    """
    request = {
        "model": str(model),
        "lora": str(lora) if lora else None,
        "prompts": prompts,
        "ids": ids,
        "stop_id": stop_id,
        "max_new_tokens": max_new_tokens,
    }
    return Inspection(**run_in_child(_inspect, request, what=what))


def quantize_gguf(source: Path, target: Path, quant: str, *, what: str = "GGUF quantization in llama.cpp") -> None:
    """llama.cpp's own quantizer (`llama-quantize`): `source` (a float GGUF) to `target` as `quant`.

    Args:
        source: A float (f16/bf16/f32) GGUF file.
        target: The GGUF file to write.
        quant: A llama.cpp type (LLAMA_QUANTIZER_TYPES: q6_k, q5_k_m, q4_k_m, ...).
        what: What is running, for error messages.

    Raises:
        FinetuneError: `quant` is not a llama.cpp quantizer type.
        ChildFailed: llama.cpp failed (see `run_in_child`).
    """
    if quant not in LLAMA_QUANTIZER_TYPES:
        raise FinetuneError(f"llama.cpp quantization to {quant!r}: choose one of {', '.join(LLAMA_QUANTIZER_TYPES)}.")
    run_in_child(_quantize, {"source": str(source), "target": str(target), "quant": quant}, what=what)


def score_gguf(
    model: Path, rows: list[tuple[list[int], list[int]]], *, what: str = "scoring in llama.cpp"
) -> tuple[float, int]:
    """Summed negative log-likelihood of the labelled next tokens (label -100 = not scored) of each (input_ids,
    labels) row under `model` in llama.cpp, and how many tokens that was.

    Args:
        model: The GGUF model file.
        rows: (input_ids, labels) pairs.
        what: What is running, for error messages.

    Returns:
        (summed negative log-likelihood, number of scored tokens).

    Raises:
        ChildFailed: llama.cpp failed (see `run_in_child`).
    """
    return run_in_child(_score, {"model": str(model), "rows": rows}, what=what)


def _llama_cpp() -> Any:
    """The llama_cpp module, or an error that says why it cannot be used and how to fix that."""
    try:
        import llama_cpp
    except ModuleNotFoundError:
        raise  # the parent turns this into the install command
    except (OSError, ImportError) as exc:  # installed, but its native library does not load
        raise RuntimeError(
            f"llama-cpp-python is installed but its native library does not load ({exc}). Reinstall it: {PORTABLE_REBUILD}"
        ) from exc
    return llama_cpp


def _open(model: str, lora: str | None, n_ctx: int) -> Any:
    llama_cpp = _llama_cpp()
    try:
        return llama_cpp.Llama(
            model_path=model,
            lora_path=lora,
            n_ctx=n_ctx,
            n_threads=1,
            n_batch=min(512, n_ctx),
            seed=0,
            logits_all=True,  # else llama.cpp keeps no logits to compare
            verbose=False,
        )
    except Exception as exc:  # noqa: BLE001 - the parent reports it as the load failing
        raise RuntimeError(f"llama.cpp could not load {Path(lora or model).name} ({exc})") from exc


def _inspect(request: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    llama_cpp = _llama_cpp()
    ids, max_new_tokens = request["ids"], request["max_new_tokens"]
    llm = _open(request["model"], request["lora"], max(len(p) for p in ids) + max_new_tokens + 8)
    try:
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        tokens = [llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) for text in request["prompts"]]
        last_logits = []
        for prompt in ids:
            llm.reset()
            llm.eval(prompt)
            last_logits.append(np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32))
        replies, ended = [], []
        for prompt in ids:
            reply: list[int] = []
            for token in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
                reply.append(int(token))
                if llama_cpp.llama_vocab_is_eog(vocab, token) or len(reply) >= max_new_tokens:
                    break
            replies.append(reply)
            ended.append(bool(reply) and bool(llama_cpp.llama_vocab_is_eog(vocab, reply[-1])))
        stop = bool(llama_cpp.llama_vocab_is_eog(vocab, request["stop_id"]))
    finally:
        llm.close()
    return {
        "tokens": tokens,
        "last_logits": last_logits,
        "replies": replies,
        "reply_ended": ended,
        "stop_is_end_of_generation": stop,
    }


def _quantize(request: dict[str, Any]) -> None:
    llama_cpp = _llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, LLAMA_QUANTIZER_TYPES[request["quant"]])
    params.nthread = max(1, len(os.sched_getaffinity(0)))
    status = llama_cpp.llama_model_quantize(request["source"].encode(), request["target"].encode(), params)
    if status != 0:
        raise RuntimeError(f"llama_model_quantize returned {status} for {Path(request['source']).name}")


def _score(request: dict[str, Any]) -> tuple[float, int]:
    import numpy as np

    rows = request["rows"]
    llm = _open(request["model"], None, max(len(ids) for ids, _ in rows) + 8)
    total, count = 0.0, 0
    try:
        for input_ids, labels in rows:
            llm.reset()
            llm.eval(input_ids)
            logits = np.asarray(llm.scores[: len(input_ids)], dtype=np.float64)[:-1]
            targets = np.asarray(labels[1:])
            keep = targets != -100
            scored, targets = logits[keep], targets[keep]
            peak = scored.max(axis=1, keepdims=True)
            log_norm = np.log(np.exp(scored - peak).sum(axis=1)) + peak[:, 0]
            total += float((log_norm - scored[np.arange(len(targets)), targets]).sum())
            count += int(keep.sum())
    finally:
        llm.close()
    return total, count


if __name__ == "__main__":
    _child_main(*sys.argv[1:4])
