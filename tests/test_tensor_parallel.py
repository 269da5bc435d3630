"""Tensor parallelism end to end: engines at tensor_parallel_size 2 (and 4) in worker processes ("mp")
and Ray actors ("ray", a local Ray instance), gloo on CPU, against the same engine at size 1 in fp32:
greedy tokens identical, with prefix caching, preemption, speculative decoding and structured
outputs. Each check also asserts that the feature it names was really exercised (cache hits,
preemptions, drafts, worker processes holding shards).

The layer-level checks (each family's logits at size 2, KV replication, quantized shards) are in
test_tensor_parallel_layers.py; transport and failure handling in test_executor.py.
"""
from __future__ import annotations

import pytest
import transformers

from builders import (TINY_CONFIGS, TINY_ENGINE_OPTIONS, make_byte_level_checkpoint, make_checkpoint, random_prompts,
                      token_prompts)
from tokenmill import LLM, SamplingParams, StructuredOutputsParams
from tokenmill.executor.multiproc import MultiprocExecutor

GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
PROMPTS = token_prompts(random_prompts([7, 19, 33, 50, 3], seed=11))
QWEN3 = transformers.Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
                                 bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
                                 architectures=["Qwen3ForCausalLM"])


def ids(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def checkpoint_of(tmp_path_factory, config) -> str:
    path = tmp_path_factory.mktemp(config.architectures[0])
    make_checkpoint(path, config)
    return str(path)


def pair(path: str, size: int = 2, backend: str = "mp", **options) -> tuple[LLM, LLM]:
    """The engine at ``size`` and the same engine at size 1, in this process."""
    options = {**TINY_ENGINE_OPTIONS, **options}
    parallel = LLM(path, **options, tensor_parallel_size=size, distributed_executor_backend=backend)
    return parallel, LLM(path, **options)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """4 query heads, 2 KV heads, a byte-level tokenizer (so structured outputs decode real text)."""
    path = tmp_path_factory.mktemp("llama")
    make_byte_level_checkpoint(path)
    return str(path)


@pytest.fixture(scope="module")
def llama_pair(llama):
    parallel, single = pair(llama)
    yield parallel, single
    parallel.shutdown()


def test_size_2_in_worker_processes_gives_size_1_tokens(llama_pair):
    parallel, single = llama_pair
    executor = parallel.engine.core.executor
    assert isinstance(executor, MultiprocExecutor) and len(executor.processes) == 2
    assert parallel.engine.core.model is None  # the shards live in the workers
    logprobs = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=3)
    ours, theirs = parallel.generate(PROMPTS, logprobs, use_tqdm=False), single.generate(PROMPTS, logprobs,
                                                                                         use_tqdm=False)
    assert ids(ours) == ids(theirs)
    for a, b in zip(ours, theirs):
        for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert x.keys() == y.keys()
            assert all(abs(x[t].logprob - y[t].logprob) < 1e-4 for t in x)


def test_size_2_prefix_caching_hits_and_changes_no_token(llama_pair):
    parallel, single = llama_pair
    shared = random_prompts([40], seed=5)[0]
    prompts = token_prompts([shared + [9, 10], shared + [11], shared + [12, 13, 14]])
    before = parallel.get_stats()["prefix_cache_hits"]
    assert ids(parallel.generate(prompts, GREEDY, use_tqdm=False)) == ids(single.generate(prompts, GREEDY,
                                                                                          use_tqdm=False))
    assert parallel.get_stats()["prefix_cache_hits"] > before


def test_size_2_structured_outputs_equal_size_1(llama_pair):
    parallel, single = llama_pair
    choices = ["yes", "no", "maybe so"]
    params = SamplingParams(temperature=0.0, max_tokens=8, structured_outputs=StructuredOutputsParams(choice=choices))
    prompts = ["Is the sky blue? ", "Answer in one word: ", "Will it rain tomorrow? "]
    ours = [o.outputs[0].text for o in parallel.generate(prompts, params, use_tqdm=False)]
    assert ours == [o.outputs[0].text for o in single.generate(prompts, params, use_tqdm=False)]
    assert all(text in choices for text in ours), ours


