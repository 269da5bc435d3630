"""``tokenmill serve``: build the engine, run the app under uvicorn, shut down gracefully.

On SIGINT or SIGTERM the server stops admitting requests (503, and the listening
socket closes), lets in-flight responses finish for up to ``shutdown_timeout``
seconds, ends what is left with an error (an error event then ``data: [DONE]``
for a stream) and aborts it, stops the engine and exits 0. A second SIGINT
exits at once.
"""
from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import uvicorn

from ..config import EngineConfig
from ..llm_engine import LLMEngine
from .app import DEFAULT_MAX_BODY_BYTES, build_app, check_cors_options
from .chat import ChatToolSettings
from .guards import MAX_HEADER_BYTES
from .async_engine import AsyncEngine
from .metrics import ServerMetrics

DEFAULT_SHUTDOWN_TIMEOUT = 30.0
# uvicorn cancels the connections still open this long after the requests were failed: a
# backstop only, as failed requests end their responses and their connections close
CANCEL_GRACE = 5.0

logger = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    """uvicorn's server, told to stop admitting on the first signal, and to fail what is
    still in flight ``drain_timeout`` seconds into the shutdown. Its signals are handled
    here and not re-raised after the shutdown: a drained server exits 0."""

    def __init__(self, config: uvicorn.Config, engine: AsyncEngine, drain_timeout: float) -> None:
        super().__init__(config)
        self.async_engine = engine
        self.drain_timeout = drain_timeout

    async def shutdown(self, sockets: list | None = None) -> None:
        message = f"the server shut down before the request finished (shutdown timeout {self.drain_timeout:g} s)"
        deadline = asyncio.get_running_loop().call_later(self.drain_timeout, self.async_engine.fail_in_flight,
                                                         message)
        try:
            await super().shutdown(sockets)
        finally:
            deadline.cancel()

    def handle_exit(self, sig: int, frame: object) -> None:
        self.async_engine.stop_admitting()
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        self.should_exit = True

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def read_chat_template(value: str | None) -> str | None:
    """``--chat-template``: a file holding the template, or the template itself."""
    if value is None:
        return None
    path = Path(value)
    return path.read_text() if path.is_file() else value


def uvicorn_config(app: object, *, host: str, port: int, shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
                   log_level: str = "info") -> uvicorn.Config:
    """uvicorn's settings; it cancels the connections still open ``shutdown_timeout``
    seconds into a shutdown."""
    # h11 (not httptools): it bounds a request head that arrives in pieces (the app bounds the rest)
    return uvicorn.Config(app, host=host, port=port, http="h11", h11_max_incomplete_event_size=MAX_HEADER_BYTES,
                          timeout_graceful_shutdown=shutdown_timeout, lifespan="on", log_level=log_level)


def served_model_names(served_model_name: str | list[str] | None, model: str) -> list[str]:
    """``--served-model-name`` (one name or several, duplicates dropped), else the model itself."""
    names = [served_model_name] if isinstance(served_model_name, str) else list(served_model_name or [])
    return list(dict.fromkeys(names)) or [model]


def serve(config: EngineConfig, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          served_model_name: str | list[str] | None = None, chat_template: str | None = None,
          trust_request_chat_template: bool = False, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
          shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
          log_level: str = "info", lora_modules: dict[str, str] | None = None,
          allowed_origins: list[str] | None = None, allowed_methods: list[str] | None = None,
          allowed_headers: list[str] | None = None, allow_credentials: bool = False,
          enable_auto_tool_choice: bool = False, tool_call_parser: str | None = None,
          reasoning_parser: str | None = None) -> int:
    """Serve ``config``'s model (and ``lora_modules``, adapter name -> PEFT folder) until a signal; returns
    the exit status. Requests may name the model by any of ``served_model_name``; the metrics carry the
    first. ``allowed_origins`` and the rest: CORS, and the tool options, as ``build_app`` takes them."""
    check_cors_options(allowed_origins, allowed_methods, allowed_headers, allow_credentials)  # before the engine
    ChatToolSettings(enable_auto_tool_choice, tool_call_parser, reasoning_parser)  # a bad parser name, before too
    model_names = served_model_names(served_model_name, config.model.model)
    engine = AsyncEngine(LLMEngine(config), ServerMetrics(model_names[0]))
    app = build_app(engine, model_names=model_names, api_key=api_key, chat_template=read_chat_template(chat_template),
                    trust_request_chat_template=trust_request_chat_template, max_body_bytes=max_body_bytes,
                    lora_modules=lora_modules, allowed_origins=allowed_origins, allowed_methods=allowed_methods,
                    allowed_headers=allowed_headers, allow_credentials=allow_credentials,
                    enable_auto_tool_choice=enable_auto_tool_choice, tool_call_parser=tool_call_parser,
                    reasoning_parser=reasoning_parser)
    server = _Server(uvicorn_config(app, host=host, port=port, shutdown_timeout=shutdown_timeout + CANCEL_GRACE,
                                    log_level=log_level), engine, drain_timeout=shutdown_timeout)
    # The engine, model and app live as long as the process: keep the collector from walking them again at
    # every collection (a step at 256 requests with logprobs went from 11.8 to 9.0 ms of host time)
    gc.collect()
    gc.freeze()
    server.run()
    return 0 if server.started else 1
