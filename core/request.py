"""A request's state as the scheduler sees it.

There is no prefill or decode phase: a request has ``num_tokens`` (prompt +
output so far) and ``num_computed_tokens`` (tokens whose K/V are in the cache);
each step closes part of that gap, plus any draft (spec) tokens.

    prompt                  output
    [p0 p1 p2 p3 p4 p5 p6] [o0 o1]  + spec [s0 s1]
    |<---- num_computed_tokens --->|   the last output token is always uncomputed
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .lora_request import LoRARequest
    from .sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    """Ordered: everything past PREEMPTED is finished."""

    WAITING_FOR_GRAMMAR = enum.auto()
    WAITING = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH_CAPPED = enum.auto()
    FINISHED_ABORTED = enum.auto()
    FINISHED_IGNORED = enum.auto()
    FINISHED_ERROR = enum.auto()  # this request failed (see Request.error); the others go on

    @property
    def is_finished(self) -> bool:
        return self > RequestStatus.PREEMPTED

    @property
    def finish_reason(self) -> str | None:
        """The OpenAI/vLLM finish reason: stop, length, abort or error."""
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH_CAPPED: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_IGNORED: "length",
    RequestStatus.FINISHED_ERROR: "error",
}


@dataclass(frozen=True, slots=True)
class RequestError:
    """Why one request ended with finish reason "error" while the engine served the rest.

    ``kind`` says whose fault it was: "invalid_request" when the request's own options
    conflict (say ``min_tokens`` against a grammar that must end sooner: the client can
    fix it), "internal" when a per-request stage of the engine failed (a bug to report).
    """

    message: str
    kind: str = "internal"

    def __post_init__(self) -> None:
        if self.kind not in ("invalid_request", "internal"):
            raise ValueError(f"RequestError.kind must be 'invalid_request' or 'internal', got {self.kind!r}")


@dataclass(slots=True, eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_id: int | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    cache_salt: str | None = None
    lora_request: LoRARequest | None = None  # the adapter the request runs with; None: the base model
    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(default_factory=list)
    spec_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    block_hashes: list[bytes] = field(default_factory=list)
    num_cached_tokens: int = -1  # prefix-cache hit length at first scheduling; -1 until then
    num_preemptions: int = 0
    stop_reason: int | str | None = None
    grammar: Any = None  # the request's Grammar when it asks for structured output
    error: RequestError | None = None  # set with status FINISHED_ERROR
    # with scheduling_policy "priority": lower runs first, ties by arrival; "fcfs" allows only 0
    priority: int = 0
    # when the scheduler first admitted it (time.monotonic); None until then. Kept across
    # preemptions: the metrics' queue time ends at the first admission, as vLLM's does
    first_scheduled_time: float | None = None

    def __post_init__(self) -> None:
        self.prompt_token_ids = list(self.prompt_token_ids)
        self.all_token_ids = [*self.prompt_token_ids, *self.output_token_ids]

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_tokens_with_spec(self) -> int:
        return len(self.all_token_ids) + len(self.spec_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def fail(self, error: RequestError) -> None:
        """Mark the request failed; whoever holds it frees it as for any other finish."""
        self.status = RequestStatus.FINISHED_ERROR
        self.error = error

    def append_output_token_ids(self, token_ids: list[int]) -> None:
        self.output_token_ids.extend(token_ids)
        self.all_token_ids.extend(token_ids)
