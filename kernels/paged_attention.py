"""Unified paged attention: one kernel for a mixed batch of decodes and prompt chunks.

Request r's ``query_len`` new tokens follow ``context_len = seq_len - query_len``
cached ones; new token j (position ``context_len + j``) sees every key at a
position <= its own: the whole cached prefix, causally among the new tokens.
Keys and values are read through the block table (layout in ``kv_write``).

Three variants, each a constexpr flag (a launch without them compiles to the
plain kernel). ``SLIDING_WINDOW``: position p also sees no key at or before
``p - window``; a program starts its key loop at the tile holding the first
key its q-tile's first query sees, and loads no key before that one.
``SOFT_CAP``: each score s (scaled) becomes ``c * tanh(s / c)`` before the mask.
``FP8_KV``: the cache holds fp8 ``x / scale``, one scale per KV head for keys and
one for values (``kv_write``). K/V tiles are widened to q's dtype for the dots
(exactly: every fp8 value is a 16-bit one) and the scales applied outside them,
as the program's KV head is fixed: the key's joins the score scale, the value's
multiplies the accumulated output.

    window 4, TILE_N 4: the q-tile of the queries at 8 and 9 sees keys 5..9
    key:      0 1 2 3 | 4 5 6 7 | 8 9
    seen:     . . . . | - x x x | x x      (-: in a loaded tile, not loaded)
    key loop: skipped | tile 1  | tile 2

Grid ``(q_tiles, num_kv_heads, num_splits)``. A q-tile is BLOCK_Q consecutive
new tokens of one request; its rows (the M dimension of the dots) are those
tokens times the GROUP query heads that share the program's KV head, so every
K/V tile is loaded once for the whole group:

    GROUP = 3, BLOCK_M = 16 -> BLOCK_Q = 5     row m: token m // 3, head kv_head * 3 + m % 3
    rows  0  1  2 | 3  4  5 | ... | 12 13 14 | 15 (masked)
    token    t0   |   t1    | ... |   t4

Request r's q-tiles are numbered from ``query_start_loc[r] // BLOCK_Q + r``, so
``num_tokens // BLOCK_Q + num_reqs`` programs cover any batch without reading
the device-side lengths on the host; a program finds its request by binary
search and exits when its tile lies past the request's queries.

Each program streams its keys in TILE_N-token tiles with an online softmax
(fp32 max, sum and accumulator; exponentials in base 2). With ``num_splits``
> 1 (flash-decoding) split s of a q-tile covers the s-th of ``num_splits``
equal runs of key tiles and writes its unnormalised partial result to a
workspace; ``split_kv_reduce`` merges the splits. The grid depends only on host
ints, and the workspace is the caller's, so a launch allocates nothing.
"""
from __future__ import annotations

import os
from typing import Any

import torch
import triton
import triton.language as tl

from .kv_write import FP8_TYPES
from .split_kv_reduce import reduce_kv_splits, split_views

