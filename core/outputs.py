"""What users get back: vLLM's RequestOutput / CompletionOutput shapes."""
from __future__ import annotations

from dataclasses import dataclass, field

from .request import RequestError
from .step import Logprobs


@dataclass(slots=True)
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# one dict per position: token id -> Logprob (the chosen token and the top-k)
PositionLogprobs = dict[int, Logprob]


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[PositionLogprobs] | None
    finish_reason: str | None = None  # "stop", "length", "abort", "error"
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it
    error: RequestError | None = None  # with finish reason "error": why this completion failed

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[PositionLogprobs | None] | None
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    # on the finished output only, time.monotonic() stamps: arrival_time, and when the request was
    # first_scheduled, got its first_token and its last_token (``*_time``; absent: it never did). Not
    # compared: two runs of the same request are equal outputs
    metrics: dict[str, float] = field(default_factory=dict, compare=False)


def logprobs_to_dicts(logprobs: Logprobs, decode) -> list[PositionLogprobs]:
    """Convert runner rows into vLLM's per-position dicts (chosen token first).

    ``decode(token_id) -> str`` gives each token's text."""
    positions = []
    for ids, values, rank in zip(logprobs.token_ids, logprobs.logprobs, logprobs.ranks):
        entry: PositionLogprobs = {ids[0]: Logprob(values[0], rank, decode(ids[0]))}
        for j, (token_id, value) in enumerate(zip(ids[1:], values[1:]), start=1):
            if token_id not in entry:  # the chosen token keeps its own rank when it is also among the top-k
                entry[token_id] = Logprob(value, j, decode(token_id))
        positions.append(entry)
    return positions
