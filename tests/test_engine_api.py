"""The LLM API around the engine: bad input is a ValueError naming the field and leaves
the engine serving; streams (several at once, closed early, aborted); assembly from a
dict or a TOML file; the documented stats.
"""
import dataclasses

import pytest

from builders import assert_no_leaks, output_ids
from engine_fixtures import GREEDY, MAX_TOKENS, PROMPTS, checkpoint, generate, llm, plain_ids  # noqa: F401
from tokenmill.llm import LLM
from tokenmill.sampling_params import SamplingParams


# ---------------------------------------------------------------- bad input

BAD_INPUTS = {
    "over-long prompt": ({"prompt_token_ids": [3] * 256}, SamplingParams(),
                         "prompt has 256 tokens; it must be shorter than max_model_len=256"),
    "out-of-range token id": ({"prompt_token_ids": [3, 128, 4]}, SamplingParams(),
                              r"prompt token id 128 at position 1 is out of range \[0, 128\)"),
    "negative token id": ({"prompt_token_ids": [3, -1]}, SamplingParams(),
                          r"prompt token id -1 at position 1 is out of range \[0, 128\)"),
    "non-int token id": ({"prompt_token_ids": [3, "4"]}, SamplingParams(),
                         r"prompt_token_ids\[1\] must be an int, got '4'"),
    "stop token out of vocabulary": ({"prompt_token_ids": [3]}, SamplingParams(stop_token_ids=[500]),
                                     "stop_token_ids holds token id 500, outside the vocabulary"),
}


@pytest.mark.parametrize("prompt, params, message", list(BAD_INPUTS.values()), ids=list(BAD_INPUTS))
def test_bad_input_is_a_value_error_and_the_engine_goes_on(llm, plain_ids, prompt, params, message):
    with pytest.raises(ValueError, match=message):
        llm.generate([{"prompt_token_ids": PROMPTS[0]}, prompt], [GREEDY, params], use_tqdm=False)
    assert_no_leaks(llm)  # the good prompt before it was not left queued
    assert output_ids(generate(llm, PROMPTS, GREEDY)) == plain_ids


def test_bare_token_id_prompt_with_a_non_int_names_the_position(llm, plain_ids):
    with pytest.raises(ValueError, match=r"prompt_token_ids\[2\] must be an int, got 4.0"):
        llm.generate([3, 5, 4.0], GREEDY, use_tqdm=False)
    assert_no_leaks(llm)
    assert output_ids(generate(llm, PROMPTS[:1], GREEDY)) == plain_ids[:1]


def test_sampling_params_changed_after_construction_are_checked_again(llm, plain_ids):
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    params.temperature = -1.0
    with pytest.raises(ValueError, match=r"temperature must be in \[0, 2\], got -1.0"):
        generate(llm, [PROMPTS[0]], params)
    assert_no_leaks(llm)
    assert output_ids(generate(llm, PROMPTS[:1], GREEDY)) == plain_ids[:1]


# ---------------------------------------------------------------- streaming

def test_stream_deltas_add_up_to_the_full_output(llm):
    full = generate(llm, [PROMPTS[2]], GREEDY)[0].outputs[0]
    deltas = list(llm.stream({"prompt_token_ids": PROMPTS[2]}, GREEDY))

    assert "".join(d.outputs[0].text for d in deltas) == full.text
    assert [t for d in deltas for t in d.outputs[0].token_ids] == full.token_ids
    assert [d.finished for d in deltas] == [False] * (len(deltas) - 1) + [True]
    assert deltas[-1].outputs[0].finish_reason == "length"
    assert_no_leaks(llm)


def test_closing_a_stream_early_aborts_its_request(llm, plain_ids):
    stream = llm.stream({"prompt_token_ids": PROMPTS[2]}, dataclasses.replace(GREEDY, max_tokens=100))
    first = next(stream)
    assert not first.finished and llm.get_stats()["num_running"] == 1
    stream.close()
    assert_no_leaks(llm)
    assert output_ids(generate(llm, PROMPTS[2:3], GREEDY)) == plain_ids[2:3]


def test_interleaved_streams_each_get_all_their_deltas(llm, plain_ids):
    first, second = (llm.stream({"prompt_token_ids": p}, GREEDY) for p in (PROMPTS[0], PROMPTS[4]))
    first_ids, second_ids = [], []
    for a, b in zip(first, second):  # each next() steps the engine for both requests
        first_ids += a.outputs[0].token_ids
        second_ids += b.outputs[0].token_ids
    assert [first_ids, second_ids] == [plain_ids[0], plain_ids[4]]
    assert_no_leaks(llm)


def test_generate_while_a_stream_is_open_takes_none_of_its_deltas(llm, plain_ids):
    stream = llm.stream({"prompt_token_ids": PROMPTS[2]}, GREEDY)
    streamed = list(next(stream).outputs[0].token_ids)

    assert output_ids(generate(llm, PROMPTS[:1], GREEDY)) == plain_ids[:1]  # steps the stream's request too

    streamed += [t for delta in stream for t in delta.outputs[0].token_ids]
    assert streamed == plain_ids[2]
    assert_no_leaks(llm)


def test_abort_ends_an_open_stream(llm):
    stream = llm.stream({"prompt_token_ids": PROMPTS[2]}, dataclasses.replace(GREEDY, max_tokens=100))
    first = next(stream)
    llm.abort(first.request_id)
    rest = list(stream)
    assert len(rest) == 1 and rest[0].finished
    assert rest[0].outputs[0].finish_reason == "abort"
    assert_no_leaks(llm)


# ---------------------------------------------------------------- assembly from a config

def test_from_config_dict(checkpoint, plain_ids):
    llm = LLM.from_config({"model": str(checkpoint[0]), "dtype": "float32", "device": "cpu", "max_model_len": 256,
                           "cache": {"num_gpu_blocks_override": 64, "enable_prefix_caching": False}})
    assert output_ids(generate(llm, PROMPTS, GREEDY)) == plain_ids
    assert llm.get_stats()["num_total_blocks"] == 63  # block 0 is the null block
    assert_no_leaks(llm)


def test_from_config_toml_file_with_overrides(checkpoint, plain_ids, tmp_path):
    config = tmp_path / "engine.toml"
    config.write_text(f'model = "{checkpoint[0]}"\ndtype = "float32"\ndevice = "cpu"\nmax_model_len = 256\n\n'
                      "[cache]\nnum_gpu_blocks_override = 32\nblock_size = 16\n\n"
                      "[scheduler]\nmax_num_batched_tokens = 24\n")
    llm = LLM.from_config(config, max_num_seqs=2)
    assert (llm.config.scheduler.max_num_seqs, llm.config.scheduler.max_num_batched_tokens) == (2, 24)
    assert output_ids(generate(llm, PROMPTS, GREEDY)) == plain_ids
    assert_no_leaks(llm)


def test_get_stats_reports_the_documented_counters(llm):
    stats = llm.get_stats()
    assert {"num_preemptions", "prefix_cache_queries", "prefix_cache_hits", "num_free_blocks", "num_total_blocks",
            "spec_num_draft_tokens", "spec_num_accepted_tokens", "spec_num_verify_steps", "spec_acceptance_rate",
            "spec_mean_accepted_length", "num_grammars_compiling"} <= set(stats)
    ratios = {"kv_cache_usage", "spec_acceptance_rate", "spec_mean_accepted_length"}
    assert all(isinstance(value, int) for key, value in stats.items() if key not in ratios)
    assert (stats["num_total_blocks"], stats["spec_num_draft_tokens"], stats["spec_num_accepted_tokens"]) == (63, 0, 0)
