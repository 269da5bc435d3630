"""Builders for the HTTP server tests: an engine on a tiny checkpoint, and a real
uvicorn server for it on a free loopback port, run in a background thread."""
from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from builders import TINY_CONFIGS, make_byte_level_checkpoint, make_checkpoint
from tokenmill.config import EngineConfig
from tokenmill.llm_engine import LLMEngine
from tokenmill.outputs import CompletionOutput, RequestOutput
from tokenmill.server import AsyncEngine, ServerMetrics, build_app
from tokenmill.server.launch import uvicorn_config

MODEL_NAME = "tiny"
# the word tokenizer has no chat template: each message becomes its words
CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }} {% endfor %}"
SERVER_ENGINE_OPTIONS = dict(dtype="float32", device="cpu", max_model_len=128, block_size=16,
                             num_gpu_blocks_override=128, max_num_seqs=32, max_num_batched_tokens=256)


def make_tiny_model(path: Path) -> Path:
    make_checkpoint(path, TINY_CONFIGS["llama-gqa-untied"])
    return path


def make_engine(model: Path | str, **options) -> LLMEngine:
    return LLMEngine(EngineConfig.build(model=str(model), **{**SERVER_ENGINE_OPTIONS, **options}))


@dataclass
class RunningServer:
    url: str  # http://127.0.0.1:PORT
    engine: AsyncEngine

    @property
    def api_url(self) -> str:
        return f"{self.url}/v1"


@contextlib.contextmanager
def run_server(engine: LLMEngine, *, model_name: str = MODEL_NAME, chat_template: str | None = CHAT_TEMPLATE,
               **app_options) -> Iterator[RunningServer]:
    """Serve ``engine`` until the block ends; the server is up when the block starts."""
    async_engine = AsyncEngine(engine, ServerMetrics(model_name))
    app = build_app(async_engine, model_names=[model_name], chat_template=chat_template, **app_options)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn_config(app, host="127.0.0.1", port=port, shutdown_timeout=2.0,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield RunningServer(f"http://127.0.0.1:{port}", async_engine)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def wait_until(predicate, timeout: float = 5.0, interval: float = 0.02) -> bool:
    """Poll ``predicate`` until it is true (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


# structured outputs need a tokenizer that can spell JSON: a byte-level checkpoint, and room for the
# random model's output (xgrammar lets it put any whitespace between JSON tokens)
BYTE_LEVEL_ENGINE_OPTIONS = dict(max_model_len=384, num_gpu_blocks_override=256, max_num_batched_tokens=512)


def make_byte_level_model(path: Path, seed: int = 2) -> Path:
    """A tiny random Llama checkpoint with the byte-level BPE tokenizer (``<eos>`` = id 0)."""
    make_byte_level_checkpoint(path, seed=seed)
    return path


def make_byte_level_engine(model: Path, **options) -> LLMEngine:
    return make_engine(model, **{**BYTE_LEVEL_ENGINE_OPTIONS, **options})


class ScriptedStream:
    """Stands in for an engine request's stream: ``text``, a few characters per delta, then finish
    reason "stop". Small pieces split markup across deltas, as a model's tokens do."""

    def __init__(self, request_id: str, prompt_token_ids: list[int], text: str, piece: int = 3) -> None:
        self.request_id, self.prompt_token_ids, self.text, self.piece = request_id, prompt_token_ids, text, piece

    def __aiter__(self):
        return self._outputs()

    async def _outputs(self):
        pieces = [self.text[i:i + self.piece] for i in range(0, len(self.text), self.piece)] or [""]
        for number, piece in enumerate(pieces):
            last = number == len(pieces) - 1
            yield RequestOutput(self.request_id, None, self.prompt_token_ids, None,
                                [CompletionOutput(0, piece, [1], None, None, "stop" if last else None)], last)

    def abort(self) -> None:
        pass


@contextlib.contextmanager
def scripted_output(server: RunningServer, text: str) -> Iterator[None]:
    """Until the block ends the server's engine answers each request (n=1) with ``text``: what a
    random tiny model cannot be made to write. The prompt still goes through the chat template and
    the tokenizer, and the answer through the endpoint's parsing and its server-sent events."""

    async def add_request(request_id, prompt, params, lora_request=None, priority=0):
        return ScriptedStream(request_id, prompt["prompt_token_ids"], text)

    server.engine.add_request = add_request
    try:
        yield
    finally:
        del server.engine.add_request
