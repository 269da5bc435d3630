"""generation_config.json: several EOS ids end generation, and its sampling defaults fill
what a request leaves unset (LLM.generate without params, absent server fields);
generation_config="vllm" ignores the file."""
import json

import httpx
import pytest

from builders import EOS_TOKEN_ID, TINY_CONFIGS, make_checkpoint, make_llm, output_ids, random_prompts, token_prompts
from server_builders import make_engine, run_server
from tokenmill.errors import ConfigError
from tokenmill.generation_config import GenerationDefaults, load_generation_defaults
from tokenmill.sampling_params import SamplingParams

PROMPTS = random_prompts([7, 12], seed=5)
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("genconfig")
    make_checkpoint(path, TINY_CONFIGS["llama-gqa-untied"])
    return path


def write_generation_config(path, **fields) -> None:
    (path / "generation_config.json").write_text(json.dumps(fields))


@pytest.fixture(scope="module")
def free_run(checkpoint):
    """Greedy tokens with nothing ending them early."""
    return output_ids(make_llm(checkpoint, generation_config="vllm").generate(token_prompts(PROMPTS), GREEDY,
                                                                             use_tqdm=False))


def test_auto_reads_the_file_vllm_ignores_it_and_a_folder_must_hold_one(tmp_path):
    write_generation_config(tmp_path, eos_token_id=[2, 7], temperature=0.6, top_p=0.9, max_new_tokens=40,
                            do_sample=True)
    defaults = load_generation_defaults("auto", tmp_path)
    assert defaults.eos_token_ids == (2, 7)
    assert dict(defaults.sampling) == {"temperature": 0.6, "top_p": 0.9, "max_tokens": 40}
    assert load_generation_defaults("vllm", tmp_path) == GenerationDefaults()
    assert load_generation_defaults("auto", tmp_path / "elsewhere") == GenerationDefaults()  # no file: no defaults
    with pytest.raises(ConfigError, match="generation_config: no generation_config.json"):
        load_generation_defaults(str(tmp_path / "elsewhere"), tmp_path)


def test_a_default_the_engine_refuses_names_the_file(tmp_path):
    write_generation_config(tmp_path, top_p=0.0)
    with pytest.raises(ConfigError, match="generation_config.json.*top_p"):
        load_generation_defaults("auto", tmp_path)
    write_generation_config(tmp_path, eos_token_id="</s>")
    with pytest.raises(ConfigError, match="eos_token_id"):
        load_generation_defaults("auto", tmp_path)


def test_every_eos_id_of_the_generation_config_ends_generation(checkpoint, tmp_path, free_run):
    stop_at = free_run[0][3]  # the 4th greedy token of the first prompt becomes a second EOS id
    folder = tmp_path / "gc"
    folder.mkdir()
    write_generation_config(folder, eos_token_id=[EOS_TOKEN_ID, stop_at])
    llm = make_llm(checkpoint, generation_config=str(folder))
    params = SamplingParams(temperature=0.0, max_tokens=12)
    out = llm.generate(token_prompts(PROMPTS[:1]), params, use_tqdm=False)[0].outputs[0]
    first = free_run[0].index(stop_at)
    assert out.token_ids == free_run[0][: first + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop_at)
    ignoring = llm.generate(token_prompts(PROMPTS[:1]), GREEDY, use_tqdm=False)[0].outputs[0]
    assert ignoring.token_ids == free_run[0]  # ignore_eos ignores them all
    assert params.stop_token_ids == []  # the caller's params are left as they were

    ignored = make_llm(checkpoint, generation_config="vllm").generate(token_prompts(PROMPTS[:1]), params,
                                                                      use_tqdm=False)[0].outputs[0]
    assert ignored.token_ids[first] == stop_at and len(ignored.token_ids) > first + 1


def test_sampling_defaults_apply_where_params_are_not_given(checkpoint, tmp_path, free_run):
    folder = tmp_path / "gc"
    folder.mkdir()
    write_generation_config(folder, temperature=0.0, max_new_tokens=5)
    llm = make_llm(checkpoint, generation_config=str(folder))
    assert llm.get_default_sampling_params().max_tokens == 5
    assert llm.get_default_sampling_params().temperature == 0.0
    outputs = output_ids(llm.generate(token_prompts(PROMPTS), use_tqdm=False))
    assert outputs == [ids[:5] for ids in free_run]  # greedy, 5 tokens (no EOS in the free run's first 5)
    assert make_llm(checkpoint, generation_config="vllm").get_default_sampling_params() == SamplingParams()


def test_server_fields_a_request_leaves_unset_take_the_defaults(checkpoint, tmp_path, free_run):
    folder = tmp_path / "gc"
    folder.mkdir()
    write_generation_config(folder, temperature=0.0, max_new_tokens=4)
    with run_server(make_engine(checkpoint, generation_config=str(folder))) as server:
        body = {"model": "tiny", "prompt": PROMPTS[0], "ignore_eos": True}
        unset = httpx.post(f"{server.api_url}/completions", json=body, timeout=30).json()
        assert unset["usage"]["completion_tokens"] == 4
        assert unset["choices"][0]["text"].split() == [f"w{t}" for t in free_run[0][:4]]
        explicit = httpx.post(f"{server.api_url}/completions", json={**body, "max_tokens": 7}, timeout=30).json()
        assert explicit["usage"]["completion_tokens"] == 7
        chat = httpx.post(f"{server.api_url}/chat/completions", timeout=30, json={
            "model": "tiny", "messages": [{"role": "user", "content": "w5 w6"}], "ignore_eos": True}).json()
        assert chat["usage"]["completion_tokens"] == 4
