"""Decode steps replayed from CUDA graphs give the eager engine's tokens.

On CPU the graph path runs *emulated*: the same static buffers, padding rows and
static metadata, the forward called eagerly instead of replayed (the runner's
``init_cuda_graphs("emulate")``). The emulated engine must give the eager engine's
greedy tokens whatever pads the batch (3 requests run at size 4, 5 at 8), while
prompts arrive among decodes, under preemption and prefix caching, with the
``torch`` backend and with the ``triton`` one under the Triton interpreter; the
null block the padding rows read is filled with large random values, so a padding
row leaking into a real one would show.

With a CUDA device (``pytest -m gpu``) the graphs are captured for real: graphs on
and off give the same greedy tokens in fp32, and the engine matches transformers
greedily on tiny configs (fp32: the same tokens; bf16, the CUDA default: at every
step our token is transformers' top token up to a small logit margin).
"""
from __future__ import annotations

import copy
import dataclasses
import os
import warnings

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import transformers  # noqa: E402

from builders import (TINY_CONFIGS, assert_no_leaks, make_checkpoint, make_llm, output_ids,  # noqa: E402
                      random_prompts, token_prompts)
from tokenmill.config import EngineConfig  # noqa: E402
from tokenmill.cuda_graphs import (DecodeGraphRunner, decode_graph_mode, default_capture_sizes,  # noqa: E402
                                   resolve_capture_sizes)
from tokenmill.errors import ConfigError  # noqa: E402
from tokenmill.input_layout import InputLayout, StepBuffers  # noqa: E402
from tokenmill.llm import LLM  # noqa: E402
from tokenmill.plugins.attention import TorchAttentionBackend, TritonAttentionBackend  # noqa: E402
from tokenmill.sampling_params import SamplingParams  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(not INTERPRETED, reason="needs the Triton interpreter (TRITON_INTERPRET=1)")
compiled_on_cuda = pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED,
                                      reason="needs a CUDA device and compiled (not interpreted) kernels")

MAX_TOKENS = 12
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
SHARED_PREFIX = random_prompts([40], seed=1)[0]
PROMPTS = [SHARED_PREFIX + tail for tail in random_prompts([1, 9, 30], seed=2)] + random_prompts([5, 23, 2], seed=3)


def head64_config(name: str) -> transformers.PretrainedConfig:
    """TINY_CONFIGS[name] with heads of 64 (a size the triton backend supports)."""
    config = TINY_CONFIGS[name]
    options = {**config.to_dict(), "hidden_size": 64 * config.num_attention_heads, "head_dim": 64}
    return type(config)(**options)


def emulate_graphs(llm: LLM, sizes: list[int] | None = None) -> DecodeGraphRunner:
    runner = llm.engine.core.runner
    runner.init_cuda_graphs("emulate", sizes)
    return runner.graphs


def poison_null_block(llm: LLM) -> None:
    """Block 0 is reserved: only padding rows attend to it. Large random values there would
    change any real row that mixed with a padding row. (Not NaN: the torch backend gathers whole
    blocks and masks the keys past a row's length, and 0 * NaN is NaN.)"""
    generator = torch.Generator().manual_seed(0)
    for cache in llm.engine.core.kv_caches:
        cache[:, 0] = 100 * torch.randn(cache[:, 0].shape, generator=generator).to(cache.device, cache.dtype)


def generate_ids(llm: LLM, prompts, params=GREEDY) -> list[list[int]]:
    ids = output_ids(llm.generate(token_prompts(prompts), params, use_tqdm=False))
    assert_no_leaks(llm)
    return ids


