"""Scheduler: one token budget, running before waiting, chunked prefill, preemption
by recompute, aborts, stop conditions and spec-token rollback.

Block size 4 throughout. ``FakeRunner`` samples ``TOKEN`` for every request whose
known tokens are all computed; ``step_with`` lets a test say what was sampled.
"""
import itertools
from collections import defaultdict

import pytest

from tokenmill.config import CacheConfig, SchedulerConfig
from tokenmill.request import Request, RequestStatus
from tokenmill.sampling_params import SamplingParams
from tokenmill.scheduler import Scheduler
from tokenmill.step import CachedRequestData, EngineCoreOutput, Logprobs, ModelRunnerOutput, NewRequestData

BLOCK_SIZE = 4
TOKEN = 7
_fresh_token_ids = itertools.count(1000)  # default prompts never share a prefix


def make_scheduler(*, num_blocks: int = 65, max_num_batched_tokens: int = 64, max_num_seqs: int = 16,
                   enable_chunked_prefill: bool = True, enable_prefix_caching: bool = True,
                   max_model_len: int = 128) -> Scheduler:
    return Scheduler(
        SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                        enable_chunked_prefill=enable_chunked_prefill),
        CacheConfig(block_size=BLOCK_SIZE, enable_prefix_caching=enable_prefix_caching),
        num_blocks=num_blocks, max_model_len=max_model_len)


def make_request(req_id: str, num_prompt_tokens: int = 4, *, prompt: list[int] | None = None,
                 eos_token_id: int | None = None, status: RequestStatus = RequestStatus.WAITING,
                 **params) -> Request:
    if prompt is None:
        prompt = [next(_fresh_token_ids) for _ in range(num_prompt_tokens)]
    params.setdefault("max_tokens", 100)
    return Request(req_id, prompt, SamplingParams(**params), eos_token_id=eos_token_id, status=status)


def add(scheduler: Scheduler, *requests: Request) -> None:
    for request in requests:
        scheduler.add_request(request)


class FakeRunner:
    """Samples ``token_id`` once a request's known tokens are all computed, after the
    first ``num_accepted`` of its scheduled drafts; proposes ``drafts`` for next step."""

    def __init__(self, scheduler: Scheduler, token_id: int = TOKEN, num_accepted: int = 0,
                 drafts: list[int] | None = None) -> None:
        self.scheduler, self.token_id, self.num_accepted, self.drafts = scheduler, token_id, num_accepted, drafts

    def execute(self, out) -> ModelRunnerOutput:
        req_ids, sampled = list(out.num_scheduled_tokens), []
        for req_id in req_ids:
            request = self.scheduler.requests[req_id]
            spec = out.scheduled_spec_decode_tokens.get(req_id, [])
            is_done = request.num_computed_tokens >= request.num_tokens
            sampled.append([*spec[:self.num_accepted], self.token_id] if is_done else [])
        drafts = {r: list(self.drafts) for r, s in zip(req_ids, sampled) if s and self.drafts}
        return ModelRunnerOutput(req_ids, sampled, draft_token_ids=drafts)


def step(scheduler: Scheduler, runner: FakeRunner | None = None):
    out = scheduler.schedule()
    assert out.total_num_scheduled_tokens <= scheduler.max_num_batched_tokens
    return out, scheduler.update_from_output(out, (runner or FakeRunner(scheduler)).execute(out))


def step_with(scheduler: Scheduler, sampled: dict[str, list[int]], **runner_fields):
    """One step whose runner sampled exactly ``sampled`` (other scheduled requests: nothing)."""
    out = scheduler.schedule()
    req_ids = list(out.num_scheduled_tokens)
    runner_output = ModelRunnerOutput(req_ids, [sampled.get(r, []) for r in req_ids], **runner_fields)
    return out, scheduler.update_from_output(out, runner_output)


