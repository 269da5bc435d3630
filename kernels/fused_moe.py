"""Mixture-of-experts feed-forward: two grouped GEMMs over the (token, expert) pairs a router picked.

Token t is routed to ``k`` experts ``topk_ids[t]`` with weights ``topk_weights[t]``. Each pair is a
*slot* ``s = t * k + j`` (the flattened ``topk_ids``); the layer computes

    out[t] = sum_j  topk_weights[t, j] * w2[e] @ (act(w13[e, :I] @ x_t) * (w13[e, I:] @ x_t)),  e = topk_ids[t, j]

with the experts' weights stacked per layer, in the model dtype, rows contiguous:

    w13  [E, 2I, H]   rows 0..I-1 the gate projection, rows I..2I-1 the up projection
    w2   [E, H, I]    the down projection

Alignment (``moe_align``). The slots are grouped by expert (stably: ascending slot within an
expert) and each expert's run padded with the sentinel ``T * k`` to a multiple of BLOCK_M, so
that an M-tile of BLOCK_M rows holds one expert's slots only. T = 3, k = 2, E = 4, BLOCK_M = 4:

    topk_ids [[2, 0], [2, 1], [0, 2]]  ->  slot: 0  1  2  3  4  5      sentinel S = 6
                                           expert: 2  0  2  1  0  2
    sorted_token_ids  [ 1  4  S  S | 3  S  S  S | 0  2  5  S | S  S  S  S ]      P = 16
    expert_ids        [     0      |     1      |     2      |    -1      ]      P // BLOCK_M
    num_tokens_post_padded [12]                                   expert 3: no slot, no block

P, the buffer's length, is the worst case for any routing of T tokens (``moe_align``), so the sizes
depend on host ints only and a CUDA graph can capture the whole layer; the programs of blocks at or
past ``num_tokens_post_padded`` exit at once.

The GEMMs. One kernel, two constexpr variants, over the P // BLOCK_M M-tiles times the N-tiles:

    gate/up   A = x [T, H] gathered by row s // k    intermediate[s] = act(A w13[e, :I].T) * (A w13[e, I:].T)
              two fp32 accumulators over the same A tile; the activation is applied in the epilogue
    down      A = intermediate [T * k, I], row s     y[s] = topk_weights[s] * (A w2[e].T)
              the routing weight is applied in the epilogue

then the k slots of each token are summed (``y.view(T, k, H).sum(1)``, in fp32). Rows are written
per slot, so no two programs write one element: no atomics, and the result is deterministic.

Tiling. Program (m, n) owns rows ``sorted_token_ids[m BM : (m + 1) BM]`` (one expert, ``expert_ids[m]``)
and columns n BN .. (n + 1) BN of the GEMM's output, and walks K (H, then I) in tiles of BK:

                K ──────────────────────────>
    A rows  [BM, K]     gathered rows (sentinel rows read row 0; only the store is masked)
    W[e]    [BN, K]     contiguous rows of expert e (gate/up: also the BN rows I further down)
                        acc[BM, BN] += A_tile @ W_tile.T   (fp32)

Programs are ordered in groups of GROUP_M M-tiles sharing an N-tile, so an expert's weight tile
is fetched from DRAM once and served from L2 to its other M-tiles. Launches allocate only their
outputs and read no device value on the host.
"""
from __future__ import annotations

import os
from typing import Any

import torch
import triton
import triton.language as tl

# Triton picks interpreter or compiler when a kernel is defined, i.e. now. The interpreter runs
# bf16 arithmetic on raw uint16 bits, so there the dots take fp32 operands rounded to the model dtype.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

