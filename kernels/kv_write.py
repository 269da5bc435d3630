"""Scatter new tokens' keys and values into the paged KV cache.

Cache layout (one layer; the ``torch`` and ``triton`` backends share it):

    key_cache, value_cache: [num_blocks, block_size, num_kv_heads, head_size]
    slot s  ->  block s // block_size, row s % block_size

One program per token copies its [num_kv_heads, head_size] key and value tiles
to their slot; a token whose slot is -1 (padding) writes nothing. Into an fp8
cache it writes ``clamp(x / scale, -max, max)`` with its KV head's scale (the
``QUANTIZE`` variant), rounded to nearest even in fp32 arithmetic first so the
final cast is exact: the bytes equal torch's cast (the ``torch`` backend's)
whatever the cast's own rounding (Triton's interpreter carries it wrongly).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

FP8_TYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


@triton.jit
def _round_to_fp8(x, MANTISSA_BITS: tl.constexpr, MIN_EXPONENT: tl.constexpr):
    """fp32 ``x`` (within the format's range) rounded to nearest even on the grid of an fp8 format
    with MANTISSA_BITS and smallest normal exponent MIN_EXPONENT: the step of |x|'s binade (below
    2**MIN_EXPONENT, the subnormals' fixed one) is s; adding M = s * 2**23 leaves fp32 that step."""
    a = tl.abs(x)
    exponent = ((a.to(tl.uint32, bitcast=True) >> 23) & 0xFF).to(tl.int32) - 127
    exponent = tl.maximum(exponent, MIN_EXPONENT)
    magic = ((exponent + (127 + 23 - MANTISSA_BITS)) << 23).to(tl.uint32).to(tl.float32, bitcast=True)
    rounded = (a + magic) - magic
    sign = x.to(tl.uint32, bitcast=True) & 0x80000000  # -0.0 stays -0.0, as torch's cast keeps it
    return (rounded.to(tl.uint32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def _write_kv_kernel(key, value, key_cache, value_cache, slot_mapping, kv_scales,
                     stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_cb, stride_cs, stride_ch,
                     NUM_KV_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr,
                     HEAD_SIZE: tl.constexpr, HEAD_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                     QUANTIZE: tl.constexpr, FP8_MAX: tl.constexpr, FP8_MANTISSA_BITS: tl.constexpr,
                     FP8_MIN_EXPONENT: tl.constexpr):
    """``kv_scales`` ([2, NUM_KV_HEADS]: keys', values'), read with QUANTIZE only; FP8_*: the cache
    format's largest finite value, mantissa bits and smallest normal exponent."""
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping + token).to(tl.int64)
    if slot < 0:
        return
    heads = tl.arange(0, HEADS_PAD)
    dims = tl.arange(0, HEAD_PAD)
    mask = (heads < NUM_KV_HEADS)[:, None] & (dims < HEAD_SIZE)[None, :]
    dst = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cs \
        + heads[:, None] * stride_ch + dims[None, :]
    k = tl.load(key + token * stride_kt + heads[:, None] * stride_kh + dims[None, :], mask=mask)
    v = tl.load(value + token * stride_vt + heads[:, None] * stride_vh + dims[None, :], mask=mask)
    if QUANTIZE:
        head_ok = heads < NUM_KV_HEADS
        k_scale = tl.load(kv_scales + heads, mask=head_ok, other=1.0)
        v_scale = tl.load(kv_scales + NUM_KV_HEADS + heads, mask=head_ok, other=1.0)
        k = tl.clamp(tl.div_rn(k.to(tl.float32), k_scale[:, None]), -FP8_MAX, FP8_MAX)
        v = tl.clamp(tl.div_rn(v.to(tl.float32), v_scale[:, None]), -FP8_MAX, FP8_MAX)
        k = _round_to_fp8(k, FP8_MANTISSA_BITS, FP8_MIN_EXPONENT)
        v = _round_to_fp8(v, FP8_MANTISSA_BITS, FP8_MIN_EXPONENT)
    tl.store(key_cache + dst, k.to(key_cache.dtype.element_ty), mask=mask)
    tl.store(value_cache + dst, v.to(value_cache.dtype.element_ty), mask=mask)


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                   slot_mapping: torch.Tensor, kv_scales: torch.Tensor | None = None) -> None:
    """Write ``key[t]``/``value[t]`` ([T, num_kv_heads, head_size]) into slot ``slot_mapping[t]``
    of ``key_cache``/``value_cache``; slots -1 are skipped. Same dtype in and out: a byte copy;
    into an fp8 cache: quantized with ``kv_scales`` (fp32 [2, num_kv_heads]: keys', values')."""
    if key.dim() != 3 or key.shape != value.shape:
        raise ValueError(f"key and value must be [num_tokens, num_kv_heads, head_size] of one shape, "
                         f"got {tuple(key.shape)} and {tuple(value.shape)}")
    if key_cache.dim() != 4 or key_cache.shape != value_cache.shape:
        raise ValueError(f"key_cache and value_cache must be [num_blocks, block_size, num_kv_heads, head_size] "
                         f"of one shape, got {tuple(key_cache.shape)} and {tuple(value_cache.shape)}")
    num_tokens, num_kv_heads, head_size = key.shape
    if key_cache.shape[2:] != (num_kv_heads, head_size):
        raise ValueError(f"cache holds (num_kv_heads, head_size) = {tuple(key_cache.shape[2:])}, "
                         f"the keys are {(num_kv_heads, head_size)}")
    quantize = key_cache.dtype in FP8_TYPES
    if key.dtype != value.dtype or key_cache.dtype != value_cache.dtype \
            or not (quantize or key.dtype == key_cache.dtype):
        raise ValueError(f"key, value and both caches must share one dtype, got {key.dtype}, {value.dtype}, "
                         f"{key_cache.dtype}, {value_cache.dtype} (or the caches one fp8 dtype)")
    if quantize and (kv_scales is None or kv_scales.shape != (2, num_kv_heads) or kv_scales.dtype != torch.float32
                     or not kv_scales.is_contiguous()):
        got = "None" if kv_scales is None else f"{kv_scales.dtype} {tuple(kv_scales.shape)}"
        raise ValueError(f"an fp8 cache needs kv_scales, contiguous float32 [2, {num_kv_heads}], got {got}")
    if slot_mapping.shape != (num_tokens,) or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot_mapping must be int32/int64 [{num_tokens}], "
                         f"got {slot_mapping.dtype} {tuple(slot_mapping.shape)}")
    if key_cache.stride() != value_cache.stride():
        raise ValueError(f"key_cache and value_cache must have the same strides, "
                         f"got {key_cache.stride()} and {value_cache.stride()}")
    devices = {t.device for t in (key, value, key_cache, value_cache, slot_mapping, kv_scales) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"key, value, caches and slot_mapping must be on one device, got {sorted(map(str, devices))}")
    for name, t in (("key", key), ("value", value), ("key_cache", key_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in head_size (stride 1), got strides {t.stride()}")
    if num_tokens == 0:
        return
    _write_kv_kernel[(num_tokens,)](
        key, value, key_cache, value_cache, slot_mapping, kv_scales if quantize else key_cache,  # unread unquantized
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        **kv_write_config(num_kv_heads=num_kv_heads, head_size=head_size, block_size=key_cache.shape[1],
                          cache_dtype=key_cache.dtype))


def kv_write_config(*, num_kv_heads: int, head_size: int, block_size: int, cache_dtype: torch.dtype) -> dict:
    """The kernel's constexprs for a launch of this shape (``kernels.aot`` compiles the same)."""
    quantize = cache_dtype in FP8_TYPES
    finfo = torch.finfo(cache_dtype if quantize else torch.float8_e4m3fn)  # read with QUANTIZE only
    return dict(NUM_KV_HEADS=num_kv_heads, HEADS_PAD=triton.next_power_of_2(num_kv_heads), HEAD_SIZE=head_size,
                HEAD_PAD=triton.next_power_of_2(head_size), BLOCK_SIZE=block_size, QUANTIZE=quantize,
                FP8_MAX=finfo.max, FP8_MANTISSA_BITS=-int(math.log2(finfo.eps)),
                FP8_MIN_EXPONENT=int(math.log2(finfo.smallest_normal)))
