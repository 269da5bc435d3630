"""The ``triton`` attention backend and its kernels, against the ``torch`` backend.

Without a CUDA device the kernels run under the Triton interpreter: this module
sets TRITON_INTERPRET=1 before anything imports them (triton chooses between
interpreter and compiler when a kernel is defined), and the checks use tiny
shapes. With a CUDA device the same checks run compiled at real sizes
(``pytest -m gpu``).

Every batch mixes decodes and prompt chunks after cached prefixes that end
mid-block, with shuffled block tables and padding tokens (slot -1). The
reference is the ``torch`` backend in fp32 on the same (rounded) inputs.
Sliding windows and soft caps have their own module (test_attention_windows);
here they are compiled ahead of time and run on a GPU at real sizes.

Every kernel variant is also compiled ahead of time for sm_80 and sm_90, with
no GPU (``tokenmill.kernels.aot``): compile errors and register spills show up
on CPU.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import transformers  # noqa: E402

from builders import assert_no_leaks, compile_ahead_of_time, make_checkpoint, output_ids, random_prompts, token_prompts  # noqa: E402
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


def run_triton(q, k, v, cache, md, variant=None, **options):
    """The triton backend's output and the cache it wrote (on a copy of ``cache``); ``variant``: the
    ``sliding_window`` and ``logits_soft_cap`` keywords of ``forward``."""
    num_heads, (_, _, _, num_kv_heads, head_size) = q.shape[1], cache.shape
    backend = TritonAttentionBackend(num_heads=num_heads, num_kv_heads=num_kv_heads, head_size=head_size,
                                     dtype=q.dtype, device=q.device, **options)
    cache = cache.clone()
    return backend.forward(q, k, v, cache, md, head_size ** -0.5, **(variant or {})), cache


def run_reference(q, k, v, cache, md, variant=None):
    """The torch backend in fp32 on the same values."""
    num_heads, (_, _, _, num_kv_heads, head_size) = q.shape[1], cache.shape
    backend = TorchAttentionBackend(num_heads=num_heads, num_kv_heads=num_kv_heads, head_size=head_size,
                                    dtype=torch.float32, device=q.device)
    return backend.forward(q.float(), k.float(), v.float(), cache.float(), md, head_size ** -0.5, **(variant or {}))


def assert_matches_reference(out, expected, md, dtype):
    n = md.num_actual_tokens
    assert out.dtype == dtype and out.shape == expected.shape
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(out[:n].float(), expected[:n], atol=atol, rtol=rtol)
    assert torch.isfinite(out[n:]).all(), "padding rows must be finite"


def check_attention(num_heads, num_kv_heads, head_size, block_size, dtype, device, prefix_lens=PREFIX_LENS,
                    query_lens=QUERY_LENS, variant=None, **options):
    batch = make_batch(prefix_lens, query_lens, num_heads=num_heads, num_kv_heads=num_kv_heads,
                       head_size=head_size, block_size=block_size, dtype=dtype, device=device)
    out, _ = run_triton(*batch, variant, **options)
    assert_matches_reference(out, run_reference(*batch, variant), batch[4], dtype)


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
                   query_lens, variant=None):
    """Forced splits agree with one split, and both with the reference."""
    batch = make_batch(prefix_lens, query_lens, num_heads=num_heads, num_kv_heads=num_kv_heads,
                       head_size=head_size, block_size=block_size, dtype=dtype, device=device)
    split, _ = run_triton(*batch, variant, options={"num_kv_splits": num_splits})
    whole, _ = run_triton(*batch, variant, options={"num_kv_splits": 1})
    n = batch[4].num_actual_tokens
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(split[:n].float(), whole[:n].float(), atol=atol, rtol=rtol)
    assert_matches_reference(split, run_reference(*batch, variant), batch[4], dtype)


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


# ---------------------------------------------------------------- ahead of time, for sm_80 and sm_90 (no GPU)

# name -> a launch shape: a decode, a prompt chunk and a split decode for 16-bit rows of head 128, the same
# for fp32 (fp32 dots, the smaller tiles of rows wider than 256 bytes), and a chunk of 16-bit rows of head 256
_PHASES = {"decode": dict(max_query_len=1, num_splits=1), "chunk": dict(max_query_len=64, num_splits=1),
           "split": dict(max_query_len=1, num_splits=4)}
AOT_SHAPES = {
    f"{phase}-{dtype}-h{head_size}": dict(dtype=dtype, num_heads=32, num_kv_heads=8, head_size=head_size,
                                          block_size=16, **_PHASES[phase])
    for dtype, head_size, phase in [("bfloat16", 128, "decode"), ("bfloat16", 128, "chunk"), ("bfloat16", 128, "split"),
                                    ("float32", 128, "decode"), ("float32", 128, "chunk"), ("float32", 128, "split"),
                                    ("bfloat16", 256, "chunk")]
}
AOT_VARIANTS = {
    "plain": dict(sliding_window=False, soft_cap=False),
    "window": dict(sliding_window=True, soft_cap=False),
    "soft-cap": dict(sliding_window=False, soft_cap=True),
    "window-soft-cap": dict(sliding_window=True, soft_cap=True),
}
AOT_ARCHS = [80, 90]
# a few bytes of stack per thread (ptxas spilling a register or three) is what kernel_config's tiles allow
AOT_MAX_STACK_BYTES = 32

# compiled in one child process: under TRITON_INTERPRET=1 (set here without CUDA) kernels are Python, not compilable
_AOT_SCRIPT = """
import json, sys, torch
from dataclasses import asdict
from tokenmill.kernels.aot import compile_paged_attention, compile_split_kv_reduce
results = {}
for name, (kernel, args) in json.load(sys.stdin).items():
    args["dtype"] = getattr(torch, args["dtype"])
    compile_kernel = compile_paged_attention if kernel == "paged_attention" else compile_split_kv_reduce
    try:
        results[name] = asdict(compile_kernel(**args))
    except Exception as error:
        results[name] = {"error": f"{type(error).__name__}: {error}"}
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def aot_resources():
    """``{"arch/shape/variant": {"registers", "stack_bytes", "local_bytes"} or {"error"}}`` for every
    variant, plus ``"arch/split-kv-reduce"``."""
    jobs = {}
    for arch in AOT_ARCHS:
        for shape, shape_args in AOT_SHAPES.items():
            for variant, variant_args in AOT_VARIANTS.items():
                jobs[f"{arch}/{shape}/{variant}"] = ("paged_attention", dict(arch=arch, **shape_args, **variant_args))
        jobs[f"{arch}/split-kv-reduce"] = ("split_kv_reduce", dict(arch=arch, dtype="bfloat16", num_heads=32,
                                                                   num_splits=4, head_size=128))
    return compile_ahead_of_time(_AOT_SCRIPT, jobs)