ACTIVATIONS = {"silu": 0, "gelu_tanh": 1}
_SILU = tl.constexpr(ACTIVATIONS["silu"])
_GELU_TANH = tl.constexpr(ACTIVATIONS["gelu_tanh"])
# gelu_tanh(g) = g (1 + tanh(z)) / 2 = g sigmoid(2 z),  z = sqrt(2 / pi) (g + 0.044715 g^3)
_TWO_SQRT_2_OVER_PI = tl.constexpr(1.5957691216057308)
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _fused_moe_kernel(a, w, c, topk_weights, sorted_token_ids, expert_ids, num_tokens_post_padded,
                      N, K, num_slots, stride_am, stride_we, stride_wn, stride_cm,
                      TOP_K: tl.constexpr, GATED: tl.constexpr, ACTIVATION: tl.constexpr,
                      ROUTING_WEIGHT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
                      DOT_IN_FP32: tl.constexpr):
    """``c[s, n] (+ over K) = a[s // TOP_K] . w[e, n]`` for the slots s of each M-tile (layout in the module
    docstring). GATED: ``w`` is w13 and ``c[s, n] = act(a . w[e, n]) * (a . w[e, N + n])`` with N = I.
    ROUTING_WEIGHT: ``c[s]`` is scaled by ``topk_weights[s]`` (fp32, flat [T * k]). EVEN_K: BLOCK_K divides K
    (no masks in the K loop). ``a``, ``w`` and ``c`` have contiguous rows."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    num_m = tl.num_programs(0) // num_n
    # GROUP_M consecutive M-tiles per N-tile, the M-tile varying fastest
    per_group = GROUP_M * num_n
    first_m = pid // per_group * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + pid % per_group % group_size
    pid_n = pid % per_group // group_size
    if pid_m * BLOCK_M >= tl.load(num_tokens_post_padded):
        return

    expert = tl.load(expert_ids + pid_m).to(tl.int64)
    slots = tl.load(sorted_token_ids + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))  # [BM]
    valid = slots < num_slots
    rows = tl.where(valid, slots // TOP_K, 0).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    a_ptrs = a + rows[:, None] * stride_am + offs_k[None, :]  # [BM, BK]
    # columns past N read row N - 1 (no masks in the loop); the store drops them
    w_rows = w + expert * stride_we + tl.minimum(offs_n, N - 1).to(tl.int64) * stride_wn  # [BN]
    w_ptrs = w_rows[None, :] + offs_k[:, None]  # [BK, BN]: the tile of W[e].T
    up_offset = N.to(tl.int64) * stride_wn

    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a_tile = tl.load(a_ptrs)
            w_tile = tl.load(w_ptrs)
        else:
            k_ok = offs_k < K - k * BLOCK_K
            a_tile = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            w_tile = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        if DOT_IN_FP32:
            a_tile = a_tile.to(tl.float32)
            acc = tl.dot(a_tile, w_tile.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a_tile, w_tile, acc)
        if GATED:
            if EVEN_K:
                up_tile = tl.load(w_ptrs + up_offset)
            else:
                up_tile = tl.load(w_ptrs + up_offset, mask=k_ok[:, None], other=0.0)
            if DOT_IN_FP32:
                acc_up = tl.dot(a_tile, up_tile.to(tl.float32), acc_up, input_precision="ieee")
            else:
                acc_up = tl.dot(a_tile, up_tile, acc_up)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    if GATED:
        if ACTIVATION == _SILU:
            acc = acc * tl.sigmoid(acc) * acc_up
        else:
            tl.static_assert(ACTIVATION == _GELU_TANH, "unknown activation")
            acc = acc * tl.sigmoid((acc + 0.044715 * acc * acc * acc) * _TWO_SQRT_2_OVER_PI) * acc_up
    if ROUTING_WEIGHT:
        acc = acc * tl.load(topk_weights + slots, mask=valid, other=0.0)[:, None]
    out = c + slots.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    tl.store(out, acc.to(c.dtype.element_ty), mask=valid[:, None] & (offs_n < N)[None, :])


# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages)
_CONFIGS = {"decode": (16, 32, 128, 1, 4, 4), "prefill": (64, 128, 64, 8, 8, 4)}
DECODE_MAX_ROWS_PER_EXPERT = 16


def kernel_config(num_tokens: int, hidden: int, intermediate: int, dtype: torch.dtype, *, top_k: int = 2,
                  num_experts: int = 8) -> dict[str, Any]:
    """The tiles both GEMMs of a launch use (they share BLOCK_M: one ``moe_align`` serves both), with
    num_warps and num_stages; ``launch_constexprs`` adds each GEMM's own flags (``kernels.aot`` compiles
    the same for a GPU that is not here).

    Chosen by the rows an expert receives on average, ``num_tokens * top_k / num_experts`` (the
    defaults: Mixtral's 2 of 8). Decode-sized (<= 16) batches read every active expert's weights once
    whatever the tile; a 16-row M-tile (an mma's height) wastes the least, and narrow 32-column
    N-tiles with 128-input K-tiles, 4 in flight, spread the weight stream over many programs
    (Mixtral's down projection at one token: 2 experts x 128 N-tiles). Prefill-sized ones reuse each
    weight tile over 64 rows and 128 columns of A, 8 warps holding the gate/up pair of
    accumulators, 3 stages to fit sm_80's shared memory. Chosen from ptxas counts (see the AOT
    test), not yet tuned by timing. BLOCK_K halves (down to 16) until it divides both K's
    (hidden, intermediate); when none does, the K loop masks its last tile."""
    rows_per_expert = num_tokens * top_k / max(num_experts, 1)
    phase = "decode" if rows_per_expert <= DECODE_MAX_ROWS_PER_EXPERT else "prefill"
    block_m, block_n, block_k, group_m, num_warps, num_stages = _CONFIGS[phase]
    while block_k > 16 and (hidden % block_k or intermediate % block_k):
        block_k //= 2
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m, num_warps=num_warps,
                num_stages=num_stages, DOT_IN_FP32=dtype == torch.float32 or INTERPRETED)


def launch_constexprs(config: dict[str, Any], *, gated: bool, k_dim: int, top_k: int,
                      activation: str = "silu") -> tuple[dict[str, Any], int, int]:
    """One GEMM's constexprs, num_warps and num_stages from ``kernel_config``'s ``config``: the gate/up
    GEMM (``gated``: K = hidden, A rows gathered per token) or the down GEMM (K = intermediate, A rows
    per slot, the routing weight applied)."""
    constexprs = {name: value for name, value in config.items() if name not in ("num_warps", "num_stages")}
    constexprs.update(TOP_K=top_k if gated else 1, GATED=gated, ACTIVATION=ACTIVATIONS[activation],
                      ROUTING_WEIGHT=not gated, EVEN_K=k_dim % config["BLOCK_K"] == 0)
    return constexprs, config["num_warps"], config["num_stages"]


# ---------------------------------------------------------------- alignment

def moe_align(topk_ids: torch.Tensor, num_experts: int,
              block_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group the slots of ``topk_ids`` (int32/int64 [T, k], ids in [0, num_experts)) by expert, each
    expert's run padded to a multiple of ``block_m`` (layout in the module docstring).

    Returns int32 ``sorted_token_ids`` [P] (slots ``t * k + j``, ascending within an expert, the sentinel
    ``T * k`` as padding and after the last run), ``expert_ids`` [P // block_m] (-1 past the last run)
    and ``num_tokens_post_padded`` [1], all on ``topk_ids``' device. P is the most any routing needs,
    so sizes depend on shapes only: with n = T * k slots on b = min(E, n) experts, expert e's c_e >= 1
    slots take 1 + (c_e - 1) // block_m blocks, at most b + (n - b) // block_m in all (one expert
    taking n - b + 1 slots and b - 1 experts one each reaches it); P = block_m times that.
    Sort, scatter-add and searchsorted, no host sync (bincount syncs on CUDA), so a CUDA graph
    captures it."""
    num_slots = topk_ids.numel()
    device = topk_ids.device
    busy = min(num_experts, num_slots)  # experts that can receive a slot
    capacity = (busy + (num_slots - busy) // block_m) * block_m
    flat = topk_ids.reshape(-1).long()
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = padded.cumsum(0)
    run_start = counts.cumsum(0) - counts  # where each expert's slots start in the unpadded sorted order
    sorted_experts, order = torch.sort(flat, stable=True)
    rank = torch.arange(num_slots, device=device) - run_start[sorted_experts]
    dest = padded_end[sorted_experts] - padded[sorted_experts] + rank
    sorted_token_ids = torch.full((capacity,), num_slots, dtype=torch.int32, device=device)
    sorted_token_ids.scatter_(0, dest, order.to(torch.int32))
    # block b belongs to the first expert whose padded run ends after b * block_m
    block_starts = torch.arange(0, capacity, block_m, device=device)
    expert_ids = torch.searchsorted(padded_end, block_starts, right=True)
    expert_ids = torch.where(expert_ids < num_experts, expert_ids, -1).to(torch.int32)
    return sorted_token_ids, expert_ids, padded_end[-1:].to(torch.int32)


# ---------------------------------------------------------------- the layer

def _check_args(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                topk_ids: torch.Tensor, activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
    if hidden.dim() != 2 or hidden.dtype not in _DTYPES or hidden.stride(1) != 1:
        raise ValueError(f"hidden must be float32/float16/bfloat16 [num_tokens, hidden] with contiguous rows, "
                         f"got {hidden.dtype} {list(hidden.shape)} strides {hidden.stride()}")
    num_tokens, size = hidden.shape
    if w13.dim() != 3 or w13.shape[1] % 2 or w13.shape[2] != size or w13.dtype != hidden.dtype \
            or w13.stride(2) != 1:
        raise ValueError(f"w13 must be {hidden.dtype} [experts, 2 * intermediate, {size}] with contiguous rows, "
                         f"got {w13.dtype} {list(w13.shape)} strides {w13.stride()}")
    num_experts, intermediate = w13.shape[0], w13.shape[1] // 2
    if w2.shape != (num_experts, size, intermediate) or w2.dtype != hidden.dtype or w2.stride(2) != 1:
        raise ValueError(f"w2 must be {hidden.dtype} [{num_experts}, {size}, {intermediate}] with contiguous rows, "
                         f"got {w2.dtype} {list(w2.shape)} strides {w2.stride()}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != num_tokens or topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_ids must be int32/int64 [{num_tokens}, top_k], got {topk_ids.dtype} "
                         f"{list(topk_ids.shape)}")
    if topk_weights.shape != topk_ids.shape or not topk_weights.is_floating_point():
        raise ValueError(f"topk_weights must be floating point {list(topk_ids.shape)}, got {topk_weights.dtype} "
                         f"{list(topk_weights.shape)}")
    devices = {t.device for t in (hidden, w13, w2, topk_weights, topk_ids)}
    if len(devices) != 1:
        raise ValueError(f"all arguments must be on one device, got {sorted(map(str, devices))}")


def _launch(a: torch.Tensor, w: torch.Tensor, c: torch.Tensor, weights: torch.Tensor,
            aligned: tuple[torch.Tensor, torch.Tensor, torch.Tensor], num_slots: int, config: dict[str, Any], *,
            gated: bool, top_k: int, activation: str) -> None:
    sorted_token_ids, expert_ids, num_tokens_post_padded = aligned
    n, k_dim = c.shape[1], a.shape[1]
    constexprs, num_warps, num_stages = launch_constexprs(config, gated=gated, k_dim=k_dim, top_k=top_k,
                                                          activation=activation)
    grid = (expert_ids.numel() * triton.cdiv(n, constexprs["BLOCK_N"]),)
    _fused_moe_kernel[grid](a, w, c, weights, sorted_token_ids, expert_ids, num_tokens_post_padded, n, k_dim,
                            num_slots, a.stride(0), w.stride(0), w.stride(1), c.stride(0), **constexprs,
                            num_warps=num_warps, num_stages=num_stages)


def fused_moe(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """The MoE feed-forward [T, H] in hidden's dtype (fp32 accumulation) of ``hidden`` [T, H] routed by
    ``topk_ids`` [T, k] (int32/int64) with ``topk_weights`` [T, k] (any float dtype), through the stacked
    ``w13`` [E, 2I, H] and ``w2`` [E, H, I] (hidden's dtype, rows contiguous). ``activation``: ``"silu"``
    or ``"gelu_tanh"``, applied to the gate half. Two Triton launches and a sum; on CUDA, or on CPU under
    TRITON_INTERPRET=1 (the engine's CPU path is ``fused_moe_reference``)."""
    _check_args(hidden, w13, w2, topk_weights, topk_ids, activation)
    if hidden.device.type != "cuda" and not INTERPRETED:
        raise ValueError(f"fused_moe runs on CUDA tensors (on {hidden.device.type} only under TRITON_INTERPRET=1); "
                         f"use fused_moe_reference there")
    num_tokens, size = hidden.shape
    num_experts, intermediate, top_k = w13.shape[0], w13.shape[1] // 2, topk_ids.shape[1]
    if num_tokens == 0 or top_k == 0:
        return torch.zeros_like(hidden)
    num_slots = num_tokens * top_k
    config = kernel_config(num_tokens, size, intermediate, hidden.dtype, top_k=top_k, num_experts=num_experts)
    aligned = moe_align(topk_ids, num_experts, config["BLOCK_M"])
    weights = topk_weights.reshape(-1).to(torch.float32).contiguous()
    inter = torch.empty(num_slots, intermediate, dtype=hidden.dtype, device=hidden.device)
    _launch(hidden, w13, inter, weights, aligned, num_slots, config, gated=True, top_k=top_k, activation=activation)
    per_slot = torch.empty(num_slots, size, dtype=hidden.dtype, device=hidden.device)
    _launch(inter, w2, per_slot, weights, aligned, num_slots, config, gated=False, top_k=top_k,
            activation=activation)
    if top_k == 1:
        return per_slot
    return per_slot.view(num_tokens, top_k, size).sum(1, dtype=torch.float32).to(hidden.dtype)


def _activate(gate: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu":
        return torch.nn.functional.silu(gate)
    return torch.nn.functional.gelu(gate, approximate="tanh")


def fused_moe_reference(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                        topk_ids: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """``fused_moe`` in plain torch, on any device: for each expert that received a slot (a loop over
    those only), gather its tokens, two matmuls in the model dtype with the activation in fp32 between
    them, and ``index_add_`` the routing-weighted rows into an fp32 sum; what the engine runs on CPU.
    Rounds as the kernel does but for gate and up, which it rounds to the model dtype before the
    activation (the kernel keeps them in fp32)."""
    _check_args(hidden, w13, w2, topk_weights, topk_ids, activation)
    num_tokens, size = hidden.shape
    num_experts, intermediate, top_k = w13.shape[0], w13.shape[1] // 2, topk_ids.shape[1]
    out = torch.zeros(num_tokens, size, dtype=torch.float32, device=hidden.device)
    flat = topk_ids.reshape(-1).long()
    if flat.numel() == 0:
        return out.to(hidden.dtype)
    order = torch.argsort(flat, stable=True)  # slots grouped by expert
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    weights = topk_weights.reshape(-1).to(torch.float32)
    ends = torch.tensor(counts).cumsum(0).tolist()
    for expert in [e for e, count in enumerate(counts) if count]:
        slots = order[ends[expert] - counts[expert]:ends[expert]]
        tokens = slots // top_k
        gate_up = hidden[tokens] @ w13[expert].T  # [count, 2I]
        h = (_activate(gate_up[:, :intermediate].float(), activation) * gate_up[:, intermediate:].float())
        y = h.to(hidden.dtype) @ w2[expert].T  # [count, H]
        out.index_add_(0, tokens, y.float() * weights[slots, None])
    return out.to(hidden.dtype)