def staggered_ids(llm: LLM, prompts, params=GREEDY, every: int = 3) -> list[list[int]]:
    """A new prompt every ``every`` steps, while the earlier ones decode."""
    engine, pending, done, step = llm.engine, list(enumerate(prompts)), {}, 0
    while pending or engine.has_unfinished_requests():
        if pending and step % every == 0:
            i, prompt = pending.pop(0)
            engine.add_request(str(i), {"prompt_token_ids": prompt}, params[i] if isinstance(params, list) else params)
        for out in engine.step():
            if out.finished:
                done[int(out.request_id)] = out.outputs[0].token_ids
        step += 1
    assert_no_leaks(llm)
    return [done[i] for i in range(len(prompts))]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    return path, make_checkpoint(path, TINY_CONFIGS["llama-gqa-untied"])


# ---------------------------------------------------------------- capture sizes and options

def test_default_ladder_is_powers_of_two_to_8_then_multiples_of_8_up_to_max_num_seqs():
    assert default_capture_sizes(1) == [1]
    assert default_capture_sizes(3) == [1, 2, 3]
    assert default_capture_sizes(8) == [1, 2, 4, 8]
    assert default_capture_sizes(20) == [1, 2, 4, 8, 16, 20]
    ladder = default_capture_sizes(256)
    assert ladder[:5] == [1, 2, 4, 8, 16] and ladder[-1] == 256 and len(ladder) == 3 + 32
    assert all(b - a == 8 for a, b in zip(ladder[3:], ladder[4:]))


def test_capture_sizes_are_capped_by_the_seats_and_the_token_budget():
    assert resolve_capture_sizes(None, 16) == [1, 2, 4, 8, 16]
    assert resolve_capture_sizes(None, 256, max_num_tokens=12) == [1, 2, 4, 8, 12]
    assert resolve_capture_sizes([8, 2, 2, 64, 1], 16) == [1, 2, 8]
    with pytest.raises(ValueError, match=">= 1"):
        resolve_capture_sizes([0, 4], 16)


def layout(max_num_reqs: int = 8, max_num_tokens: int = 32) -> InputLayout:
    return InputLayout(max_num_tokens=max_num_tokens, max_num_reqs=max_num_reqs, max_blocks_per_req=3, block_size=16,
                       max_model_len=40, device=torch.device("cpu"))


def test_a_batch_pads_to_the_next_captured_size():
    graphs = DecodeGraphRunner(capture_sizes=[8, 1, 4, 2], inputs=layout(), emulate=True)
    assert graphs.sizes == [1, 2, 4, 8]
    assert [graphs.padded_size(n) for n in (1, 2, 3, 4, 5, 8, 9, 0)] == [1, 2, 4, 4, 8, 8, None, None]


def test_real_capture_needs_cuda():
    with pytest.raises(ValueError, match="CUDA"):
        DecodeGraphRunner(capture_sizes=[1], inputs=layout())


def test_enforce_eager_and_capture_sizes_are_engine_options():
    assert EngineConfig.build().model.enforce_eager is False
    assert EngineConfig.build().model.cudagraph_capture_sizes is None
    assert EngineConfig.build(enforce_eager=True).model.enforce_eager is True
    assert EngineConfig.build({"model": {"enforce_eager": True}}).model.enforce_eager is True
    assert EngineConfig.build(cudagraph_capture_sizes=[1, 2, 4]).model.cudagraph_capture_sizes == [1, 2, 4]
    for bad in ([], [0, 2], "x"):
        with pytest.raises(ConfigError, match="cudagraph_capture_sizes"):
            EngineConfig.build(cudagraph_capture_sizes=bad)
    with pytest.raises(ConfigError, match="enforce_eager"):
        EngineConfig.build(enforce_eager="sometimes")


def test_graphs_only_on_cuda_with_a_backend_that_supports_them():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert TritonAttentionBackend.supports_cuda_graphs and not TorchAttentionBackend.supports_cuda_graphs
    assert decode_graph_mode(enforce_eager=False, device=cuda, backend=TritonAttentionBackend) == "capture"
    assert decode_graph_mode(enforce_eager=True, device=cuda, backend=TritonAttentionBackend) == "off"
    assert decode_graph_mode(enforce_eager=False, device=cuda, backend=TorchAttentionBackend) == "off"
    assert decode_graph_mode(enforce_eager=False, device=cpu, backend=TritonAttentionBackend) == "off"


