"""AsyncEngine: the LLMEngine loop on its own thread, driven from asyncio.

    event loop (HTTP handlers)                    engine thread
    --------------------------                    -------------
    await add_request() / call()  --command-->    SimpleQueue: run it between steps
    async for out in stream       <--one batch--  step() -> loop.call_soon_threadsafe
    stream.abort(), disconnects   --command-->    LLMEngine.abort_request

Commands are plain callables run on the engine thread, so the LLMEngine and its
tokenizer are only ever touched there (no locks on the hot path, nothing
pickled). Requests added between two steps join the next one: continuous
batching across HTTP requests. Every output is a DELTA ``RequestOutput``.

Tokenizing a prompt and rendering a chat template take time proportional to the
text (seconds for megabytes), so they never run on the engine thread: ``tokenize``
runs them in a ``TokenizerPool`` and the engine thread only receives token ids.

If ``step()`` raises, the engine is considered broken: every in-flight stream
ends with ``EngineDeadError`` and every later command is refused with
``EngineUnavailableError``.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from ..input_processor import InputProcessor, PromptType
from ..lora_request import LoRARequest
from ..llm_engine import LLMEngine
from ..output_processor import OutputKind
from ..outputs import RequestOutput
from ..sampling_params import SamplingParams
from .metrics import RequestTiming, ServerMetrics
from .tokenizer_pool import TokenizerPool

logger = logging.getLogger(__name__)
T = TypeVar("T")


class EngineError(RuntimeError):
    """The engine could not serve a request; ``status`` is the HTTP status it maps to."""

    status = 500


class EngineDeadError(EngineError):
    """The engine loop failed while this request was in flight."""


class EngineUnavailableError(EngineError):
    """The engine admits no new work (it died, is shutting down, or its queue is full), or
    it ended this request because the server is going away. ``retry_after``: seconds after
    which trying again may succeed (a full queue), or None."""

    status = 503

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RequestStream:
    """One request's DELTA outputs, as an async iterator that ends after the finished one.

    Its ``timing`` is written by the engine thread only (for the metrics)."""

    def __init__(self, request_id: str, engine: AsyncEngine) -> None:
        self.request_id = request_id
        self.finished = False
        self._engine = engine
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self.timing = RequestTiming()

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        self.finished = item.finished
        return item

    def abort(self) -> None:
        """Stop generating (idempotent); a live consumer then gets the final "abort" output."""
        if not self.finished:
            self._engine.abort(self.request_id)


@dataclass(slots=True)
class _Command:
    fn: Callable[[], Any]
    future: asyncio.Future | None  # None: nobody waits for the result


_STOP = object()


class AsyncEngine:
    def __init__(self, engine: LLMEngine, metrics: ServerMetrics | None = None) -> None:
        self.engine = engine
        self.metrics = metrics or ServerMetrics()
        self.max_num_queued_requests = engine.config.scheduler.max_num_queued_requests
        self.max_model_len = engine.input_processor.max_model_len
        self.stats: dict[str, Any] = engine.get_stats()  # refreshed by the engine thread
        self.error: BaseException | None = None
        self.is_accepting = False
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}  # engine thread only
        self._submit_lock = threading.Lock()
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._tokenizer_pool = TokenizerPool(engine.input_processor)

    # ------------------------------------------------------------ event-loop side

    def start(self) -> None:
        """Start the engine thread; call from the event loop that will consume the outputs."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="tokenmill-engine", daemon=True)
        self.is_accepting = True
        self._thread.start()

    @property
    def is_healthy(self) -> bool:
        return self.is_accepting and self.error is None

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    async def call(self, fn: Callable[[LLMEngine], T]) -> T:
        """Run ``fn(engine)`` on the engine thread between steps; its result or exception."""
        self._check_admitting()
        future = self._loop.create_future()
        if not self._submit(_Command(lambda: fn(self.engine), future)):
            raise EngineUnavailableError("the engine has been shut down")
        return await future

    async def tokenize(self, fn: Callable[[InputProcessor], T], num_chars: int) -> T:
        """Run ``fn(processor)`` in the tokenizer pool, with an input processor (tokenizer,
        vocabulary size, max_model_len) of its own: off the engine thread and the event loop.
        ``num_chars``: the size of the text it handles (huge texts go to a worker of their own)."""
        self._check_admitting()
        return await self._tokenizer_pool.run(fn, num_chars)

    async def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams,
                          lora_request: LoRARequest | None = None, priority: int = 0) -> RequestStream:
        """Queue a request; raises ValueError (naming the field) on bad input, or
        EngineUnavailableError when no more work is admitted."""
        stream = RequestStream(request_id, self)
        try:
            await self.call(lambda engine: self._add(stream, prompt, params, lora_request, priority))
        except asyncio.CancelledError:  # the client left while the request was being added
            self.abort(request_id)
            raise
        return stream

    def abort(self, request_id: str) -> None:
        """Abort a request (a no-op once it has finished or the engine is shut down)."""
        self._submit(_Command(lambda: self._abort(request_id), None))

    def fail_in_flight(self, message: str) -> None:
        """End every in-flight request now: the engine aborts it and its consumer gets
        ``EngineUnavailableError(message)`` (an error event, or a 503). For a shutdown whose
        drain time is up: the responses end properly instead of being cut."""
        self._submit(_Command(lambda: self._fail_all(EngineUnavailableError(message)), None))

    def stop_admitting(self) -> None:
        """Refuse new work from now on (graceful shutdown); in-flight requests go on."""
        self.is_accepting = False

    async def shutdown(self, timeout: float = 0.0) -> None:
        """Stop admitting, let in-flight requests finish for up to ``timeout`` seconds,
        abort the rest, and stop the engine thread."""
        self.stop_admitting()
        deadline = time.monotonic() + timeout
        while self.num_in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        with self._submit_lock:
            if self._closed:
                return
            self._closed = True
            self._commands.put(_STOP)
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
        self._tokenizer_pool.shutdown()
        shutdown = getattr(self.engine, "shutdown", None)
        if shutdown is not None:  # the engine's worker processes, if it has any
            shutdown()

    def _check_admitting(self) -> None:
        if self.error is not None:
            raise EngineUnavailableError(f"the engine has stopped after an error: {self.error!r}")
        if not self.is_accepting:
            raise EngineUnavailableError("the server is shutting down and admits no new requests", retry_after=1.0)

    def _submit(self, command: _Command) -> bool:
        """Queue ``command`` for the engine thread; False once it has been told to stop."""
        with self._submit_lock:
            if not self._closed:
                self._commands.put(command)
            return not self._closed

    # ------------------------------------------------------------ engine thread

    def _run(self) -> None:
        try:
            self._serve()
        except Exception as exc:  # the engine is broken: end everything in flight, refuse the rest
            logger.exception("the engine loop failed; the server can no longer generate")
            self.error = exc
            dead = EngineDeadError(f"the engine failed while generating: {exc!r}")
            self._post(_deliver, [(stream, dead) for stream in self._streams.values()])
            self._streams.clear()
            self._refuse_until_stopped()

    def _serve(self) -> None:
        while self._run_commands(block=not self.engine.has_unfinished_requests()):
            if self.engine.has_unfinished_requests():
                self._dispatch(self.engine.step())
            self.stats = self.engine.get_stats()
            self.metrics.update_engine_stats(self.stats)
        self._abort_all()

    def _run_commands(self, block: bool) -> bool:
        """Run the queued commands (waiting for one when idle); False once told to stop."""
        while True:
            try:
                command = self._commands.get(block=block)
            except queue.Empty:
                return True
            if command is _STOP:
                return False
            block = False
            try:
                result = command.fn()
            except Exception as exc:
                if command.future is None:
                    raise
                self._post(_resolve, command.future, None, exc)
            else:
                if command.future is not None:
                    self._post(_resolve, command.future, result, None)

    def _refuse_until_stopped(self) -> None:
        refusal = EngineUnavailableError(f"the engine has stopped after an error: {self.error!r}")
        while (command := self._commands.get()) is not _STOP:
            if command.future is not None:
                self._post(_resolve, command.future, None, refusal)

    def _add(self, stream: RequestStream, prompt: PromptType, params: SamplingParams,
             lora_request: LoRARequest | None = None, priority: int = 0) -> None:
        limit = self.max_num_queued_requests
        if limit is not None and self.engine.get_stats()["num_waiting"] + params.n > limit:
            raise EngineUnavailableError(f"too many requests are waiting (max_num_queued_requests={limit}); "
                                         "retry later", retry_after=1.0)
        self.engine.add_request(stream.request_id, prompt, params, OutputKind.DELTA, lora_request, priority)
        self._streams[stream.request_id] = stream

    def _abort(self, request_id: str) -> None:
        stream = self._streams.pop(request_id, None)
        if stream is None:
            return
        finals = self.engine.abort_request([request_id])
        for final in finals:
            self.metrics.observe_output(stream.timing, final, time.monotonic())
        self._post(_deliver, [(stream, final) for final in finals])

    def _abort_all(self) -> None:
        for request_id in list(self._streams):
            self._abort(request_id)

    def _fail_all(self, error: EngineError) -> None:
        streams = list(self._streams.values())
        self._streams.clear()
        now = time.monotonic()
        for stream in streams:
            for final in self.engine.abort_request([stream.request_id]):
                self.metrics.observe_output(stream.timing, final, now)
        self._post(_deliver, [(stream, error) for stream in streams])

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        batch = []
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue
            self.metrics.observe_output(stream.timing, output, now)
            if output.finished:
                del self._streams[output.request_id]
            batch.append((stream, output))
        if batch:
            self._post(_deliver, batch)

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the event loop is closed: nobody is left to tell
            pass


def _deliver(batch: list[tuple[RequestStream, RequestOutput | BaseException]]) -> None:
    for stream, item in batch:
        stream._queue.put_nowait(item)


def _resolve(future: asyncio.Future, result: Any, exc: BaseException | None) -> None:
    if future.done():  # the caller was cancelled
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)
