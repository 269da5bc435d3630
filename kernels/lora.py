"""Batched multi-LoRA: each token of a batch adds the low-rank delta of its own adapter to a layer's output.

Adapters live in fixed device slots, stacked per layer in the model dtype, rows contiguous:

    lora_a  [S, R, K]   S = max_loras slots, R = max_lora_rank; an adapter of rank r < R has rows r..R-1 zero
    lora_b  [S, N, R]   columns r..R-1 zero; the adapter's scaling (alpha / r) already folded in
    token_slots  int32 [T]   each token's slot, -1: no adapter (any value outside [0, S) is read as -1)

and for token t with slot s >= 0 the layer computes ``y[t] += lora_b[s] @ (lora_a[s] @ x[t])`` in two steps:

    shrink   t[t] = lora_a[s] @ x[t]           [T, R] fp32   (zero rows for tokens without an adapter)
    expand   y[t] += lora_b[s] @ t[t]          in place, rounded once to y's dtype; rows without one untouched

The intermediate stays fp32 and expand multiplies in fp32, so the only rounding to the model dtype is y's
store: the kernels agree with the fp32 reference (``lora_reference``) up to summation order.

Two variants per op, one kernel each (constexpr GROUPED), picked by ``kernel_config`` from the token count:

* per-row (decode, T <= DECODE_MAX_TOKENS): program (t, j) owns token t and output tile j; it reads the
  token's slot and streams that adapter's weights through a broadcast multiply and a row sum (no tensor
  cores: one row is far below an mma's 16). Tokens of one adapter re-read its weights, from L2; a decode
  batch is small, and this skips the grouping's sort and scatter launches.
* grouped (prefill): the tokens are grouped by slot with ``moe_align`` from ``fused_moe`` (the slot as
  the "expert", tokens without an adapter in an extra bucket S), each slot's run padded to BLOCK_M. An
  M-tile then holds one adapter's tokens: it reads that adapter's weight tile once for BLOCK_M rows and
  multiplies with ``tl.dot``. T = 5, S = 2, BLOCK_M = 2, token_slots [1, -1, 0, 1, 1]:

      bucket        1  2  0  1  1          (-1 -> bucket S = 2; sentinel row T = 5)
      sorted_rows   [ 2  5 | 0  3 | 4  5 | 1  5 | 5  5 ... ]
      block_slots   [   0  |   1  |   1  |   2  |  -1 ... ]      num_rows_post_padded [8]

  Blocks of bucket S store zero rows (shrink) or return (expand); blocks past num_rows_post_padded
  return. The buffers' sizes are the worst case for T tokens (see ``moe_align``).

Tiles: shrink walks K in BLOCK_K steps, its output tile is BLOCK_R columns of R; expand walks R in BLOCK_R
steps, its output tile is BLOCK_N columns of N. Every output element is written by one program: no
atomics, deterministic. Launches size everything from shapes and never read a device value on the host,
so a CUDA graph captures them (``lora_apply`` included, on CUDA).
"""
from __future__ import annotations

import os
from typing import Any

import torch
import triton
import triton.language as tl

from .fused_moe import moe_align

# the interpreter runs bf16 arithmetic on raw uint16 bits: there the dots take fp32 operands
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DECODE_MAX_TOKENS = 16
OPS = ("shrink", "expand")