def test_a_cpu_engine_runs_eagerly(checkpoint):
    assert make_llm(checkpoint[0]).engine.core.runner.graphs is None


# ---------------------------------------------------------------- static buffers

def test_one_layout_for_eager_and_graph_steps():
    """A graph step is the eager layout of its rows, then padding rows, in the same buffers."""
    inputs = layout()
    token_ids = np.arange(4 * 41).reshape(4, 41)
    table = np.array([[7, 9, 4], [5, 0, 0], [3, 8, 0], [6, 2, 1]], dtype=np.int32)
    rows, counts, starts = np.array([0, 2, 3]), np.ones(3, dtype=np.int32), np.array([20, 3, 17], dtype=np.int32)
    eager = inputs.prepare(rows, counts, starts, token_ids=token_ids, block_table=table)
    eager_view = (eager.input_ids.tolist(), eager.positions.tolist(), eager.metadata.slot_mapping.tolist(),
                  eager.metadata.seq_lens.tolist(), eager.metadata.query_start_loc.tolist(),
                  eager.metadata.block_tables.tolist())
    assert eager_view == ([20, 2 * 41 + 3, 3 * 41 + 17], [20, 3, 17], [9 * 16 + 4, 3 * 16 + 3, 2 * 16 + 1],
                          [21, 4, 18], [0, 1, 2, 3], [[7, 9], [3, 8], [6, 2]])  # the longest row's 2 blocks
    assert (eager.metadata.num_actual_tokens, eager.metadata.max_seq_len) == (3, 21)

    seen = []
    graphs = DecodeGraphRunner(capture_sizes=[1, 2, 4, 8], inputs=inputs, emulate=True)
    graphs.capture(lambda ids, pos, md: seen.append((ids.clone(), pos.clone(), md)) or ids[:, None].float())
    step = inputs.prepare(rows, counts, starts, token_ids=token_ids, block_table=table,
                          padded_size=graphs.padded_size(3))
    hidden = graphs.run(step)
    assert hidden[:3, 0].tolist() == eager_view[0]
    ids, pos, md = seen[-1]
    assert ids.tolist() == eager_view[0] + [0] and pos.tolist() == eager_view[1] + [0]
    assert (md.num_actual_tokens, md.max_query_len, md.max_seq_len, md.num_reqs) == (4, 1, 40, 4)
    assert md.slot_mapping.tolist() == eager_view[2] + [-1]
    assert md.seq_lens.tolist() == md.seq_lens_cpu.tolist() == eager_view[3] + [1]
    assert md.query_start_loc.tolist() == [0, 1, 2, 3, 4]
    assert md.block_tables.shape == (4, 3)  # full width: a graph's shapes are fixed at capture
    assert md.block_tables[:3, :2].tolist() == eager_view[5] and md.block_tables[3, 0] == 0
    assert step.query_start_loc.tolist() == [0, 1, 2, 3] and step.seq_lens.tolist() == [21, 4, 18]

    # a smaller batch at the same size: the old third row becomes padding, at the same addresses
    graphs.run(inputs.prepare(np.array([1]), np.ones(1, np.int32), np.array([5], np.int32), token_ids=token_ids,
                              block_table=table, padded_size=1))
    assert seen[-1][2].num_actual_tokens == 1 and seen[-1][2].slot_mapping.tolist() == [5 * 16 + 5]
    again = inputs.prepare(np.array([1, 1, 1]), np.ones(3, np.int32), np.array([5, 6, 7], np.int32),
                           token_ids=token_ids, block_table=table, padded_size=4)
    graphs.run(again)
    assert seen[-1][2] is md  # the size's one metadata object, as a replay sees it: forward prepares it each step
    assert md.block_tables[:, 0].tolist() == [5, 5, 5, 0] and md.slot_mapping[3] == -1
    assert dict(graphs.num_runs) == {4: 2, 1: 1}
    with pytest.raises(ValueError, match="captured size"):
        graphs.run(inputs.prepare(rows, counts, starts, token_ids=token_ids, block_table=table))


