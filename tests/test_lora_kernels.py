"""The batched multi-LoRA kernels (``tokenmill.kernels.lora``) against their torch reference, and the reference
against a dense per-row oracle.

* ``lora_shrink`` then ``lora_expand`` (Triton, interpreted without CUDA on small shapes) on mixed batches:
  rows of several adapters, rows without one (-1), a single adapter, both variants (per-row decode, grouped
  prefill), adapters of smaller rank zero-padded to R, fp32 / fp16 / bf16. Slots no token uses hold NaN
  weights, so a program that reads a wrong slot poisons its rows; rows without an adapter must come back
  bit for bit as they went in (y is random, not zero, so a stray write shows).
* ``lora_reference`` against an fp64 oracle that gathers each token's adapter on its own (no unique, no
  grouping), and ``lora_apply``'s CPU path against it.
* Every variant a launch compiles, ahead of time for sm_80 and sm_90 (``tokenmill.kernels.aot``).

Bounds are elementwise, ``|y - expected| <= c |expected| + a rms(expected)``: the kernels and the reference
both multiply in fp32 and round once, to y's dtype, so c is one unit of roundoff of that dtype (plus fp32
summation order, the a term). A wrong slot, a dropped row or a transposed weight moves y by about the
delta's own size, far outside it.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from builders import compile_ahead_of_time  # noqa: E402
from tokenmill.kernels.lora import (DECODE_MAX_TOKENS, kernel_config, lora_apply, lora_expand,  # noqa: E402
                                    lora_reference, lora_shrink)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# one rounding of y to the dtype (half an ulp: 2^-24, 2^-11, 2^-8), with margin for the sum's order in fp32
ROUNDING = {torch.float32: 2 ** -23, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}
FP32_ORDER = 1e-5


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------- builders

def make_adapters(num_slots: int, max_rank: int, in_features: int, out_features: int, dtype: torch.dtype,
                  ranks: list[int] | None = None, device: str = DEVICE,
                  seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """lora_a [S, R, K] and lora_b [S, N, R], adapter s of rank ``ranks[s]`` (default R) zero-padded to R;
    N(0, 1 / K) and N(0, 1 / r) entries: a delta of about unit size for unit inputs."""
    gen = torch.Generator().manual_seed(seed)
    lora_a = torch.randn(num_slots, max_rank, in_features, generator=gen) / in_features ** 0.5
    lora_b = torch.randn(num_slots, out_features, max_rank, generator=gen) / max_rank ** 0.5
    for slot, rank in enumerate(ranks or [max_rank] * num_slots):
        lora_a[slot, rank:] = 0
        lora_b[slot, :, rank:] = 0
    return lora_a.to(device, dtype), lora_b.to(device, dtype)


def make_slots(num_tokens: int, num_slots: int, pattern: str, device: str = DEVICE, seed: int = 0) -> torch.Tensor:
    """int32 [T]. ``mixed``: each token a random slot or -1, every value present when T allows.
    ``one``: every token the last slot (not slot 0: a kernel that ignores the slot reads slot 0).
    ``some``: tokens alternate between the last slot and -1."""
    if pattern == "one":
        slots = torch.full((num_tokens,), num_slots - 1)
    elif pattern == "some":
        slots = torch.where(torch.arange(num_tokens) % 2 == 0, num_slots - 1, -1)
    else:
        assert pattern == "mixed"
        gen = torch.Generator().manual_seed(seed)
        slots = torch.randint(-1, num_slots, (num_tokens,), generator=gen)
        slots[:num_slots + 1] = torch.arange(-1, num_slots)[:num_tokens]
        slots = slots[torch.randperm(num_tokens, generator=gen)]
    return slots.to(device, torch.int32)


def poison_unused_slots(lora_a: torch.Tensor, lora_b: torch.Tensor, token_slots: torch.Tensor) -> list[int]:
    """NaN weights in the slots no token uses; returns those slots."""
    unused = sorted(set(range(lora_a.shape[0])) - set(token_slots.tolist()))
    lora_a[unused] = float("nan")
    lora_b[unused] = float("nan")
    return unused


def dense_oracle(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                 token_slots: torch.Tensor) -> torch.Tensor:
    """The delta row by row in fp64: each token's own adapter, zero for -1."""
    delta = torch.zeros(x.shape[0], lora_b.shape[1], dtype=torch.float64)
    for row, slot in enumerate(token_slots.tolist()):
        if slot >= 0:
            delta[row] = lora_b[slot].double().cpu() @ (lora_a[slot].double().cpu() @ x[row].double().cpu())
    return delta


