"""The scheduler: one token budget per step, no prefill or decode phase.

Each request has ``num_tokens`` (prompt + output) and ``num_computed_tokens``;
a step closes part of each gap, spec tokens included, within
``max_num_batched_tokens`` and ``max_num_seqs``:

    running (admission order)      waiting (FCFS; preempted ones at the front)
    [r0 r1 r2]  first, each its     [w0 w1 ...]  then, while budget, seats and
    whole gap, trimmed to the       blocks last; a long prompt is chunked to the
    budget                          remaining budget (if chunked prefill is on)

When blocks run out for a running request, the most recently admitted running
request is preempted by recompute (blocks freed, ``num_computed_tokens = 0``,
front of the waiting queue) and allocation retried; no waiting request is
admitted in a step that preempted.

``scheduling_policy="priority"`` (vLLM's) changes two choices, nothing else: waiting
requests are admitted in (``priority``, arrival) order, lower first, a preempted one
taking its place by that order too; and the preemption victim is the running request
that order puts last (largest ``priority``, latest arrival), which may be one already
scheduled this step: its tokens go back to the budget.

``num_computed_tokens`` advances when a request is scheduled; ``update_from_output``
rolls back rejected spec tokens and appends the sampled tokens one by one,
checking stop conditions after each.

Sequence length: a request never needs more than ``max_model_len - 1`` KV slots
(its last token is sampled, never computed), so ``max_model_len`` is capped at
the cache's capacity + 1. A request whose prompt reaches that limit can never
run: ``add_request`` finishes it as FINISHED_IGNORED (finish reason "length")
and the next ``update_from_output`` reports it; until then it counts as
unfinished, so an engine that steps while ``has_unfinished_requests()`` delivers
it. The engine calls ``update_from_output`` after every ``schedule``, even an
empty one, and in the same order.

``async_scheduling``: ``schedule`` may run while the previous step is still on the
device, before its ``update_from_output``. A request that samples in that step
holds a placeholder for its coming token: the next step computes that token's
position (the runner has the token by then, as it runs steps in order), never
past ``max_tokens``, and a guided request waits out the step (its grammar must
see the token before its next bitmask). A request preempted with a token in
flight keeps that token when it arrives, as the synchronous loop would have given
it before preempting; a request that ended meanwhile has its token dropped.

    step N     scheduled  [a b c]           a, b, c sample: one placeholder each
    step N+1   scheduled  [a b c]           while N runs; a's position N+1 reads N's token
    update N   a stops (EOS)                a is freed; its step-N+1 token is dropped
"""
from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterable

from .config import CacheConfig, SchedulerConfig
from .kv_cache import KVCacheBlock, KVCacheManager, blocks_per_request
from .request import Request, RequestError, RequestStatus
from .step import CachedRequestData, EngineCoreOutput, Logprobs, ModelRunnerOutput, NewRequestData, SchedulerOutput
from .stop_checker import check_stop

logger = logging.getLogger(__name__)

_ADMISSIBLE = (RequestStatus.WAITING, RequestStatus.WAITING_FOR_GRAMMAR)


