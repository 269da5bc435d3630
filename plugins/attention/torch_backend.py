"""The ``torch`` attention backend: paged attention in plain PyTorch.

The CPU default. Cache layout, one tensor per layer:

    kv_cache[0] = keys, kv_cache[1] = values: [num_blocks, block_size, num_kv_heads, head_size]

``TorchAttentionBackend`` batches the decode rows (query length 1): rows of
similar context length form a bucket, whose cache blocks are gathered whole
into a reused workspace (padded to the bucket's longest context) and attended
in one ``scaled_dot_product_attention`` with a length mask. Longer queries
(prompt chunks) go one request at a time: their compute dwarfs the call
overhead, and padding them would waste the most. What depends only on the metadata
(buckets, gather indices, masks) is built once per step and shared by every
layer. ``reference_paged_attention`` is the plain per-request version, the
independent reference other backends are checked against.

A sliding window W changes the plan, not the kernels: each decode row gathers
only the blocks from the one holding its window's first key, and its mask
also hides the keys before the window; a prompt chunk gathers from its first
query's window and gets a banded mask. Layers may differ in window, so the
step keeps one plan per distinct window, built on first use. Soft-capped
scores need the scores themselves, which SDPA never exposes: those calls
compute them explicitly (matmul, cap, mask, softmax, matmul).

    decode row, seq_len 30, block_size 8, W = 10: keys 20..29, in blocks 2 and 3
    block:      0        1        2        3
    gathered:                     ....xxxx xxxxxx..   (x: visible in the mask)

Math in fp32 whatever the cache dtype (a no-op for fp32, the CPU default), as
in the reference; outputs are cast back to q's dtype. GQA without repeating KV
heads: query head h reads KV head h // group, so in decode the H query heads
view as [KV, group] and each KV head serves its group's rows; prompt chunks
use SDPA's own ``enable_gqa``:

    decode   q [R, H, D] -> [R, KV, group, D]    k, v [R, L, KV, D] seen as [R, KV, L, D]
    prompt   q [Q, H, D] -> [1, H, Q, D]         k, v [L, KV, D] seen as [1, KV, L, D]

An fp8 cache (``kv_cache_dtype``) holds ``clamp(x / scale, -max, max)`` per KV
head (``quantize_kv``); gathered keys and values are dequantized to fp32 before
the math. A prompt with no cached prefix attends to its own k/v after the same
round trip, so it sees what a later step, or a prefix-cache hit, reads back.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tokenmill import AttentionBackend, AttentionMetadata
from tokenmill.attention import FP8_DTYPES

# Cost of one more decode bucket, in padded context tokens: a bucket is split off
# when it saves more gather + attention work than this per-call overhead.
_BUCKET_OVERHEAD_TOKENS = 256


@dataclass(slots=True)
class _DecodeBucket:
    num_rows: int
    padded_len: int
    token_index: torch.Tensor  # int64 [R]: the rows' query tokens in the flat batch, ascending
    tokens: slice | None  # the same as a range, when they are consecutive (then no index op is needed)
    kv_blocks: torch.Tensor  # int64 [2 * R * padded_len / block_size]: see _kv_blocks
    mask: torch.Tensor  # fp32 [R, 1, 1, padded_len]: 0 where a key is visible, -inf where not (see _additive)


@dataclass(slots=True)
class _Prefill:
    start: int
    end: int
    num_keys: int  # keys from the first block gathered (or the chunk's first token) to the last
    kv_blocks: torch.Tensor | None  # int64 (see _kv_blocks), None when the chunk is the whole context
    mask: torch.Tensor | None  # fp32 [query_len, num_keys] (see _additive), None: plain causal over the chunk alone


@dataclass(slots=True)
class _WindowPlan:
    """How one step attends under one sliding window (or none)."""

    decode: list[_DecodeBucket]
    prefill: list[_Prefill]


@dataclass(slots=True)
class _StepPlan:
    """What every layer of one step shares: built from the metadata and the cache's layout."""

    slots: torch.Tensor | None  # int64 write slots, None when some are -1 (masked write)
    starts: np.ndarray  # int64 [R + 1]: query_start_loc
    seq_lens: np.ndarray  # int64 [R]
    max_seq_len: int
    tables: torch.Tensor  # int64 [R, max_blocks] on the CPU, unused entries clamped to block 0
    num_blocks: int
    block_size: int
    device: torch.device
    windows: dict[int | None, _WindowPlan]  # by window, filled on first use

    def for_window(self, window: int | None) -> _WindowPlan:
        """The attention plan of ``window``; a window no shorter than every context is none."""
        if window is not None and window >= self.max_seq_len:
            window = None
        plan = self.windows.get(window)
        if plan is None:
            plan = self.windows[window] = _window_plan(self, window)
        return plan


