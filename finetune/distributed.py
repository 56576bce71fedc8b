"""Multi-process runs through Accelerate: one process per device, data split between them, one writer.

Entry points: `launch(cli_args, num_processes)` re-runs a `finetune` command in N processes through Accelerate's
launcher (what `finetune run --num-processes N` does); `init()` joins the process group a launcher set up;
`on_main(fn)` runs file-writing work once and hands its result (or its error) to every process; `shard` and
`gather` split evaluation rows between processes and put the per-process results back together in order.

A plain single-process run goes through the same calls: they reduce to "run it here".
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object

from finetune.errors import FinetuneError, argument

if TYPE_CHECKING:
    from datasets import Dataset

T = TypeVar("T")
R = TypeVar("R", "Dataset", list)


def state() -> PartialState:
    """This process's rank, world size and device.

    Without CUDA, launched processes join one gloo group only when asked for the CPU explicitly; otherwise each
    believes it runs alone and trains on all the data. Transformers' TrainingArguments rebuilds the state the
    same way (`use_cpu=True`), so the group made here is the one the Trainer uses.
    """
    return PartialState(cpu=not torch.cuda.is_available())


def init() -> PartialState:
    """Join the launcher's process group (if any) and keep progress bars and info logs to the main process."""
    current = state()
    if current.num_processes > 1:
        # Leave the group before the interpreter tears down: a gloo process that exits with the group still up can
        # abort ("terminate called without an active exception") and fail a run whose work is done.
        atexit.register(_leave)
    if not current.is_main_process:
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    return current


def _leave() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def is_main() -> bool:
    """Whether this is the main process (always, in a single-process run).

    Returns:
        True on the main process.
    """
    return state().is_main_process


def weights_sharded() -> bool:
    """True in a run launched with an FSDP or DeepSpeed config (the launcher sets these variables for every process).

    Each process then holds a slice of the weights, gathered inside every forward pass: all processes must run
    the same forward passes together, and saving needs the slices put back together first.
    """
    return any(
        os.environ.get(name, "").lower() == "true" for name in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED")
    )


def launched() -> bool:
    """True inside a process started by `accelerate launch` or `torchrun` (they set WORLD_SIZE for every process)."""
    return "WORLD_SIZE" in os.environ


def on_main(fn: Callable[[], T]) -> T:
    """Run `fn` on the main process only; every process then returns its result, or raises its error.

    The other processes wait meanwhile, so nothing reads a file before it is written, and an error on the main
    process (a refused run folder, a failed merge check) stops every process instead of leaving them waiting.

    Args:
        fn: What to run, with no arguments.

    Returns:
        What `fn` returned on the main process.

    Raises:
        FinetuneError: On the main process, what `fn` raised; on the others, that the main process failed, with its
            message.
    """
    current = state()
    if current.num_processes == 1:
        return fn()
    outcome: list[Any] = [None, None]  # [result, error message]
    error: BaseException | None = None
    if current.is_main_process:
        try:
            outcome[0] = fn()
        except Exception as exc:  # re-raised below, after the other processes have heard of it
            error = exc
            outcome = [None, str(exc) or type(exc).__name__]
    result, message = broadcast_object_list(outcome, from_process=0)
    if error is not None:
        raise error
    if message is not None:
        raise FinetuneError(f"stopped because the main process failed: {message}")
    return result


def shard(rows: R) -> R:
    """This process's contiguous slice of `rows` (a Dataset or a list), so that `gather` puts per-row results back in order.

    Args:
        rows: A Dataset or a list.

    Returns:
        This process's slice; all of `rows` in a single-process run.
    """
    current = state()
    if current.num_processes == 1:
        return rows
    if isinstance(rows, list):  # the same slices as Dataset.shard(contiguous=True)
        size, extra = divmod(len(rows), current.num_processes)
        start = size * current.process_index + min(current.process_index, extra)
        return rows[start : start + size + (current.process_index < extra)]
    return rows.shard(num_shards=current.num_processes, index=current.process_index, contiguous=True)


def gather(items: list[T]) -> list[T]:
    """Every process's `items`, concatenated in process order, on every process.

    Args:
        items: This process's items (JSON- or pickle-able).

    Returns:
        Every process's items, in process order.
    """
    return gather_object(items) if state().num_processes > 1 else items


def launch(cli_args: list[str], num_processes: int) -> None:
    """Run `python -m finetune CLI_ARGS` in `num_processes` processes through Accelerate's launcher.

    One process per GPU with CUDA (NCCL); on a machine without one, CPU processes in a gloo group, which is how
    the tests check that N processes train like one. Accelerate's `--cpu` flag would start a single process.

    Args:
        cli_args: The finetune command line to run in each process (e.g. ["run", "recipe.yaml", "--set", ...]).
        num_processes: How many processes (at least 2; at most one per GPU).

    Raises:
        FinetuneError: `num_processes` is below 2 or above the number of GPUs, or a process failed.
    """
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    if num_processes < 2:
        raise FinetuneError(f"{argument('num_processes', num_processes)}: a multi-process run needs at least 2.")
    gpus = torch.cuda.device_count()
    if gpus and num_processes > gpus:
        raise FinetuneError(
            f"{argument('num_processes', num_processes)}: this machine has {gpus} GPU(s), and each process needs its own. "
            f"Use {argument('num_processes', gpus)} or fewer (and raise training.gradient_accumulation_steps to keep the global batch)."
        )
    # Every launcher setting is given, so Accelerate has nothing to guess and no saved `accelerate config` applies;
    # port 0 picks a free port, so two runs on one machine do not collide.
    args = launch_command_parser().parse_args(
        [
            "--multi_gpu",
            "--num_processes",
            str(num_processes),
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            "0",
            "-m",
            "finetune",
            *cli_args,
        ]
    )
    # One thread per process unless told otherwise: processes sharing cores slow each other down badly.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        launch_command(args)
    except ChildFailedError as exc:
        failed = ", ".join(
            f"rank {rank} ({f'exit code {failure.exitcode}' if failure.exitcode >= 0 else f'stopped by signal {-failure.exitcode}'})"
            for rank, failure in sorted(exc.failures.items())
        )
        raise FinetuneError(
            f"the {num_processes}-process run failed: {failed}. The processes' own errors are printed above."
        ) from exc
