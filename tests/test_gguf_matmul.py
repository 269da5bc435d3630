"""The GGUF matmul kernel (``tokenmill.kernels.gguf_matmul``) against gguf's own dequantization.

A weight is random bytes in the format's layout with sane fp16 scale fields (random bytes there
could be inf or NaN); the reference dequantizes it with ``gguf.quants.dequantize`` and multiplies
in fp64. The kernel may differ from it by what its roundings allow, elementwise

    |y - x @ W.T| <= c * (|x| @ |W|.T)

with c twice the unit roundoff of x's dtype (weights and outputs are rounded to it) plus room for
fp32 accumulation: a weight decoded from the wrong bits is off by about |W| per input and breaks it.

Without CUDA the kernel runs under the Triton interpreter on small shapes; with CUDA the same
checks run compiled, and ``-m gpu`` adds real sizes and a bandwidth report. Every variant a launch
compiles (each format, decode and prefill configs, fp16 and bf16 activations) is also compiled
ahead of time for sm_80 and sm_90 with no GPU (``tokenmill.kernels.aot``).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q, quants  # noqa: E402

from builders import compile_ahead_of_time  # noqa: E402
from tokenmill.kernels.gguf_matmul import FORMATS, gguf_matmul, kernel_config  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
compiled_on_cuda = pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                                      reason="needs a CUDA device and compiled (not interpreted) kernels")

# c of the bound above, per activation dtype
ROUNDING = {torch.float32: 1e-5, torch.float16: 2 * 2 ** -11 + 1e-5, torch.bfloat16: 2 * 2 ** -8 + 1e-5}

# format -> its fp16 fields (byte offset in the block, largest magnitude): values of that size keep |w| <= ~1
F16_FIELDS = {
    Q.Q4_0: ((0, 1 / 8),), Q.Q4_1: ((0, 1 / 16), (2, 1.0)), Q.Q5_0: ((0, 1 / 16),),
    Q.Q5_1: ((0, 1 / 32), (2, 1.0)), Q.Q8_0: ((0, 1 / 128),),
    Q.Q4_K: ((0, 1 / 945), (2, 1 / 63)), Q.Q5_K: ((0, 1 / 1953), (2, 1 / 63)), Q.Q6_K: ((208, 1 / 4096),),
}
QTYPES = list(F16_FIELDS)


def qtype_id(qtype) -> str:
    return qtype.name


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------- builders

def make_weight(qtype: Q, out_features: int, in_features: int, seed: int = 0) -> np.ndarray:
    """GGUF bytes [out_features, bytes_per_row]: random, but for fp16 scales uniform in +-magnitude."""
    block_inputs, block_bytes = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    shape = (out_features, in_features // block_inputs)
    blocks = rng.integers(0, 256, size=(*shape, block_bytes), dtype=np.uint8)
    for offset, magnitude in F16_FIELDS[qtype]:
        values = rng.uniform(-magnitude, magnitude, size=shape).astype(np.float16)
        blocks[..., offset:offset + 2] = values.view(np.uint8).reshape(*shape, 2)
    return blocks.reshape(out_features, -1)


def make_x(num_tokens: int, in_features: int, dtype: torch.dtype, device: str = DEVICE, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(num_tokens, in_features, generator=gen).to(device, dtype)


def assert_matches_reference(y: torch.Tensor, x: torch.Tensor, weight: np.ndarray, qtype: Q) -> None:
    w = torch.from_numpy(quants.dequantize(weight, qtype)).to(x.device, torch.float64)
    expected = x.double() @ w.T
    bound = ROUNDING[x.dtype] * (x.double().abs() @ w.abs().T)
    assert y.dtype == x.dtype and y.shape == expected.shape
    error = (y.double() - expected).abs()
    worst = int((error - bound).argmax())
    assert (error <= bound).all(), (f"y[{divmod(worst, y.shape[1])}] = {y.flatten()[worst].item()}, "
                                    f"expected {expected.flatten()[worst].item()} +- {bound.flatten()[worst].item()}")


def check_matmul(qtype: Q, num_tokens: int, dtype: torch.dtype, out_features: int = 40, in_features: int = 512,
                 device: str = DEVICE) -> None:
    weight = make_weight(qtype, out_features, in_features)
    x = make_x(num_tokens, in_features, dtype, device)
    y = gguf_matmul(x, torch.from_numpy(weight).to(device), qtype, out_features, in_features)
    assert_matches_reference(y, x, weight, qtype)


# ---------------------------------------------------------------- small shapes (interpreted without CUDA)

# out_features 40: a partial N-tile in both configs; 1 and 5 tokens decode, 33 a prefill with a partial M-tile
@pytest.mark.parametrize("num_tokens", [1, 5, 33])
@pytest.mark.parametrize("qtype", QTYPES, ids=qtype_id)
def test_float32_activations_match_gguf_dequantize(qtype, num_tokens):
    check_matmul(qtype, num_tokens, torch.float32)


@pytest.mark.parametrize("qtype,num_tokens,dtype", [
    (Q.Q4_0, 33, torch.bfloat16), (Q.Q4_1, 1, torch.float16), (Q.Q5_0, 33, torch.float16),
    (Q.Q5_1, 5, torch.bfloat16), (Q.Q8_0, 33, torch.bfloat16), (Q.Q4_K, 5, torch.bfloat16),
    (Q.Q5_K, 33, torch.float16), (Q.Q6_K, 1, torch.float16)],
    ids=lambda v: v.name if isinstance(v, Q) else dtype_id(v) if isinstance(v, torch.dtype) else f"T{v}")
def test_16_bit_activations_match_within_their_rounding(qtype, num_tokens, dtype):
    check_matmul(qtype, num_tokens, dtype)


@pytest.mark.parametrize("num_tokens", [3, 40])
def test_rows_of_an_odd_number_of_blocks_take_smaller_k_tiles(num_tokens):
    # 9 blocks of 32: neither config's BLOCK_K (256, 64) divides the row
    assert kernel_config(Q.Q5_1, num_tokens=num_tokens, in_features=288, dtype=torch.float32)[0]["BLOCK_K"] == 32
    check_matmul(Q.Q5_1, num_tokens, torch.float32, out_features=24, in_features=288)


def test_three_k_quant_blocks_per_row():
    check_matmul(Q.Q6_K, 17, torch.float32, out_features=16, in_features=768)


def test_strided_rows_of_x_and_of_the_weight():
    qtype, out_features, in_features = Q.Q4_K, 24, 512
    weight = make_weight(qtype, out_features, in_features)
    padded = torch.zeros(out_features, weight.shape[1] + 16, dtype=torch.uint8)
    padded[:, 8:8 + weight.shape[1]] = torch.from_numpy(weight)
    x = make_x(6, in_features + 64, torch.float32)[:, 64:]
    y = gguf_matmul(x, padded[:, 8:8 + weight.shape[1]].to(DEVICE), qtype, out_features, in_features)
    assert_matches_reference(y, x, weight, qtype)


def test_no_tokens_give_an_empty_output():
    weight = torch.from_numpy(make_weight(Q.Q8_0, 16, 64)).to(DEVICE)
    y = gguf_matmul(make_x(0, 64, torch.bfloat16), weight, Q.Q8_0, 16, 64)
    assert y.shape == (0, 16) and y.dtype == torch.bfloat16


# ---------------------------------------------------------------- launch configs and errors (no kernel launch)

@pytest.mark.parametrize("qtype", QTYPES, ids=qtype_id)
def test_decode_takes_one_16_row_tile_and_prefill_64(qtype):
    for num_tokens, block_m in ((1, 16), (16, 16), (17, 64), (4096, 64)):
        constexprs, _, _ = kernel_config(qtype, num_tokens=num_tokens, in_features=4096, dtype=torch.bfloat16)
        assert constexprs["BLOCK_M"] == block_m
        assert constexprs["BLOCK_K"] % FORMATS[qtype].block_inputs == 0 and 4096 % constexprs["BLOCK_K"] == 0


def test_wrapper_names_what_is_wrong():
    weight = torch.from_numpy(make_weight(Q.Q4_0, 8, 64))
    x = torch.zeros(2, 64)
    with pytest.raises(ValueError, match=r"qtype must be one of \['Q4_0', .*'Q6_K'\], got <GGMLQuantizationType.Q2_K"):
        gguf_matmul(x, weight, Q.Q2_K, 8, 64)
    with pytest.raises(ValueError, match=r"Q4_K needs out_features >= 1 and in_features a positive multiple of 256"):
        gguf_matmul(x, weight, Q.Q4_K, 8, 64)
    with pytest.raises(ValueError, match=r"data must be uint8 \[8, 36\] with contiguous rows, got torch.int8"):
        gguf_matmul(x, weight.view(torch.int8), Q.Q4_0, 8, 64)
    with pytest.raises(ValueError, match=r"data must be uint8 \[16, 36\] .* got torch.uint8 \[8, 36\]"):
        gguf_matmul(x, weight, Q.Q4_0, 16, 64)
    with pytest.raises(ValueError, match=r"x must be float32/float16/bfloat16 \[num_tokens, 64\] .* got torch.int32"):
        gguf_matmul(x.int(), weight, Q.Q4_0, 8, 64)
    with pytest.raises(ValueError, match=r"x must be .* got torch.float32 \[2, 32\]"):
        gguf_matmul(x[:, :32], weight, Q.Q4_0, 8, 64)


# ---------------------------------------------------------------- ahead of time, for sm_80 and sm_90 (no GPU)

AOT_ARCHS = [80, 90]
AOT_PHASES = {"decode": 1, "prefill": 256}  # a launch's token count -> its config
AOT_DTYPES = ["float16", "bfloat16"]
# ptxas (as triton runs it, --regAllocOptLevel=2) parks one register in a few variants: stored before the K loop,
# loaded after it, never touched inside (seen in the SASS of Q5_K decode on sm_80, Q8_0 fp16 decode on sm_90)
AOT_MAX_STACK_BYTES = 8

# compiled in one child process: under TRITON_INTERPRET=1 (set here without CUDA) kernels are Python, not compilable
_AOT_SCRIPT = """
import json, sys, torch
from dataclasses import asdict
from tokenmill.kernels.aot import MAX_SHARED_BYTES, compile_gguf_matmul
results = {}
for name, args in json.load(sys.stdin).items():
    args["dtype"] = getattr(torch, args["dtype"])
    try:
        results[name] = dict(asdict(compile_gguf_matmul(**args)), max_shared_bytes=MAX_SHARED_BYTES[args["arch"]])
    except Exception as error:
        results[name] = {"error": f"{type(error).__name__}: {error}"}
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def aot_resources():
    """``{"arch/qtype/phase/dtype": KernelResources as a dict (plus max_shared_bytes), or {"error"}}``."""
    jobs = {f"{arch}/{qtype.name}/{phase}/{dtype}": dict(arch=arch, qtype=int(qtype), dtype=dtype,
                                                         num_tokens=num_tokens)
            for arch in AOT_ARCHS for qtype in QTYPES for phase, num_tokens in AOT_PHASES.items()
            for dtype in AOT_DTYPES}
    return compile_ahead_of_time(_AOT_SCRIPT, jobs)