def test_buffers_a_graph_reads_do_not_grow():
    inputs = layout(max_num_tokens=8)
    counts = np.array([20], dtype=np.int32)
    step = inputs.prepare(np.array([0]), counts, np.zeros(1, np.int32), token_ids=np.zeros((1, 41), np.int64),
                          block_table=np.zeros((1, 3), np.int32))
    assert step.metadata.num_actual_tokens == 20  # an eager step grows them
    inputs = layout(max_num_tokens=8)
    DecodeGraphRunner(capture_sizes=[1, 2], inputs=inputs, emulate=True)
    with pytest.raises(ValueError, match="holds 8 rows"):
        inputs.prepare(np.array([0]), counts, np.zeros(1, np.int32), token_ids=np.zeros((1, 41), np.int64),
                       block_table=np.zeros((1, 3), np.int32))


def test_step_buffers_grow_unless_a_graph_reads_them():
    buffers = StepBuffers(torch.device("cpu"), {"x": ((4,), torch.int64)})
    buffers.acquire(x=10)
    buffers.np["x"][:10] = np.arange(10)
    buffers.upload()
    assert buffers.dev["x"][:10].tolist() == list(range(10))
    fixed = StepBuffers(torch.device("cpu"), {"x": ((4,), torch.int64)}, growable=False)
    with pytest.raises(ValueError, match="holds 4 rows"):
        fixed.acquire(x=5)


# ---------------------------------------------------------------- emulated engine == eager engine

@pytest.mark.parametrize("num_prompts,padded", [(1, 1), (3, 4), (5, 8)])
def test_padded_decode_batches_give_the_eager_tokens(checkpoint, num_prompts, padded):
    prompts = PROMPTS[:num_prompts]
    expected = generate_ids(make_llm(checkpoint[0]), prompts)
    llm = make_llm(checkpoint[0])
    graphs = emulate_graphs(llm)
    poison_null_block(llm)
    assert generate_ids(llm, prompts) == expected
    assert graphs.num_runs[padded] >= MAX_TOKENS - 1  # every decode step of the full batch


def test_prompts_arriving_among_decodes_give_the_eager_tokens(checkpoint):
    params = [dataclasses.replace(GREEDY, max_tokens=6 + 3 * i) for i in range(len(PROMPTS))]
    options = dict(max_num_batched_tokens=24, enable_prefix_caching=False)
    expected = staggered_ids(make_llm(checkpoint[0], **options), PROMPTS, params)
    llm = make_llm(checkpoint[0], **options)
    graphs = emulate_graphs(llm)
    poison_null_block(llm)
    assert staggered_ids(llm, PROMPTS, params) == expected
    assert len(graphs.num_runs) >= 3  # the batch grew and shrank through several sizes


@pytest.mark.parametrize("enable_prefix_caching", [False, True])
def test_preemption_and_prefix_caching_give_the_eager_tokens(checkpoint, enable_prefix_caching):
    # 13 usable blocks of 16 for prompts that need more by their ends: requests are preempted
    options = dict(max_model_len=128, num_gpu_blocks_override=14, enable_prefix_caching=enable_prefix_caching,
                   max_num_batched_tokens=64)
    params = dataclasses.replace(GREEDY, max_tokens=24)
    expected = generate_ids(make_llm(checkpoint[0], **options), PROMPTS, params)
    llm = make_llm(checkpoint[0], **options)
    graphs = emulate_graphs(llm, [1, 2, 4, 8])
    poison_null_block(llm)
    assert generate_ids(llm, PROMPTS, params) == expected
    assert llm.get_stats()["num_preemptions"] > 0 and sum(graphs.num_runs.values()) > 0
    if enable_prefix_caching:  # again, now from the cache
        assert generate_ids(llm, PROMPTS, params) == expected
        assert llm.get_stats()["prefix_cache_hits"] > 0