def test_size_2_preemption_and_speculative_decoding_change_no_token(llama):
    # 12 blocks of 16 tokens for 6 requests growing to ~70 tokens each: some must be preempted
    parallel, single = pair(llama, num_gpu_blocks_override=12, max_num_seqs=6, max_model_len=128,
                            speculative_config={"method": "ngram", "num_speculative_tokens": 3,
                                                "prompt_lookup_min": 1, "prompt_lookup_max": 3})
    try:
        repetitive = [list(range(10, 20)) * 4 for _ in range(6)]
        prompts = token_prompts([p[: 30 + i] for i, p in enumerate(repetitive)])
        params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
        assert ids(parallel.generate(prompts, params, use_tqdm=False)) == ids(single.generate(prompts, params,
                                                                                              use_tqdm=False))
        stats = parallel.get_stats()
        assert stats["num_preemptions"] > 0 and stats["spec_num_draft_tokens"] > 0
    finally:
        parallel.shutdown()


def test_size_2_with_async_scheduling_and_preemption_gives_size_1_tokens(llama):
    # the worker processes run a step while the driver schedules the next one
    options = {**TINY_ENGINE_OPTIONS, "num_gpu_blocks_override": 12, "max_num_seqs": 6, "max_model_len": 128}
    parallel = LLM(llama, **options, tensor_parallel_size=2, async_scheduling=True)
    single = LLM(llama, **options)
    try:
        prompts = token_prompts(random_prompts([30, 31, 32, 33, 34, 35], seed=12))
        params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
        assert ids(parallel.generate(prompts, params, use_tqdm=False)) == ids(single.generate(prompts, params,
                                                                                              use_tqdm=False))
        assert parallel.get_stats()["num_preemptions"] > 0
        assert parallel.engine.core.max_steps_in_flight == 2
    finally:
        parallel.shutdown()


@pytest.mark.parametrize("config", [TINY_CONFIGS["qwen2-gqa-tied"], QWEN3], ids=["qwen2-biases-tied", "qwen3-qk-norm"])
def test_size_2_other_families_give_size_1_tokens(tmp_path_factory, config):
    parallel, single = pair(checkpoint_of(tmp_path_factory, config))
    try:
        assert ids(parallel.generate(PROMPTS, GREEDY, use_tqdm=False)) == ids(single.generate(PROMPTS, GREEDY,
                                                                                              use_tqdm=False))
    finally:
        parallel.shutdown()


def test_size_4_with_2_kv_heads_replicates_them_and_gives_size_1_tokens(llama):
    parallel, single = pair(llama, size=4)
    try:
        assert len(parallel.engine.core.executor.processes) == 4
        assert ids(parallel.generate(PROMPTS, GREEDY, use_tqdm=False)) == ids(single.generate(PROMPTS, GREEDY,
                                                                                              use_tqdm=False))
    finally:
        parallel.shutdown()


def test_size_2_on_ray_actors_gives_size_1_tokens(llama):
    from tokenmill.executor.ray_executor import RayExecutor

    parallel, single = pair(llama, backend="ray")
    try:
        assert isinstance(parallel.engine.core.executor, RayExecutor)
        assert ids(parallel.generate(PROMPTS, GREEDY, use_tqdm=False)) == ids(single.generate(PROMPTS, GREEDY,
                                                                                              use_tqdm=False))
    finally:
        parallel.shutdown()


def test_killing_one_rank_mid_generation_ends_generate_within_a_minute_and_reaps_the_other(llama):
    import os
    import signal
    import threading
    import time

    from tokenmill.executor import EngineDeadError

    parallel = LLM(llama, **TINY_ENGINE_OPTIONS, tensor_parallel_size=2)
    processes = parallel.engine.core.executor.processes
    timer = threading.Timer(1.0, os.kill, (processes[1].pid, signal.SIGKILL))  # rank 0 is then stuck in a collective
    params = SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)
    began = time.monotonic()
    timer.start()
    with pytest.raises(EngineDeadError, match="worker 1"):
        for _ in range(100):
            parallel.generate(token_prompts(random_prompts([20] * 8, seed=4)), params, use_tqdm=False)
    timer.cancel()
    assert time.monotonic() - began < 60
    assert all(p.poll() is not None for p in processes)
