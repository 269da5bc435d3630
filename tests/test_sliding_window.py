"""A model whose every layer slides: the KV cache frees the blocks behind the window as a
request advances, and neither that nor prefix caching, chunked prefill across the window
edge or preemption changes a greedy token (transformers is the reference)."""
import pytest
import transformers

from builders import (_BASE, assert_no_leaks, hf_greedy, make_checkpoint, make_llm, output_ids, random_prompts,
                      token_prompts)
from tokenmill import hookimpl
from tokenmill.config import EngineConfig
from tokenmill.errors import ConfigError
from tokenmill.llm_engine import LLMEngine
from tokenmill.plugins.attention import TorchAttentionBackend
from tokenmill.registry import BUILTIN_PLUGINS, Registry
from tokenmill.sampling_params import SamplingParams

WINDOW = 10
BLOCK_SIZE = 4
MAX_TOKENS = 30
PROMPTS = random_prompts([37, 9, 23], seed=11)
SHARED = PROMPTS[0][:28]  # a prefix longer than the window, whole blocks of it
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
OPTIONS = dict(block_size=BLOCK_SIZE, max_model_len=128)


@pytest.fixture(scope="module")
def windowed(tmp_path_factory):
    path = tmp_path_factory.mktemp("mistral-window")
    config = transformers.MistralConfig(**{**_BASE, "max_position_embeddings": 128}, num_attention_heads=4,
                                        num_key_value_heads=2, sliding_window=WINDOW,
                                        architectures=["MistralForCausalLM"])
    hf_model = make_checkpoint(path, config)
    return path, [hf_greedy(hf_model, p, MAX_TOKENS) for p in PROMPTS]


def test_the_model_tells_the_cache_its_window(windowed):
    llm = make_llm(windowed[0], **OPTIONS)
    assert llm.engine.core.scheduler.kv_cache_manager.sliding_window == WINDOW


@pytest.mark.parametrize("options", [
    dict(enable_prefix_caching=False),
    dict(enable_prefix_caching=True),
    dict(max_num_batched_tokens=7),  # prompts in chunks of up to 7 tokens, crossing the window edge
    dict(num_gpu_blocks_override=9, max_num_seqs=3, max_num_batched_tokens=8),  # 8 usable blocks, 3 requests
], ids=["no-prefix-caching", "prefix-caching", "chunked", "preempted"])
def test_greedy_tokens_match_transformers(windowed, options):
    path, expected = windowed
    llm = make_llm(path, **{**OPTIONS, **options})
    assert output_ids(llm.generate(token_prompts(PROMPTS), GREEDY, use_tqdm=False)) == expected
    assert_no_leaks(llm)
    if "num_gpu_blocks_override" in options:
        assert llm.get_stats()["num_preemptions"] > 0


def test_prefix_cache_hits_past_the_window_change_no_token(windowed):
    path, _ = windowed
    llm = make_llm(path, **OPTIONS)
    first = output_ids(llm.generate(token_prompts([SHARED + [5, 6, 7]]), GREEDY, use_tqdm=False))
    queries, hits = llm.get_stats()["prefix_cache_queries"], llm.get_stats()["prefix_cache_hits"]
    again = output_ids(llm.generate(token_prompts([SHARED + [5, 6, 7]]), GREEDY, use_tqdm=False))
    assert llm.get_stats()["prefix_cache_hits"] - hits >= 28  # the shared blocks were found
    assert llm.get_stats()["prefix_cache_queries"] > queries
    assert again == first
    cold = make_llm(path, **OPTIONS, enable_prefix_caching=False)
    assert output_ids(cold.generate(token_prompts([SHARED + [5, 6, 7]]), GREEDY, use_tqdm=False)) == first


def test_a_request_holds_only_the_blocks_its_window_reaches(windowed):
    path, expected = windowed
    llm = make_llm(path, **OPTIONS)
    engine, manager = llm.engine, llm.engine.core.scheduler.kv_cache_manager
    engine.add_request("long", {"prompt_token_ids": PROMPTS[0]}, GREEDY)
    held, tokens = [], []
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens = out.outputs[0].token_ids
        table = manager.get_block_ids("long")
        held.append(sum(1 for block_id in table if block_id != 0))
        if table and len(held) > 1:
            assert table[0] == 0  # after the prompt's step, the first block is behind the window
    assert tokens == expected[0]
    # a decode step starting at position c reads keys from c - W + 1: at most (W - 1) // 4 + 2 blocks
    assert max(held[1:]) <= (WINDOW - 1) // BLOCK_SIZE + 2
    assert held[0] <= -(-len(PROMPTS[0]) // BLOCK_SIZE)
    assert_no_leaks(llm)


def test_a_small_cache_serves_long_requests_when_every_layer_slides(windowed):
    path, expected = windowed
    # 6 usable blocks (24 tokens) cannot hold a 67-token request; its window and a decode step need 4
    llm = make_llm(path, block_size=BLOCK_SIZE, max_model_len=128, num_gpu_blocks_override=7, max_num_seqs=1,
                   max_num_batched_tokens=8)
    assert llm.engine.core.scheduler.max_model_len == 128
    assert output_ids(llm.generate(token_prompts(PROMPTS[:1]), GREEDY, use_tqdm=False)) == expected[:1]
    assert_no_leaks(llm)


class Windowless(TorchAttentionBackend):
    name = "windowless"
    supports_sliding_window = False


@hookimpl
def tokenmill_register_attention_backends(register):  # this module is a plugin for the test below
    register(Windowless)


def test_a_backend_without_windows_is_refused_by_name(windowed):
    registry = Registry(builtins=[*BUILTIN_PLUGINS, __name__], entry_points=False)
    config = EngineConfig.build(model=str(windowed[0]), attention_backend="windowless", dtype="float32",
                                device="cpu", **OPTIONS, num_gpu_blocks_override=64)
    with pytest.raises(ConfigError, match="'windowless' cannot run MistralForCausalLM: the model's layers use "
                                          "sliding windows, which it does not support"):
        LLMEngine(config, registry)
