"""The ``triton`` attention backend and its kernels, against the ``torch`` backend.

Without a CUDA device the kernels run under the Triton interpreter: this module
sets TRITON_INTERPRET=1 before anything imports them (triton chooses between
interpreter and compiler when a kernel is defined), and the checks use tiny
shapes. With a CUDA device the same checks run compiled at real sizes
(``pytest -m gpu``).

Every batch mixes decodes and prompt chunks after cached prefixes that end
mid-block, with shuffled block tables and padding tokens (slot -1). The
reference is the ``torch`` backend in fp32 on the same (rounded) inputs.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import transformers  # noqa: E402

from builders import assert_no_leaks, make_checkpoint, output_ids, random_prompts, token_prompts  # noqa: E402
from tokenmill import Registry  # noqa: E402
from tokenmill.llm import LLM  # noqa: E402
from tokenmill.plugins.attention import TorchAttentionBackend, TritonAttentionBackend  # noqa: E402
from tokenmill.plugins.attention.torch_backend import write_kv  # noqa: E402
from tokenmill.sampling_params import SamplingParams  # noqa: E402
from tokenmill.testing.builders import make_attention_metadata, shuffled_block_tables  # noqa: E402
from tokenmill.testing.conformance import CHECKS  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(not INTERPRETED, reason="CPU checks need the Triton interpreter "
                                                         "(TRITON_INTERPRET=1; set here when there is no CUDA)")
compiled_on_cuda = pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED,
                                      reason="needs a CUDA device and compiled (not interpreted) kernels")

# (atol, rtol) of an output against the fp32 reference on the same inputs. fp32 uses IEEE dots;
# fp16/bf16 round the output and the softmax weights (one ulp of 2**-11 / 2**-8) before the PV dot.
TOLERANCES = {torch.float32: (1e-5, 1e-4), torch.float16: (2e-3, 1e-2), torch.bfloat16: (1.5e-2, 2e-2)}

# request i: PREFIX_LENS[i] cached tokens (none a whole number of blocks but 0), then QUERY_LENS[i] new ones
PREFIX_LENS = [37, 19, 0, 70]
QUERY_LENS = [1, 5, 23, 1]
NUM_PADDING = 2


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------- builders

def make_batch(prefix_lens, query_lens, *, num_heads, num_kv_heads, head_size, block_size, dtype,
               device="cpu", seed=0):
    """q, k, v (padding rows included), a cache of random values (the cached prefixes) and the metadata."""
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [p + n for p, n in zip(prefix_lens, query_lens)]
    num_blocks = sum(-(-s // block_size) for s in seq_lens) + 3
    tables = shuffled_block_tables(seq_lens, block_size, num_blocks, gen)
    md = make_attention_metadata(query_lens, seq_lens, tables, block_size, device, num_padding_tokens=NUM_PADDING)
    total = md.num_actual_tokens + NUM_PADDING
    q, k, v = (torch.randn(total, h, head_size, generator=gen).to(device, dtype)
               for h in (num_heads, num_kv_heads, num_kv_heads))
    cache_shape = TritonAttentionBackend.kv_cache_shape(num_blocks, block_size, num_kv_heads, head_size)
    cache = torch.randn(cache_shape, generator=gen).to(device, dtype)
    return q, k, v, cache, md


def run_triton(q, k, v, cache, md, **options):
    """The triton backend's output and the cache it wrote (on a copy of ``cache``)."""
    num_heads, (_, _, _, num_kv_heads, head_size) = q.shape[1], cache.shape
    backend = TritonAttentionBackend(num_heads=num_heads, num_kv_heads=num_kv_heads, head_size=head_size,
                                     dtype=q.dtype, device=q.device, **options)
    cache = cache.clone()
    return backend.forward(q, k, v, cache, md, head_size ** -0.5), cache


