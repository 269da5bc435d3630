"""Sampling options through the engine, checked against their exact meaning: a reference
greedy loop over the transformers model with the same mask, bias or penalty, the plain
run, or single requests with the same seed. Every test ends with the leak check.
"""
import dataclasses

import pytest
import torch

from builders import (EOS_TOKEN_ID, assert_no_leaks, hf_greedy_loop, hf_logprobs, make_llm, output_ids,
                      random_prompts, word)
from engine_fixtures import GREEDY, MAX_TOKENS, PROMPTS, checkpoint, generate, llm, plain_ids  # noqa: F401
from tokenmill.sampling_params import SamplingParams


def test_seeded_sampling_does_not_depend_on_the_batch(llm):
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=MAX_TOKENS, ignore_eos=True)
    alone = generate(llm, [PROMPTS[2]], seeded)[0].outputs[0].token_ids
    others = [GREEDY, SamplingParams(temperature=0.8, max_tokens=5), seeded, dataclasses.replace(seeded, seed=99),
              SamplingParams(temperature=1.0, top_k=5, max_tokens=30)]
    batched = generate(llm, [PROMPTS[0], PROMPTS[5], PROMPTS[2], PROMPTS[2], PROMPTS[4]], others)

    assert batched[2].outputs[0].token_ids == alone
    assert batched[3].outputs[0].token_ids != alone  # another seed, another stream
    assert_no_leaks(llm)


def test_n_gives_n_distinct_completions_seeded_like_single_requests(llm):
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=MAX_TOKENS, ignore_eos=True)
    outputs = generate(llm, [PROMPTS[1]], params)

    assert len(outputs) == 1 and outputs[0].finished
    completions = outputs[0].outputs
    assert [c.index for c in completions] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in completions}) == 3
    singles = generate(llm, [PROMPTS[1]] * 3, [dataclasses.replace(params, n=1, seed=7 + i) for i in range(3)])
    assert [c.token_ids for c in completions] == output_ids(singles)  # child i draws with seed + i
    assert_no_leaks(llm)


def test_stop_string_ends_the_text_before_it(llm, plain_ids):
    plain = generate(llm, [PROMPTS[3]], GREEDY)[0].outputs[0]
    ids = plain_ids[3]
    assert plain.text == "".join(f" {word(t)}" for t in ids) and EOS_TOKEN_ID not in ids
    stop = f"{word(ids[4])} {word(ids[5])}"
    assert plain.text.find(stop) == len("".join(f" {word(t)}" for t in ids[:4])) + 1  # first seen at ids[4]

    completion = generate(llm, [PROMPTS[3]], dataclasses.replace(GREEDY, stop=["zzz", stop]))[0].outputs[0]

    assert completion.text == "".join(f" {word(t)}" for t in ids[:4]) + " "
    assert (completion.finish_reason, completion.stop_reason) == ("stop", stop)
    assert completion.token_ids == ids[:6]  # up to the token that completed the stop string
    assert_no_leaks(llm)


def test_stop_token_id_ends_the_request_and_is_not_in_the_text(llm, plain_ids):
    ids = plain_ids[3]
    stop_token = ids[5]
    first = ids.index(stop_token)

    completion = generate(llm, [PROMPTS[3]], dataclasses.replace(GREEDY, stop_token_ids=[stop_token]))[0].outputs[0]

    assert completion.token_ids == ids[:first + 1]
    assert completion.text == "".join(f" {word(t)}" for t in ids[:first])
    assert (completion.finish_reason, completion.stop_reason) == ("stop", stop_token)
    assert_no_leaks(llm)


def test_min_tokens_holds_back_stop_tokens(llm, checkpoint, plain_ids):
    prompt, stop_token, min_tokens = PROMPTS[0], plain_ids[0][1], 4  # greedy's second token

    def ban_stop_token(output_ids, logits):
        if len(output_ids) < min_tokens:
            logits[stop_token] = float("-inf")

    reference = hf_greedy_loop(checkpoint[1], prompt, MAX_TOKENS, ban_stop_token)
    assert stop_token in reference[min_tokens:]  # it is allowed again, and comes
    expected = reference[:reference.index(stop_token, min_tokens) + 1]

    params = dataclasses.replace(GREEDY, stop_token_ids=[stop_token], min_tokens=min_tokens)
    completion = generate(llm, [prompt], params)[0].outputs[0]

    assert completion.token_ids == expected
    assert (completion.finish_reason, completion.stop_reason) == ("stop", stop_token)
    assert_no_leaks(llm)


