"""SamplingParams: vLLM names and defaults, and one clear error per broken rule."""
import math

import pytest

from tokenmill.sampling_params import MAX_LOGPROBS, SamplingParams, SamplingType, validate_prompt_token_ids
from tokenmill.structured import StructuredOutputsParams


def test_defaults_are_vllms():
    params = SamplingParams()
    assert (params.n, params.temperature, params.top_p, params.top_k, params.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (params.presence_penalty, params.frequency_penalty, params.repetition_penalty) == (0.0, 0.0, 1.0)
    assert (params.seed, params.max_tokens, params.min_tokens) == (None, 16, 0)
    assert (params.stop, params.stop_token_ids) == ([], [])
    assert (params.logprobs, params.prompt_logprobs, params.logit_bias, params.allowed_token_ids) == (None,) * 4
    assert (params.ignore_eos, params.include_stop_str_in_output, params.bad_words) == (False, False, None)
    assert (params.skip_special_tokens, params.spaces_between_special_tokens) == (True, True)
    assert params.structured_outputs is None


@pytest.mark.parametrize("kwargs, message", [
    ({"n": 0}, "n must be in [1, 128], got 0"),
    ({"n": 129}, "n must be in [1, 128], got 129"),
    ({"n": 2.0}, "n must be an int, got 2.0"),
    ({"temperature": 3.0}, "temperature must be in [0, 2], got 3.0"),
    ({"temperature": -0.1}, "temperature must be in [0, 2], got -0.1"),
    ({"temperature": math.nan}, "temperature must be a finite number, got nan"),
    ({"top_p": 0.0}, "top_p must be in (0, 1], got 0.0"),
    ({"top_p": 1.5}, "top_p must be in (0, 1], got 1.5"),
    ({"top_k": -2}, "top_k must be -1, 0 (disabled) or an int in [1, 9223372036854775807], got -2"),
    ({"top_k": 2.5}, "top_k must be -1, 0 (disabled) or an int in [1, 9223372036854775807], got 2.5"),
    ({"top_k": 1 << 63},
     "top_k must be -1, 0 (disabled) or an int in [1, 9223372036854775807], got 9223372036854775808"),
    ({"min_p": 1.1}, "min_p must be in [0, 1], got 1.1"),
    ({"presence_penalty": -2.5}, "presence_penalty must be in [-2, 2], got -2.5"),
    ({"frequency_penalty": 2.5}, "frequency_penalty must be in [-2, 2], got 2.5"),
    ({"repetition_penalty": 0.0}, "repetition_penalty must be in [0.01, 100], got 0.0"),
    ({"repetition_penalty": 1e-300}, "repetition_penalty must be in [0.01, 100], got 1e-300"),
    ({"repetition_penalty": math.inf}, "repetition_penalty must be a finite number, got inf"),
    ({"seed": "7"}, "seed must be an int, got '7'"),
    ({"seed": 1 << 64}, "seed must be in [-9223372036854775808, 9223372036854775807], got 18446744073709551616"),
    ({"seed": -(1 << 63) - 1}, "seed must be in [-9223372036854775808, 9223372036854775807]"),
    ({"max_tokens": 0}, "max_tokens must be >= 1, got 0"),
    ({"min_tokens": -1}, "min_tokens must be in [0, max_tokens=16], got -1"),
    ({"min_tokens": 17}, "min_tokens must be in [0, max_tokens=16], got 17"),
    ({"logprobs": MAX_LOGPROBS + 1}, "logprobs must be an int in [0, 20], got 21"),
    ({"logprobs": -1}, "logprobs=-1 (the full vocabulary) is not supported; ask for at most 20"),
    ({"prompt_logprobs": -1}, "prompt_logprobs=-1 (the full vocabulary) is not supported"),
    ({"prompt_logprobs": 1.0}, "prompt_logprobs must be an int in [0, 20], got 1.0"),
    ({"stop": ["ok", ""]}, "stop strings must not be empty"),
    ({"stop": [1]}, "stop must be a string or a list of strings, got [1]"),
    ({"stop_token_ids": [-1]}, "stop_token_ids must hold ints >= 0, got -1"),
    ({"stop_token_ids": [True]}, "stop_token_ids must hold ints >= 0, got True"),
    ({"logit_bias": {"x": 1.0}}, "logit_bias keys must be token ids >= 0 (ints or strings of ints), got 'x'"),
    ({"logit_bias": {-3: 1.0}}, "logit_bias keys must be token ids >= 0"),
    ({"logit_bias": {3: math.inf}}, "logit_bias[3] must be a finite number, got inf"),
    ({"logit_bias": {3: 1e308}}, "logit_bias[3] must be in [-100, 100], got 1e+308"),
    ({"stop": ["ok", "a\ud800b"]}, "stop[1] holds a lone surrogate (U+D800) at index 1"),
    ({"bad_words": ["\udfff"]}, "bad_words[0] holds a lone surrogate (U+DFFF) at index 0"),
    ({"allowed_token_ids": []}, "allowed_token_ids must not be empty when given"),
    ({"allowed_token_ids": [1, "2"]}, "allowed_token_ids must hold ints >= 0, got '2'"),
    ({"bad_words": ["fine", ""]}, "bad_words must be a list of non-empty strings"),
    ({"bad_words": "word"}, "bad_words must be a list of non-empty strings"),
    ({"structured_outputs": "json"}, "structured_outputs must be a StructuredOutputsParams or a dict, got str"),
])
def test_each_broken_rule_names_the_field_and_the_rule(kwargs, message):
    with pytest.raises(ValueError) as info:
        SamplingParams(**kwargs)
    assert message in str(info.value)


@pytest.mark.parametrize("kwargs", [
    {"temperature": 0.0}, {"temperature": 2}, {"top_p": 1e-3}, {"top_k": -1}, {"top_k": 1}, {"top_k": (1 << 63) - 1}, {"min_p": 1.0},
    {"repetition_penalty": 0.01}, {"repetition_penalty": 100}, {"seed": 0}, {"seed": -(1 << 63)},
    {"seed": (1 << 63) - 1}, {"max_tokens": None, "min_tokens": 1000}, {"min_tokens": 16},
    {"logprobs": 0}, {"logprobs": MAX_LOGPROBS}, {"prompt_logprobs": 0}, {"n": 128},
])
def test_values_on_the_boundaries_are_accepted(kwargs):
    SamplingParams(**kwargs)


def test_best_of_is_rejected_as_deprecated():
    with pytest.raises(ValueError, match="best_of is deprecated in V1; use n and pick among the outputs"):
        SamplingParams(best_of=2)


def test_logits_processors_are_rejected_as_deprecated():
    with pytest.raises(ValueError, match="logits_processors is deprecated in V1"):
        SamplingParams(logits_processors=[lambda token_ids, logits: logits])


def test_a_single_stop_string_becomes_a_list():
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]