def run_reference(q, k, v, cache, md):
    """The torch backend in fp32 on the same values."""
    num_heads, (_, _, _, num_kv_heads, head_size) = q.shape[1], cache.shape
    backend = TorchAttentionBackend(num_heads=num_heads, num_kv_heads=num_kv_heads, head_size=head_size,
                                    dtype=torch.float32, device=q.device)
    return backend.forward(q.float(), k.float(), v.float(), cache.float(), md, head_size ** -0.5)


def assert_matches_reference(out, expected, md, dtype):
    n = md.num_actual_tokens
    assert out.dtype == dtype and out.shape == expected.shape
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(out[:n].float(), expected[:n], atol=atol, rtol=rtol)
    assert torch.isfinite(out[n:]).all(), "padding rows must be finite"


def check_attention(num_heads, num_kv_heads, head_size, block_size, dtype, device, prefix_lens=PREFIX_LENS,
                    query_lens=QUERY_LENS, **options):
    batch = make_batch(prefix_lens, query_lens, num_heads=num_heads, num_kv_heads=num_kv_heads,
                       head_size=head_size, block_size=block_size, dtype=dtype, device=device)
    out, _ = run_triton(*batch, **options)
    assert_matches_reference(out, run_reference(*batch), batch[4], dtype)


def check_kv_write(num_kv_heads, head_size, block_size, dtype, device, prefix_lens=PREFIX_LENS,
                   query_lens=QUERY_LENS):
    """The kernel's cache equals torch's scatter byte for byte; padding slots write nothing."""
    from tokenmill.kernels.kv_write import write_kv_cache

    q, k, v, cache, md = make_batch(prefix_lens, query_lens, num_heads=num_kv_heads, num_kv_heads=num_kv_heads,
                                    head_size=head_size, block_size=block_size, dtype=dtype, device=device)
    ours, expected = cache.clone(), cache.clone()
    write_kv_cache(k, v, ours[0], ours[1], md.slot_mapping)  # padding rows included: their slot is -1
    write_kv(expected[0], expected[1], k, v, md.slot_mapping)
    assert torch.equal(ours.view(torch.uint8), expected.view(torch.uint8))
    assert not torch.equal(ours, cache), "nothing was written"


def check_split_kv(num_heads, num_kv_heads, head_size, block_size, dtype, device, num_splits, prefix_lens,
                   query_lens):
    """Forced splits agree with one split, and both with the reference."""
    batch = make_batch(prefix_lens, query_lens, num_heads=num_heads, num_kv_heads=num_kv_heads,
                       head_size=head_size, block_size=block_size, dtype=dtype, device=device)
    split, _ = run_triton(*batch, options={"num_kv_splits": num_splits})
    whole, _ = run_triton(*batch, options={"num_kv_splits": 1})
    n = batch[4].num_actual_tokens
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(split[:n].float(), whole[:n].float(), atol=atol, rtol=rtol)
    assert_matches_reference(split, run_reference(*batch), batch[4], dtype)


def greedy_ids(model_dir, attention_backend, device, prompts, **options):
    llm = LLM(str(model_dir), attention_backend=attention_backend, device=device, dtype="float32",
              max_model_len=128, block_size=16, num_gpu_blocks_override=48, max_num_seqs=8,
              max_num_batched_tokens=32, **options)  # a small token budget: steps mix decodes and chunks
    ids = output_ids(llm.generate(token_prompts(prompts), SamplingParams(temperature=0.0, max_tokens=8),
                                  use_tqdm=False))
    assert_no_leaks(llm)
    backend = llm.engine.core.model.layers[0].self_attn.backend
    return ids, backend


def tiny_llama(head_size=64, num_heads=2, num_kv_heads=1):
    return transformers.LlamaConfig(vocab_size=128, hidden_size=head_size * num_heads, intermediate_size=128,
                                    num_hidden_layers=2, num_attention_heads=num_heads,
                                    num_key_value_heads=num_kv_heads, max_position_embeddings=256,
                                    bos_token_id=1, eos_token_id=2, architectures=["LlamaForCausalLM"])