def run_until_done(scheduler: Scheduler, runner: FakeRunner | None = None, max_steps: int = 1000):
    tokens: dict[str, list[int]] = defaultdict(list)
    reasons: dict[str, str] = {}
    for _ in range(max_steps):
        if not scheduler.has_unfinished_requests():
            return dict(tokens), reasons
        for output in step(scheduler, runner)[1]:
            tokens[output.req_id] += output.new_token_ids
            if output.finished:
                reasons[output.req_id] = output.finish_reason
    raise AssertionError(f"requests still unfinished after {max_steps} steps")


def assert_no_leaks(scheduler: Scheduler) -> None:
    kv = scheduler.kv_cache_manager
    assert not scheduler.has_unfinished_requests()
    assert (scheduler.running, list(scheduler.waiting)) == ([], [])
    assert kv.num_free_blocks == kv.num_usable_blocks
    assert all(block.ref_cnt == 0 for block in kv.block_pool.blocks)


def finish_all(scheduler: Scheduler) -> None:
    run_until_done(scheduler)
    assert_no_leaks(scheduler)


# ---- budget and admission ----

def test_waiting_requests_are_admitted_fcfs_and_the_last_one_chunked_to_the_budget():
    scheduler = make_scheduler(max_num_batched_tokens=16)
    a, b, c = make_request("a", 10), make_request("b", 10), make_request("c", 10)
    add(scheduler, a, b, c)
    out = scheduler.schedule()
    assert out.num_scheduled_tokens == {"a": 10, "b": 6}
    assert out.total_num_scheduled_tokens == 16
    assert out.scheduled_new_reqs == [
        NewRequestData("a", a.prompt_token_ids, [], a.sampling_params, [1, 2, 3], 0),
        NewRequestData("b", b.prompt_token_ids, [], b.sampling_params, [4, 5], 0)]
    assert (a.num_computed_tokens, b.num_computed_tokens) == (10, 6)
    assert list(scheduler.waiting) == [c]


def test_a_prompt_longer_than_the_budget_is_prefilled_in_chunks():
    scheduler = make_scheduler(max_num_batched_tokens=16)
    add(scheduler, make_request("a", 40))
    first, outputs = step(scheduler)
    assert (first.num_scheduled_tokens, outputs) == ({"a": 16}, [])
    second, outputs = step(scheduler)
    assert second.scheduled_cached_reqs == [CachedRequestData("a", [5, 6, 7, 8], 16)]
    assert (second.num_scheduled_tokens, outputs) == ({"a": 16}, [])
    third, outputs = step(scheduler)
    assert third.num_scheduled_tokens == {"a": 8}
    assert [o.new_token_ids for o in outputs] == [[TOKEN]]
    assert step(scheduler)[0].num_scheduled_tokens == {"a": 1}
    finish_all(scheduler)


def test_running_requests_are_scheduled_before_waiting_ones():
    scheduler = make_scheduler(max_num_batched_tokens=8)
    add(scheduler, make_request("a", 4))
    step(scheduler)
    add(scheduler, make_request("b", 20))
    assert scheduler.schedule().num_scheduled_tokens == {"a": 1, "b": 7}


def test_max_num_seqs_caps_the_running_requests():
    scheduler = make_scheduler(max_num_seqs=2)
    add(scheduler, *(make_request(r, 4, max_tokens=2) for r in "abc"))
    assert step(scheduler)[0].num_scheduled_tokens == {"a": 4, "b": 4}
    assert step(scheduler)[0].num_scheduled_tokens == {"a": 1, "b": 1}
    assert step(scheduler)[0].num_scheduled_tokens == {"c": 4}
    finish_all(scheduler)


def test_without_chunked_prefill_a_prompt_that_does_not_fit_waits_and_blocks_those_behind_it():
    scheduler = make_scheduler(max_num_batched_tokens=32, max_model_len=32, enable_chunked_prefill=False)
    add(scheduler, make_request("a", 20), make_request("b", 20), make_request("c", 4))
    assert step(scheduler)[0].num_scheduled_tokens == {"a": 20}
    assert step(scheduler)[0].num_scheduled_tokens == {"a": 1, "b": 20, "c": 4}
    finish_all(scheduler)