class Scheduler:
    def __init__(self, scheduler_config: SchedulerConfig, cache_config: CacheConfig, *, num_blocks: int,
                 max_model_len: int, sliding_window: int | None = None, max_loras: int | None = None) -> None:
        """``sliding_window``: when every layer of the model slides, its window (the KV cache
        frees the blocks behind it). ``max_loras``: with LoRA enabled, the most distinct adapters the
        running requests may use (so one step never needs more device slots than there are)."""
        self.max_num_seqs = scheduler_config.max_num_seqs
        self.max_loras = max_loras
        self.max_num_batched_tokens = scheduler_config.max_num_batched_tokens
        self.enable_chunked_prefill = scheduler_config.enable_chunked_prefill
        self.priority_policy = scheduler_config.scheduling_policy == "priority"
        # priority policy: the waiting queue got a request out of order since it was last sorted
        self._waiting_unsorted = False
        capacity = (num_blocks - 1) * cache_config.block_size  # block 0 is the null block
        # with a window on every layer a request holds only the blocks its window and step reach
        held = blocks_per_request(max_model_len, cache_config.block_size, sliding_window, self.max_num_batched_tokens)
        self.max_model_len = max_model_len if sliding_window and held <= num_blocks - 1 else \
            min(max_model_len, capacity + 1)
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(f"max_num_batched_tokens must be >= {self.max_model_len} (max_model_len, capped by "
                             "the KV cache) when enable_chunked_prefill is False, or a long prompt could never "
                             f"be scheduled; got {self.max_num_batched_tokens}")
        self.kv_cache_manager = KVCacheManager(num_blocks, cache_config.block_size,
                                               cache_config.enable_prefix_caching, self.max_model_len,
                                               sliding_window=sliding_window)
        self.requests: dict[str, Request] = {}  # every request not yet reported finished
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._finished_req_ids: set[str] = set()  # since the last schedule()
        # finished before running (FINISHED_IGNORED, or failed), reported by the next update
        self._ignored: list[Request] = []
        self.num_preemptions = 0
        self.spec_num_draft_tokens = 0
        self.spec_num_accepted_tokens = 0
        self.spec_num_verify_steps = 0  # request-steps that verified at least one draft
        # steps that scheduled tokens, and how many the latest one scheduled (the metrics' per-step histogram);
        # attributes rather than stats() keys, which callers compare whole
        self.num_steps = 0
        self.last_step_num_tokens = 0
        # async scheduling: each request's tokens in flight, and per step not yet updated (oldest first)
        # the requests it samples
        self.async_scheduling = scheduler_config.async_scheduling
        self._placeholders: dict[str, int] = {}
        self._sampling_in_flight: deque[list[str]] = deque()

    # ---- requests in and out ----

    def add_request(self, request: Request) -> None:
        """Queue a WAITING request (or a WAITING_FOR_GRAMMAR one, which stays queued
        but is passed over until someone sets it WAITING)."""
        if request.request_id in self.requests:
            raise ValueError(f"request_id {request.request_id!r} is already in the scheduler")
        if request.status not in _ADMISSIBLE:
            raise ValueError(f"a new request must be WAITING or WAITING_FOR_GRAMMAR, got {request.status.name}")
        check_priority(request.priority, self.priority_policy)
        self.requests[request.request_id] = request
        if request.num_tokens >= self.max_model_len:
            request.status = RequestStatus.FINISHED_IGNORED
            self._ignored.append(request)
        else:
            self.waiting.append(request)
            self._waiting_unsorted = self.priority_policy

    def abort_requests(self, request_ids: str | Iterable[str]) -> list[str]:
        return self.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)

    def finish_requests(self, request_ids: str | Iterable[str], finished_status: RequestStatus) -> list[str]:
        """End requests in any unfinished state (for reasons the engine detects, such
        as stop strings, or aborts); returns the ids actually ended. Finished and
        unknown ids are ignored. The runner learns through the next ``finished_req_ids``."""
        if not finished_status.is_finished:
            raise ValueError(f"finished_status must be a FINISHED_* status, got {finished_status.name}")
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        ended = [self.requests[i] for i in dict.fromkeys(ids)
                 if i in self.requests and not self.requests[i].is_finished]
        ended_ids = {request.request_id for request in ended}
        if any(request.status == RequestStatus.RUNNING for request in ended):
            self.running = [r for r in self.running if r.request_id not in ended_ids]
        if any(request.status != RequestStatus.RUNNING for request in ended):
            self.waiting = deque(r for r in self.waiting if r.request_id not in ended_ids)
        for request in ended:
            request.status = finished_status
            self._free(request)
        return [request.request_id for request in ended]

    def fail_requests(self, errors: dict[str, RequestError]) -> list[str]:
        """End waiting requests that cannot run (a grammar that failed to compile) with finish
        reason "error"; unlike ``finish_requests`` the next ``update_from_output`` reports them,
        with their errors, so their consumers are told why."""
        ids = [i for i in errors if i in self.requests and not self.requests[i].is_finished]
        self.waiting = deque(r for r in self.waiting if r.request_id not in set(ids))
        for req_id in ids:
            request = self.requests[req_id]
            request.fail(errors[req_id])
            self._ignored.append(request)
        return ids

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    def stats(self) -> dict[str, int | float]:
        kv = self.kv_cache_manager
        return {
            "num_running": len(self.running), "num_waiting": len(self.waiting),
            "num_preemptions": self.num_preemptions,
            "prefix_cache_queries": kv.prefix_cache_queries, "prefix_cache_hits": kv.prefix_cache_hits,
            "num_free_blocks": kv.num_free_blocks, "num_total_blocks": kv.num_usable_blocks,
            "kv_cache_usage": kv.usage(),
            "spec_num_draft_tokens": self.spec_num_draft_tokens,
            "spec_num_accepted_tokens": self.spec_num_accepted_tokens,
            "spec_num_verify_steps": self.spec_num_verify_steps,
        }

    # ---- one step ----

    def schedule(self) -> SchedulerOutput:
        """Pick this step's tokens: running requests first, then waiting ones (FCFS, or by
        priority), advancing each scheduled request's ``num_computed_tokens``."""
        out = SchedulerOutput([], [], {}, 0, finished_req_ids=self._finished_req_ids)
        self._finished_req_ids = set()
        budget = self.max_num_batched_tokens
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            pending = self._placeholders.get(request.request_id, 0)
            num_new = min(request.num_tokens_with_spec + pending - request.num_computed_tokens, budget,
                          self.max_model_len - 1 - request.num_computed_tokens)
            if pending and (num_new <= 0 or self._waits_for_token(request, pending)):
                index += 1
                continue
            new_blocks, refund = self._allocate_or_preempt(request, num_new, out)
            if new_blocks is None:
                break
            if refund:  # a victim scheduled before this request left the list: find its place again
                budget += refund
                index = self.running.index(request)
            out.scheduled_cached_reqs.append(CachedRequestData(
                request.request_id, [block.block_id for block in new_blocks], request.num_computed_tokens))
            budget -= self._take(request, num_new, out, pending)
            index += 1
        if not out.preempted_req_ids:
            self._admit_waiting(budget, out)
        if self.async_scheduling:
            self._hold_placeholders(out)
        out.total_num_scheduled_tokens = sum(out.num_scheduled_tokens.values())
        if out.total_num_scheduled_tokens:
            self.num_steps += 1
            self.last_step_num_tokens = out.total_num_scheduled_tokens
        return out

    def update_from_output(self, scheduler_output: SchedulerOutput,
                           runner_output: ModelRunnerOutput) -> list[EngineCoreOutput]:
        """Apply one step's results; one output per request that got tokens, prompt
        logprobs or finished (ignored requests included). A request in ``runner_output.failed``
        keeps the tokens it got before the failure (stop conditions apply to them) and, unless
        one of them ended it, ends with finish reason "error"."""
        outputs = [EngineCoreOutput(r.request_id, [], finish_reason=r.status.finish_reason, error=r.error)
                   for r in self._ignored]
        for request in self._ignored:
            del self.requests[request.request_id]
        self._ignored = []
        finished_ids: set[str] = set()
        failed = runner_output.failed
        preempted_with_token = False
        drafts, all_logprobs = runner_output.draft_token_ids, runner_output.logprobs
        all_prompt_logprobs = runner_output.prompt_logprobs
        if self.async_scheduling:
            self._release_placeholders()
        for req_id, sampled in zip(runner_output.req_ids, runner_output.sampled_token_ids):
            request = self.requests.get(req_id)
            if request is None or request.status != RequestStatus.RUNNING:
                if request is not None and request.status == RequestStatus.PREEMPTED and sampled:
                    outputs.extend(self._token_of_preempted(request, sampled, runner_output))
                    preempted_with_token = True
                continue  # ended since it was scheduled
            new_token_ids: list[int] = []
            if sampled:
                scheduled_spec = scheduler_output.scheduled_spec_decode_tokens.get(req_id, [])
                if len(sampled) > len(scheduled_spec) + 1:
                    raise ValueError(f"request {req_id!r}: the runner sampled {len(sampled)} tokens, at most "
                                     f"{len(scheduled_spec) + 1} (the scheduled drafts + 1) are possible")
                self._roll_back_rejected(request, scheduled_spec, sampled)
                new_token_ids = self._append_until_stop(request, sampled)
            if failed and req_id in failed and not request.is_finished:
                request.fail(failed[req_id])
            is_finished = request.status.is_finished
            if is_finished:
                finished_ids.add(req_id)
                self._free(request)
            elif drafts or request.spec_token_ids:
                request.spec_token_ids = list(drafts.get(req_id, ()))
            prompt_logprobs = all_prompt_logprobs.get(req_id) if all_prompt_logprobs else None
            if new_token_ids or prompt_logprobs is not None or is_finished:
                logprobs = _first_rows(all_logprobs.get(req_id), len(new_token_ids)) if all_logprobs else None
                outputs.append(EngineCoreOutput(
                    req_id, new_token_ids, logprobs, prompt_logprobs,
                    request.status.finish_reason if is_finished else None, request.stop_reason,
                    max(request.num_cached_tokens, 0), request.error))
        for req_id, error in runner_output.failed.items():  # failed before the runner gave them a row
            request = self.requests.get(req_id)
            if request is not None and request.status == RequestStatus.RUNNING:
                request.fail(error)
                finished_ids.add(req_id)
                self._free(request)
                outputs.append(EngineCoreOutput(req_id, [], finish_reason="error", error=error))
        if finished_ids:
            self.running = [r for r in self.running if r.request_id not in finished_ids]
        if preempted_with_token:
            self.waiting = deque(r for r in self.waiting if not r.is_finished)
        return outputs

    # ---- async scheduling ----

    def _waits_for_token(self, request: Request, pending: int) -> bool:
        """Whether a running request with ``pending`` tokens in flight sits this step out: its grammar
        must accept them first, or they may already be its last (``max_tokens``)."""
        if request.grammar is not None or request.sampling_params.structured_outputs is not None:
            return True
        max_tokens = request.sampling_params.max_tokens
        return max_tokens is not None and request.num_output_tokens + pending >= max_tokens

    def _hold_placeholders(self, out: SchedulerOutput) -> None:
        """One placeholder per request this step samples for (it reaches the end of its known tokens)."""
        sampling = []
        for req_id, num_new in out.num_scheduled_tokens.items():
            request = self.requests[req_id]
            pending = self._placeholders.get(req_id, 0)
            if request.num_computed_tokens >= request.num_tokens + pending:
                self._placeholders[req_id] = pending + 1
                sampling.append(req_id)
        self._sampling_in_flight.append(sampling)

    def _release_placeholders(self) -> None:
        """The oldest step in flight is being updated: its placeholders become tokens (or nothing)."""
        for req_id in self._sampling_in_flight.popleft():
            pending = self._placeholders.pop(req_id) - 1
            if pending:
                self._placeholders[req_id] = pending

    def _token_of_preempted(self, request: Request, sampled: list[int],
                            runner_output: ModelRunnerOutput) -> list[EngineCoreOutput]:
        """A request preempted while its token was in flight keeps it (the synchronous loop would have
        appended it before preempting); the token may end it, in the waiting queue."""
        req_id = request.request_id
        new_token_ids = self._append_until_stop(request, sampled)
        error = runner_output.failed.get(req_id)
        if error is not None and not request.is_finished:
            request.fail(error)
        if request.is_finished:
            self._free(request)
        prompt_logprobs = runner_output.prompt_logprobs.get(req_id)
        if not new_token_ids and prompt_logprobs is None and not request.is_finished:
            return []
        return [EngineCoreOutput(req_id, new_token_ids,
                                 _first_rows(runner_output.logprobs.get(req_id), len(new_token_ids)),
                                 prompt_logprobs, request.status.finish_reason, request.stop_reason,
                                 max(request.num_cached_tokens, 0), request.error)]

    # ---- internals ----

    def _allocate_or_preempt(self, request: Request, num_new: int,
                             out: SchedulerOutput) -> tuple[list[KVCacheBlock] | None, int]:
        """Blocks for a running request, preempting victims (see ``_pop_victim``) until they
        fit; None if the request itself had to go. Also the tokens given back by victims
        already scheduled this step (only the priority policy picks those)."""
        refund = 0
        while (new_blocks := self.kv_cache_manager.allocate_slots(request, num_new)) is None:
            victim = self._pop_victim()
            refund += self._unschedule(victim, out)
            self._preempt(victim)
            out.preempted_req_ids.add(victim.request_id)
            if victim is request:
                return None, refund
        return new_blocks, refund

    def _pop_victim(self) -> Request:
        """FCFS: the last admitted running request. Priority: the one the (priority, arrival)
        order puts last, the later admitted on a full tie (children of one prompt)."""
        if not self.priority_policy:
            return self.running.pop()
        victim = max(reversed(self.running), key=_priority_order)
        self.running.remove(victim)
        return victim

    @staticmethod
    def _unschedule(request: Request, out: SchedulerOutput) -> int:
        """Take back a request scheduled earlier in this step; the tokens it had."""
        num_tokens = out.num_scheduled_tokens.pop(request.request_id, 0)
        if num_tokens:
            out.scheduled_spec_decode_tokens.pop(request.request_id, None)
            out.scheduled_cached_reqs = [r for r in out.scheduled_cached_reqs if r.req_id != request.request_id]
        return num_tokens

    def _admit_waiting(self, budget: int, out: SchedulerOutput) -> None:
        if self._waiting_unsorted:  # stable: equal keys keep their queue order
            self.waiting = deque(sorted(self.waiting, key=_priority_order))
            self._waiting_unsorted = False
        passed_over: list[Request] = []
        now = time.monotonic() if self.waiting else 0.0
        adapters = {r.lora_request.lora_int_id for r in self.running if r.lora_request is not None}
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            if request.status == RequestStatus.WAITING_FOR_GRAMMAR or request.request_id in self._placeholders:
                # a preempted request whose token is still in flight (async scheduling) waits for it too
                passed_over.append(self.waiting.popleft())
                continue
            lora = request.lora_request
            if (lora is not None and self.max_loras is not None and lora.lora_int_id not in adapters
                    and len(adapters) >= self.max_loras):
                passed_over.append(self.waiting.popleft())  # its adapter waits for a free slot
                continue
            hits, num_hit_tokens = self.kv_cache_manager.get_computed_blocks(request)
            num_new = request.num_tokens - num_hit_tokens
            if num_new > budget and not self.enable_chunked_prefill:
                break
            num_new = min(num_new, budget)
            if self.kv_cache_manager.allocate_slots(request, num_new, num_hit_tokens, hits) is None:
                break
            self.waiting.popleft()
            self.running.append(request)
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = num_hit_tokens
            if request.first_scheduled_time is None:
                request.first_scheduled_time = now
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_hit_tokens
            if lora is not None:
                adapters.add(lora.lora_int_id)
            out.scheduled_new_reqs.append(NewRequestData(
                request.request_id, request.prompt_token_ids, list(request.output_token_ids),
                request.sampling_params, self.kv_cache_manager.get_block_ids(request.request_id), num_hit_tokens,
                lora))
            budget -= self._take(request, num_new, out)
        self.waiting.extendleft(reversed(passed_over))

    def _take(self, request: Request, num_new: int, out: SchedulerOutput, pending: int = 0) -> int:
        """Record ``num_new`` scheduled tokens; spec tokens beyond them are dropped."""
        num_spec = request.num_computed_tokens + num_new - request.num_tokens - pending
        if num_spec > 0:
            request.spec_token_ids = request.spec_token_ids[:num_spec]
            out.scheduled_spec_decode_tokens[request.request_id] = request.spec_token_ids
        elif request.spec_token_ids:
            request.spec_token_ids = []
        out.num_scheduled_tokens[request.request_id] = num_new
        request.num_computed_tokens += num_new
        return num_new

    def _preempt(self, request: Request) -> None:
        self.kv_cache_manager.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.spec_token_ids = []
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)
        self._waiting_unsorted = self.priority_policy

    def _roll_back_rejected(self, request: Request, scheduled_spec: list[int], sampled: list[int]) -> None:
        """``sampled`` is the accepted drafts plus one bonus/corrected token; the
        rejected drafts' K/V are stale, so they count as uncomputed again."""
        if not scheduled_spec:
            return
        num_accepted = len(sampled) - 1
        request.num_computed_tokens -= len(scheduled_spec) - num_accepted
        self.spec_num_draft_tokens += len(scheduled_spec)
        self.spec_num_accepted_tokens += num_accepted
        self.spec_num_verify_steps += 1

    def _append_until_stop(self, request: Request, sampled: list[int]) -> list[int]:
        """Append tokens one by one; the first that stops the request (a stop condition, or
        the end of its grammar) is the last one kept. A stage that raises fails this request
        alone, keeping the tokens appended before it."""
        if len(sampled) == 1 and request.grammar is None:  # the common step: one token, no grammar
            try:
                request.append_output_token_ids(sampled)
                check_stop(request, self.max_model_len)
                return sampled
            except Exception as exc:
                logger.exception("request %s: checking its new tokens failed", request.request_id)
                request.fail(RequestError(f"checking the request's new tokens (stop conditions, grammar) failed: "
                                          f"{exc!r}"))
                return sampled if request.output_token_ids[-1:] == sampled else []
        num_before = len(request.output_token_ids)
        try:
            for count, token_id in enumerate(sampled, 1):
                # the grammar first: a token it refuses must not be emitted, nor pass for an EOS
                if request.grammar is not None and not request.grammar.accept_tokens([token_id]):
                    self._refused_by_grammar(request, token_id)
                    return sampled[:count - 1]
                request.append_output_token_ids([token_id])
                stopped = check_stop(request, self.max_model_len)
                if not stopped and request.grammar is not None and request.grammar.is_terminated():
                    request.status = RequestStatus.FINISHED_STOPPED
                    request.stop_reason = token_id
                    stopped = True
                if stopped:
                    return sampled[:count]
        except Exception as exc:
            logger.exception("request %s: checking its new tokens failed", request.request_id)
            request.fail(RequestError(f"checking the request's new tokens (stop conditions, grammar) failed: "
                                      f"{exc!r}"))
            return request.output_token_ids[num_before:]
        return sampled

    @staticmethod
    def _refused_by_grammar(request: Request, token_id: int) -> None:
        """The bitmask allows only what the grammar accepts, and a row that masks every token
        samples none (the runner reports it), so the grammar and its own bitmask disagree: a
        bug in the guided decoder. End the request rather than emit a token it refuses."""
        logger.error("request %s: the grammar refused token %d, which its bitmask allowed", request.request_id,
                     token_id)
        request.fail(RequestError(f"structured_outputs: the grammar refused token {token_id}, which its own "
                                  "token bitmask allowed"))

    def _free(self, request: Request) -> None:
        self.kv_cache_manager.free(request)
        del self.requests[request.request_id]
        self._finished_req_ids.add(request.request_id)


def _priority_order(request: Request) -> tuple[int, float]:
    return request.priority, request.arrival_time


def check_priority(priority: object, priority_policy: bool) -> None:
    """A ValueError naming ``priority`` (vLLM refuses the same): an int, and nonzero only under the
    priority policy, where FCFS would silently ignore it."""
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise ValueError(f"priority must be an int, got {priority!r}")
    if priority and not priority_policy:
        raise ValueError(f"priority={priority} needs scheduling_policy='priority'; this engine schedules 'fcfs', "
                         "where every request has priority 0")


def _first_rows(logprobs: Logprobs | None, num_rows: int) -> Logprobs | None:
    if logprobs is None or len(logprobs.ranks) == num_rows:
        return logprobs
    return Logprobs(logprobs.token_ids[:num_rows], logprobs.logprobs[:num_rows], logprobs.ranks[:num_rows])