# ---------------------------------------------------------------- interpreted, tiny shapes

@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("block_size", [16, 32])
def test_kv_write_is_byte_exact_and_skips_padding(dtype, block_size):
    check_kv_write(num_kv_heads=3, head_size=96, block_size=block_size, dtype=dtype, device="cpu")


@interpreted
@pytest.mark.parametrize("head_size", [64, 96, 128, 256])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(2, 2), (3, 1), (8, 2)], ids=["mha", "gqa3", "gqa4"])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_attention_matches_torch(head_size, num_heads, num_kv_heads, block_size, dtype):
    check_attention(num_heads, num_kv_heads, head_size, block_size, dtype, "cpu")


@interpreted
def test_float16_with_block_size_64_matches_torch():
    check_attention(num_heads=6, num_kv_heads=2, head_size=96, block_size=64, dtype=torch.float16, device="cpu")


@interpreted
@pytest.mark.parametrize("num_heads,num_kv_heads", [(2, 2), (8, 2)], ids=["mha", "gqa4"])
def test_queries_spanning_several_tiles_see_the_right_keys(num_heads, num_kv_heads):
    # 70 new tokens after 21 cached: more than one q-tile (64 rows = 64 tokens or 16 tokens x 4 heads)
    check_attention(num_heads=num_heads, num_kv_heads=num_kv_heads, head_size=64, block_size=16,
                    dtype=torch.float32, device="cpu", prefix_lens=[21, 3], query_lens=[70, 1])


