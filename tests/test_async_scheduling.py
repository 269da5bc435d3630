"""Async scheduling (``async_scheduling=True``): the engine schedules step N+1 while the executor runs
step N, and the tokens are the synchronous loop's, whatever stops, preempts, chunks or aborts a request.

Every engine test here also asserts that two steps really were in flight at once
(``max_steps_in_flight == 2``): with the option off that figure stays 0 and the tests fail.
"""
import pytest

from builders import (BYTE_LEVEL_EOS_TOKEN_ID, assert_no_leaks, make_byte_level_checkpoint, make_llm, output_ids,
                      random_prompts)
from engine_fixtures import GREEDY, MAX_TOKENS, PROMPTS, checkpoint, generate, llm, plain_ids  # noqa: F401
from tokenmill import StructuredOutputsParams
from tokenmill.config import CacheConfig, SchedulerConfig
from tokenmill.errors import ConfigError
from tokenmill.request import Request
from tokenmill.sampling_params import SamplingParams
from tokenmill.scheduler import Scheduler
from tokenmill.step import ModelRunnerOutput

ASYNC = dict(async_scheduling=True)


def assert_overlapped(llm) -> None:
    assert llm.engine.core.max_steps_in_flight == 2


def finished(outputs) -> list[tuple]:
    return [(o.outputs[0].token_ids, o.outputs[0].text, o.outputs[0].finish_reason, o.outputs[0].stop_reason)
            for o in outputs]


def test_greedy_tokens_are_the_synchronous_loops(checkpoint, plain_ids):
    llm = make_llm(checkpoint[0], **ASYNC)
    assert output_ids(generate(llm, PROMPTS, GREEDY)) == plain_ids
    assert_overlapped(llm)
    assert_no_leaks(llm)
    assert output_ids(generate(llm, PROMPTS, GREEDY)) == plain_ids  # again, with prefix-cache hits
    assert llm.get_stats()["prefix_cache_hits"] > 0
    assert_no_leaks(llm)


def test_synchronous_engine_never_overlaps(llm):
    generate(llm, PROMPTS[:2], GREEDY)
    assert llm.engine.core.max_steps_in_flight == 0


def test_stops_and_max_tokens_end_at_the_same_token(checkpoint, llm, plain_ids):
    # each request ends its own way, most while their next step is already in flight
    params = [SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, stop_token_ids=[plain_ids[2][4]]),
              SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, stop_token_ids=[plain_ids[3][0]]),
              SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)]
    expected = finished(generate(llm, PROMPTS, params))
    assert [len(e[0]) for e in expected] == [1, 2, plain_ids[2].index(plain_ids[2][4]) + 1, 1, 7, MAX_TOKENS]
    async_llm = make_llm(checkpoint[0], **ASYNC)
    assert finished(generate(async_llm, PROMPTS, params)) == expected
    assert_overlapped(async_llm)
    assert_no_leaks(async_llm)


def test_stop_strings_end_at_the_same_text(checkpoint, llm, plain_ids):
    words = llm.get_tokenizer().decode(plain_ids[0]).split()
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, stop=[words[5]])
    expected = finished(generate(llm, PROMPTS, params))
    assert expected[0][2] == "stop" and expected[0][3] == words[5]
    async_llm = make_llm(checkpoint[0], **ASYNC)
    assert finished(generate(async_llm, PROMPTS, params)) == expected
    assert_overlapped(async_llm)
    assert_no_leaks(async_llm)


@pytest.mark.parametrize("enable_prefix_caching", [False, True])
def test_preemption_gives_the_same_tokens(checkpoint, plain_ids, enable_prefix_caching):
    llm = make_llm(checkpoint[0], num_gpu_blocks_override=20, enable_prefix_caching=enable_prefix_caching, **ASYNC)
    assert output_ids(generate(llm, PROMPTS, GREEDY)) == plain_ids
    assert llm.get_stats()["num_preemptions"] > 0
    assert_overlapped(llm)
    assert_no_leaks(llm)