def test_one_token_prompt_chunks_replay_and_prompt_logprobs_run_eagerly(checkpoint):
    """One token per step: a prompt chunk of one token takes the graph path like a decode,
    unless its prompt logprobs are to be computed."""
    prompt = PROMPTS[4]
    plain = dataclasses.replace(GREEDY, max_tokens=4)
    with_logprobs = dataclasses.replace(plain, prompt_logprobs=2)
    options = dict(max_num_batched_tokens=1, enable_prefix_caching=False)
    eager = make_llm(checkpoint[0], **options)
    expected = eager.generate(token_prompts([prompt]), with_logprobs, use_tqdm=False)[0]
    llm = make_llm(checkpoint[0], **options)
    graphs = emulate_graphs(llm)
    output = llm.generate(token_prompts([prompt]), with_logprobs, use_tqdm=False)[0]
    assert output.outputs[0].token_ids == expected.outputs[0].token_ids
    assert output.prompt_logprobs == expected.prompt_logprobs
    assert sum(graphs.num_runs.values()) == 4  # the prompt's last token, then 3 decodes
    graphs.num_runs.clear()
    assert generate_ids(llm, [prompt], plain) == generate_ids(eager, [prompt], plain)
    assert sum(graphs.num_runs.values()) == len(prompt) + 3  # every step


def test_speculative_decoding_steps_run_eagerly_and_match(checkpoint):
    base = random_prompts([9, 6], seed=11)
    prompts = [base[0] * 3, base[1] * 4, PROMPTS[5]]
    params = dataclasses.replace(GREEDY, max_tokens=20)
    ngram = dict(speculative_config={"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 2,
                                     "prompt_lookup_max": 3})
    expected = generate_ids(make_llm(checkpoint[0]), prompts, params)
    llm = make_llm(checkpoint[0], **ngram)
    emulate_graphs(llm)
    assert generate_ids(llm, prompts, params) == expected
    assert llm.get_stats()["spec_num_draft_tokens"] > 0


@interpreted
@pytest.mark.parametrize("num_kv_splits", [None, 2], ids=["one-split", "two-splits"])
def test_triton_backend_emulated_graphs_give_the_torch_tokens(tmp_path, num_kv_splits):
    make_checkpoint(tmp_path, head64_config("llama-gqa-untied"))
    prompts = random_prompts([3, 17, 40], seed=5)
    options = dict(max_model_len=128, num_gpu_blocks_override=32, max_num_seqs=4, max_num_batched_tokens=32)
    params = dataclasses.replace(GREEDY, max_tokens=6)
    expected = generate_ids(make_llm(tmp_path, attention_backend="torch", **options), prompts, params)
    llm = make_llm(tmp_path, attention_backend="triton", **options)
    backend = llm.engine.core.model.layers[0].self_attn.backend
    backend.num_kv_splits = num_kv_splits
    graphs = emulate_graphs(llm)
    poison_null_block(llm)
    assert generate_ids(llm, prompts, params) == expected
    assert graphs.num_runs[4] > 0


# ---------------------------------------------------------------- parity with transformers

def hf_teacher_forced_logits(hf_model, prompt: list[int], generated: list[int]) -> torch.Tensor:
    """transformers' fp32 logits [len(generated), vocab] for each of our generated positions."""
    device = next(hf_model.parameters()).device
    with torch.no_grad():
        logits = hf_model(torch.tensor([prompt + generated], device=device)).logits[0].float()
    return logits[len(prompt) - 1: len(prompt) - 1 + len(generated)].cpu()