@pytest.mark.parametrize("dtype", AOT_DTYPES)
@pytest.mark.parametrize("phase", AOT_PHASES)
@pytest.mark.parametrize("qtype", QTYPES, ids=qtype_id)
@pytest.mark.parametrize("arch", AOT_ARCHS, ids=lambda a: f"sm_{a}")
def test_compiles_ahead_of_time_without_spilling(aot_resources, arch, qtype, phase, dtype):
    resources = aot_resources[f"{arch}/{qtype.name}/{phase}/{dtype}"]
    assert "error" not in resources, resources.get("error")
    assert resources["stack_bytes"] <= AOT_MAX_STACK_BYTES and resources["local_bytes"] == 0, \
        f"ptxas spilled: {resources}"
    assert resources["shared_bytes"] <= resources["max_shared_bytes"], f"too much shared memory: {resources}"


# ---------------------------------------------------------------- CUDA, compiled, real sizes

@pytest.mark.gpu
@compiled_on_cuda
@pytest.mark.parametrize("num_tokens", [1, 16, 256])
@pytest.mark.parametrize("qtype", QTYPES, ids=qtype_id)
def test_gpu_4096_square_matches_gguf_dequantize(qtype, num_tokens):
    check_matmul(qtype, num_tokens, torch.bfloat16, out_features=4096, in_features=4096, device="cuda")