def test_without_chunked_prefill_the_budget_must_hold_the_longest_sequence():
    with pytest.raises(ValueError, match="max_num_batched_tokens must be >= 128 .*enable_chunked_prefill is "
                                         "False.*got 64"):
        make_scheduler(max_num_batched_tokens=64, enable_chunked_prefill=False)


def test_a_waiting_for_grammar_request_is_passed_over_until_it_is_waiting():
    scheduler = make_scheduler()
    compiling = make_request("a", 4, status=RequestStatus.WAITING_FOR_GRAMMAR)
    add(scheduler, compiling, make_request("b", 4))
    assert step(scheduler)[0].num_scheduled_tokens == {"b": 4}
    assert list(scheduler.waiting) == [compiling]
    compiling.status = RequestStatus.WAITING
    assert step(scheduler)[0].num_scheduled_tokens == {"b": 1, "a": 4}
    finish_all(scheduler)


def test_a_request_id_can_be_added_only_once():
    scheduler = make_scheduler()
    add(scheduler, make_request("a"))
    with pytest.raises(ValueError, match="request_id 'a' is already in the scheduler"):
        add(scheduler, make_request("a"))


def test_a_new_request_must_be_waiting():
    with pytest.raises(ValueError, match="must be WAITING or WAITING_FOR_GRAMMAR, got RUNNING"):
        add(make_scheduler(), make_request("a", status=RequestStatus.RUNNING))


# ---- prompts that can never run ----

def test_a_prompt_larger_than_the_cache_is_ignored_and_reported_by_the_next_update():
    scheduler = make_scheduler(num_blocks=5)  # 16 slots
    too_big, fits = make_request("big", 17), make_request("fits", 16, max_tokens=1)
    add(scheduler, too_big, fits)
    assert too_big.status == RequestStatus.FINISHED_IGNORED
    assert scheduler.get_num_unfinished_requests() == 2
    out, outputs = step(scheduler)
    assert out.num_scheduled_tokens == {"fits": 16}
    assert outputs == [EngineCoreOutput("big", [], finish_reason="length"),
                       EngineCoreOutput("fits", [TOKEN], finish_reason="length")]
    assert_no_leaks(scheduler)


def test_a_prompt_reaching_max_model_len_is_ignored():
    scheduler = make_scheduler(max_model_len=8)
    add(scheduler, make_request("a", 8))
    assert step(scheduler)[1] == [EngineCoreOutput("a", [], finish_reason="length")]
    assert_no_leaks(scheduler)


# ---- preemption ----

def two_requests_filling_the_cache() -> tuple[Scheduler, Request, Request]:
    """4 usable blocks; a and b (6-token prompts) hold two each and have each sampled 3 tokens."""
    scheduler = make_scheduler(num_blocks=5)
    a, b = make_request("a", 6, max_tokens=4), make_request("b", 6, max_tokens=4)
    add(scheduler, a, b)
    for _ in range(3):
        step(scheduler)
    assert (scheduler.kv_cache_manager.num_free_blocks, a.num_tokens, b.num_tokens) == (0, 9, 9)
    return scheduler, a, b


def test_when_blocks_run_out_the_last_admitted_request_is_preempted_by_recompute():
    scheduler, a, b = two_requests_filling_the_cache()
    out, _ = step(scheduler)
    assert (out.num_scheduled_tokens, out.preempted_req_ids) == ({"a": 1}, {"b"})
    assert out.scheduled_cached_reqs == [CachedRequestData("a", [4], 8)]
    assert (b.status, b.num_computed_tokens, b.output_token_ids) == (RequestStatus.PREEMPTED, 0, [TOKEN] * 3)
    assert (b.num_preemptions, scheduler.stats()["num_preemptions"]) == (1, 1)
    assert list(scheduler.waiting) == [b]