@triton.jit
def _lora_shrink_kernel(x, w, out, token_slots, sorted_rows, block_slots, num_rows_post_padded,
                        num_tokens, K, R, num_slots, stride_xm, stride_ws, stride_wr, stride_om,
                        GROUPED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                        BLOCK_K: tl.constexpr, DOT_IN_FP32: tl.constexpr):
    """``out[t, r] = sum_k x[t, k] w[slot_t, r, k]`` (fp32) for the rows of an M-tile and BLOCK_R columns;
    zero for rows without an adapter. Per-row (not GROUPED): BLOCK_M = 1, row = the M-tile's index."""
    pid = tl.program_id(0)
    num_r = tl.cdiv(R, BLOCK_R)
    pid_m = pid // num_r
    pid_r = pid % num_r
    if GROUPED:
        if pid_m * BLOCK_M >= tl.load(num_rows_post_padded):
            return
        slot = tl.load(block_slots + pid_m)
        rows = tl.load(sorted_rows + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))  # [BM], sentinel num_tokens
    else:
        slot = tl.load(token_slots + pid_m)
        rows = pid_m + tl.arange(0, BLOCK_M)
    valid = rows < num_tokens
    has_lora = (slot >= 0) & (slot < num_slots)
    safe_rows = tl.where(valid, rows, 0).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = offs_r < R
    x_ptrs = x + safe_rows[:, None] * stride_xm + offs_k[None, :]  # [BM, BK]
    w_ptrs = (w + tl.where(has_lora, slot, 0).to(tl.int64) * stride_ws
              + offs_r.to(tl.int64)[:, None] * stride_wr + offs_k[None, :])  # [BR, BK]

    acc = tl.zeros([BLOCK_M, BLOCK_R], tl.float32)
    num_k = tl.where(has_lora, tl.cdiv(K, BLOCK_K), 0)  # no adapter: no weight read, zero rows
    for k in range(0, num_k):
        k_ok = offs_k < K - k * BLOCK_K
        x_tile = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
        w_tile = tl.load(w_ptrs, mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        if GROUPED:
            if DOT_IN_FP32:
                acc = tl.dot(x_tile.to(tl.float32), tl.trans(w_tile.to(tl.float32)), acc, input_precision="ieee")
            else:
                acc = tl.dot(x_tile, tl.trans(w_tile), acc)
        else:
            acc += tl.sum(x_tile.to(tl.float32)[:, None, :] * w_tile.to(tl.float32)[None, :, :], axis=2)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    out_ptrs = out + safe_rows[:, None] * stride_om + offs_r[None, :]
    tl.store(out_ptrs, acc, mask=valid[:, None] & r_ok[None, :])


@triton.jit
def _lora_expand_kernel(t, w, y, token_slots, sorted_rows, block_slots, num_rows_post_padded,
                        num_tokens, N, R, num_slots, stride_tm, stride_ws, stride_wn, stride_ym,
                        GROUPED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_R: tl.constexpr):
    """``y[t, n] += sum_r t[t, r] w[slot_t, n, r]`` in fp32, stored in y's dtype, for the rows of an M-tile
    and BLOCK_N columns; rows without an adapter are not written. Per-row (not GROUPED): BLOCK_M = 1."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n
    if GROUPED:
        if pid_m * BLOCK_M >= tl.load(num_rows_post_padded):
            return
        slot = tl.load(block_slots + pid_m)
        rows = tl.load(sorted_rows + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    else:
        slot = tl.load(token_slots + pid_m)
        rows = pid_m + tl.arange(0, BLOCK_M)
    if (slot < 0) | (slot >= num_slots):
        return
    valid = rows < num_tokens
    safe_rows = tl.where(valid, rows, 0).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    t_ptrs = t + safe_rows[:, None] * stride_tm + offs_r[None, :]  # [BM, BR]
    w_ptrs = (w + slot.to(tl.int64) * stride_ws
              + offs_n.to(tl.int64)[:, None] * stride_wn + offs_r[None, :])  # [BN, BR]

    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for r in range(0, tl.cdiv(R, BLOCK_R)):
        r_ok = offs_r < R - r * BLOCK_R
        t_tile = tl.load(t_ptrs, mask=r_ok[None, :], other=0.0)
        w_tile = tl.load(w_ptrs, mask=n_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
        if GROUPED:
            acc = tl.dot(t_tile, tl.trans(w_tile), acc, input_precision="ieee")
        else:
            acc += tl.sum(t_tile[:, None, :] * w_tile[None, :, :], axis=2)
        t_ptrs += BLOCK_R
        w_ptrs += BLOCK_R
    y_ptrs = y + safe_rows[:, None] * stride_ym + offs_n[None, :]
    mask = valid[:, None] & n_ok[None, :]
    total = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32) + acc
    tl.store(y_ptrs, total.to(y.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------- launch configs

def kernel_config(num_tokens: int, rank: int, dtype: torch.dtype, op: str) -> tuple[dict[str, Any], int, int]:
    """The constexprs, num_warps and num_stages of ``op`` (``"shrink"`` or ``"expand"``) for a launch of
    ``num_tokens`` tokens on adapters of (padded) ``rank``; ``kernels.aot`` compiles the same.

    Both ops of a batch take the same variant (so one grouping serves both): per-row up to
    DECODE_MAX_TOKENS tokens, grouped in 64-row M-tiles past that. BLOCK_R is R's power of two, at
    least 16 (a dot's least K) and at most 64 (shrink: more R-tiles; expand: more steps of its R loop).
    Per-row tiles hold 4096 weights ([BLOCK_R, BLOCK_K] or [BLOCK_N, BLOCK_R]): 32 per thread at
    4 warps. Grouped shrink reads [64, 64] of x and [BLOCK_R, 64] of A per step; grouped expand keeps
    a [64, 64] fp32 accumulator and multiplies in fp32 on the FMA units (no fp32 mma), which costs
    registers: 16-wide R steps and 8 warps keep it at 128 per thread (4 warps: 254; 32-wide steps spill).
    Chosen from ptxas counts (see the AOT test), not yet tuned by timing."""
    if op not in OPS:
        raise ValueError(f"op must be one of {list(OPS)}, got {op!r}")
    grouped = num_tokens > DECODE_MAX_TOKENS
    block_r = min(max(16, triton.next_power_of_2(rank)), 64)
    constexprs: dict[str, Any] = dict(GROUPED=grouped, BLOCK_M=64 if grouped else 1, BLOCK_R=block_r)
    if op == "shrink":
        constexprs.update(BLOCK_K=64 if grouped else 4096 // block_r,
                          DOT_IN_FP32=dtype == torch.float32 or INTERPRETED)
        return constexprs, 4, 2 if grouped else 1
    if grouped:
        constexprs.update(BLOCK_R=16, BLOCK_N=64)
        return constexprs, 8, 2
    constexprs.update(BLOCK_N=4096 // block_r)
    return constexprs, 4, 1


def _align(token_slots: torch.Tensor, num_slots: int, grouped: bool,
           block_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sorted_rows, block_slots, num_rows_post_padded) for the grouped variant (layout in the module
    docstring); the per-row variant reads ``token_slots`` only and gets it three times (unused)."""
    if not grouped:
        return token_slots, token_slots, token_slots
    slots = token_slots.long()
    buckets = torch.where((slots >= 0) & (slots < num_slots), slots, num_slots)
    return moe_align(buckets.view(-1, 1), num_slots + 1, block_m)


# ---------------------------------------------------------------- the layer

def _check(name: str, tensor: torch.Tensor, dims: int, dtypes, shape: tuple) -> None:
    if tensor.dim() != dims or tensor.dtype not in dtypes or (dims and tensor.stride(-1) != 1) \
            or any(want is not None and have != want for have, want in zip(tensor.shape, shape)):
        wanted = "/".join(str(d).removeprefix("torch.") for d in dtypes)
        dims_text = ", ".join("?" if d is None else str(d) for d in shape)
        raise ValueError(f"{name} must be {wanted} [{dims_text}] with contiguous rows, got {tensor.dtype} "
                         f"{list(tensor.shape)} strides {tensor.stride()}")


def _check_slots(token_slots: torch.Tensor, num_tokens: int) -> None:
    if token_slots.shape != (num_tokens,) or token_slots.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"token_slots must be int32/int64 [{num_tokens}], got {token_slots.dtype} "
                         f"{list(token_slots.shape)}")


def _check_devices(*tensors: torch.Tensor) -> None:
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"all arguments must be on one device, got {sorted(map(str, devices))}")