def assert_top_token_parity(hf_model, prompts, generated, margin: float, min_exact: float) -> None:
    """At every step our token is among transformers' top tokens, those within ``margin`` of its
    best logit (low-precision rounding may swap near-ties), on our own prefix (teacher forcing,
    so one swap does not derail the rest); and it is transformers' exact top-1 at a fraction of
    at least ``min_exact`` of the steps."""
    exact = total = 0
    for prompt, ours in zip(prompts, generated):
        logits = hf_teacher_forced_logits(hf_model, prompt, ours)
        best = logits.max(dim=-1).values
        chosen = logits[torch.arange(len(ours)), torch.tensor(ours)]
        assert bool((chosen >= best - margin).all()), (
            f"a token outside transformers' top set: gaps {(best - chosen).tolist()}")
        exact += int((logits.argmax(dim=-1) == torch.tensor(ours)).sum())
        total += len(ours)
    assert exact >= min_exact * total, f"only {exact} of {total} tokens are transformers' top-1"


BF16_MARGIN = 0.25  # logits of these tiny models spread over several units; bf16 moves them by ~0.05
BF16_MIN_EXACT = 0.8


def test_bf16_emulated_graphs_keep_transformers_top_tokens_on_cpu(checkpoint):
    """The bf16 criterion of the GPU test, on CPU (torch backend, emulated graphs)."""
    llm = make_llm(checkpoint[0], dtype="bfloat16")
    emulate_graphs(llm)
    ids = generate_ids(llm, PROMPTS[:4])
    hf_bf16 = copy.deepcopy(checkpoint[1]).to(torch.bfloat16)
    assert_top_token_parity(hf_bf16, PROMPTS[:4], ids, BF16_MARGIN, BF16_MIN_EXACT)


# ---------------------------------------------------------------- CUDA: real graphs

GPU_OPTIONS = dict(device="cuda", max_model_len=256, block_size=16, num_gpu_blocks_override=128,
                   max_num_seqs=16, max_num_batched_tokens=256)
GPU_PROMPTS = random_prompts([3, 17, 40, 90, 1, 33, 64], seed=7)


def gpu_llm(model_dir, **options) -> LLM:
    return LLM(str(model_dir), **{**GPU_OPTIONS, **options})


@pytest.fixture(scope="module")
def gpu_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama64")
    return path, make_checkpoint(path, head64_config("llama-gqa-untied"))


@pytest.mark.gpu
@compiled_on_cuda
def test_gpu_decode_graphs_are_captured_at_start_for_the_ladder(gpu_checkpoint):
    llm = gpu_llm(gpu_checkpoint[0])
    core = llm.engine.core
    assert isinstance(core.model.layers[0].self_attn.backend, TritonAttentionBackend)
    assert core.dtype == torch.bfloat16
    graphs = core.runner.graphs
    assert graphs is not None and not graphs.emulate and graphs.sizes == [1, 2, 4, 8, 16]
    assert set(graphs._graphs) == set(graphs.sizes) and graphs.capture_seconds > 0
    assert gpu_llm(gpu_checkpoint[0], enforce_eager=True).engine.core.runner.graphs is None
    assert gpu_llm(gpu_checkpoint[0], attention_backend="torch").engine.core.runner.graphs is None
    custom = gpu_llm(gpu_checkpoint[0], cudagraph_capture_sizes=[3, 1, 64]).engine.core.runner.graphs
    assert custom.sizes == [1, 3]


@pytest.mark.gpu
@compiled_on_cuda
@pytest.mark.parametrize("options", [{}, dict(max_num_batched_tokens=24), dict(num_gpu_blocks_override=20)],
                         ids=["plain", "mixed-steps", "preemption"])
