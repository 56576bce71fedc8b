"""The terminal chat: `chat_loop(chat)` reads a line, streams the reply, keeps the conversation until /exit."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TextIO

from transformers import TextIteratorStreamer

from finetune.errors import FinetuneError
from finetune.generation import DecodingSettings
from finetune.serving.chat_model import ChatModel, Completion


def chat_loop(
    chat: ChatModel,
    *,
    model: str | None = None,
    system: str | None = None,
    decoding: DecodingSettings = DecodingSettings(),
    read: Callable[[str], str] = input,
    out: TextIO | None = None,
) -> list[dict[str, str]]:
    """Chat in the terminal until /exit or end of input, printing each reply as it is generated.

    `read` takes the prompt and returns one line, raising EOFError at the end (as `input` does). `/reset` starts the
    conversation over (keeping the system prompt); Ctrl-C stops a reply midway. Returns the conversation since the
    last reset.

    Args:
        chat: The loaded model.
        model: The variant to chat with; None for the first one (`chat.default`).
        system: A system prompt opening the conversation; None for none.
        decoding: How replies are decoded.
        read: Reads one line after showing a prompt; `input` by default.
        out: Where replies are written; None for stdout.

    Returns:
        The messages since the last /reset, the system prompt included.

    Raises:
        FinetuneError: `model` is not a loaded variant.
    """
    out = out or sys.stdout
    name = model or chat.default
    if name not in chat.variants:
        raise FinetuneError(f"model `{name}` is not loaded; choose one of: {', '.join(chat.variants)}.")
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    out.write(f"Chatting with {name}. /reset starts over, /exit quits.\n")
    while True:
        try:
            line = read("you> ").strip()
        except EOFError:
            out.write("\n")
            return history
        if line == "/exit":
            return history
        if line == "/reset":
            history = list(start)
            out.write("(conversation cleared)\n")
            continue
        if line.startswith("/"):
            out.write(f"(unknown command {line.split()[0]}; commands: /reset, /exit)\n")
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        try:
            prompt = chat.prompt_ids(history)
        except FinetuneError as exc:
            out.write(f"({exc})\n")
            history.pop()
            continue
        context = chat.context_length
        if context and len(prompt) + decoding.max_new_tokens > context:
            out.write(
                f"(the conversation is {len(prompt)} tokens and the model's context {context}; /reset to start over)\n"
            )
            history.pop()
            continue
        out.write(f"{name}> ")
        out.flush()
        completion = _stream_to(out, chat, name, prompt, decoding)
        out.write("\n")
        history.append({"role": "assistant", "content": completion.text})


def _stream_to(out: TextIO, chat: ChatModel, name: str, prompt: list[int], decoding: DecodingSettings) -> Completion:
    streamer = TextIteratorStreamer(chat.tokenizer, skip_prompt=True, skip_special_tokens=True)
    cancel = threading.Event()
    with ThreadPoolExecutor(max_workers=1) as worker:
        job = worker.submit(chat.complete, name, prompt, decoding, streamer=streamer, cancel=cancel)
        try:
            for text in streamer:
                out.write(text)
                out.flush()
        except KeyboardInterrupt:  # Ctrl-C ends this reply, not the chat; the part already shown is kept
            out.write(" (stopped)")
        finally:
            cancel.set()  # generation stops at the next token instead of running on to max_new_tokens
        return job.result()