def _check_runs_triton(device: torch.device, name: str) -> None:
    if device.type != "cuda" and not INTERPRETED:
        raise ValueError(f"{name} runs on CUDA tensors (on {device.type} only under TRITON_INTERPRET=1); "
                         f"use lora_reference there")


def _check_shrink(x: torch.Tensor, lora_a: torch.Tensor, token_slots: torch.Tensor) -> None:
    _check("x", x, 2, _DTYPES, (None, None))
    _check("lora_a", lora_a, 3, (x.dtype,), (None, None, x.shape[1]))
    _check_slots(token_slots, x.shape[0])
    _check_devices(x, lora_a, token_slots)


def _check_expand(t: torch.Tensor, lora_b: torch.Tensor, token_slots: torch.Tensor, y: torch.Tensor) -> None:
    _check("y", y, 2, _DTYPES, (None, None))
    _check("lora_b", lora_b, 3, _DTYPES, (None, y.shape[1], None))
    _check("t", t, 2, (torch.float32,), (y.shape[0], lora_b.shape[2]))
    _check_slots(token_slots, y.shape[0])
    _check_devices(t, lora_b, token_slots, y)


def _shrink(x, lora_a, token_slots, aligned, constexprs, num_warps, num_stages) -> torch.Tensor:
    num_tokens, k_dim = x.shape
    num_slots, rank = lora_a.shape[0], lora_a.shape[1]
    out = torch.empty(num_tokens, rank, dtype=torch.float32, device=x.device)  # every row is stored
    if num_tokens == 0 or rank == 0:
        return out.zero_()
    sorted_rows, block_slots, num_post = aligned
    num_m = sorted_rows.numel() // constexprs["BLOCK_M"]
    grid = (num_m * triton.cdiv(rank, constexprs["BLOCK_R"]),)
    _lora_shrink_kernel[grid](x, lora_a, out, token_slots, sorted_rows, block_slots, num_post, num_tokens, k_dim,
                              rank, num_slots, x.stride(0), lora_a.stride(0), lora_a.stride(1), out.stride(0),
                              **constexprs, num_warps=num_warps, num_stages=num_stages)
    return out