def test_preemption_keeps_each_seeded_stream(checkpoint, llm):
    # a request preempted with its token in flight keeps that token: its seeded stream goes on unbroken
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=MAX_TOKENS, ignore_eos=True)
              for i in range(len(PROMPTS))]
    expected = output_ids(generate(llm, PROMPTS, params))
    small = make_llm(checkpoint[0], num_gpu_blocks_override=20, **ASYNC)
    assert output_ids(generate(small, PROMPTS, params)) == expected
    assert small.get_stats()["num_preemptions"] > 0
    assert_overlapped(small)
    assert_no_leaks(small)


@pytest.mark.parametrize("max_num_batched_tokens", [1, 7, 32])
def test_chunked_prefill_gives_the_same_tokens(checkpoint, plain_ids, max_num_batched_tokens):
    llm = make_llm(checkpoint[0], max_num_batched_tokens=max_num_batched_tokens, **ASYNC)
    assert output_ids(generate(llm, PROMPTS, GREEDY)) == plain_ids
    assert_overlapped(llm)
    assert_no_leaks(llm)


def test_logprobs_are_the_synchronous_loops(checkpoint, llm):
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=3, prompt_logprobs=2)
    expected = generate(llm, PROMPTS, params)
    async_llm = make_llm(checkpoint[0], **ASYNC)
    got = generate(async_llm, PROMPTS, params)
    for e, g in zip(expected, got):
        assert g.outputs[0].token_ids == e.outputs[0].token_ids
        assert g.outputs[0].logprobs == e.outputs[0].logprobs
        assert g.prompt_logprobs == e.prompt_logprobs
    assert_overlapped(async_llm)
    assert_no_leaks(async_llm)


def test_abort_while_a_step_is_in_flight(checkpoint, plain_ids):
    llm = make_llm(checkpoint[0], **ASYNC)
    engine = llm.engine
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(str(i), {"prompt_token_ids": prompt}, GREEDY)
    done, step = {}, 0
    while engine.has_unfinished_requests():
        if step == 4:
            assert engine.core._in_flight  # the abort lands between a step's launch and its update
            engine.abort_request(["1", "4"])
        for out in engine.step():
            if out.finished:
                done[out.request_id] = (out.outputs[0].token_ids, out.outputs[0].finish_reason)
        step += 1
    assert {i for i in done} == {"0", "2", "3", "5"}  # aborted requests report through abort_request
    assert all(done[str(i)] == (plain_ids[i], "length") for i in (0, 2, 3, 5))
    assert_overlapped(llm)
    assert_no_leaks(llm)


def test_decode_graphs_give_the_same_tokens(checkpoint, plain_ids):
    llm = make_llm(checkpoint[0], **ASYNC)
    runner = llm.engine.core.runner
    runner.init_cuda_graphs("emulate", [1, 2, 4, 8])
    assert output_ids(generate(llm, PROMPTS, GREEDY)) == plain_ids
    assert sum(runner.graphs.num_runs.values()) >= MAX_TOKENS - 1
    assert_overlapped(llm)
    assert_no_leaks(llm)


def test_requests_added_while_others_decode(checkpoint, plain_ids):
    llm = make_llm(checkpoint[0], **ASYNC)
    engine, pending, done, step = llm.engine, list(enumerate(PROMPTS)), {}, 0
    while pending or engine.has_unfinished_requests():
        if pending and step % 3 == 0:
            i, prompt = pending.pop(0)
            engine.add_request(str(i), {"prompt_token_ids": prompt}, GREEDY)
        for out in engine.step():
            if out.finished:
                done[int(out.request_id)] = out.outputs[0].token_ids
        step += 1
    assert [done[i] for i in range(len(PROMPTS))] == plain_ids
    assert_overlapped(llm)
    assert_no_leaks(llm)


