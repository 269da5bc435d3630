"""Scheduling does not change a greedy token: prefix caching, preemption by recompute,
chunked prefill and a one-request batch all give the plain run's tokens, and every
run ends with no request left in the scheduler and every KV block free.
"""
import pytest

from builders import assert_no_leaks, hf_greedy, make_llm, output_ids, random_prompts
from engine_fixtures import GREEDY, MAX_TOKENS, PROMPTS, checkpoint, generate, llm, plain_ids  # noqa: F401
from tokenmill.sampling_params import SamplingParams


def test_plain_run_matches_transformers(checkpoint, plain_ids):
    assert plain_ids == [hf_greedy(checkpoint[1], prompt, MAX_TOKENS) for prompt in PROMPTS]


def test_plain_run_is_not_degenerate(plain_ids):
    assert all(len(set(ids)) > 1 for ids in plain_ids)
    assert len({tuple(ids) for ids in plain_ids}) == len(PROMPTS)


def test_prefix_caching_gives_the_same_tokens_and_hits(checkpoint, plain_ids):
    llm = make_llm(checkpoint[0], enable_prefix_caching=True)
    assert output_ids(generate(llm, PROMPTS, GREEDY)) == plain_ids
    first_hits = llm.get_stats()["prefix_cache_hits"]
    assert first_hits > 0  # the shared 40-token prefix: its 2 full blocks are computed once
    assert_no_leaks(llm)

    outputs = generate(llm, PROMPTS, GREEDY)  # again: every prompt's full blocks are cached now

    assert output_ids(outputs) == plain_ids
    assert [o.num_cached_tokens for o in outputs] == [(len(p) - 1) // 16 * 16 for p in PROMPTS]
    assert llm.get_stats()["prefix_cache_hits"] == first_hits + sum(o.num_cached_tokens for o in outputs)
    assert_no_leaks(llm)


@pytest.mark.parametrize("enable_prefix_caching", [False, True])
def test_preemption_gives_the_same_tokens(checkpoint, plain_ids, enable_prefix_caching):
    # 19 usable blocks of 16 for 6 requests that need 27 blocks by their ends
    llm = make_llm(checkpoint[0], num_gpu_blocks_override=20, enable_prefix_caching=enable_prefix_caching)
    assert output_ids(generate(llm, PROMPTS, GREEDY)) == plain_ids
    assert llm.get_stats()["num_preemptions"] > 0
    assert_no_leaks(llm)


@pytest.mark.parametrize("max_num_batched_tokens", [1, 7, 32])
def test_chunked_prefill_gives_the_same_tokens(checkpoint, plain_ids, max_num_batched_tokens):
    llm = make_llm(checkpoint[0], max_num_batched_tokens=max_num_batched_tokens)
    assert output_ids(generate(llm, PROMPTS, GREEDY)) == plain_ids
    assert_no_leaks(llm)


def test_one_request_at_a_time_gives_the_same_tokens(checkpoint, plain_ids):
    llm = make_llm(checkpoint[0], max_num_seqs=1)
    assert output_ids(generate(llm, PROMPTS, GREEDY)) == plain_ids
    assert_no_leaks(llm)


def test_preemption_keeps_each_seeded_stream(checkpoint, llm):
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=MAX_TOKENS, ignore_eos=True)
              for i in range(len(PROMPTS))]
    expected = output_ids(generate(llm, PROMPTS, params))
    small = make_llm(checkpoint[0], num_gpu_blocks_override=20)

    assert output_ids(generate(small, PROMPTS, params)) == expected
    assert small.get_stats()["num_preemptions"] > 0
    assert_no_leaks(small)


def test_output_runs_up_to_max_model_len_without_max_tokens(llm):
    prompt = random_prompts([250], seed=5)[0]
    params = SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True)
    completion = generate(llm, [prompt], params)[0].outputs[0]
    assert len(completion.token_ids) == 256 - 250
    assert completion.finish_reason == "length"
    assert_no_leaks(llm)
