"""A loaded chat model: one base, optionally several LoRA adapters over it, each reachable by a public name.

Entry point: `load_chat_model(target, adapters)` resolves a run folder, model folder, .gguf file, bundled alias or Hub
id (plus LoRA adapters over the same base); `ChatModel.complete` generates one reply.
"""

from __future__ import annotations

import textwrap
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import torch
from peft import PeftModel
from transformers import (
    AsyncTextIteratorStreamer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
)

from finetune import models, precision
from finetune.adapters import add_trained, load_trained
from finetune.config import ModelConfig, Quantization, choices
from finetune.data import end_of_turn_ids, render_prompt
from finetune.errors import FinetuneError, argument
from finetune.generation import DecodingSettings, generate_kwargs
from finetune.run_folder import RunFolder, is_adapter
from finetune.serving.tool_calls import ToolCallFormat, tool_call_format


@dataclass(frozen=True)
class Completion:
    """One generated reply.

    Attributes:
        text: The reply, special tokens removed.
        prompt_tokens: Tokens in the prompt.
        completion_tokens: Tokens generated.
        finish_reason: "stop" when the reply reached the end-of-turn token, "length" when it ran out of tokens.
        token_ids: The reply's tokens, the end-of-turn token included when reached.
    """

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: Literal["stop", "length"]
    token_ids: tuple[int, ...] = ()  # the reply's tokens, end-of-turn token included when reached


class _Cancelled(StoppingCriteria):
    """Ends a generation once its requester has gone (closed stream, Ctrl-C), so the next request need not wait."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


@dataclass
class ChatModel:
    """One loaded base model, optionally with several LoRA adapters over it, each reachable by a public name."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    variants: dict[str, str | None]  # public name -> peft adapter name; None is the model without any adapter
    default: str
    # Held while the model runs: complete() switches the active adapter, which the server's batcher must not see.
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def context_length(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)

    @cached_property
    def tool_format(self) -> ToolCallFormat | None:
        """How this model's chat template writes tool calls (None: it does not)."""
        return tool_call_format(self.tokenizer)

    @contextmanager
    def _variant(self, adapter: str | None) -> Iterator[None]:
        if adapter is not None:
            self.model.set_adapter(adapter)
            yield
        elif isinstance(self.model, PeftModel):
            with self.model.disable_adapter():  # the base shares its weights with the adapters: bypass LoRA this once
                yield
        else:
            yield

    def prompt_ids(self, messages: list[dict[str, Any]], tools: str = "") -> list[int]:
        """The conversation (and tools, as JSON text) rendered with the model's own chat template exactly as
        training rendered prompts, ready for the assistant's turn.

        Args:
            messages: The conversation so far (OpenAI-style messages).
            tools: The tools as JSON text ("" for none).

        Returns:
            The prompt's token ids.

        Raises:
            FinetuneError: The chat template rejects the conversation.
        """
        text = render_prompt(self.tokenizer, messages, tools)  # a template that rejects it raises FinetuneError
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @torch.inference_mode()
    def complete(
        self,
        name: str,
        prompt_ids: list[int],
        decoding: DecodingSettings,
        *,
        streamer: TextIteratorStreamer | AsyncTextIteratorStreamer | None = None,
        cancel: threading.Event | None = None,
    ) -> Completion:
        """Generate one reply with variant `name`, decoded as `finetune.generation.generate_kwargs` says (the
        model's own sampling settings, the user's, the repetition guard). One call at a time: the active adapter is
        state on the model (held under `lock`); the server batches requests with `finetune.serving.batching`.

        Args:
            name: The variant to reply with (a key of `variants`).
            prompt_ids: The prompt's token ids (`prompt_ids`).
            decoding: How to decode.
            streamer: Receives the reply's text as it is generated; None for none.
            cancel: Set it to stop the reply at the next token; None for none.

        Returns:
            The Completion: text, token counts, finish reason ("stop" at the end-of-turn token, else "length").
        """
        if cancel is not None and cancel.is_set():  # the requester left while this waited in the queue
            return Completion("", len(prompt_ids), 0, "stop")
        adapter = self.variants[name]
        input_ids = torch.tensor([prompt_ids], device=self.model.device)
        try:
            with self.lock, self._variant(adapter), precision.autocast_like(self.model):
                output = self.model.generate(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    streamer=streamer,
                    stopping_criteria=StoppingCriteriaList([_Cancelled(cancel)]) if cancel else None,
                    **generate_kwargs(decoding, self.model.generation_config, prompt_length=len(prompt_ids)),
                )
        except BaseException:
            if streamer is not None:
                streamer.end()  # wakes the reader, which would otherwise wait for text forever
            raise
        reply = output[0, len(prompt_ids) :].tolist()
        eos = self.model.generation_config.eos_token_id
        stops = {eos} if isinstance(eos, int) else set(eos or [])
        finish = "stop" if reply and reply[-1] in stops else "length"
        text = self.tokenizer.decode(reply, skip_special_tokens=True)
        return Completion(text, len(prompt_ids), len(reply), finish, tuple(reply))