def _expand(t, lora_b, token_slots, y, aligned, constexprs, num_warps, num_stages) -> None:
    num_tokens, n_dim = y.shape
    num_slots, rank = lora_b.shape[0], lora_b.shape[2]
    if num_tokens == 0 or rank == 0 or n_dim == 0:
        return
    sorted_rows, block_slots, num_post = aligned
    num_m = sorted_rows.numel() // constexprs["BLOCK_M"]
    grid = (num_m * triton.cdiv(n_dim, constexprs["BLOCK_N"]),)
    _lora_expand_kernel[grid](t, lora_b, y, token_slots, sorted_rows, block_slots, num_post, num_tokens, n_dim,
                              rank, num_slots, t.stride(0), lora_b.stride(0), lora_b.stride(1), y.stride(0),
                              **constexprs, num_warps=num_warps, num_stages=num_stages)


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, token_slots: torch.Tensor) -> torch.Tensor:
    """``t[i] = lora_a[token_slots[i]] @ x[i]``: fp32 [T, R] from ``x`` [T, K] and ``lora_a`` [S, R, K]
    (x's dtype: fp32/fp16/bf16, rows contiguous); zero rows where the slot is -1. One Triton launch
    (plus the grouping for a prefill-sized batch); on CUDA, or on CPU under TRITON_INTERPRET=1."""
    _check_shrink(x, lora_a, token_slots)
    _check_runs_triton(x.device, "lora_shrink")
    num_slots, rank = lora_a.shape[0], lora_a.shape[1]
    constexprs, num_warps, num_stages = kernel_config(x.shape[0], rank, x.dtype, "shrink")
    aligned = _align(token_slots, num_slots, constexprs["GROUPED"], constexprs["BLOCK_M"])
    return _shrink(x, lora_a, token_slots, aligned, constexprs, num_warps, num_stages)


