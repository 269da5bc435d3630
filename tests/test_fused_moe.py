"""The fused MoE kernel (``tokenmill.kernels.fused_moe``) against its torch reference, and the reference
against a dense oracle.

Three layers of checks:

* ``moe_align``'s layout invariants, on routings from even to all-on-one-expert;
* ``fused_moe`` (the Triton kernel, interpreted without CUDA on small shapes) against
  ``fused_moe_reference`` on random layers and routings: both tile configs, partial N and K tiles,
  uneven routing, experts that receive no token (their weights are NaN: a program that reads
  them, say through a wrong expert id, poisons its rows), both activations, fp32 / fp16 / bf16;
* ``fused_moe_reference`` against a dense fp64 oracle that gathers each slot's expert weights and
  computes every (token, expert) pair on its own: no sorting, grouping or index_add_.

Outputs are compared elementwise, ``|y - expected| <= c (|expected| + rms(expected))``, with c a few
units of roundoff of the dtype: the rms term absorbs cancellation in a sum of slots. A dropped
routing weight, a wrong expert or a missing activation moves y by about |y| and breaks it.

Every variant a launch compiles (both GEMMs, decode and prefill configs, fp16 and bf16) is also
compiled ahead of time for sm_80 and sm_90 with no GPU (``tokenmill.kernels.aot``).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from builders import compile_ahead_of_time  # noqa: E402
from tokenmill.kernels.fused_moe import (fused_moe, fused_moe_reference, kernel_config,  # noqa: E402
                                         moe_align)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
compiled_on_cuda = pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                                      reason="needs a CUDA device and compiled (not interpreted) kernels")

# c of the bound above, in units of roundoff u (2^-8 bf16, 2^-11 fp16). The reference rounds gate and up to
# the dtype, the kernel keeps them in fp32; both round the intermediate and each slot's output. Seen at most:
# kernel vs reference 4.5 u, reference vs fp64 4.2 u, kernel vs fp64 3.3 u (the cases below, both 16-bit
# dtypes); fp32 differs by summation order, ~1e-7.
KERNEL_TOLERANCE = {torch.float32: 2e-5, torch.float16: 8 * 2 ** -11, torch.bfloat16: 8 * 2 ** -8}
ORACLE_TOLERANCE = {torch.float32: 1e-5, torch.float16: 6 * 2 ** -11, torch.bfloat16: 6 * 2 ** -8}


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------- builders

def make_layer(num_experts: int, hidden: int, intermediate: int, dtype: torch.dtype, device: str = DEVICE,
               seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """w13 [E, 2I, H] and w2 [E, H, I], N(0, 1 / fan_in): outputs of about unit size for unit inputs.
    Drawn on ``device`` (a real-size layer is 1.4G numbers)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    w13 = torch.randn(num_experts, 2 * intermediate, hidden, generator=gen, device=device) / hidden ** 0.5
    w2 = torch.randn(num_experts, hidden, intermediate, generator=gen, device=device) / intermediate ** 0.5
    return w13.to(dtype), w2.to(dtype)