@interpreted
@pytest.mark.parametrize("num_splits", [2, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_split_kv_matches_one_split(num_splits, dtype):
    # 5 splits of a 6-token request leave most splits empty: they must weigh nothing
    check_split_kv(num_heads=8, num_kv_heads=2, head_size=64, block_size=16, dtype=dtype, device="cpu",
                   num_splits=num_splits, prefix_lens=[150, 37, 0, 5], query_lens=[1, 1, 6, 20])


@interpreted
def test_cache_after_forward_equals_the_torch_backends():
    q, k, v, cache, md = make_batch(PREFIX_LENS, QUERY_LENS, num_heads=4, num_kv_heads=2, head_size=64,
                                    block_size=16, dtype=torch.bfloat16)
    _, ours = run_triton(q, k, v, cache, md)
    expected = cache.clone()
    TorchAttentionBackend(num_heads=4, num_kv_heads=2, head_size=64, dtype=torch.bfloat16,
                          device="cpu").forward(q, k, v, expected, md, 0.125)
    assert torch.equal(ours, expected)


@interpreted
def test_an_empty_batch_returns_padding_only():
    backend = TritonAttentionBackend(num_heads=2, num_kv_heads=1, head_size=64, dtype=torch.float32, device="cpu")
    md = make_attention_metadata([], [], [], 16, num_padding_tokens=3)
    q, k, v = torch.randn(3, 2, 64), torch.randn(3, 1, 64), torch.randn(3, 1, 64)
    cache = torch.zeros(backend.kv_cache_shape(4, 16, 1, 64))
    out = backend.forward(q, k, v, cache, md, 0.125)
    assert torch.equal(out, torch.zeros_like(q)) and not cache.any()


@interpreted
@pytest.mark.parametrize("check", CHECKS["attention_backend"], ids=lambda c: c.__name__)
def test_passes_the_attention_conformance_checks(check):
    check(TritonAttentionBackend)


@interpreted
def test_greedy_generation_equals_the_torch_backend(tmp_path):
    make_checkpoint(tmp_path, tiny_llama())
    prompts = random_prompts([3, 17, 40])
    expected, _ = greedy_ids(tmp_path, "torch", "cpu", prompts)
    ids, backend = greedy_ids(tmp_path, "triton", "cpu", prompts)
    assert isinstance(backend, TritonAttentionBackend)
    assert ids == expected


# ---------------------------------------------------------------- contract and errors (no kernel launch)

def test_registered_next_to_torch_by_the_builtin_plugin():
    registry = Registry(entry_points=False)
    assert {"torch", "triton"} <= set(registry.available("attention_backend"))
    record = next(r for r in registry.records("attention_backend") if r.name == "triton")
    assert record.provider.plugin == "tokenmill.plugins.attention" and record.cls is TritonAttentionBackend


def test_cache_layout_is_the_torch_backends():
    assert TritonAttentionBackend.kv_cache_shape(7, 16, 2, 96) == TorchAttentionBackend.kv_cache_shape(7, 16, 2, 96)


def test_cpu_without_the_interpreter_says_to_set_triton_interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert TritonAttentionBackend.supported_devices == ("cuda",)
    reason = TritonAttentionBackend.unsupported_reason(device="cpu", head_size=64, dtype=torch.float32)
    assert "set TRITON_INTERPRET=1" in reason
    with pytest.raises(ValueError, match=r"attention backend 'triton': .*set TRITON_INTERPRET=1"):
        TritonAttentionBackend(num_heads=2, num_kv_heads=1, head_size=64, dtype=torch.float32, device="cpu")


def test_unsupported_head_size_is_named():
    reason = TritonAttentionBackend.unsupported_reason(head_size=80)
    assert reason == "head_size must be one of [64, 96, 128, 256], got 80"


@interpreted
def test_kernel_wrappers_name_what_is_wrong():
    from tokenmill.kernels.kv_write import write_kv_cache
    from tokenmill.kernels.paged_attention import paged_attention

    q, k, v, cache, md = make_batch([3], [2], num_heads=2, num_kv_heads=1, head_size=64, block_size=16,
                                    dtype=torch.float32)
    with pytest.raises(ValueError, match=r"share one dtype, got torch.float32, torch.float32, torch.bfloat16"):
        write_kv_cache(k, v, cache[0].bfloat16(), cache[1].bfloat16(), md.slot_mapping)
    with pytest.raises(ValueError, match=r"slot_mapping must be int32/int64 \[4\], got torch.float32"):
        write_kv_cache(k, v, cache[0], cache[1], md.slot_mapping.float())
    n = md.num_actual_tokens
    args = dict(block_tables=md.block_tables, seq_lens=md.seq_lens, query_start_loc=md.query_start_loc,
                max_query_len=2, scale=0.125)
    with pytest.raises(ValueError, match=r"num_splits=4 needs a float32 workspace of >= \d+ elements"):
        paged_attention(q[:n], cache[0], cache[1], torch.empty_like(q[:n]), num_splits=4, **args)
    with pytest.raises(ValueError, match=r"q has 3 heads of 64; the cache 2 KV heads"):
        paged_attention(torch.zeros(n, 3, 64), cache[0].repeat(1, 1, 2, 1), cache[1].repeat(1, 1, 2, 1),
                        torch.zeros(n, 3, 64), **args)


# ---------------------------------------------------------------- CUDA, compiled, real sizes

REAL_PREFIX_LENS = [3000, 1, 517, 0, 2049, 96, 777, 16]  # decodes, chunks after prefixes, a fresh prompt
REAL_QUERY_LENS = [1, 1, 256, 300, 1, 64, 1, 1]


@pytest.mark.gpu
@compiled_on_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("block_size", [16, 32])
def test_gpu_kv_write_is_byte_exact(dtype, block_size):
    check_kv_write(num_kv_heads=8, head_size=128, block_size=block_size, dtype=dtype, device="cuda",
                   prefix_lens=REAL_PREFIX_LENS, query_lens=REAL_QUERY_LENS)


@pytest.mark.gpu
@compiled_on_cuda
@pytest.mark.parametrize("head_size", [64, 96, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=dtype_id)
def test_gpu_attention_matches_torch_for_each_head_size(head_size, dtype):
    check_attention(32, 8, head_size, 16, dtype, "cuda", prefix_lens=REAL_PREFIX_LENS, query_lens=REAL_QUERY_LENS)


@pytest.mark.gpu
@compiled_on_cuda
@pytest.mark.parametrize("num_heads,num_kv_heads", [(16, 16), (12, 4), (32, 8)], ids=["mha", "gqa3", "gqa4"])
@pytest.mark.parametrize("block_size", [16, 32, 64])
def test_gpu_attention_matches_torch_for_each_group_and_block_size(num_heads, num_kv_heads, block_size):
    check_attention(num_heads, num_kv_heads, 128, block_size, torch.bfloat16, "cuda",
                    prefix_lens=REAL_PREFIX_LENS, query_lens=REAL_QUERY_LENS)


@pytest.mark.gpu
@compiled_on_cuda
@pytest.mark.parametrize("num_splits", [2, 7, 16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=dtype_id)
def test_gpu_split_kv_matches_one_split(num_splits, dtype):
    check_split_kv(32, 8, 128, 16, dtype, "cuda", num_splits, prefix_lens=[8191, 1000, 5, 0],
                   query_lens=[1, 1, 1, 40])


@pytest.mark.gpu
@compiled_on_cuda
def test_gpu_split_kv_is_picked_for_few_long_decodes_only():
    backend = TritonAttentionBackend(num_heads=32, num_kv_heads=8, head_size=128, dtype=torch.bfloat16,
                                     device="cuda")
    one_long = make_attention_metadata([1], [8192], [list(range(512))], 16, "cuda")
    many = make_attention_metadata([1] * 64, [8192] * 64, [list(range(512))] * 64, 16, "cuda")
    assert backend.num_kv_splits_for(one_long) > 1 and backend.num_kv_splits_for(many) == 1


@pytest.mark.gpu
@compiled_on_cuda
def test_gpu_split_decode_step_replays_as_a_cuda_graph():
    """After one warm-up step (which compiles and sizes the workspace) a decode step neither syncs
    with the host nor allocates outside the graph's pool: it captures, and a replay on new inputs
    equals an eager run."""
    q, k, v, cache, md = make_batch([100, 517, 2000], [1, 1, 1], num_heads=32, num_kv_heads=8, head_size=128,
                                    block_size=16, dtype=torch.bfloat16, device="cuda")
    backend = TritonAttentionBackend(num_heads=32, num_kv_heads=8, head_size=128, dtype=torch.bfloat16,
                                     device="cuda", options={"num_kv_splits": 4})
    graph_cache = cache.clone()
    backend.forward(q, k, v, graph_cache.clone(), md, 128 ** -0.5)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_out = backend.forward(q, k, v, graph_cache, md, 128 ** -0.5)
    for t in (q, k, v):
        t.copy_(torch.randn_like(t))
    graph.replay()
    expected, expected_cache = run_triton(q, k, v, cache, md, options={"num_kv_splits": 4})
    assert torch.equal(graph_out, expected) and torch.equal(graph_cache, expected_cache)


@pytest.mark.gpu
@compiled_on_cuda
def test_gpu_greedy_generation_equals_the_torch_backend(tmp_path):
    make_checkpoint(tmp_path, tiny_llama(head_size=128, num_heads=4, num_kv_heads=2))
    prompts = random_prompts([3, 17, 40, 90])
    expected, _ = greedy_ids(tmp_path, "torch", "cuda", prompts)
    ids, backend = greedy_ids(tmp_path, "triton", "cuda", prompts)
    assert isinstance(backend, TritonAttentionBackend)
    assert ids == expected


@pytest.mark.gpu
@compiled_on_cuda
def test_gpu_engine_picks_triton_by_default(tmp_path):
    make_checkpoint(tmp_path, tiny_llama())
    llm = LLM(str(tmp_path), device="cuda", dtype="float32", max_model_len=128, num_gpu_blocks_override=16)
    assert isinstance(llm.engine.core.model.layers[0].self_attn.backend, TritonAttentionBackend)