def assert_close_to(y: torch.Tensor, expected: torch.Tensor, rounding: float) -> None:
    y, expected = y.double().cpu(), expected.double().cpu()
    bound = rounding * expected.abs() + FP32_ORDER * expected.square().mean().sqrt()
    error = (y - expected).abs()
    worst = int((error - bound).argmax()) if error.numel() else 0
    assert torch.isfinite(y).all(), "non-finite output"
    assert (error <= bound).all(), (f"y[{divmod(worst, y.shape[1])}] = {y.flatten()[worst].item()}, expected "
                                    f"{expected.flatten()[worst].item()} +- {bound.flatten()[worst].item()}")


# ---------------------------------------------------------------- the kernels against the reference

# (tokens, slots, max rank, adapter ranks or None, K, N, dtype, pattern)
KERNEL_CASES = [
    (1, 1, 8, None, 32, 64, torch.float32, "one"),
    (1, 4, 16, None, 64, 32, torch.bfloat16, "one"),
    (7, 4, 16, [16, 4, 8, 16], 64, 96, torch.float32, "mixed"),
    (16, 3, 8, [8, 2, 8], 128, 48, torch.float16, "mixed"),
    (12, 2, 16, None, 48, 128, torch.bfloat16, "some"),
    (17, 4, 16, [16, 8, 4, 1], 64, 64, torch.float32, "mixed"),  # just past decode: grouped
    (100, 4, 8, None, 128, 96, torch.bfloat16, "mixed"),
    (200, 3, 16, [4, 16, 12], 96, 128, torch.float16, "mixed"),
    (130, 4, 12, None, 40, 72, torch.float32, "one"),  # rank 12 and K = 40, N = 72: partial R, K and N tiles
    (64, 2, 16, None, 32, 64, torch.bfloat16, "some"),
]


def case_id(case) -> str:
    tokens, slots, rank, ranks, k_dim, n_dim, dtype, pattern = case
    return f"T{tokens}-S{slots}-R{rank}{'-padded' if ranks else ''}-K{k_dim}-N{n_dim}-{dtype_id(dtype)}-{pattern}"


@pytest.mark.parametrize("case", KERNEL_CASES, ids=case_id)
def test_kernels_match_reference(case):
    tokens, num_slots, rank, ranks, k_dim, n_dim, dtype, pattern = case
    grouped = tokens > DECODE_MAX_TOKENS
    for op in ("shrink", "expand"):
        assert kernel_config(tokens, rank, dtype, op)[0]["GROUPED"] == grouped
    lora_a, lora_b = make_adapters(num_slots, rank, k_dim, n_dim, dtype, ranks, seed=tokens)
    token_slots = make_slots(tokens, num_slots, pattern, seed=tokens)
    unused = poison_unused_slots(lora_a, lora_b, token_slots)
    assert pattern == "mixed" or num_slots == 1 or unused, "the case should leave a slot unused"
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, k_dim, generator=gen).to(DEVICE, dtype)
    y = torch.randn(tokens, n_dim, generator=gen).to(DEVICE, dtype)
    y_before = y.clone()

    t = lora_shrink(x, lora_a, token_slots)
    assert t.shape == (tokens, rank) and t.dtype == torch.float32
    none = token_slots < 0
    assert (t[none] == 0).all(), "rows without an adapter must shrink to zero"
    with_lora = token_slots.clamp(min=0).long()
    expected_t = torch.einsum("tk,trk->tr", x.double(), lora_a[with_lora].double()).masked_fill(none[:, None], 0)
    assert_close_to(t, expected_t, ROUNDING[torch.float32])

    lora_expand(t, lora_b, token_slots, y)
    assert y.dtype == dtype
    assert torch.equal(y[none].view(torch.int16 if dtype != torch.float32 else torch.int32),
                       y_before[none].view(torch.int16 if dtype != torch.float32 else torch.int32)), \
        "rows without an adapter were written"
    expected = y_before.float() + lora_reference(x, lora_a, lora_b, token_slots)
    assert_close_to(y, expected, ROUNDING[dtype])