def lora_expand(t: torch.Tensor, lora_b: torch.Tensor, token_slots: torch.Tensor, y: torch.Tensor) -> None:
    """``y[i] += lora_b[token_slots[i]] @ t[i]`` in place, for ``t`` fp32 [T, R], ``lora_b`` [S, N, R] and
    ``y`` [T, N] (any of fp32/fp16/bf16, rows contiguous): the sum in fp32, rounded once to y's dtype;
    rows whose slot is -1 are not written. One Triton launch (plus the grouping for a prefill-sized batch)."""
    _check_expand(t, lora_b, token_slots, y)
    _check_runs_triton(y.device, "lora_expand")
    num_slots, rank = lora_b.shape[0], lora_b.shape[2]
    constexprs, num_warps, num_stages = kernel_config(y.shape[0], rank, y.dtype, "expand")
    aligned = _align(token_slots, num_slots, constexprs["GROUPED"], constexprs["BLOCK_M"])
    _expand(t, lora_b, token_slots, y, aligned, constexprs, num_warps, num_stages)


def lora_apply(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, token_slots: torch.Tensor,
               y: torch.Tensor) -> None:
    """The layer's call: ``y[i] += lora_b[s] @ (lora_a[s] @ x[i])``, s = ``token_slots[i]``, in place; rows
    with s = -1 untouched. On CUDA: shrink and expand in Triton, one grouping shared by both; elsewhere
    (even under TRITON_INTERPRET=1, far too slow for a model) ``lora_reference``'s delta, added to the
    rows that have an adapter."""
    _check_shrink(x, lora_a, token_slots)
    _check("y", y, 2, _DTYPES, (x.shape[0], None))
    _check("lora_b", lora_b, 3, (x.dtype,), (lora_a.shape[0], y.shape[1], lora_a.shape[1]))
    _check_devices(x, lora_b, y)
    if x.device.type != "cuda":
        _add_rows_with_adapter(y, lora_reference(x, lora_a, lora_b, token_slots), token_slots, lora_a.shape[0])
        return
    num_slots, rank = lora_a.shape[0], lora_a.shape[1]
    shrink_config = kernel_config(x.shape[0], rank, x.dtype, "shrink")
    expand_config = kernel_config(x.shape[0], rank, y.dtype, "expand")
    aligned = _align(token_slots, num_slots, shrink_config[0]["GROUPED"], shrink_config[0]["BLOCK_M"])
    t = _shrink(x, lora_a, token_slots, aligned, *shrink_config)
    _expand(t, lora_b, token_slots, y, aligned, *expand_config)


def _add_rows_with_adapter(y: torch.Tensor, delta: torch.Tensor, token_slots: torch.Tensor, num_slots: int) -> None:
    rows = ((token_slots >= 0) & (token_slots < num_slots)).nonzero().flatten()
    y[rows] = (y[rows].float() + delta[rows]).to(y.dtype)


def lora_reference(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                   token_slots: torch.Tensor) -> torch.Tensor:
    """The LoRA delta ``lora_b[s] @ (lora_a[s] @ x[i])`` as fp32 [T, N] in plain torch, on any device: for each
    slot present in ``token_slots`` (``torch.unique``, a loop over those only) gather its rows and multiply
    in fp32; zero rows for slot -1 (or any slot outside [0, S)). What the engine runs off CUDA."""
    _check_shrink(x, lora_a, token_slots)
    if lora_b.dim() != 3 or lora_b.shape[0] != lora_a.shape[0] or lora_b.shape[2] != lora_a.shape[1]:
        raise ValueError(f"lora_b must be [{lora_a.shape[0]}, N, {lora_a.shape[1]}], got {list(lora_b.shape)}")
    _check_devices(x, lora_b)
    num_slots = lora_a.shape[0]
    delta = torch.zeros(x.shape[0], lora_b.shape[1], dtype=torch.float32, device=x.device)
    for slot in torch.unique(token_slots).tolist():
        if not 0 <= slot < num_slots:
            continue
        rows = (token_slots == slot).nonzero().flatten()
        shrunk = x[rows].float() @ lora_a[slot].float().T  # [rows, R]
        delta[rows] = shrunk @ lora_b[slot].float().T
    return delta