def test_no_waiting_request_is_admitted_in_a_step_that_preempted():
    scheduler, a, b = two_requests_filling_the_cache()
    late = make_request("late", 3)
    add(scheduler, late)
    out, _ = step(scheduler)
    assert out.scheduled_new_reqs == []
    assert list(scheduler.waiting) == [b, late]
    finish_all(scheduler)


def test_a_preempted_request_resumes_as_a_new_request_with_its_outputs():
    scheduler, a, b = two_requests_filling_the_cache()
    step(scheduler)  # a finishes (max_tokens 4); b was preempted
    out, outputs = step(scheduler)
    # b's first block is still cached; its second was reallocated to a and evicted
    assert out.scheduled_new_reqs == [NewRequestData("b", b.prompt_token_ids, [TOKEN] * 3, b.sampling_params,
                                                     [3, 4, 2], 4)]
    assert out.num_scheduled_tokens == {"b": 5}
    assert outputs == [EngineCoreOutput("b", [TOKEN], finish_reason="length")]
    assert_no_leaks(scheduler)


def test_a_running_request_that_must_preempt_itself_ends_the_running_pass():
    scheduler = make_scheduler(num_blocks=5)
    a, b = make_request("a", 5), make_request("b", 7)
    add(scheduler, a, b)
    step(scheduler)
    step(scheduler)
    out, _ = step(scheduler)  # b needs a third block and is the last running request
    assert (out.num_scheduled_tokens, out.preempted_req_ids) == ({"a": 1}, {"b"})
    assert scheduler.running == [a]


def test_every_request_finishes_under_a_tiny_cache():
    scheduler = make_scheduler(num_blocks=5)  # each request alone needs the whole cache
    add(scheduler, *(make_request(f"r{i}", 6, max_tokens=8) for i in range(5)))
    tokens, reasons = run_until_done(scheduler)
    assert tokens == {f"r{i}": [TOKEN] * 8 for i in range(5)}
    assert set(reasons.values()) == {"length"}
    assert scheduler.num_preemptions > 0
    assert_no_leaks(scheduler)


# ---- aborts and engine-detected finishes ----

def test_abort_a_waiting_request():
    scheduler = make_scheduler()
    add(scheduler, make_request("a"))
    assert scheduler.abort_requests(["a"]) == ["a"]
    assert scheduler.schedule().finished_req_ids == {"a"}
    assert_no_leaks(scheduler)


def test_abort_a_running_request_frees_its_blocks_and_tells_the_runner():
    scheduler = make_scheduler()
    a = make_request("a", 6)
    add(scheduler, a, make_request("b", 4))
    step(scheduler)
    assert scheduler.abort_requests("a") == ["a"]
    assert a.status == RequestStatus.FINISHED_ABORTED
    out, _ = step(scheduler)
    assert (out.finished_req_ids, out.num_scheduled_tokens) == ({"a"}, {"b": 1})
    assert scheduler.schedule().finished_req_ids == set()


def test_abort_a_preempted_request():
    scheduler, a, b = two_requests_filling_the_cache()
    step(scheduler)
    assert scheduler.abort_requests(["b"]) == ["b"]
    assert b.status == RequestStatus.FINISHED_ABORTED
    assert_no_leaks(scheduler)


def test_aborting_finished_or_unknown_requests_does_nothing():
    scheduler = make_scheduler()
    add(scheduler, make_request("a", max_tokens=1))
    step(scheduler)
    assert scheduler.abort_requests(["a", "never-added"]) == []


def test_a_request_aborted_after_scheduling_ignores_its_runner_row():
    scheduler = make_scheduler()
    add(scheduler, make_request("a"))
    out = scheduler.schedule()
    scheduler.abort_requests(["a"])
    assert scheduler.update_from_output(out, ModelRunnerOutput(["a"], [[TOKEN]])) == []
    assert_no_leaks(scheduler)


def test_finish_requests_ends_a_request_with_the_engines_reason():
    scheduler = make_scheduler()
    a = make_request("a")
    add(scheduler, a)
    step(scheduler)
    assert scheduler.finish_requests(["a"], RequestStatus.FINISHED_STOPPED) == ["a"]
    assert a.status == RequestStatus.FINISHED_STOPPED
    assert_no_leaks(scheduler)