def test_logit_bias_forces_a_token(llm, plain_ids):
    forced = 77
    assert forced not in plain_ids[0]
    params = [dataclasses.replace(GREEDY, logit_bias={forced: 100.0}),
              SamplingParams(temperature=1.0, seed=3, max_tokens=MAX_TOKENS, logit_bias={str(forced): 100.0})]
    outputs = generate(llm, [PROMPTS[0]] * 2, params)
    assert output_ids(outputs) == [[forced] * MAX_TOKENS] * 2
    assert_no_leaks(llm)


def test_allowed_token_ids_restrict_greedy_to_their_argmax(llm, checkpoint):
    allowed = [5, 17, 40, 41, 99]

    def keep_allowed(output_ids, logits):
        banned = torch.ones_like(logits, dtype=torch.bool)
        banned[allowed] = False
        logits[banned] = float("-inf")

    expected = hf_greedy_loop(checkpoint[1], PROMPTS[4], MAX_TOKENS, keep_allowed)
    assert len(set(expected)) > 1

    outputs = generate(llm, [PROMPTS[4]], dataclasses.replace(GREEDY, allowed_token_ids=allowed))

    assert output_ids(outputs) == [expected]
    assert_no_leaks(llm)


def test_logprobs_are_per_request_and_match_transformers(llm, checkpoint):
    prompt = PROMPTS[1]
    params = [dataclasses.replace(GREEDY, logprobs=3), GREEDY, dataclasses.replace(GREEDY, logprobs=0)]
    with_three, without, with_zero = (o.outputs[0] for o in generate(llm, [prompt] * 3, params))
    reference = hf_logprobs(checkpoint[1], prompt + with_three.token_ids, MAX_TOKENS + 1)[:-1]

    assert without.logprobs is None and without.cumulative_logprob is None
    assert with_three.token_ids == with_zero.token_ids == without.token_ids
    for entry, token_id, ref in zip(with_three.logprobs, with_three.token_ids, reference):
        assert set(entry) == set(ref.topk(3).indices.tolist())
        for candidate, logprob in entry.items():
            assert logprob.logprob == pytest.approx(ref[candidate].item(), abs=1e-4)
    assert [list(entry) for entry in with_zero.logprobs] == [[t] for t in with_zero.token_ids]
    chosen = [ref[t].item() for ref, t in zip(reference, with_zero.token_ids)]
    reported = [entry[t].logprob for entry, t in zip(with_zero.logprobs, with_zero.token_ids)]
    assert reported == pytest.approx(chosen, abs=1e-4)
    assert with_zero.cumulative_logprob == pytest.approx(sum(chosen), abs=1e-3)
    assert_no_leaks(llm)


def repetition_penalty(prompt, output_ids, logits, penalty):
    """transformers' rule over prompt and output tokens: positive logits divided, negative multiplied."""
    seen = torch.tensor(sorted(set(prompt + output_ids)), dtype=torch.long)
    logits[seen] = torch.where(logits[seen] > 0, logits[seen] / penalty, logits[seen] * penalty)


def frequency_presence_penalty(output_ids, logits, frequency, presence):
    """OpenAI's rule over output tokens: minus frequency * count, minus presence once seen."""
    counts = torch.bincount(torch.tensor(output_ids, dtype=torch.long), minlength=logits.shape[0]).float()
    logits -= frequency * counts + presence * (counts > 0).float()


PENALTIES = {
    "repetition": (dict(repetition_penalty=1.8),
                   lambda prompt, out, logits: repetition_penalty(prompt, out, logits, 1.8)),
    "frequency": (dict(frequency_penalty=1.5),
                  lambda prompt, out, logits: frequency_presence_penalty(out, logits, 1.5, 0.0)),
    "presence": (dict(presence_penalty=1.5),
                 lambda prompt, out, logits: frequency_presence_penalty(out, logits, 0.0, 1.5)),
}