def test_stop_token_ids_become_a_list():
    assert SamplingParams(stop_token_ids=(5, 6)).stop_token_ids == [5, 6]


def test_logit_bias_string_keys_become_token_ids():
    assert SamplingParams(logit_bias={"12": 5, 3: -1.5}).logit_bias == {12: 5.0, 3: -1.5}


def test_structured_outputs_dict_is_converted():
    params = SamplingParams(structured_outputs={"regex": "[0-9]+"})
    assert params.structured_outputs == StructuredOutputsParams(regex="[0-9]+")


def test_structured_outputs_dict_is_checked_like_the_params():
    with pytest.raises(ValueError, match="exactly one of json, regex"):
        SamplingParams(structured_outputs={"regex": "a", "choice": ["b"]})


@pytest.mark.parametrize("temperature, seed, expected", [
    (0.0, None, SamplingType.GREEDY), (1e-6, 3, SamplingType.GREEDY),
    (0.7, None, SamplingType.RANDOM), (0.7, 3, SamplingType.RANDOM_SEED),
])
def test_sampling_type_is_greedy_below_epsilon_temperature(temperature, seed, expected):
    params = SamplingParams(temperature=temperature, seed=seed)
    assert params.sampling_type is expected
    assert params.is_greedy is (expected is SamplingType.GREEDY)


@pytest.mark.parametrize("field, value, message", [
    ("stop_token_ids", [3, 100], "stop_token_ids holds token id 100, outside the vocabulary (vocab_size=100)"),
    ("logit_bias", {99: 1.0, 150: 2.0}, "logit_bias holds token id 150, outside the vocabulary (vocab_size=100)"),
    ("allowed_token_ids", [101], "allowed_token_ids holds token id 101, outside the vocabulary (vocab_size=100)"),
])
def test_validate_for_vocab_names_the_field_and_the_vocab_size(field, value, message):
    params = SamplingParams(**{field: value})
    with pytest.raises(ValueError) as info:
        params.validate_for_vocab(100)
    assert str(info.value) == message


@pytest.mark.parametrize("field", ["logprobs", "prompt_logprobs"])
def test_validate_for_vocab_refuses_more_top_logprobs_than_tokens(field):
    with pytest.raises(ValueError, match=f"{field} must be <= the vocabulary size \\(10\\), got 12"):
        SamplingParams(**{field: 12}).validate_for_vocab(10)


def test_validate_for_vocab_accepts_ids_below_the_vocab_size():
    SamplingParams(stop_token_ids=[99], logit_bias={0: 1.0}, allowed_token_ids=[1, 99]).validate_for_vocab(100)


@pytest.mark.parametrize("prompt, message", [
    ([], "prompt must not be empty"),
    ([1] * 8, "prompt has 8 tokens; it must be shorter than max_model_len=8"),
    ([1, 2, 100], "prompt token id 100 at position 2 is out of range [0, 100)"),
    ([1, -1], "prompt token id -1 at position 1 is out of range [0, 100)"),
])
def test_validate_prompt_token_ids(prompt, message):
    with pytest.raises(ValueError) as info:
        validate_prompt_token_ids(prompt, vocab_size=100, max_model_len=8)
    assert str(info.value) == message


def test_validate_prompt_token_ids_accepts_a_prompt_one_shorter_than_max_model_len():
    validate_prompt_token_ids([0, 99] * 3 + [5], vocab_size=100, max_model_len=8)