def test_finish_requests_needs_a_finished_status():
    with pytest.raises(ValueError, match="finished_status must be a FINISHED_\\* status, got RUNNING"):
        make_scheduler().finish_requests(["a"], RequestStatus.RUNNING)


# ---- stop conditions ----

def decoding(scheduler: Scheduler, num_prompt_tokens: int = 4, **kwargs) -> Request:
    """A request whose prompt is computed and which has sampled one token (1)."""
    request = make_request("a", num_prompt_tokens, **kwargs)
    add(scheduler, request)
    step_with(scheduler, {"a": [1]})
    return request


def test_eos_stops_and_is_kept_in_the_output():
    scheduler = make_scheduler()
    request = decoding(scheduler, eos_token_id=2)
    _, outputs = step_with(scheduler, {"a": [2]})
    assert outputs == [EngineCoreOutput("a", [2], finish_reason="stop")]
    assert (request.output_token_ids, request.status) == ([1, 2], RequestStatus.FINISHED_STOPPED)
    assert_no_leaks(scheduler)


def test_ignore_eos_keeps_going_past_eos():
    scheduler = make_scheduler()
    decoding(scheduler, eos_token_id=2, ignore_eos=True)
    assert step_with(scheduler, {"a": [2]})[1] == [EngineCoreOutput("a", [2])]


def test_a_stop_token_stops_and_is_the_stop_reason():
    scheduler = make_scheduler()
    decoding(scheduler, stop_token_ids=[9])
    assert step_with(scheduler, {"a": [9]})[1] == [EngineCoreOutput("a", [9], finish_reason="stop", stop_reason=9)]


def test_eos_and_stop_tokens_count_only_from_min_tokens_on():
    scheduler = make_scheduler()
    decoding(scheduler, eos_token_id=2, stop_token_ids=[9], min_tokens=3)
    assert step_with(scheduler, {"a": [9]})[1] == [EngineCoreOutput("a", [9])]
    assert step_with(scheduler, {"a": [2]})[1] == [EngineCoreOutput("a", [2], finish_reason="stop")]


def test_max_tokens_caps_the_output():
    scheduler = make_scheduler()
    request = decoding(scheduler, max_tokens=2)
    assert step_with(scheduler, {"a": [5]})[1] == [EngineCoreOutput("a", [5], finish_reason="length")]
    assert request.status == RequestStatus.FINISHED_LENGTH_CAPPED


def test_eos_as_the_last_allowed_token_is_a_stop():
    scheduler = make_scheduler()
    decoding(scheduler, eos_token_id=2, max_tokens=2)
    assert step_with(scheduler, {"a": [2]})[1] == [EngineCoreOutput("a", [2], finish_reason="stop")]


def test_max_model_len_caps_the_sequence():
    scheduler = make_scheduler(max_model_len=6)
    decoding(scheduler, max_tokens=None)
    assert step_with(scheduler, {"a": [5]})[1] == [EngineCoreOutput("a", [5], finish_reason="length")]


def test_a_stop_inside_an_accepted_spec_run_discards_the_rest():
    scheduler = make_scheduler()
    request = decoding(scheduler, stop_token_ids=[9])
    request.spec_token_ids = [5, 9, 6]
    rows = Logprobs([[t] for t in (5, 9, 6, 8)], [[-0.5]] * 4, [1] * 4)
    _, outputs = step_with(scheduler, {"a": [5, 9, 6, 8]}, logprobs={"a": rows})
    assert outputs == [EngineCoreOutput("a", [5, 9], Logprobs([[5], [9]], [[-0.5]] * 2, [1, 1]),
                                        finish_reason="stop", stop_reason=9)]
    assert request.output_token_ids == [1, 5, 9]
    assert_no_leaks(scheduler)


# ---- speculative decoding ----