def load_chat_model(
    target: str | Path,
    adapters: Sequence[str | Path] = (),
    *,
    quantization: str = "none",
    compute_dtype: str | None = None,
) -> ChatModel:
    """Load what `target` names, ready to chat.

    target: a run folder (runs/NAME) serves its merged/ model, or the recipe's base plus its adapter/ when there is
    no merged/ or when `adapters` are given; otherwise a model folder, .gguf file, bundled alias or Hub id.
    adapters: LoRA adapters over the same base, each `PATH` or `NAME=PATH`, PATH an adapter folder or a run folder.
    Public names: the run folder's name, each adapter's name and, when adapters are loaded, the base's name.

    Raises:
        FinetuneError: unknown quantization, a run folder without weights, a missing or mismatched adapter.

    Args:
        target: A run folder, model folder, .gguf file, bundled alias or Hub id.
        adapters: LoRA adapters to serve beside it, each `PATH` or `NAME=PATH`.
        quantization: Load the base as "none", "8bit" or "4bit".
        compute_dtype: "auto", "float32", "bfloat16" or "float16"; None: what a run folder's recipe ran with, else
            auto (finetune.precision). Greedy replies of batched serving equal one-at-a-time generation token for
            token in float32; in bf16 a near tie can fall either way with the batch's rounding.

    Returns:
        The ChatModel: model, tokenizer and the variants by public name.
    """
    if quantization not in choices(Quantization):
        raise FinetuneError(f"{argument('quantization', quantization)}: use one of {', '.join(choices(Quantization))}.")
    run = RunFolder(Path(target).expanduser())
    named = [_named_adapter(str(spec)) for spec in adapters]
    if run.has_recipe():
        recipe_model = run.read_config().model.model_copy(update={"quantization": quantization})
        if compute_dtype is not None:
            recipe_model = recipe_model.model_copy(update={"compute_dtype": compute_dtype})
        if not named and run.has_merged():
            base_cfg = recipe_model.model_copy(update={"source": str(run.merged), "revision": None})
            base_name = run.path.name
        elif run.has_adapter():
            # Other adapters were trained on the base, not on this run's merge of it: serve all over the base.
            base_cfg, base_name = recipe_model, _display_name(recipe_model.source)
            named.insert(0, (run.path.name, run.adapter))
        else:
            raise FinetuneError(
                f"{run.path}: a run folder with neither merged/ nor adapter/ in it; the run did not finish. "
                f"Run its recipe ({run.recipe}) again with output.overwrite: true."
            )
    else:
        base_cfg = ModelConfig(source=str(target), quantization=quantization, compute_dtype=compute_dtype or "auto")
        base_name = _display_name(str(target))
    names = [base_name, *(name for name, _ in named)]
    duplicate = next((name for name in names if names.count(name) > 1), None)
    if duplicate:
        raise FinetuneError(f"two models would both be named `{duplicate}`; name adapters explicitly with NAME=PATH.")

    with_tokenizer = next((folder for _, folder in named if (folder / "tokenizer_config.json").is_file()), None)
    tokenizer = models.load_tokenizer(base_cfg, folder=with_tokenizer)  # the adapter's copy has the trained template
    model = models.load_model(base_cfg)
    if not named:
        models.fit_vocabulary(model, tokenizer)  # a template's turn markers the base lacks (chatml on a base model)
    models.configure_generation(model, tokenizer, end_of_turn_ids(tokenizer))
    variants: dict[str, str | None] = {base_name: None}
    for index, (name, folder) in enumerate(named):
        adapter = f"adapter{index}"  # peft adapter names become module keys, which may not contain dots
        try:
            if index == 0:
                model = load_trained(model, tokenizer, folder, adapter_name=adapter)
            else:
                add_trained(model, folder, adapter_name=adapter)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise FinetuneError(
                f"adapter `{name}` ({folder}) does not fit the base `{base_cfg.source}`: {textwrap.shorten(str(exc), 300)}. "
                "Serve together only adapters trained on the same base model."
            ) from exc
        variants[name] = adapter
    model.eval()
    return ChatModel(model, tokenizer, variants, default=named[0][0] if named else base_name)


def _named_adapter(spec: str) -> tuple[str, Path]:
    name, sep, location = spec.partition("=")
    if not sep or "/" in name:
        name, location = "", spec
    folder = Path(location).expanduser()
    if RunFolder(folder).has_adapter():
        name, folder = name or folder.name, RunFolder(folder).adapter
    if not is_adapter(folder):
        raise FinetuneError(
            f"{argument('adapter', spec)}: no adapter_config.json in {folder}; pass a LoRA adapter folder or a run folder."
        )
    return name or _display_name(str(folder)), folder


def _display_name(source: str) -> str:
    """A model's public name: the alias or Hub id as given, a path's last part (its run's name for merged/, adapter/)."""
    path = Path(source).expanduser()
    if not path.exists():
        return source
    path = path.resolve()
    return path.parent.name if path in RunFolder(path.parent).weight_folders else path.name.removesuffix(".gguf")