@pytest.mark.parametrize("options, rule", list(PENALTIES.values()), ids=list(PENALTIES))
def test_penalties_follow_their_rule_in_a_mixed_batch(llm, checkpoint, plain_ids, options, rule):
    prompt = PROMPTS[4]
    expected = hf_greedy_loop(checkpoint[1], prompt, MAX_TOKENS, lambda out, logits: rule(prompt, out, logits))
    assert expected != plain_ids[4]  # the penalty changes greedy's choice

    outputs = generate(llm, [PROMPTS[0], prompt], [GREEDY, dataclasses.replace(GREEDY, **options)])

    assert output_ids(outputs) == [plain_ids[0], expected]
    assert_no_leaks(llm)


@pytest.mark.parametrize("max_num_batched_tokens", [512, 16])
def test_prompt_logprobs_match_a_transformers_forward_pass(checkpoint, max_num_batched_tokens):
    llm = make_llm(checkpoint[0], max_num_batched_tokens=max_num_batched_tokens)
    prompt = PROMPTS[3]
    reference = hf_logprobs(checkpoint[1], prompt)  # row p: the distribution of token p + 1

    output = generate(llm, [prompt], SamplingParams(prompt_logprobs=3, max_tokens=2))[0]

    assert len(output.prompt_logprobs) == len(prompt)
    assert output.prompt_logprobs[0] is None
    for position in range(1, len(prompt)):
        entry, ref = output.prompt_logprobs[position], reference[position - 1]
        token_id = prompt[position]
        assert set(entry) == set(ref.topk(3).indices.tolist()) | {token_id}, position
        assert entry[token_id].rank == int((ref > ref[token_id]).sum()) + 1, position
        for candidate, logprob in entry.items():
            assert logprob.logprob == pytest.approx(ref[candidate].item(), abs=1e-4), (position, candidate)
    assert_no_leaks(llm)


def test_prompt_logprobs_do_not_read_the_prefix_cache(checkpoint):
    llm = make_llm(checkpoint[0], enable_prefix_caching=True)
    prompt = PROMPTS[3]
    assert generate(llm, [prompt], GREEDY)[0].num_cached_tokens == 0
    assert generate(llm, [prompt], GREEDY)[0].num_cached_tokens == 96  # cached now

    output = generate(llm, [prompt], dataclasses.replace(GREEDY, prompt_logprobs=0))[0]

    assert output.num_cached_tokens == 0
    assert len(output.prompt_logprobs) == len(prompt)
    assert [list(entry) for entry in output.prompt_logprobs[1:]] == [[t] for t in prompt[1:]]
    assert_no_leaks(llm)


def test_prompt_logprobs_survive_preemption(checkpoint):
    # each request needs 7 blocks by its end; 17 usable blocks cannot hold all three
    llm = make_llm(checkpoint[0], num_gpu_blocks_override=18, max_num_batched_tokens=64)
    prompts = random_prompts([90, 90, 90], seed=4)
    params = SamplingParams(prompt_logprobs=1, temperature=0.0, max_tokens=10, ignore_eos=True)
    expected = generate(make_llm(checkpoint[0]), prompts, params)

    outputs = generate(llm, prompts, params)

    assert llm.get_stats()["num_preemptions"] > 0
    assert output_ids(outputs) == output_ids(expected)
    for output, plain in zip(outputs, expected):
        assert len(output.prompt_logprobs) == len(output.prompt_token_ids) == len(plain.prompt_logprobs)
        assert output.prompt_logprobs[0] is None
        for entry, plain_entry in zip(output.prompt_logprobs[1:], plain.prompt_logprobs[1:]):
            assert entry.keys() == plain_entry.keys()
            for token_id, logprob in entry.items():
                assert logprob.logprob == pytest.approx(plain_entry[token_id].logprob, abs=1e-4)
    assert_no_leaks(llm)