def measure_bandwidth(qtype: Q, num_tokens: int, out_features: int = 4096, in_features: int = 4096,
                      dtype: torch.dtype = torch.bfloat16) -> tuple[float, float]:
    """(microseconds per call, GB/s of weight, activation and output bytes moved) over CUDA-graph replays."""
    weight = torch.from_numpy(make_weight(qtype, out_features, in_features)).cuda()
    x = make_x(num_tokens, in_features, dtype, device="cuda")
    gguf_matmul(x, weight, qtype, out_features, in_features)  # compile outside the capture
    graph, calls = torch.cuda.CUDAGraph(), 20
    with torch.cuda.graph(graph):
        for _ in range(calls):
            y = gguf_matmul(x, weight, qtype, out_features, in_features)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        graph.replay()
    end.record()
    end.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / (10 * calls)
    moved = weight.numel() + x.numel() * x.element_size() + y.numel() * y.element_size()
    return seconds * 1e6, moved / seconds / 1e9


@pytest.mark.gpu
@compiled_on_cuda
def test_gpu_bandwidth_report():
    """Prints (run with -s) time, achieved bandwidth and TFLOP/s per format and token count on 4096 x 4096."""
    print(f"\n{torch.cuda.get_device_name()}: gguf_matmul 4096 x 4096, bf16 activations")
    for qtype in QTYPES:
        for num_tokens in (1, 16, 256):
            micros, gbps = measure_bandwidth(qtype, num_tokens)
            tflops = 2 * num_tokens * 4096 * 4096 / micros / 1e6
            print(f"  {qtype.name:5} T={num_tokens:<4} {micros:8.1f} us {gbps:8.0f} GB/s {tflops:7.2f} TFLOP/s")
            assert gbps > 0