@dataclass(slots=True)
class _PlanSlot:
    """This backend's ``metadata.backend_state``: the step's plan, built by its first layer
    (the plan needs the cache's block count and size, which ``prepare`` does not see)."""

    plan: _StepPlan | None = None


class TorchAttentionBackend(AttentionBackend):
    name = "torch"
    supported_devices = ("cpu", "cuda")
    supports_sliding_window = True
    supports_logits_soft_cap = True
    supported_kv_cache_dtypes = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # gather target reused across layers and steps: fresh large CPU tensors cost page faults
        self._workspace = torch.empty(0)

    @staticmethod
    def kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int,
                       head_size: int) -> tuple[int, ...]:
        return (2, num_blocks, block_size, num_kv_heads, head_size)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                metadata: AttentionMetadata, scale: float, *, sliding_window: int | None = None,
                logits_soft_cap: float | None = None) -> torch.Tensor:
        _check_window_and_cap(sliding_window, logits_soft_cap)
        n = metadata.num_actual_tokens
        key_cache, value_cache = kv_cache[0], kv_cache[1]
        if not isinstance(metadata.backend_state, _PlanSlot):  # a caller that did not prepare
            metadata.backend_state = self.prepare(metadata)
        slot = metadata.backend_state
        if slot.plan is None:  # the step's first layer: the cache's layout is known from here
            slot.plan = self._step_plan(metadata, num_blocks=key_cache.shape[0], block_size=key_cache.shape[1],
                                        device=q.device)
        plan = slot.plan
        k_scale, v_scale = self.kv_cache_scales(kv_cache) if kv_cache.dtype in FP8_DTYPES else (None, None)
        new_k = quantize_kv(k[:n], k_scale, key_cache.dtype)  # [n, KV, D], as the cache stores them
        new_v = quantize_kv(v[:n], v_scale, value_cache.dtype)
        if plan.slots is None:
            write_kv(key_cache, value_cache, new_k, new_v, metadata.slot_mapping[:n])
        else:
            key_cache.view(-1, *key_cache.shape[2:])[plan.slots] = new_k
            value_cache.view(-1, *value_cache.shape[2:])[plan.slots] = new_v

        group = self.num_heads // self.num_kv_heads
        window_plan = plan.for_window(sliding_window)
        # one bucket of every token (all decode, e.g. batch 1): its result is the output, no copy
        is_one_bucket = not window_plan.prefill and len(window_plan.decode) == 1 \
            and window_plan.decode[0].tokens == slice(0, q.shape[0])
        if not is_one_bucket:
            out = torch.empty_like(q)
            out[n:].zero_()  # padding rows: any finite value
        for bucket in window_plan.decode:
            keys, values = self._gather(kv_cache, bucket.kv_blocks, k_scale, v_scale)  # [R * L, KV, D] each
            keys = keys.view(bucket.num_rows, bucket.padded_len, self.num_kv_heads, -1).transpose(1, 2)
            values = values.view(bucket.num_rows, bucket.padded_len, self.num_kv_heads, -1).transpose(1, 2)
            rows = bucket.token_index if bucket.tokens is None else bucket.tokens
            qh = q[rows].reshape(bucket.num_rows, self.num_kv_heads, group, -1)
            if logits_soft_cap is None:
                attn = F.scaled_dot_product_attention(qh.float(), keys.float(), values.float(),
                                                      attn_mask=bucket.mask, scale=scale)  # [R, KV, group, D]
            else:
                attn = _soft_capped_attention(qh.float(), keys.float(), values.float(), bucket.mask, scale,
                                              logits_soft_cap)
            attn = attn.reshape(bucket.num_rows, self.num_heads, -1).to(q.dtype)
            if is_one_bucket:
                return attn
            out[rows] = attn
        for chunk in window_plan.prefill:
            start, end = chunk.start, chunk.end
            if chunk.kv_blocks is None:  # no cached prefix: this step's k/v are the whole context
                keys, values = dequantize_kv(new_k[start:end], k_scale), dequantize_kv(new_v[start:end], v_scale)
            else:
                keys, values = self._gather(kv_cache, chunk.kv_blocks, k_scale, v_scale)
                keys, values = keys[: chunk.num_keys], values[: chunk.num_keys]
            keys, values = keys.transpose(0, 1), values.transpose(0, 1)  # [KV, L, D]
            if logits_soft_cap is None:
                # 4-D inputs: CPU SDPA takes its flash kernel only for those (3-D falls back to the math one)
                attn = F.scaled_dot_product_attention(
                    q[start:end].transpose(0, 1)[None].float(), keys[None].float(), values[None].float(),
                    attn_mask=chunk.mask, is_causal=chunk.mask is None, scale=scale, enable_gqa=True)[0]
            else:
                # [Q, H, D] -> [KV, group, Q, D]: each KV head's keys serve its group of query heads
                qh = q[start:end].transpose(0, 1).reshape(self.num_kv_heads, group, end - start, -1)
                mask = chunk.mask
                if mask is None:
                    mask = _additive(torch.ones(end - start, end - start, dtype=torch.bool).tril(), q.device)
                attn = _soft_capped_attention(qh.float(), keys[:, None].float(), values[:, None].float(), mask,
                                              scale, logits_soft_cap).flatten(0, 1)
            out[start:end] = attn.transpose(0, 1).to(out.dtype)  # [H, Q, D] -> [Q, H, D]
        return out

    def _gather(self, kv_cache: torch.Tensor, kv_blocks: torch.Tensor, k_scale: torch.Tensor | None,
                v_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Whole blocks of keys and values, in ``kv_blocks`` order, into the workspace:
        two [num_blocks_gathered * block_size, KV, D] views (dequantized fp32 copies for an fp8
        cache). Copying whole blocks runs at memcpy speed; attention then reads keys with a
        stride of KV * D."""
        width = kv_cache[0, 0].numel()
        numel = kv_blocks.shape[0] * width
        if self._workspace.numel() < numel or self._workspace.dtype != kv_cache.dtype \
                or self._workspace.device != kv_cache.device:
            self._workspace = torch.empty(numel, dtype=kv_cache.dtype, device=kv_cache.device)
        gathered = self._workspace[:numel].view(kv_blocks.shape[0], width)
        torch.index_select(kv_cache.view(-1, width), 0, kv_blocks, out=gathered)
        keys, values = gathered.view(2, -1, *kv_cache.shape[3:])
        return dequantize_kv(keys, k_scale), dequantize_kv(values, v_scale)

    def prepare(self, metadata: AttentionMetadata) -> _PlanSlot:
        return _PlanSlot()

    def _step_plan(self, metadata: AttentionMetadata, num_blocks: int, block_size: int,
                   device: torch.device) -> _StepPlan:
        """The step's write slots and what every window's attention plan is made of."""
        n = metadata.num_actual_tokens
        slot_mapping = metadata.slot_mapping[:n]
        slots = slot_mapping if bool((slot_mapping >= 0).all()) else None
        seq_lens = metadata.seq_lens_cpu.numpy().astype(np.int64)
        return _StepPlan(
            slots=slots, starts=metadata.query_start_loc_cpu.numpy().astype(np.int64), seq_lens=seq_lens,
            max_seq_len=int(seq_lens.max(initial=0)),
            tables=metadata.block_tables.cpu().to(torch.int64).clamp_min(0),  # unused entries may hold anything
            num_blocks=num_blocks, block_size=block_size, device=device, windows={})


def _window_plan(step: _StepPlan, window: int | None) -> _WindowPlan:
    """Decode buckets and prefill chunks of ``step`` under ``window`` (None: full causal).

    A decode row gathers the blocks from the one holding its first visible key,
    ``max(seq_len - window, 0)``, to its last; a bucket pads its rows to its
    widest run of blocks, repeating a row's last block (the mask hides it)."""
    starts, seq_lens, tables, block_size, device = step.starts, step.seq_lens, step.tables, step.block_size, step.device
    query_lens = starts[1:] - starts[:-1]
    first_key = np.zeros_like(seq_lens) if window is None else np.maximum(seq_lens - query_lens + 1 - window, 0)
    first_block = first_key // block_size
    last_block = (seq_lens - 1) // block_size
    decode = []
    span_lens = (last_block - first_block + 1) * block_size  # tokens of the blocks a row gathers
    for rows in _bucket_rows(np.flatnonzero(query_lens == 1), span_lens, block_size):
        rows = np.sort(rows)  # in batch order: consecutive tokens read as a slice
        padded_len = int(span_lens[rows].max())
        rows_t = torch.from_numpy(rows)
        block_index = torch.from_numpy(first_block[rows])[:, None] + torch.arange(padded_len // block_size)
        block_index = block_index.minimum(torch.from_numpy(last_block[rows])[:, None])
        k_pos = torch.from_numpy(first_block[rows] * block_size)[:, None] + torch.arange(padded_len)
        mask = (k_pos >= torch.from_numpy(first_key[rows])[:, None]) \
            & (k_pos < torch.from_numpy(seq_lens[rows])[:, None])  # [R, padded_len]
        decode.append(_DecodeBucket(
            num_rows=len(rows), padded_len=padded_len, token_index=torch.from_numpy(starts[rows]).to(device),
            tokens=_as_range(starts[rows]),
            kv_blocks=_kv_blocks(tables[rows_t[:, None], block_index], step.num_blocks, device),
            mask=_additive(mask[:, None, None, :], device)))
    prefill = []
    for i in np.flatnonzero(query_lens > 1).tolist():
        query_len, seq_len = int(query_lens[i]), int(seq_lens[i])
        key_start = int(first_block[i]) * block_size
        kv_blocks = mask = None  # no cached prefix: causal from the top left, as SDPA's is_causal
        if seq_len != query_len:
            kv_blocks = _kv_blocks(tables[i, int(first_block[i]): int(last_block[i]) + 1], step.num_blocks, device)
        if seq_len != query_len or (window is not None and seq_len > window):
            q_pos = torch.arange(seq_len - query_len, seq_len)[:, None]
            k_pos = torch.arange(key_start, seq_len)[None, :]
            mask = k_pos <= q_pos
            if window is not None:
                mask &= k_pos > q_pos - window
            mask = _additive(mask, device)  # [Q, seq_len - key_start]
        prefill.append(_Prefill(int(starts[i]), int(starts[i + 1]), seq_len - key_start, kv_blocks, mask))
    return _WindowPlan(decode, prefill)


def _soft_capped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
                           soft_cap: float) -> torch.Tensor:
    """``softmax(c * tanh(scale * q k^T / c), masked) v`` for q [..., M, D] and k, v [..., L, D];
    ``mask`` (0: visible, -inf: hidden) broadcasts to the scores [..., M, L]. Every row sees some key."""
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(scale / soft_cap).tanh_().mul_(soft_cap)
    scores.add_(mask)
    return torch.matmul(scores.softmax(-1), v)


def _as_range(tokens: np.ndarray) -> slice | None:
    """Ascending token positions as a slice when they are consecutive, else None."""
    first, last = int(tokens[0]), int(tokens[-1])
    return slice(first, last + 1) if last - first + 1 == len(tokens) else None


def _additive(visible: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A bool mask (True: visible) as the fp32 one SDPA adds to the scores (0 or -inf): what SDPA would
    convert a bool mask to on every call, made once per step for every layer."""
    hidden = ~visible.to(device)
    return torch.zeros(visible.shape, dtype=torch.float32, device=device).masked_fill_(hidden, float("-inf"))


def _check_window_and_cap(sliding_window: int | None, logits_soft_cap: float | None) -> None:
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")
    if logits_soft_cap is not None and not 0 < logits_soft_cap < float("inf"):
        raise ValueError(f"logits_soft_cap must be finite and > 0 or None, got {logits_soft_cap}")


def _kv_blocks(block_ids: torch.Tensor, num_blocks: int, device: torch.device) -> torch.Tensor:
    """Rows of a [2, num_blocks, ...] cache viewed as [2 * num_blocks, block]: the keys of
    ``block_ids`` (any shape, flattened), then their values."""
    block_ids = block_ids.flatten()
    return torch.cat((block_ids, block_ids + num_blocks)).to(device)


def _bucket_rows(rows: np.ndarray, lens: np.ndarray, block_size: int) -> list[np.ndarray]:
    """Split decode rows into buckets of similar length (``lens``: the keys each row gathers),
    minimising padded tokens + a per-bucket overhead (contiguous ranges of the rows sorted by length)."""
    if len(rows) == 0:
        return []
    rows = rows[np.argsort(-lens[rows], kind="stable")]
    padded = -(-lens[rows] // block_size) * block_size  # descending
    # best[j]: cheapest split of the first j rows; a bucket rows[i:j] costs (j - i) * padded[i]
    best = np.zeros(len(rows) + 1)
    cut = np.zeros(len(rows) + 1, dtype=np.int64)
    for j in range(1, len(rows) + 1):
        i = np.arange(j)
        costs = best[:j] + (j - i) * padded[:j] + _BUCKET_OVERHEAD_TOKENS
        cut[j] = int(np.argmin(costs))
        best[j] = costs[cut[j]]
    buckets, j = [], len(rows)
    while j > 0:
        buckets.append(rows[cut[j]: j])
        j = cut[j]
    return buckets[::-1]


def quantize_kv(x: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Keys or values ``x`` [T, KV, D] as a cache of ``dtype`` stores them: for fp8, ``x / scale``
    (``scale`` [KV]: their KV head's; None: 1.0) clamped to the format's finite range (beyond it a
    value saturates rather than becoming inf or NaN); for other dtypes, ``x`` cast."""
    if dtype not in FP8_DTYPES:
        return x.to(dtype)
    limit = torch.finfo(dtype).max
    x = x.float() if scale is None else x.float() / scale[:, None]
    return x.clamp_(-limit, limit).to(dtype)


def dequantize_kv(x: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """The fp32 keys or values that cache entries ``x`` [..., KV, D] stand for (``scale`` as in ``quantize_kv``)."""
    if x.dtype not in FP8_DTYPES or scale is None:
        return x.float()
    return x.float() * scale[:, None]


def write_kv(key_cache: torch.Tensor, value_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor, kv_scales: torch.Tensor | None = None) -> None:
    """Scatter each token's k/v into its slot, quantized for an fp8 cache (``quantize_kv``);
    slot -1 (padding) is skipped."""
    k_scale, v_scale = (None, None) if kv_scales is None else kv_scales
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    key_cache.view(-1, *key_cache.shape[2:])[slots] = quantize_kv(k[valid], k_scale, key_cache.dtype)
    value_cache.view(-1, *value_cache.shape[2:])[slots] = quantize_kv(v[valid], v_scale, value_cache.dtype)


def reference_paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                              metadata: AttentionMetadata, scale: float, *, sliding_window: int | None = None,
                              logits_soft_cap: float | None = None,
                              kv_scales: torch.Tensor | None = None) -> torch.Tensor:
    """The reference: ``AttentionBackend.forward`` for the torch cache layout, one request
    at a time, in fp32, KV heads repeated for GQA, every score computed and masked
    explicitly (no SDPA, which the backends use). Plain and slow on purpose.
    ``kv_scales`` [2, KV]: an fp8 cache's scales (``kv_cache_scales``; None: 1.0)."""
    n = metadata.num_actual_tokens
    key_cache, value_cache = kv_cache[0], kv_cache[1]
    block_size = key_cache.shape[1]
    write_kv(key_cache, value_cache, k[:n], v[:n], metadata.slot_mapping[:n], kv_scales)
    k_scale, v_scale = (None, None) if kv_scales is None else kv_scales

    out = torch.zeros_like(q)
    group = q.shape[1] // key_cache.shape[2]
    starts = metadata.query_start_loc_cpu.tolist()
    for i, seq_len in enumerate(metadata.seq_lens_cpu.tolist()):
        start, end = starts[i], starts[i + 1]
        query_len = end - start
        if query_len == 0:
            continue
        blocks = metadata.block_tables[i, : (seq_len + block_size - 1) // block_size]
        # keys/values of the whole context: [seq_len, kv_heads, head]
        keys = dequantize_kv(key_cache[blocks].flatten(0, 1)[:seq_len], k_scale)
        values = dequantize_kv(value_cache[blocks].flatten(0, 1)[:seq_len], v_scale)
        # [heads, len, head]; fp32 so the reference is exact enough to compare against
        qh = q[start:end].transpose(0, 1).float()
        kh = keys.transpose(0, 1).repeat_interleave(group, dim=0)
        vh = values.transpose(0, 1).repeat_interleave(group, dim=0)
        scores = scale * qh @ kh.transpose(1, 2)  # [heads, query_len, seq_len]
        if logits_soft_cap is not None:
            scores = logits_soft_cap * torch.tanh(scores / logits_soft_cap)
        # new token j sits at position p = seq_len - query_len + j and sees keys up to it (and after p - W)
        q_pos = torch.arange(seq_len - query_len, seq_len, device=q.device)[:, None]
        k_pos = torch.arange(seq_len, device=q.device)[None, :]
        mask = k_pos <= q_pos
        if sliding_window is not None:
            mask = mask & (k_pos > q_pos - sliding_window)
        weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        out[start:end] = (weights @ vh).transpose(0, 1).to(q.dtype)
    return out
