"""Per-step state passed between scheduler, model runner and engine (explicit, typed).

    Scheduler.schedule()          -> SchedulerOutput
    ModelRunner.execute(...)      -> ModelRunnerOutput
    Scheduler.update_from_output  -> list[EngineCoreOutput]
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from .lora_request import LoRARequest
    from .request import RequestError
    from .sampling_params import SamplingParams


@dataclass(slots=True)
class NewRequestData:
    """A request the runner has no row for: first scheduled, or resumed after preemption
    (then ``output_token_ids`` holds what it generated before and is recomputed)."""

    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    lora_request: LoRARequest | None = None  # the adapter its rows run with


@dataclass(slots=True)
class CachedRequestData:
    """A request the runner already holds: only what changed."""

    req_id: str
    new_block_ids: list[int]  # appended to its block table
    num_computed_tokens: int  # before this step's tokens


@dataclass(slots=True)
class SchedulerOutput:
    scheduled_new_reqs: list[NewRequestData]
    scheduled_cached_reqs: list[CachedRequestData]
    # req_id -> tokens to compute this step, spec tokens included
    num_scheduled_tokens: dict[str, int]
    total_num_scheduled_tokens: int
    # req_id -> draft tokens scheduled for verification (a subset of the request's spec tokens)
    scheduled_spec_decode_tokens: dict[str, list[int]] = field(default_factory=dict)
    # requests whose rows the runner must drop: finished, aborted or preempted since the last step
    finished_req_ids: set[str] = field(default_factory=set)
    preempted_req_ids: set[str] = field(default_factory=set)
    # structured output: int32 [rows, ceil(vocab/32)] token bitmask filled by the engine after
    # scheduling, and req_id -> its first row; a guided request that samples this step has one
    # row per scheduled draft plus one (see core/structured.py for the bit layout)
    grammar_bitmask: torch.Tensor | None = None
    structured_output_request_ids: dict[str, int] = field(default_factory=dict)

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0


@dataclass(slots=True)
class Logprobs:
    """Per position: the sampled (or prompt) token and the top-k alternatives.

    token_ids[i][0] is the chosen token; the rest are the top-k by logprob.
    ranks[i] is the chosen token's rank (1 = most likely).
    """

    token_ids: list[list[int]]
    logprobs: list[list[float]]
    ranks: list[int]


@dataclass(slots=True)
class ModelRunnerOutput:
    req_ids: list[str]
    # per request, in req_ids order: tokens produced this step (accepted drafts + one
    # bonus/corrected token); empty while a prompt is only partly computed
    sampled_token_ids: list[list[int]]
    logprobs: dict[str, Logprobs] = field(default_factory=dict)  # one row per sampled token
    prompt_logprobs: dict[str, Logprobs] = field(default_factory=dict)  # rows for this chunk's prompt positions
    draft_token_ids: dict[str, list[int]] = field(default_factory=dict)  # proposals for the next step
    # requests a per-request stage failed this step (sampling set-up, no allowed token, grammar,
    # prompt logprobs): their ``sampled_token_ids`` are the tokens before the failure, if any
    failed: dict[str, RequestError] = field(default_factory=dict)

    def drop_failed(self, errors: dict[str, RequestError]) -> None:
        """Fail requests for a fault found outside the runner; their tokens of this step are dropped."""
        for i, req_id in enumerate(self.req_ids):
            if req_id in errors:
                self.sampled_token_ids[i] = []
        self.failed.update(errors)


@dataclass(slots=True)
class EngineCoreOutput:
    """What changed for one request in one step."""

    req_id: str
    new_token_ids: list[int]
    new_logprobs: Logprobs | None = None
    new_prompt_logprobs: Logprobs | None = None
    finish_reason: str | None = None  # "stop", "length", "abort", "error"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    num_cached_tokens: int = 0
    error: RequestError | None = None  # with finish reason "error": why

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
