"""Scatter new tokens' keys and values into the paged KV cache.

Cache layout (one layer; the ``torch`` and ``triton`` backends share it):

    key_cache, value_cache: [num_blocks, block_size, num_kv_heads, head_size]
    slot s  ->  block s // block_size, row s % block_size

One program per token copies its [num_kv_heads, head_size] key and value tiles
to their slot; a token whose slot is -1 (padding) writes nothing.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _write_kv_kernel(key, value, key_cache, value_cache, slot_mapping,
                     stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_cb, stride_cs, stride_ch,
                     NUM_KV_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr,
                     HEAD_SIZE: tl.constexpr, HEAD_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr):
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
    tl.store(key_cache + dst, k, mask=mask)
    tl.store(value_cache + dst, v, mask=mask)


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """Write ``key[t]``/``value[t]`` ([T, num_kv_heads, head_size]) into slot ``slot_mapping[t]``
    of ``key_cache``/``value_cache``; slots -1 are skipped. Same dtype in and out: a byte copy."""
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
    if not (key.dtype == value.dtype == key_cache.dtype == value_cache.dtype):
        raise ValueError(f"key, value and both caches must share one dtype, got {key.dtype}, {value.dtype}, "
                         f"{key_cache.dtype}, {value_cache.dtype}")
    if slot_mapping.shape != (num_tokens,) or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot_mapping must be int32/int64 [{num_tokens}], "
                         f"got {slot_mapping.dtype} {tuple(slot_mapping.shape)}")
    if key_cache.stride() != value_cache.stride():
        raise ValueError(f"key_cache and value_cache must have the same strides, "
                         f"got {key_cache.stride()} and {value_cache.stride()}")
    devices = {t.device for t in (key, value, key_cache, value_cache, slot_mapping)}
    if len(devices) != 1:
        raise ValueError(f"key, value, caches and slot_mapping must be on one device, got {sorted(map(str, devices))}")
    for name, t in (("key", key), ("value", value), ("key_cache", key_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in head_size (stride 1), got strides {t.stride()}")
    if num_tokens == 0:
        return
    _write_kv_kernel[(num_tokens,)](
        key, value, key_cache, value_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        HEAD_SIZE=head_size, HEAD_PAD=triton.next_power_of_2(head_size), BLOCK_SIZE=key_cache.shape[1])