def test_drafts_are_scheduled_after_the_last_token():
    scheduler = make_scheduler()
    decoding(scheduler)
    scheduler.requests["a"].spec_token_ids = [1, 2, 3]
    out = scheduler.schedule()
    assert (out.num_scheduled_tokens, out.scheduled_spec_decode_tokens) == ({"a": 4}, {"a": [1, 2, 3]})
    assert out.scheduled_cached_reqs == [CachedRequestData("a", [2], 4)]


def test_rejected_drafts_are_rolled_back():
    scheduler = make_scheduler()
    request = decoding(scheduler)
    request.spec_token_ids = [1, 2, 3]
    _, outputs = step_with(scheduler, {"a": [1, 5]}, draft_token_ids={"a": [6, 6]})  # 1 accepted, then 5
    assert outputs == [EngineCoreOutput("a", [1, 5])]
    assert (request.num_tokens, request.num_computed_tokens) == (7, 6)
    assert request.spec_token_ids == [6, 6]
    stats = scheduler.stats()
    assert (stats["spec_num_draft_tokens"], stats["spec_num_accepted_tokens"]) == (3, 1)


def test_a_runner_sampling_more_than_drafts_plus_one_is_an_error():
    scheduler = make_scheduler()
    request = decoding(scheduler)
    request.spec_token_ids = [1]
    with pytest.raises(ValueError, match="request 'a': the runner sampled 3 tokens, at most 2"):
        step_with(scheduler, {"a": [1, 2, 3]})


def test_drafts_that_do_not_fit_the_budget_are_dropped_for_the_step():
    scheduler = make_scheduler(max_num_batched_tokens=3)
    request = decoding(scheduler, num_prompt_tokens=2)
    request.spec_token_ids = [1, 2, 3]
    out = scheduler.schedule()
    assert (out.num_scheduled_tokens, out.scheduled_spec_decode_tokens) == ({"a": 3}, {"a": [1, 2]})
    assert request.spec_token_ids == [1, 2]


def test_drafts_never_reach_past_max_model_len():
    scheduler = make_scheduler(max_model_len=7)
    request = decoding(scheduler, max_tokens=None)
    request.spec_token_ids = [1, 2, 3]
    assert scheduler.schedule().scheduled_spec_decode_tokens == {"a": [1]}  # positions 4, 5 of 0..6


def test_spec_decoding_with_partial_acceptance_finishes_every_request():
    scheduler = make_scheduler(num_blocks=9)
    add(scheduler, *(make_request(f"r{i}", 5, max_tokens=9) for i in range(4)))
    tokens, _ = run_until_done(scheduler, FakeRunner(scheduler, num_accepted=2, drafts=[TOKEN, TOKEN, 3]))
    assert tokens == {f"r{i}": [TOKEN] * 9 for i in range(4)}
    assert scheduler.spec_num_accepted_tokens > 0
    assert_no_leaks(scheduler)


# ---- outputs ----

def test_a_partial_prompt_chunk_reports_only_its_prompt_logprobs():
    scheduler = make_scheduler(max_num_batched_tokens=4)
    add(scheduler, make_request("a", 8, prompt_logprobs=1))
    chunk = Logprobs([[1, 2]] * 4, [[-0.1, -2.0]] * 4, [1] * 4)
    assert step_with(scheduler, {}, prompt_logprobs={"a": chunk})[1] == [
        EngineCoreOutput("a", [], new_prompt_logprobs=chunk)]


def test_a_prefix_cache_hit_starts_the_request_past_its_cached_tokens():
    scheduler = make_scheduler()
    prompt = list(range(10, 19))
    add(scheduler, make_request("a", prompt=prompt))
    step(scheduler)
    add(scheduler, make_request("b", prompt=prompt))
    out, outputs = step(scheduler)
    assert out.scheduled_new_reqs[0].num_computed_tokens == 8
    assert out.num_scheduled_tokens == {"a": 1, "b": 1}
    assert outputs[1] == EngineCoreOutput("b", [TOKEN], num_cached_tokens=8)
    stats = scheduler.stats()
    assert (stats["prefix_cache_queries"], stats["prefix_cache_hits"]) == (18, 8)