def assert_compiled_without_spilling(resources):
    assert "error" not in resources, resources.get("error")
    assert resources["stack_bytes"] <= AOT_MAX_STACK_BYTES and resources["local_bytes"] == 0, \
        f"ptxas spilled: {resources}"


@pytest.mark.parametrize("variant", AOT_VARIANTS)
@pytest.mark.parametrize("shape", AOT_SHAPES)
@pytest.mark.parametrize("arch", AOT_ARCHS, ids=lambda a: f"sm_{a}")
def test_attention_kernel_compiles_ahead_of_time(aot_resources, arch, shape, variant):
    assert_compiled_without_spilling(aot_resources[f"{arch}/{shape}/{variant}"])


@pytest.mark.parametrize("arch", AOT_ARCHS, ids=lambda a: f"sm_{a}")
def test_split_kv_reduce_compiles_ahead_of_time(aot_resources, arch):
    assert_compiled_without_spilling(aot_resources[f"{arch}/split-kv-reduce"])


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


# (sliding_window, logits_soft_cap): Mistral-like, Gemma-2-like local and global layers (cap low enough to bend
# scores of a few units)
GPU_VARIANTS = {"window": {"sliding_window": 1000}, "soft-cap": {"logits_soft_cap": 2.0},
                "window-soft-cap": {"sliding_window": 517, "logits_soft_cap": 2.0}}


@pytest.mark.gpu
@compiled_on_cuda
@pytest.mark.parametrize("variant", GPU_VARIANTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=dtype_id)
def test_gpu_window_and_soft_cap_match_torch(variant, dtype):
    check_attention(32, 8, 128, 16, dtype, "cuda", prefix_lens=REAL_PREFIX_LENS, query_lens=REAL_QUERY_LENS,
                    variant=GPU_VARIANTS[variant])


@pytest.mark.gpu
@compiled_on_cuda
@pytest.mark.parametrize("variant", GPU_VARIANTS)
def test_gpu_split_kv_with_window_and_soft_cap_matches_one_split(variant):
    check_split_kv(32, 8, 128, 16, torch.bfloat16, "cuda", 7, prefix_lens=[8191, 1000, 5, 0],
                   query_lens=[1, 1, 1, 40], variant=GPU_VARIANTS[variant])


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
@pytest.mark.parametrize("variant", [{}, GPU_VARIANTS["window-soft-cap"]], ids=["plain", "window-soft-cap"])
def test_gpu_split_decode_step_replays_as_a_cuda_graph(variant):
    """After one warm-up step (which compiles and sizes the workspace) a decode step neither syncs
    with the host nor allocates outside the graph's pool: it captures, and a replay on new inputs
    equals an eager run."""
    q, k, v, cache, md = make_batch([100, 517, 2000], [1, 1, 1], num_heads=32, num_kv_heads=8, head_size=128,
                                    block_size=16, dtype=torch.bfloat16, device="cuda")
    backend = TritonAttentionBackend(num_heads=32, num_kv_heads=8, head_size=128, dtype=torch.bfloat16,
                                     device="cuda", options={"num_kv_splits": 4})
    graph_cache = cache.clone()
    backend.forward(q, k, v, graph_cache.clone(), md, 128 ** -0.5, **variant)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_out = backend.forward(q, k, v, graph_cache, md, 128 ** -0.5, **variant)
    for t in (q, k, v):
        t.copy_(torch.randn_like(t))
    graph.replay()
    expected, expected_cache = run_triton(q, k, v, cache, md, variant, options={"num_kv_splits": 4})
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