def test_gpu_graphs_on_and_off_give_the_same_fp32_tokens(gpu_checkpoint, options):
    params = [dataclasses.replace(GREEDY, max_tokens=8 + 4 * i) for i in range(len(GPU_PROMPTS))]
    eager = gpu_llm(gpu_checkpoint[0], dtype="float32", enforce_eager=True, **options)
    llm = gpu_llm(gpu_checkpoint[0], dtype="float32", **options)
    poison_null_block(llm)
    expected = generate_ids(eager, GPU_PROMPTS, params)
    assert generate_ids(llm, GPU_PROMPTS, params) == expected
    assert staggered_ids(llm, GPU_PROMPTS, params) == expected
    assert sum(llm.engine.core.runner.graphs.num_runs.values()) > 0


@pytest.mark.gpu
@compiled_on_cuda
def test_gpu_graphs_with_split_kv_give_the_eager_fp32_tokens(tmp_path):
    """A long max_model_len makes the captured small batches split the KV (the split count is
    fixed at capture from max_model_len); eager steps over short contexts do not split."""
    config = head64_config("llama-gqa-untied")
    config.max_position_embeddings = 4096
    make_checkpoint(tmp_path, config)
    options = dict(dtype="float32", max_model_len=4096, num_gpu_blocks_override=600, max_num_batched_tokens=4096)
    prompts = random_prompts([700, 1500, 30], seed=9)
    params = dataclasses.replace(GREEDY, max_tokens=16)
    llm = gpu_llm(tmp_path, **options)
    graphs = llm.engine.core.runner.graphs
    backend = llm.engine.core.model.layers[0].self_attn.backend
    assert backend.num_kv_splits_for(graphs.inputs.static_metadata(1)) > 1
    assert generate_ids(llm, prompts, params) == generate_ids(gpu_llm(tmp_path, enforce_eager=True, **options),
                                                              prompts, params)
    assert graphs.num_runs[4] > 0


@pytest.mark.gpu
@compiled_on_cuda
@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_gpu_greedy_fp32_equals_transformers(tmp_path, name):
    hf_model = make_checkpoint(tmp_path, head64_config(name)).to("cuda")
    llm = gpu_llm(tmp_path, dtype="float32")
    assert llm.engine.core.runner.graphs is not None
    ids = generate_ids(llm, GPU_PROMPTS)
    for prompt, ours in zip(GPU_PROMPTS, ids):
        with torch.no_grad():
            out = hf_model.generate(torch.tensor([prompt], device="cuda"), do_sample=False, max_new_tokens=MAX_TOKENS,
                                    eos_token_id=None, pad_token_id=0,
                                    attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device="cuda"))
        assert ours == out[0, len(prompt):].tolist()


@pytest.mark.gpu
@compiled_on_cuda
@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_gpu_greedy_bf16_keeps_transformers_top_tokens(tmp_path, name):
    hf_model = make_checkpoint(tmp_path, head64_config(name)).to("cuda", torch.bfloat16)
    llm = gpu_llm(tmp_path)  # dtype auto: bf16 on CUDA
    assert llm.engine.core.dtype == torch.bfloat16 and llm.engine.core.runner.graphs is not None
    ids = generate_ids(llm, GPU_PROMPTS)
    assert_top_token_parity(hf_model, GPU_PROMPTS, ids, BF16_MARGIN, BF16_MIN_EXACT)


@pytest.mark.gpu
@compiled_on_cuda
def test_gpu_greedy_decode_step_syncs_once(gpu_checkpoint):
    """A greedy decode step's one host sync is reading the sampled tokens back."""
    llm = gpu_llm(gpu_checkpoint[0])
    engine = llm.engine
    for i, prompt in enumerate(GPU_PROMPTS[:4]):
        engine.add_request(str(i), {"prompt_token_ids": prompt}, dataclasses.replace(GREEDY, max_tokens=40))
    for _ in range(3):  # prompts, then warm decode steps
        engine.step()
    runs_before = sum(engine.core.runner.graphs.num_runs.values())
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(5):
                engine.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert sum(engine.core.runner.graphs.num_runs.values()) == runs_before + 5
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 5, [str(w.message) for w in syncs]
    engine.abort_request([str(i) for i in range(4)])