_LOG2E = 1.4426950408889634
# Triton picks interpreter or compiler when a kernel is defined, i.e. now. The interpreter
# runs bf16 arithmetic on the raw uint16 bits (conversions are exact), so there the dots
# take fp32 operands, rounded first to what the low-precision dot would see.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _find_request(query_start_loc, q_tile, num_reqs, BLOCK_Q: tl.constexpr):
    """The last request whose first q-tile (``query_start_loc[r] // BLOCK_Q + r``) is <= ``q_tile``."""
    lo: tl.int32 = 0
    hi = num_reqs
    while lo < hi:
        mid = (lo + hi) // 2
        first = tl.load(query_start_loc + mid) // BLOCK_Q + mid
        if first <= q_tile:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _tanh(x):
    """tanh from one exp (the interpreter has no tanh): sign(x) (1 - e) / (1 + e), e = exp(-2|x|) <= 1."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _paged_attention_kernel(
        out, q, key_cache, value_cache, block_tables, seq_lens, query_start_loc,
        part_acc, part_max, part_sum, kv_scales, scale_log2, window, cap_in, cap_out, num_reqs,
        stride_qt, stride_qh, stride_ot, stride_oh, stride_cb, stride_cs, stride_ch, stride_bt,
        NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_SIZE: tl.constexpr, HEAD_PAD: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, TILE_N: tl.constexpr,
        NUM_SPLITS: tl.constexpr, DOT_IN_FP32: tl.constexpr, SLIDING_WINDOW: tl.constexpr,
        SOFT_CAP: tl.constexpr, FP8_KV: tl.constexpr):
    """``window``: read with SLIDING_WINDOW only; ``cap_in = scale / c`` and ``cap_out = c * log2(e)``
    with SOFT_CAP only (the capped score, in base 2, is ``cap_out * tanh(cap_in * q.k)``);
    ``kv_scales`` ([2, num_kv_heads]: keys', values') with FP8_KV only."""
    q_tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    req = _find_request(query_start_loc, q_tile, num_reqs, BLOCK_Q)
    q_start = tl.load(query_start_loc + req)
    query_len = tl.load(query_start_loc + req + 1) - q_start
    tile_in_req = q_tile - (q_start // BLOCK_Q + req)
    if tile_in_req * BLOCK_Q >= query_len:
        return
    seq_len = tl.load(seq_lens + req)
    context_len = seq_len - query_len

    rows = tl.arange(0, BLOCK_M)
    q_local = tile_in_req * BLOCK_Q + rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_ok = (rows < BLOCK_Q * GROUP) & (q_local < query_len)
    dims = tl.arange(0, HEAD_PAD)
    dim_ok = dims < HEAD_SIZE
    token = (q_start + q_local).to(tl.int64)
    q_tile_values = tl.load(q + token[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :],
                            mask=row_ok[:, None] & dim_ok[None, :], other=0.0)  # [BLOCK_M, HEAD_PAD]
    if DOT_IN_FP32:
        q_tile_values = q_tile_values.to(tl.float32)
    q_pos = context_len + q_local
    if FP8_KV:  # q . (scale_k * k) = scale_k * (q . k)
        k_scale = tl.load(kv_scales + kv_head)
        scale_log2 = scale_log2 * k_scale
        cap_in = cap_in * k_scale

    # keys [kv_lo, kv_len): from the first its first query sees to the last query's own, in NUM_SPLITS runs
    # of whole TILE_N tiles. Keys before kv_lo are never loaded: their blocks may be freed (the KV cache
    # manager frees what lies wholly behind a window) and hold another request's data.
    kv_len = tl.minimum(context_len + (tile_in_req + 1) * BLOCK_Q, seq_len)
    num_tiles = tl.cdiv(kv_len, TILE_N)
    if SLIDING_WINDOW:
        kv_lo = tl.maximum(context_len + tile_in_req * BLOCK_Q - window + 1, 0)
    else:
        kv_lo = 0
    first_tile = kv_lo // TILE_N
    tiles_per_split = tl.cdiv(num_tiles - first_tile, NUM_SPLITS)
    tile_lo = first_tile + split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, num_tiles)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_PAD], tl.float32)
    offs_n = tl.arange(0, TILE_N)
    table = block_tables + req.to(tl.int64) * stride_bt
    for t in range(tile_lo, tile_hi):
        k_pos = t * TILE_N + offs_n
        k_ok = k_pos < kv_len
        if SLIDING_WINDOW:
            k_ok = k_ok & (k_pos >= kv_lo)
        block = tl.load(table + k_pos // BLOCK_SIZE, mask=k_ok, other=0).to(tl.int64)
        kv_offset = block * stride_cb + (k_pos % BLOCK_SIZE) * stride_cs + kv_head * stride_ch  # [TILE_N]
        k_t = tl.load(key_cache + kv_offset[None, :] + dims[:, None],
                      mask=dim_ok[:, None] & k_ok[None, :], other=0.0)  # [HEAD_PAD, TILE_N]
        if FP8_KV:
            k_t = k_t.to(q.dtype.element_ty)
        if DOT_IN_FP32:
            s = tl.dot(q_tile_values, k_t.to(tl.float32), input_precision="ieee")
        else:
            s = tl.dot(q_tile_values, k_t)
        visible = (k_pos[None, :] <= q_pos[:, None]) & k_ok[None, :]
        if SLIDING_WINDOW:
            visible = visible & (k_pos[None, :] > q_pos[:, None] - window)
        if SOFT_CAP:
            s = _tanh(s * cap_in) * cap_out
        else:
            s = s * scale_log2
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row that has seen no key yet keeps max -inf: shift by 0 so exp2 gives 0, not NaN
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_shift[:, None])
        alpha = tl.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(value_cache + kv_offset[:, None] + dims[None, :],
                    mask=k_ok[:, None] & dim_ok[None, :], other=0.0)  # [TILE_N, HEAD_PAD]
        if FP8_KV:
            v = v.to(q.dtype.element_ty)
        p_low = p.to(v.dtype)  # the rounding a low-precision dot applies, kept on the fp32 path
        if DOT_IN_FP32:
            pv = tl.dot(p_low.to(tl.float32), v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p_low, v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    if FP8_KV:  # sum p * (scale_v * v) = scale_v * sum p * v; partial results merge linearly
        acc = acc * tl.load(kv_scales + NUM_HEADS // GROUP + kv_head)
    io_mask = row_ok[:, None] & dim_ok[None, :]
    if NUM_SPLITS == 1:
        result = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # rows past the queries saw no key
        tl.store(out + token[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :],
                 result.to(out.dtype.element_ty), mask=io_mask)
    else:
        part = (token * NUM_HEADS + head) * NUM_SPLITS + split  # [BLOCK_M]
        tl.store(part_acc + part[:, None] * HEAD_PAD + dims[None, :], acc, mask=io_mask)
        tl.store(part_max + part, m_i, mask=row_ok)
        tl.store(part_sum + part, l_i, mask=row_ok)


def split_workspace_numel(num_tokens: int, num_heads: int, num_splits: int, head_size: int) -> int:
    """fp32 elements a ``num_splits`` launch needs: per (token, head, split) a partial output, max and sum."""
    return num_tokens * num_heads * num_splits * (triton.next_power_of_2(head_size) + 2)


def kernel_config(*, num_heads: int, num_kv_heads: int, head_size: int, block_size: int, dtype: torch.dtype,
                  max_query_len: int, num_splits: int, sliding_window: bool, soft_cap: bool,
                  fp8_kv: bool = False) -> tuple[dict[str, Any], int, int]:
    """What a launch of this shape compiles: the kernel's constexprs, num_warps and num_stages
    (``kernels.aot`` compiles the same for a GPU that is not here).

    Decode tiles take the smallest M a dot allows; prompt chunks take taller tiles, reusing
    each K/V tile over more rows. Rows wider than 256 bytes (head 256 in 16 bits, fp32 from
    head 96) get smaller tiles: the gathered K/V tiles' 64-bit addresses dominate register
    use. Chosen from ptxas register counts for sm_90 (at most a few bytes spilled); not yet
    tuned by timing. ``dtype`` is q's; an fp8 cache (``fp8_kv``) is widened to it on load."""
    group = num_heads // num_kv_heads
    head_pad = triton.next_power_of_2(head_size)
    wide = head_pad * dtype.itemsize > 256
    block_m = max(16, triton.next_power_of_2(group))
    if max_query_len * group <= block_m:
        tile_n, num_warps, num_stages = (16, 4, 2) if wide else (32, 8, 3)
    else:
        block_m = max(block_m, 32 if wide else 64)
        tile_n, num_warps, num_stages = (16, 8, 2) if wide else (32, 8, 3)
    if fp8_kv and dtype == torch.float32:
        num_stages = 1  # pipelined, the tiles widened to fp32 stay live in registers: ptxas spills (sm_90)
    constexprs = dict(NUM_HEADS=num_heads, GROUP=group, HEAD_SIZE=head_size, HEAD_PAD=head_pad,
                      BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_Q=block_m // group, TILE_N=tile_n,
                      NUM_SPLITS=num_splits, DOT_IN_FP32=dtype == torch.float32 or INTERPRETED,
                      SLIDING_WINDOW=sliding_window, SOFT_CAP=soft_cap, FP8_KV=fp8_kv)
    return constexprs, num_warps, num_stages


