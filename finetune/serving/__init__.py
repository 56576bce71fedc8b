"""Stage 7: talk to a trained model, in the terminal or over an OpenAI-compatible HTTP API with a web chat page.

Entry points: `load_chat_model(target, adapters)` (chat_model.py) loads what to talk to; `chat_loop(chat)`
(terminal.py) is the terminal chat; `create_app(chat)` and `serve(chat)` (api.py) the HTTP server, which generates
concurrent requests together (`Batcher`, batching.py: continuous batching) and answers `tools` requests with OpenAI
tool calls parsed in the chat template's own format (tool_calls.py).
"""

from finetune.generation import DecodingSettings
from finetune.serving.api import ApiError, ChatRequest, Limits, create_app, serve
from finetune.serving.batching import Batcher, BatchStatus, QueueFull, RequestTimeout, ServerClosing
from finetune.serving.chat_model import ChatModel, Completion, load_chat_model
from finetune.serving.terminal import chat_loop

Decoding = DecodingSettings  # its earlier name here, before finetune.generation owned decoding for every stage

__all__ = [
    "ApiError",
    "BatchStatus",
    "Batcher",
    "ChatModel",
    "ChatRequest",
    "Completion",
    "Decoding",
    "DecodingSettings",
    "Limits",
    "QueueFull",
    "RequestTimeout",
    "ServerClosing",
    "chat_loop",
    "create_app",
    "load_chat_model",
    "serve",
]