def test_kernels_take_strided_rows_and_int64_slots():
    tokens, num_slots, rank, k_dim, n_dim = 40, 3, 16, 64, 32
    lora_a, lora_b = make_adapters(num_slots, rank, k_dim, n_dim, torch.float32)
    token_slots = make_slots(tokens, num_slots, "mixed").long()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(tokens, 2 * k_dim, generator=gen).to(DEVICE)[:, k_dim:]
    y_wide = torch.randn(tokens, 3 * n_dim, generator=gen).to(DEVICE)
    y = y_wide[:, n_dim:2 * n_dim]
    before = y_wide.clone()
    lora_expand(lora_shrink(x, lora_a, token_slots), lora_b, token_slots, y)
    assert torch.equal(y_wide[:, :n_dim], before[:, :n_dim]) and torch.equal(y_wide[:, 2 * n_dim:],
                                                                               before[:, 2 * n_dim:])
    assert_close_to(y, before[:, n_dim:2 * n_dim] + lora_reference(x, lora_a, lora_b, token_slots),
                    ROUNDING[torch.float32])


def test_no_tokens_and_all_rows_without_adapter():
    lora_a, lora_b = make_adapters(2, 8, 32, 32, torch.bfloat16)
    empty = torch.zeros(0, 32, dtype=torch.bfloat16, device=DEVICE)
    no_slots = torch.zeros(0, dtype=torch.int32, device=DEVICE)
    assert lora_shrink(empty, lora_a, no_slots).shape == (0, 8)
    lora_expand(torch.zeros(0, 8, device=DEVICE), lora_b, no_slots, empty)
    assert lora_reference(empty, lora_a, lora_b, no_slots).shape == (0, 32)
    for tokens in (3, 40):  # both variants
        x = torch.randn(tokens, 32).to(DEVICE, torch.bfloat16)
        y = torch.randn(tokens, 32).to(DEVICE, torch.bfloat16)
        before = y.clone()
        slots = torch.full((tokens,), -1, dtype=torch.int32, device=DEVICE)
        t = lora_shrink(x, lora_a, slots)
        assert (t == 0).all()
        lora_expand(t, lora_b, slots, y)
        assert torch.equal(y, before)


# ---------------------------------------------------------------- the reference and the layer's CPU path

@pytest.mark.parametrize("tokens,num_slots,dtype,pattern", [
    (1, 1, torch.float32, "one"), (30, 4, torch.float32, "mixed"), (50, 3, torch.bfloat16, "mixed"),
    (20, 2, torch.float16, "some"), (9, 4, torch.bfloat16, "one")],
    ids=lambda v: dtype_id(v) if isinstance(v, torch.dtype) else str(v))
def test_reference_matches_dense_oracle(tokens, num_slots, dtype, pattern):
    lora_a, lora_b = make_adapters(num_slots, 16, 48, 80, dtype, [16, 8, 4, 2][:num_slots], device="cpu",
                                   seed=tokens)
    token_slots = make_slots(tokens, num_slots, pattern, device="cpu", seed=tokens)
    poison_unused_slots(lora_a, lora_b, token_slots)  # the reference loops over present slots only
    x = torch.randn(tokens, 48, generator=torch.Generator().manual_seed(1)).to(dtype)
    delta = lora_reference(x, lora_a, lora_b, token_slots)
    assert delta.dtype == torch.float32 and delta.shape == (tokens, 80)
    assert (delta[token_slots < 0] == 0).all()
    assert_close_to(delta, dense_oracle(x, lora_a, lora_b, token_slots), ROUNDING[torch.float32])


def test_apply_on_cpu_adds_the_reference_delta_to_rows_with_an_adapter():
    tokens, num_slots = 24, 3
    lora_a, lora_b = make_adapters(num_slots, 8, 32, 48, torch.bfloat16, device="cpu")
    token_slots = make_slots(tokens, num_slots, "mixed", device="cpu")
    x = torch.randn(tokens, 32).bfloat16()
    y = torch.randn(tokens, 48).bfloat16()
    before = y.clone()
    lora_apply(x, lora_a, lora_b, token_slots, y)
    none = token_slots < 0
    assert torch.equal(y[none].view(torch.int16), before[none].view(torch.int16))
    assert_close_to(y, before.float() + dense_oracle(x, lora_a, lora_b, token_slots).float(),
                    ROUNDING[torch.bfloat16])


# ---------------------------------------------------------------- configs and errors (no launch)