def make_routing(num_tokens: int, num_experts: int, top_k: int, pattern: str, device: str = DEVICE,
                 seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(topk_weights fp32, topk_ids int64), both [T, k]: a softmax router's top k, renormalised.

    ``even``: random logits. ``skewed``: one expert's logits raised so that almost every token picks it,
    and a quarter of the experts (at least one) never picked. ``one``: every token's first choice is
    expert 0, the others from experts 1..k-1 only. ``repeats``: ids drawn independently, so a token may
    pick an expert twice (two slots, two weights)."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_tokens, num_experts, generator=gen)
    if pattern == "skewed":
        logits[:, 1] += 4.0
        unused = torch.randperm(num_experts, generator=gen)[: max(1, num_experts // 4)]
        unused = unused[unused != 1][: max(0, num_experts - top_k)]
        logits[:, unused] = float("-inf")
    elif pattern == "one":
        logits[:, top_k:] = float("-inf")
        logits[:, 0] += 100.0
    if pattern == "repeats":
        ids = torch.randint(0, num_experts, (num_tokens, top_k), generator=gen)
        weights = torch.softmax(torch.randn(num_tokens, top_k, generator=gen), dim=-1)
    else:
        top, ids = logits.topk(top_k, dim=-1)
        weights = torch.softmax(top, dim=-1)
    return weights.to(device), ids.to(device)


def poison_unused_experts(w13: torch.Tensor, w2: torch.Tensor, topk_ids: torch.Tensor) -> list[int]:
    """Set the weights of every expert that no slot routes to NaN; returns those experts."""
    unused = sorted(set(range(w13.shape[0])) - set(topk_ids.flatten().tolist()))
    w13[unused] = float("nan")
    w2[unused] = float("nan")
    return unused


def dense_oracle(hidden, w13, w2, topk_weights, topk_ids, activation: str) -> torch.Tensor:
    """fp64 [T, H]: every slot (t, j) through its own expert's gathered weights, summed over j."""
    num_tokens, top_k = topk_ids.shape
    intermediate = w13.shape[1] // 2
    x = hidden.double()[:, None, :].expand(num_tokens, top_k, -1)
    ids = topk_ids.long()
    gate_up = torch.einsum("tkh,tkih->tki", x, w13.double()[ids])
    gate, up = gate_up[..., :intermediate], gate_up[..., intermediate:]
    act = torch.nn.functional.silu(gate) if activation == "silu" else torch.nn.functional.gelu(gate,
                                                                                                approximate="tanh")
    y = torch.einsum("tki,tkhi->tkh", act * up, w2.double()[ids])
    return (y * topk_weights.double()[..., None]).sum(1)


def assert_close_to(y: torch.Tensor, expected: torch.Tensor, c: float) -> None:
    expected = expected.double()
    error = (y.double() - expected).abs()
    bound = c * (expected.abs() + expected.pow(2).mean().sqrt())
    worst = int((error - bound).argmax()) if error.numel() else 0
    assert torch.isfinite(y).all(), "non-finite output"
    assert (error <= bound).all(), (f"y[{divmod(worst, y.shape[1])}] = {y.flatten()[worst].item()}, expected "
                                    f"{expected.flatten()[worst].item()} +- {bound.flatten()[worst].item()}")


# ---------------------------------------------------------------- moe_align

def test_align_matches_the_documented_example():
    sorted_ids, expert_ids, num_post = moe_align(torch.tensor([[2, 0], [2, 1], [0, 2]]), 4, 4)
    assert sorted_ids.tolist() == [1, 4, 6, 6, 3, 6, 6, 6, 0, 2, 5, 6, 6, 6, 6, 6]
    assert expert_ids.tolist() == [0, 1, 2, -1] and num_post.tolist() == [12]
    assert sorted_ids.dtype == expert_ids.dtype == num_post.dtype == torch.int32


@pytest.mark.parametrize("num_tokens,top_k,num_experts,block_m,pattern,id_dtype", [
    (1, 1, 4, 16, "even", torch.int64), (1, 2, 8, 16, "even", torch.int32), (7, 2, 8, 4, "skewed", torch.int32),
    (33, 4, 16, 16, "skewed", torch.int64), (64, 2, 8, 64, "one", torch.int32), (300, 3, 5, 64, "even", torch.int64),
    (50, 3, 6, 8, "repeats", torch.int32), (5, 8, 64, 16, "even", torch.int64)])
def test_align_groups_every_slot_once_in_padded_expert_runs(num_tokens, top_k, num_experts, block_m, pattern,
                                                            id_dtype):
    _, ids = make_routing(num_tokens, num_experts, top_k, pattern, device="cpu", seed=num_tokens)
    ids = ids.to(id_dtype)
    sorted_ids, expert_ids, num_post = moe_align(ids, num_experts, block_m)
    num_slots = num_tokens * top_k
    flat = ids.flatten().long()
    counts = torch.bincount(flat, minlength=num_experts)
    padded = (counts + block_m - 1) // block_m * block_m

    # sizes: the static worst case, whatever the routing
    busy = min(num_experts, num_slots)
    capacity = (busy + (num_slots - busy) // block_m) * block_m
    assert sorted_ids.shape == (capacity,) and expert_ids.shape == (capacity // block_m,) and num_post.shape == (1,)
    assert num_post.item() == padded.sum().item() <= capacity

    # every slot exactly once, sentinels elsewhere (inside runs as padding, and past the last run)
    real = sorted_ids[sorted_ids != num_slots]
    assert sorted(real.tolist()) == list(range(num_slots))
    assert (sorted_ids[num_post.item():] == num_slots).all()
    assert (expert_ids[num_post.item() // block_m:] == -1).all()

    # block by block: the experts in ascending order, each with ceil(count / block_m) blocks, no empty expert
    blocks = sorted_ids[:num_post.item()].view(-1, block_m)
    block_experts = expert_ids[:blocks.shape[0]].long()
    expected_experts = torch.repeat_interleave(torch.arange(num_experts), padded // block_m)
    assert block_experts.tolist() == expected_experts.tolist()
    for expert in range(num_experts):
        run = blocks[block_experts == expert].flatten()
        slots = run[run != num_slots]
        assert (flat[slots.long()] == expert).all(), f"expert {expert}'s run holds other experts' slots"
        assert slots.tolist() == sorted(flat.eq(expert).nonzero().flatten().tolist()), "slots not ascending"
        assert (run[len(slots):] == num_slots).all() and len(run) - len(slots) < max(block_m, 1), \
            "padding only at a run's end, less than a block of it"


def test_align_sizes_depend_on_shapes_only():
    """What a CUDA graph needs: the same shapes for any routing, and the worst routing fills them exactly."""
    num_tokens, top_k, num_experts, block_m = 20, 2, 8, 16
    together = torch.zeros(num_tokens, top_k, dtype=torch.int64)  # 40 slots: 3 blocks
    spread = torch.arange(num_tokens * top_k).view(num_tokens, top_k) % num_experts  # 5 slots each: 8 blocks
    worst = torch.zeros(num_tokens * top_k, dtype=torch.int64)  # 33 slots to expert 0 (3 blocks), 1 to each other
    worst[:num_experts - 1] = torch.arange(1, num_experts)
    shapes = {tuple(t.shape for t in moe_align(ids.view(num_tokens, top_k), num_experts, block_m))
              for ids in (together, spread, worst)}
    assert shapes == {((10 * block_m,), (10,), (1,))}
    assert moe_align(worst.view(num_tokens, top_k), num_experts, block_m)[2].item() == 10 * block_m


def test_align_of_no_tokens_is_empty():
    sorted_ids, expert_ids, num_post = moe_align(torch.zeros(0, 2, dtype=torch.int64), 8, 16)
    assert sorted_ids.numel() == 0 and expert_ids.numel() == 0 and num_post.tolist() == [0]


# ---------------------------------------------------------------- the kernel against the reference

# (tokens, experts, top_k, hidden, intermediate, dtype, activation, routing, config)
KERNEL_CASES = [
    (1, 8, 2, 64, 32, torch.float32, "silu", "even", "decode"),
    (16, 16, 4, 32, 64, torch.float32, "gelu_tanh", "skewed", "decode"),
    (80, 4, 1, 40, 24, torch.float32, "silu", "even", "prefill"),  # K = 40 and 24: masked K tiles, partial N
    (300, 16, 4, 64, 64, torch.float32, "silu", "skewed", "prefill"),
    (130, 6, 2, 48, 32, torch.float32, "gelu_tanh", "one", "prefill"),
    (90, 8, 3, 32, 48, torch.float32, "silu", "repeats", "prefill"),
    (5, 8, 2, 64, 32, torch.bfloat16, "silu", "skewed", "decode"),
    (200, 8, 2, 64, 48, torch.bfloat16, "gelu_tanh", "skewed", "prefill"),
    (12, 4, 4, 32, 32, torch.float16, "gelu_tanh", "even", "decode"),
    (150, 12, 2, 48, 64, torch.float16, "silu", "one", "prefill"),
]


def case_id(case) -> str:
    tokens, experts, top_k, hidden, intermediate, dtype, activation, routing, config = case
    return f"T{tokens}-E{experts}-k{top_k}-H{hidden}-I{intermediate}-{dtype_id(dtype)}-{activation}-{routing}"


@pytest.mark.parametrize("case", KERNEL_CASES, ids=case_id)
def test_kernel_matches_reference(case):
    tokens, experts, top_k, hidden, intermediate, dtype, activation, routing, config = case
    expected_block_m = 16 if config == "decode" else 64
    assert kernel_config(tokens, hidden, intermediate, dtype, top_k=top_k,
                         num_experts=experts)["BLOCK_M"] == expected_block_m
    w13, w2 = make_layer(experts, hidden, intermediate, dtype, seed=tokens)
    weights, ids = make_routing(tokens, experts, top_k, routing, seed=tokens)
    unused = poison_unused_experts(w13, w2, ids)
    assert routing not in ("skewed", "one") or unused, "the case should leave an expert without tokens"
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    y = fused_moe(x, w13, w2, weights, ids.int() if tokens % 2 else ids, activation)
    expected = fused_moe_reference(x, w13, w2, weights, ids, activation)
    assert y.shape == (tokens, hidden) and y.dtype == dtype
    assert_close_to(y, expected, KERNEL_TOLERANCE[dtype])


def test_kernel_takes_strided_token_rows_and_low_precision_routing_weights():
    tokens, experts, top_k, hidden, intermediate = 20, 4, 2, 32, 32
    w13, w2 = make_layer(experts, hidden, intermediate, torch.float32)
    weights, ids = make_routing(tokens, experts, top_k, "even")
    x = torch.randn(tokens, 2 * hidden, generator=torch.Generator().manual_seed(1)).to(DEVICE)[:, hidden:]
    y = fused_moe(x, w13, w2, weights.bfloat16(), ids)
    assert_close_to(y, fused_moe_reference(x, w13, w2, weights.bfloat16(), ids), KERNEL_TOLERANCE[torch.float32])


def test_no_tokens_give_an_empty_output():
    w13, w2 = make_layer(4, 32, 32, torch.bfloat16)
    x = torch.zeros(0, 32, dtype=torch.bfloat16, device=DEVICE)
    ids = torch.zeros(0, 2, dtype=torch.int64, device=DEVICE)
    for run in (fused_moe, fused_moe_reference):
        y = run(x, w13, w2, ids.float(), ids)
        assert y.shape == (0, 32) and y.dtype == torch.bfloat16


# ---------------------------------------------------------------- the reference against the dense oracle

@pytest.mark.parametrize("tokens,experts,top_k,dtype,activation,routing", [
    (1, 4, 1, torch.float32, "silu", "even"), (40, 8, 2, torch.float32, "silu", "skewed"),
    (64, 16, 4, torch.float32, "gelu_tanh", "even"), (30, 6, 3, torch.float32, "silu", "repeats"),
    (50, 8, 2, torch.bfloat16, "silu", "skewed"), (50, 8, 2, torch.float16, "gelu_tanh", "one")],
    ids=lambda v: dtype_id(v) if isinstance(v, torch.dtype) else str(v))
def test_reference_matches_dense_oracle(tokens, experts, top_k, dtype, activation, routing):
    hidden, intermediate = 48, 80
    w13, w2 = make_layer(experts, hidden, intermediate, dtype, device="cpu", seed=tokens)
    weights, ids = make_routing(tokens, experts, top_k, routing, device="cpu", seed=tokens)
    poison_unused_experts(w13, w2, ids)  # the reference must not touch them (the oracle gathers only used ones)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(1)).to(dtype)
    y = fused_moe_reference(x, w13, w2, weights, ids, activation)
    assert y.dtype == dtype
    assert_close_to(y, dense_oracle(x, w13, w2, weights, ids, activation), ORACLE_TOLERANCE[dtype])


# ---------------------------------------------------------------- launch configs and errors (no kernel launch)

def test_decode_sized_batches_take_16_row_tiles_and_prefill_64():
    for tokens, top_k, experts, block_m in ((1, 2, 8, 16), (64, 2, 8, 16), (65, 2, 8, 64), (256, 2, 8, 64),
                                            (128, 8, 64, 16), (4096, 8, 128, 64)):
        config = kernel_config(tokens, 4096, 14336, torch.bfloat16, top_k=top_k, num_experts=experts)
        assert config["BLOCK_M"] == block_m, (tokens, top_k, experts)
        assert 4096 % config["BLOCK_K"] == 0 and 14336 % config["BLOCK_K"] == 0
        assert {"BLOCK_N", "GROUP_M", "num_warps", "num_stages"} <= set(config)
    assert kernel_config(1, 2048, 1408, torch.bfloat16)["BLOCK_K"] == 128  # Qwen1.5-MoE: 1408 = 11 * 128
    assert kernel_config(1, 40, 24, torch.float32)["BLOCK_K"] == 16  # no power of two >= 16 divides 40 and 24


def test_wrapper_names_what_is_wrong():
    w13, w2 = make_layer(4, 32, 16, torch.float32, device="cpu")
    x = torch.zeros(3, 32)
    weights, ids = torch.full((3, 2), 0.5), torch.zeros(3, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"activation must be one of \['silu', 'gelu_tanh'\], got 'relu'"):
        fused_moe(x, w13, w2, weights, ids, "relu")
    with pytest.raises(ValueError, match=r"w13 must be torch.float32 \[experts, 2 \* intermediate, 32\]"):
        fused_moe_reference(x, w13[:, :, :16], w2, weights, ids)
    with pytest.raises(ValueError, match=r"w2 must be torch.float32 \[4, 32, 16\] .* got torch.bfloat16"):
        fused_moe_reference(x, w13, w2.bfloat16(), weights, ids)
    with pytest.raises(ValueError, match=r"topk_ids must be int32/int64 \[3, top_k\], got torch.float32"):
        fused_moe(x, w13, w2, weights, ids.float())
    with pytest.raises(ValueError, match=r"topk_weights must be floating point \[3, 2\], got torch.float32 \[3, 1\]"):
        fused_moe(x, w13, w2, weights[:, :1], ids)
    with pytest.raises(ValueError, match=r"hidden must be float32/float16/bfloat16 .* got torch.int64"):
        fused_moe(x.long(), w13, w2, weights, ids)


# ---------------------------------------------------------------- ahead of time, for sm_80 and sm_90 (no GPU)

AOT_ARCHS = [80, 90]
AOT_PHASES = {"decode": 1, "prefill": 256}  # Mixtral-8x7B, a launch's token count -> its config
AOT_DTYPES = ["float16", "bfloat16"]
AOT_GEMMS = {"gate_up": dict(gated=True), "gelu_tanh": dict(gated=True, activation="gelu_tanh"),
             "down": dict(gated=False)}

# compiled in one child process: under TRITON_INTERPRET=1 (set here without CUDA) kernels are Python, not compilable
_AOT_SCRIPT = """
import json, sys, torch
from dataclasses import asdict
from tokenmill.kernels.aot import MAX_SHARED_BYTES, compile_fused_moe
results = {}
for name, args in json.load(sys.stdin).items():
    args["dtype"] = getattr(torch, args["dtype"])
    try:
        results[name] = dict(asdict(compile_fused_moe(**args)), max_shared_bytes=MAX_SHARED_BYTES[args["arch"]])
    except Exception as error:
        results[name] = {"error": f"{type(error).__name__}: {error}"}
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def aot_resources():
    """``{"arch/gemm/phase/dtype": KernelResources as a dict (plus max_shared_bytes), or {"error"}}``."""
    jobs = {f"{arch}/{gemm}/{phase}/{dtype}": dict(arch=arch, dtype=dtype, num_tokens=num_tokens, **args)
            for arch in AOT_ARCHS for gemm, args in AOT_GEMMS.items() for phase, num_tokens in AOT_PHASES.items()
            for dtype in AOT_DTYPES}
    return compile_ahead_of_time(_AOT_SCRIPT, jobs)


@pytest.mark.parametrize("dtype", AOT_DTYPES)
@pytest.mark.parametrize("phase", AOT_PHASES)
@pytest.mark.parametrize("gemm", AOT_GEMMS)
@pytest.mark.parametrize("arch", AOT_ARCHS, ids=lambda a: f"sm_{a}")
def test_compiles_ahead_of_time_without_spilling(aot_resources, arch, gemm, phase, dtype):
    resources = aot_resources[f"{arch}/{gemm}/{phase}/{dtype}"]
    assert "error" not in resources, resources.get("error")
    assert resources["stack_bytes"] == 0 and resources["local_bytes"] == 0, f"ptxas spilled: {resources}"
    assert resources["shared_bytes"] <= resources["max_shared_bytes"], f"too much shared memory: {resources}"


# ---------------------------------------------------------------- CUDA, compiled, real sizes

@pytest.fixture(scope="module")
def mixtral_layer():
    return make_layer(8, 4096, 14336, torch.bfloat16, device="cuda")


@pytest.mark.gpu
@compiled_on_cuda
@pytest.mark.parametrize("tokens", [1, 16, 256])
def test_gpu_mixtral_layer_matches_reference(mixtral_layer, tokens):
    w13, w2 = mixtral_layer
    weights, ids = make_routing(tokens, 8, 2, "skewed", device="cuda", seed=tokens)
    x = torch.randn(tokens, 4096, device="cuda").bfloat16()
    assert_close_to(fused_moe(x, w13, w2, weights, ids), fused_moe_reference(x, w13, w2, weights, ids),
                    KERNEL_TOLERANCE[torch.bfloat16])


@pytest.mark.gpu
@compiled_on_cuda
def test_gpu_cuda_graph_replays_new_routings():
    """Alignment and both launches captured once, replayed on routings the capture never saw."""
    tokens, experts, top_k, hidden, intermediate = 24, 8, 2, 256, 512
    w13, w2 = make_layer(experts, hidden, intermediate, torch.bfloat16, device="cuda")
    x = torch.randn(tokens, hidden, device="cuda").bfloat16()
    weights, ids = make_routing(tokens, experts, top_k, "even", device="cuda")
    fused_moe(x, w13, w2, weights, ids)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = fused_moe(x, w13, w2, weights, ids)
    for seed, routing in ((1, "skewed"), (2, "one"), (3, "even")):
        new_weights, new_ids = make_routing(tokens, experts, top_k, routing, device="cuda", seed=seed)
        weights.copy_(new_weights)
        ids.copy_(new_ids)
        graph.replay()
        assert_close_to(y, fused_moe_reference(x, w13, w2, weights, ids), KERNEL_TOLERANCE[torch.bfloat16])
