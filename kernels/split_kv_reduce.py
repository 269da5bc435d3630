"""Merge the partial results of split-KV (flash-decoding) attention.

Split s of (token, head) left, over its run of keys, in base 2:

    max_s = max of its scores (-inf when the run is empty)
    sum_s = sum of exp2(score - max_s)
    acc_s = sum of exp2(score - max_s) * value          (unnormalised)

and the result is  sum_s w_s acc_s / sum_s w_s sum_s  with  w_s = exp2(max_s - max over s).
One program per (token, head) loads all its splits at once.

Workspace: one flat fp32 buffer, carved by ``split_views`` into
acc [T, H, S, HEAD_PAD] | max [T, H, S] | sum [T, H, S].
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _reduce_kv_splits_kernel(out, part_acc, part_max, part_sum, stride_ot, stride_oh,
                             NUM_HEADS: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr,
                             HEAD_SIZE: tl.constexpr, HEAD_PAD: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    splits = tl.arange(0, SPLITS_PAD)
    split_ok = splits < NUM_SPLITS
    dims = tl.arange(0, HEAD_PAD)
    dim_ok = dims < HEAD_SIZE
    part = (token * NUM_HEADS + head) * NUM_SPLITS + splits  # [SPLITS_PAD]
    m = tl.load(part_max + part, mask=split_ok, other=float("-inf"))
    l = tl.load(part_sum + part, mask=split_ok, other=0.0)
    # a token sees at least its own key, so some split has a finite max; empty splits weigh 0
    weight = tl.exp2(m - tl.max(m, 0))
    total = tl.sum(weight * l, 0)
    acc = tl.load(part_acc + part[:, None] * HEAD_PAD + dims[None, :],
                  mask=split_ok[:, None] & dim_ok[None, :], other=0.0)  # [SPLITS_PAD, HEAD_PAD]
    result = tl.sum(acc * weight[:, None], 0) / total
    tl.store(out + token * stride_ot + head * stride_oh + dims, result.to(out.dtype.element_ty), mask=dim_ok)


def split_views(workspace: torch.Tensor, num_tokens: int, num_heads: int, num_splits: int,
                head_pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(acc, max, sum) views at the front of ``workspace``: no allocation."""
    rows = num_tokens * num_heads * num_splits
    acc = workspace[: rows * head_pad].view(num_tokens, num_heads, num_splits, head_pad)
    part_max = workspace[rows * head_pad: rows * (head_pad + 1)].view(num_tokens, num_heads, num_splits)
    part_sum = workspace[rows * (head_pad + 1): rows * (head_pad + 2)].view(num_tokens, num_heads, num_splits)
    return acc, part_max, part_sum


def reduce_kv_splits(part_acc: torch.Tensor, part_max: torch.Tensor, part_sum: torch.Tensor,
                     out: torch.Tensor) -> None:
    """out[t, h] = the merged splits of (t, h); ``part_*`` as ``split_views`` returns them."""
    if part_acc.dim() != 4 or out.dim() != 3 or part_acc.shape[:2] != out.shape[:2]:
        raise ValueError(f"part_acc must be [T, H, splits, head_pad] over out [T, H, head_size], "
                         f"got {tuple(part_acc.shape)} and {tuple(out.shape)}")
    num_tokens, num_heads, num_splits, head_pad = part_acc.shape
    if part_max.shape != part_acc.shape[:3] or part_sum.shape != part_acc.shape[:3]:
        raise ValueError(f"part_max and part_sum must be {list(part_acc.shape[:3])}, "
                         f"got {tuple(part_max.shape)} and {tuple(part_sum.shape)}")
    if not (part_acc.dtype == part_max.dtype == part_sum.dtype == torch.float32):
        raise ValueError(f"the split workspace must be float32, got {part_acc.dtype}, {part_max.dtype}, "
                         f"{part_sum.dtype}")
    if not (part_acc.is_contiguous() and part_max.is_contiguous() and part_sum.is_contiguous()):
        raise ValueError("part_acc, part_max and part_sum must be contiguous")
    if out.stride(-1) != 1 or head_pad < out.shape[2]:
        raise ValueError(f"out must be contiguous in head_size and fit in head_pad={head_pad}, "
                         f"got {tuple(out.shape)} with strides {out.stride()}")
    if num_tokens == 0:
        return
    _reduce_kv_splits_kernel[(num_tokens, num_heads)](
        out, part_acc, part_max, part_sum, out.stride(0), out.stride(1),
        NUM_HEADS=num_heads, NUM_SPLITS=num_splits, SPLITS_PAD=triton.next_power_of_2(num_splits),
        HEAD_SIZE=out.shape[2], HEAD_PAD=head_pad)