def test_decode_batches_run_per_row_and_prefill_grouped():
    for tokens, grouped in ((1, False), (DECODE_MAX_TOKENS, False), (DECODE_MAX_TOKENS + 1, True), (4096, True)):
        for rank in (8, 16, 64, 256):
            shrink, _, _ = kernel_config(tokens, rank, torch.bfloat16, "shrink")
            expand, _, _ = kernel_config(tokens, rank, torch.bfloat16, "expand")
            assert shrink["GROUPED"] == expand["GROUPED"] == grouped
            assert shrink["BLOCK_M"] == expand["BLOCK_M"] == (64 if grouped else 1)  # one grouping serves both
            assert 16 <= shrink["BLOCK_R"] <= 64 and expand["BLOCK_R"] >= 16
    with pytest.raises(ValueError, match=r"op must be one of \['shrink', 'expand'\], got 'both'"):
        kernel_config(1, 16, torch.float16, "both")


def test_wrappers_name_what_is_wrong():
    lora_a, lora_b = make_adapters(2, 8, 32, 16, torch.float32, device="cpu")
    x, y, slots = torch.zeros(3, 32), torch.zeros(3, 16), torch.zeros(3, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"lora_a must be float32 \[\?, \?, 32\]"):
        lora_shrink(x, lora_a[:, :, :16], slots)
    with pytest.raises(ValueError, match=r"token_slots must be int32/int64 \[3\], got torch.float32"):
        lora_shrink(x, lora_a, slots.float())
    with pytest.raises(ValueError, match=r"t must be float32 \[3, 8\]"):
        lora_expand(torch.zeros(3, 8).bfloat16(), lora_b, slots, y)
    with pytest.raises(ValueError, match=r"lora_b must be float32 \[2, 16, 8\]"):
        lora_apply(x, lora_a, lora_b[:1], slots, y)
    with pytest.raises(ValueError, match=r"x must be float32/float16/bfloat16 .* got torch.int64"):
        lora_reference(x.long(), lora_a, lora_b, slots)


# ---------------------------------------------------------------- ahead of time, for sm_80 and sm_90 (no GPU)

AOT_ARCHS = [80, 90]
AOT_PHASES = {"decode": 1, "prefill": 256}
AOT_DTYPES = ["float16", "bfloat16"]
AOT_OPS = ["shrink", "expand"]
AOT_RANKS = [16, 64]

_AOT_SCRIPT = """
import json, sys, torch
from dataclasses import asdict
from tokenmill.kernels.aot import MAX_SHARED_BYTES, compile_lora
results = {}
for name, args in json.load(sys.stdin).items():
    args["dtype"] = getattr(torch, args["dtype"])
    try:
        results[name] = dict(asdict(compile_lora(**args)), max_shared_bytes=MAX_SHARED_BYTES[args["arch"]])
    except Exception as error:
        results[name] = {"error": f"{type(error).__name__}: {error}"}
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def aot_resources():
    """``{"arch/op/phase/dtype/rank": KernelResources as a dict (plus max_shared_bytes), or {"error"}}``."""
    jobs = {f"{arch}/{op}/{phase}/{dtype}/{rank}": dict(arch=arch, op=op, dtype=dtype, num_tokens=num_tokens,
                                                        rank=rank)
            for arch in AOT_ARCHS for op in AOT_OPS for phase, num_tokens in AOT_PHASES.items()
            for dtype in AOT_DTYPES for rank in AOT_RANKS}
    return compile_ahead_of_time(_AOT_SCRIPT, jobs)


@pytest.mark.parametrize("rank", AOT_RANKS, ids=lambda r: f"R{r}")
@pytest.mark.parametrize("dtype", AOT_DTYPES)
@pytest.mark.parametrize("phase", AOT_PHASES)
@pytest.mark.parametrize("op", AOT_OPS)
@pytest.mark.parametrize("arch", AOT_ARCHS, ids=lambda a: f"sm_{a}")
def test_compiles_ahead_of_time_without_spilling(aot_resources, arch, op, phase, dtype, rank):
    resources = aot_resources[f"{arch}/{op}/{phase}/{dtype}/{rank}"]
    assert "error" not in resources, resources.get("error")
    assert resources["stack_bytes"] == 0 and resources["local_bytes"] == 0, f"ptxas spilled: {resources}"
    assert resources["shared_bytes"] <= resources["max_shared_bytes"], f"too much shared memory: {resources}"
