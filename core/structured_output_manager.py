"""The engine's side of structured output: grammars compiled off the critical path,
bitmasks filled each step, matchers advanced by the accepted tokens.

    add_request     validate(spec) on the caller's thread (bad spec -> ValueError, nothing queued)
                    compile(spec) submitted to a thread pool; request WAITING_FOR_GRAMMAR
    each step       ready grammars: request -> WAITING (the scheduler passes over the others)
                    after schedule(): one bitmask row per draft position + 1 for each guided
                    request that samples this step (the matcher walks the drafts, then rolls back)
    update          the scheduler feeds each emitted token to the matcher; a terminated
                    grammar finishes the request (finish reason "stop")

The guided decoder is built on first use, so an engine that never sees a guided
request never pays for the tokenizer info.
"""
from __future__ import annotations

import concurrent.futures
import logging
import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .components import GUIDED_DECODER
from .errors import ConfigError, TokenmillError
from .request import Request, RequestError, RequestStatus
from .structured import Grammar, GuidedDecoder, StructuredOutputsParams, allocate_token_bitmask

if TYPE_CHECKING:
    import torch

    from .registry import Registry
    from .step import SchedulerOutput

logger = logging.getLogger(__name__)


class StructuredOutputManager:
    def __init__(self, registry: Registry, backend: str, tokenizer: Any, vocab_size: int,
                 options: Mapping[str, Any] | None = None, max_workers: int = 2) -> None:
        """``backend``: the guided decoder's registered name; ``options``: its own options
        (the other keys of structured_outputs_config), validated now."""
        try:
            self._decoder_cls = registry.get(GUIDED_DECODER, backend)
        except TokenmillError as exc:
            raise ConfigError(f"structured_outputs_config.backend: {exc}") from None
        self._options = self._decoder_cls.validate_options(options, "structured_outputs_config")
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._max_workers = max_workers
        self._decoder: GuidedDecoder | None = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._pending: dict[str, tuple[Request, concurrent.futures.Future]] = {}

    @property
    def decoder(self) -> GuidedDecoder:
        with self._lock:
            if self._decoder is None:
                self._decoder = self._decoder_cls(self._tokenizer, self.vocab_size, options=self._options)
            return self._decoder

    # ---- requests in ----

    def validate(self, params: StructuredOutputsParams) -> None:
        """Raises ValueError (UnsupportedStructuredOutput) naming the problem."""
        if not isinstance(params, StructuredOutputsParams):
            raise ValueError("sampling_params.structured_outputs must be a StructuredOutputsParams, "
                             f"got {type(params).__name__}")
        decoder = self.decoder
        if params.mode not in decoder.modes:
            raise ValueError(f"structured_outputs.{params.mode}: the guided decoder {decoder.name!r} supports "
                             f"{list(decoder.modes)}")
        decoder.validate(params)

    def submit(self, request: Request) -> None:
        """Compile the request's grammar in the pool; the request waits for it."""
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(self._max_workers,
                                                               thread_name_prefix="tokenmill-grammar")
        request.status = RequestStatus.WAITING_FOR_GRAMMAR
        future = self._pool.submit(self.decoder.compile, request.sampling_params.structured_outputs)
        self._pending[request.request_id] = (request, future)

    def update_waiting(self, block: bool = False) -> dict[str, RequestError]:
        """Make requests with a ready grammar WAITING. Returns the requests whose compilation
        failed, and why (the caller ends them). ``block``: wait (up to 50 ms) for one if none
        is ready, rather than spin."""
        if not self._pending:
            return {}
        if block and not any(f.done() for _, f in self._pending.values()):
            concurrent.futures.wait([f for _, f in self._pending.values()], timeout=0.05,
                                    return_when=concurrent.futures.FIRST_COMPLETED)
        failed: dict[str, RequestError] = {}
        for req_id, (request, future) in list(self._pending.items()):
            if not future.done():
                continue
            del self._pending[req_id]
            if request.status != RequestStatus.WAITING_FOR_GRAMMAR:
                continue  # aborted meanwhile
            try:
                request.grammar = future.result()
            except Exception as exc:  # validate() let through a spec compile() rejects
                logger.error("request %s: its grammar failed to compile: %s", req_id, exc)
                failed[req_id] = RequestError(f"structured_outputs: the grammar failed to compile: {exc}",
                                              "invalid_request" if isinstance(exc, ValueError) else "internal")
                continue
            request.status = RequestStatus.WAITING
        return failed

    @property
    def num_pending(self) -> int:
        """Requests whose grammar is still compiling."""
        return len(self._pending)

    def forget(self, request_ids: list[str]) -> None:
        for req_id in request_ids:
            entry = self._pending.pop(req_id, None)
            if entry is not None:
                entry[1].cancel()

    # ---- each step ----

    def grammar_bitmask(self, scheduler_output: SchedulerOutput,
                        requests: dict[str, Request]) -> dict[str, RequestError]:
        """Fill ``scheduler_output.grammar_bitmask``: for each guided request that samples this
        step, one row per scheduled draft and one after them. A draft the grammar refuses ends
        the walk (its own row forbids it, so verification rejects it); later rows allow all.
        Returns the requests whose grammar raised, and why (the caller ends them)."""
        rows: dict[str, int] = {}
        total = 0
        for req_id, num in scheduler_output.num_scheduled_tokens.items():
            request = requests.get(req_id)
            if request is None or request.grammar is None:
                continue
            if request.num_computed_tokens < request.num_tokens:
                continue  # still computing its prompt: nothing is sampled
            rows[req_id] = total
            total += len(scheduler_output.scheduled_spec_decode_tokens.get(req_id, ())) + 1
        if not rows:
            return {}
        bitmask = allocate_token_bitmask(total, self.vocab_size)
        failed: dict[str, RequestError] = {}
        for req_id, first in rows.items():
            drafts = scheduler_output.scheduled_spec_decode_tokens.get(req_id, ())
            try:
                _fill_rows(requests[req_id].grammar, bitmask, first, drafts)
            except Exception as exc:  # this request's matcher: the rest of the batch goes on
                logger.exception("request %s: its grammar failed while filling the token bitmask", req_id)
                failed[req_id] = RequestError(f"structured_outputs: the grammar matcher failed: {exc!r}")
        scheduler_output.grammar_bitmask = bitmask
        scheduler_output.structured_output_request_ids = rows
        return failed

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


def _fill_rows(grammar: Grammar, bitmask: torch.Tensor, first: int, drafts: Sequence[int]) -> None:
    """Row ``first`` for the next token, then one row after each draft the grammar accepts;
    the matcher ends where it started."""
    walked = 0
    grammar.fill_bitmask(bitmask, first)
    for j, token in enumerate(drafts):
        if grammar.is_terminated() or not grammar.accept_tokens([token]):
            break
        walked += 1
        grammar.fill_bitmask(bitmask, first + j + 1)
    grammar.rollback(walked)