def paged_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, out: torch.Tensor, *,
                    block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                    max_query_len: int, scale: float, num_splits: int = 1,
                    workspace: torch.Tensor | None = None, sliding_window: int | None = None,
                    logits_soft_cap: float | None = None, kv_scales: torch.Tensor | None = None) -> None:
    """Attention of ``q`` ([T, num_heads, head_size], the batch's real tokens) over the paged
    cache into ``out`` (q's shape and dtype). ``query_start_loc`` [R + 1] must end at T and
    ``max_query_len`` bound every request's query length (host int: sizes the grid).
    ``num_splits > 1`` takes the split-KV path and needs an fp32 ``workspace`` of at least
    ``split_workspace_numel(...)`` elements. ``sliding_window`` and ``logits_soft_cap`` as
    in ``AttentionBackend.forward`` (None: off). An fp8 cache needs its ``kv_scales`` (fp32
    [2, num_kv_heads]: keys', values')."""
    if q.dim() != 3 or out.shape != q.shape or out.dtype != q.dtype:
        raise ValueError(f"q must be [num_tokens, num_heads, head_size] and out the same shape and dtype, "
                         f"got q {q.dtype} {tuple(q.shape)}, out {out.dtype} {tuple(out.shape)}")
    if key_cache.dim() != 4 or key_cache.shape != value_cache.shape or key_cache.stride() != value_cache.stride():
        raise ValueError(f"key_cache and value_cache must be [num_blocks, block_size, num_kv_heads, head_size] "
                         f"with one shape and strides, got {tuple(key_cache.shape)} {key_cache.stride()} and "
                         f"{tuple(value_cache.shape)} {value_cache.stride()}")
    num_tokens, num_heads, head_size = q.shape
    _, block_size, num_kv_heads, cache_head_size = key_cache.shape
    if cache_head_size != head_size or num_heads % num_kv_heads:
        raise ValueError(f"q has {num_heads} heads of {head_size}; the cache {num_kv_heads} KV heads of "
                         f"{cache_head_size}: head sizes must match and num_heads be a multiple of num_kv_heads")
    fp8_kv = key_cache.dtype in FP8_TYPES
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16) or key_cache.dtype != value_cache.dtype \
            or not (fp8_kv or q.dtype == key_cache.dtype):
        raise ValueError(f"q must be float32/float16/bfloat16 and the caches of its dtype or one fp8 dtype, "
                         f"got {q.dtype}, {key_cache.dtype}, {value_cache.dtype}")
    if fp8_kv and (kv_scales is None or kv_scales.shape != (2, num_kv_heads) or kv_scales.dtype != torch.float32
                   or not kv_scales.is_contiguous() or kv_scales.device != q.device):
        got = "None" if kv_scales is None else f"{kv_scales.dtype} {tuple(kv_scales.shape)} on {kv_scales.device}"
        raise ValueError(f"an fp8 cache needs kv_scales, contiguous float32 [2, {num_kv_heads}] on {q.device}, "
                         f"got {got}")
    num_reqs = seq_lens.shape[0]
    for name, t, shape in (("seq_lens", seq_lens, (num_reqs,)), ("query_start_loc", query_start_loc, (num_reqs + 1,)),
                           ("block_tables", block_tables, (num_reqs, block_tables.shape[-1]))):
        if t.shape != shape or t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be int32/int64 {list(shape)}, got {t.dtype} {tuple(t.shape)}")
    for name, t in (("q", q), ("out", out), ("key_cache", key_cache), ("block_tables", block_tables)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension, got strides {t.stride()}")
    devices = {t.device for t in (q, out, key_cache, value_cache, block_tables, seq_lens, query_start_loc)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")
    if logits_soft_cap is not None and not 0 < logits_soft_cap < float("inf"):
        raise ValueError(f"logits_soft_cap must be finite and > 0 or None, got {logits_soft_cap}")
    if num_tokens == 0:
        return

    constexprs, num_warps, num_stages = kernel_config(
        num_heads=num_heads, num_kv_heads=num_kv_heads, head_size=head_size, block_size=block_size, dtype=q.dtype,
        max_query_len=max_query_len, num_splits=num_splits, sliding_window=sliding_window is not None,
        soft_cap=logits_soft_cap is not None, fp8_kv=fp8_kv)
    if num_splits > 1:
        needed = split_workspace_numel(num_tokens, num_heads, num_splits, head_size)
        if workspace is None or workspace.dtype != torch.float32 or workspace.numel() < needed \
                or workspace.device != q.device:
            got = "None" if workspace is None else f"{workspace.dtype} [{workspace.numel()}] on {workspace.device}"
            raise ValueError(f"num_splits={num_splits} needs a float32 workspace of >= {needed} elements "
                             f"on {q.device}, got {got}")
        part_acc, part_max, part_sum = split_views(workspace, num_tokens, num_heads, num_splits,
                                                   constexprs["HEAD_PAD"])
    else:
        part_acc = part_max = part_sum = out  # never touched: the kernel writes them only when split
    cap = 1.0 if logits_soft_cap is None else float(logits_soft_cap)  # read only with SOFT_CAP
    grid = (num_tokens // constexprs["BLOCK_Q"] + num_reqs, num_kv_heads, num_splits)
    _paged_attention_kernel[grid](
        out, q, key_cache, value_cache, block_tables, seq_lens, query_start_loc,
        part_acc, part_max, part_sum, kv_scales if fp8_kv else out,  # unread without fp8
        scale * _LOG2E, sliding_window or 0, scale / cap, cap * _LOG2E, num_reqs,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), block_tables.stride(0),
        **constexprs, num_warps=num_warps, num_stages=num_stages)
    if num_splits > 1:
        reduce_kv_splits(part_acc, part_max, part_sum, out)