def test_structured_outputs_give_the_same_tokens(tmp_path):
    make_byte_level_checkpoint(tmp_path)
    regex = StructuredOutputsParams(regex=r"[a-c]{3}-[0-9]{2,4}")
    choice = StructuredOutputsParams(choice=["yes", "no", "maybe"])
    params = [SamplingParams(temperature=0.0, max_tokens=12, structured_outputs=regex),
              SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=1.0, seed=3, max_tokens=12, structured_outputs=choice),
              SamplingParams(temperature=1.0, seed=4, max_tokens=12, ignore_eos=True)]
    prompts = ["abc-123", "red green", "yes no", "[1, 2, 3]"]
    sync_llm = make_llm(tmp_path, enable_prefix_caching=False)
    expected = finished(sync_llm.generate(prompts, params, use_tqdm=False))
    assert expected[2][1] in ("yes", "no", "maybe")
    async_llm = make_llm(tmp_path, enable_prefix_caching=False, **ASYNC)
    assert finished(async_llm.generate(prompts, params, use_tqdm=False)) == expected
    assert_overlapped(async_llm)
    assert_no_leaks(async_llm)
    assert BYTE_LEVEL_EOS_TOKEN_ID not in expected[1][0] or expected[1][2] == "length"


def test_speculative_decoding_is_refused_by_name(checkpoint):
    with pytest.raises(ConfigError, match="async_scheduling"):
        make_llm(checkpoint[0], speculative_config={"method": "ngram", "num_speculative_tokens": 2}, **ASYNC)


# ---------------------------------------------------------------- the scheduler's placeholders

def scheduler(**options) -> Scheduler:
    return Scheduler(SchedulerConfig(async_scheduling=True, **options), CacheConfig(block_size=4), num_blocks=64,
                     max_model_len=128)


def request(req_id: str, prompt_len: int, max_tokens: int) -> Request:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return Request(req_id, random_prompts([prompt_len], seed=len(req_id))[0], params)


def test_next_step_computes_the_token_in_flight():
    s = scheduler()
    s.add_request(request("a", 5, 10))
    first = s.schedule()
    assert first.num_scheduled_tokens == {"a": 5}
    second = s.schedule()  # before the first step's update: "a" computes its coming token's position
    assert second.num_scheduled_tokens == {"a": 1}
    assert s.requests["a"].num_computed_tokens == 6 and s.requests["a"].num_tokens == 5
    s.update_from_output(first, ModelRunnerOutput(req_ids=["a"], sampled_token_ids=[[7]]))
    third = s.schedule()
    assert third.num_scheduled_tokens == {"a": 1}
    s.update_from_output(second, ModelRunnerOutput(req_ids=["a"], sampled_token_ids=[[8]]))
    assert s.requests["a"].output_token_ids == [7, 8]


def test_no_step_past_max_tokens():
    s = scheduler()
    s.add_request(request("a", 3, 1))
    s.add_request(request("b", 3, 2))
    first = s.schedule()
    second = s.schedule()
    assert second.num_scheduled_tokens == {"b": 1}  # "a"'s one token is already in flight
    outputs = s.update_from_output(first, ModelRunnerOutput(req_ids=["a", "b"], sampled_token_ids=[[4], [5]]))
    assert [(o.req_id, o.finish_reason) for o in outputs] == [("a", "length"), ("b", None)]
    assert s.schedule().num_scheduled_tokens == {}  # "b"'s last token is in flight
    outputs = s.update_from_output(second, ModelRunnerOutput(req_ids=["b"], sampled_token_ids=[[6]]))
    assert [(o.req_id, o.new_token_ids, o.finish_reason) for o in outputs] == [("b", [6], "length")]


def test_a_token_for_an_ended_request_is_dropped():
    s = scheduler()
    s.add_request(request("a", 3, 5))
    first = s.schedule()
    second = s.schedule()
    s.update_from_output(first, ModelRunnerOutput(req_ids=["a"], sampled_token_ids=[[4]]))
    s.abort_requests("a")
    assert s.update_from_output(second, ModelRunnerOutput(req_ids=["a"], sampled_token_ids=[[5]])) == []
    assert not s.has_unfinished_requests() and s.kv_cache_manager.num_free_blocks == 63
    assert not s._placeholders