def test_without_prefix_caching_nothing_hits():
    scheduler = make_scheduler(enable_prefix_caching=False)
    add(scheduler, make_request("a", prompt=list(range(9))))
    step(scheduler)
    add(scheduler, make_request("b", prompt=list(range(9))))
    assert step(scheduler)[0].num_scheduled_tokens == {"a": 1, "b": 9}


def test_stats_report_queues_blocks_and_counters():
    scheduler = make_scheduler(num_blocks=11)
    add(scheduler, make_request("a", 8), make_request("b", 4, status=RequestStatus.WAITING_FOR_GRAMMAR))
    step(scheduler)
    assert scheduler.stats() == {
        "num_running": 1, "num_waiting": 1, "num_preemptions": 0, "prefix_cache_queries": 8,
        "prefix_cache_hits": 0, "num_free_blocks": 8, "num_total_blocks": 10, "kv_cache_usage": pytest.approx(0.2),
        "spec_num_draft_tokens": 0, "spec_num_accepted_tokens": 0, "spec_num_verify_steps": 0}


# ---------------------------------------------------------------- LoRA adapters

def test_no_step_runs_more_distinct_adapters_than_max_loras():
    from tokenmill.lora_request import LoRARequest

    scheduler = Scheduler(SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=64),
                          CacheConfig(block_size=BLOCK_SIZE), num_blocks=65, max_model_len=128, max_loras=2)
    loras = [LoRARequest(f"a{i}", i, f"/adapters/{i}") for i in (1, 2, 3)]
    requests = [make_request("r0", max_tokens=3), make_request("r1", max_tokens=3), make_request("r2", max_tokens=3),
                make_request("r3", max_tokens=3), make_request("r4", max_tokens=3)]
    for request, lora in zip(requests, [loras[0], loras[1], loras[2], loras[0], None]):
        request.lora_request = lora
    add(scheduler, *requests)
    seen_together = []
    for _ in range(20):
        out, _ = step(scheduler)
        running = {scheduler.requests[r].lora_request for r in out.num_scheduled_tokens if r in scheduler.requests}
        seen_together.append({lora.lora_int_id for lora in running if lora is not None})
        if not scheduler.has_unfinished_requests():
            break
    assert all(len(ids) <= 2 for ids in seen_together)
    assert seen_together[0] == {1, 2}  # r2's adapter 3 waits; r3 (adapter 1) and r4 (base) are admitted past it
    assert any(3 in ids for ids in seen_together) and not scheduler.has_unfinished_requests()


def test_a_new_request_tells_the_runner_its_adapter():
    from tokenmill.lora_request import LoRARequest

    scheduler = make_scheduler()
    request = make_request("r0")
    request.lora_request = LoRARequest("a", 7, "/adapters/a")
    add(scheduler, request)
    out = scheduler.schedule()
    assert out.scheduled_new_reqs[0].lora_request == request.lora_request


def test_prefix_cache_blocks_are_keyed_by_adapter():
    from tokenmill.kv_cache.hashing import update_block_hashes
    from tokenmill.lora_request import LoRARequest

    prompt = list(range(100, 100 + 2 * BLOCK_SIZE))
    hashes = {}
    for name, lora in [("base", None), ("a", LoRARequest("a", 1, "/a")), ("a again", LoRARequest("a", 1, "/a")),
                       ("b", LoRARequest("b", 2, "/b"))]:
        request = make_request(name, prompt=prompt)
        request.lora_request = lora
        update_block_hashes(request, BLOCK_SIZE)
        hashes[name] = request.block_hashes
    assert hashes["a"] == hashes["a again"]
    assert len({tuple(h) for h in hashes.values()}) == 3
    assert all(not set(hashes["base"]) & set(hashes[k]) for k in ("a", "b")) and not set(hashes["a"]) & set(hashes["b"])
