"""The ``triton`` attention backend: paged attention on Triton kernels, the CUDA default.

Same cache layout as the ``torch`` backend, so the two are interchangeable:

    kv_cache[0] = keys, kv_cache[1] = values: [num_blocks, block_size, num_kv_heads, head_size]

A step is two launches, whatever mixes of decodes and prompt chunks it holds:
``kv_write`` scatters the new keys and values to their slots, then the unified
``paged_attention`` kernel attends (see its module for the grid and tiling).

Split-KV (flash-decoding) pays when a batch gives too few programs to fill the
GPU: few requests x KV heads over long contexts. It is then split so there are
about two programs per SM, each covering at least ``_MIN_KEYS_PER_SPLIT`` keys
(of the layer's sliding window, when it has one). ``num_kv_splits`` fixes the
number instead (1: never split), which also keeps the grid of a captured CUDA
graph constant. The split workspace is allocated on the first split launch at
its maximal size and reused: after that warm-up a decode launch allocates
nothing and reads nothing back to the host.

An fp8 cache (``kv_cache_dtype``): ``kv_write`` quantizes with the layer's
scales, the attention kernel widens the loaded tiles and applies them (both
read the scales from device memory: a captured graph stays valid). Triton
converts e4m3 (``fp8``, ``fp8_e4m3``) only from compute capability 8.9
(Ada, Hopper); e5m2 from 8.0.

On CPU the kernels run only under the Triton interpreter (``TRITON_INTERPRET=1``,
set before the kernels are imported), which is for tests: it is slow.
"""
from __future__ import annotations

import os
import sys
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from tokenmill import AttentionBackend, AttentionMetadata
from tokenmill.attention import FP8_DTYPES, KV_CACHE_DTYPES

_MAX_SPLITS = 16
_MIN_KEYS_PER_SPLIT = 512  # shorter runs cost more in partial writes and the reduce than they gain
_SPLIT_MAX_TOKENS = 128  # the heuristic splits batches of at most this many tokens: bounds the workspace
_KERNEL_MODULE = "tokenmill.kernels.paged_attention"
_E4M3_MIN_CAPABILITY = (8, 9)  # Triton's fp8e4nv conversions: Ada and Hopper on


def _interpreter_problem() -> str | None:
    """Why the kernels cannot run on CPU in this process, or None."""
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return ("runs on CPU only under the Triton interpreter, which is for testing (slow): "
                "set TRITON_INTERPRET=1 before the first use, or use the 'torch' backend")
    kernels = sys.modules.get(_KERNEL_MODULE)
    if kernels is not None and not kernels.INTERPRETED:
        return ("its Triton kernels were imported before TRITON_INTERPRET=1 was set, so they are compiled "
                "for a GPU: set TRITON_INTERPRET=1 before anything imports tokenmill.kernels")
    return None


class _DevicesWhereKernelsRun:
    """``supported_devices``, read at each access: CUDA, and CPU while the interpreter is on."""

    def __get__(self, instance, owner) -> tuple[str, ...]:
        return ("cuda",) if _interpreter_problem() else ("cuda", "cpu")


class TritonAttentionBackend(AttentionBackend):
    name = "triton"
    supported_devices = _DevicesWhereKernelsRun()
    supported_dtypes = (torch.float16, torch.bfloat16, torch.float32)
    supported_head_sizes = (64, 96, 128, 256)
    supported_block_sizes = (16, 32, 64)
    supports_sliding_window = True
    supports_logits_soft_cap = True
    supports_cuda_graphs = True  # a decode launch neither syncs nor allocates once the workspace exists
    supported_kv_cache_dtypes = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")

    class Options(BaseModel):
        """``attention_config``. ``num_kv_splits``: None picks per step (see the module docstring);
        n >= 1 always uses n."""

        model_config = ConfigDict(extra="forbid", frozen=True)
        num_kv_splits: int | None = Field(default=None, ge=1, le=_MAX_SPLITS)

    def __init__(self, options: Any = None, **kwargs) -> None:
        super().__init__(options, **kwargs)
        num_kv_splits = self.options.num_kv_splits
        # imported here, not at the top: triton decides between interpreter and compiler when a
        # kernel is defined, and a test process may turn the interpreter on after loading plugins
        from tokenmill.kernels.kv_write import write_kv_cache
        from tokenmill.kernels.paged_attention import paged_attention, split_workspace_numel

        self._write_kv_cache = write_kv_cache
        self._paged_attention = paged_attention
        self._split_workspace_numel = split_workspace_numel
        self.num_kv_splits = num_kv_splits
        self._num_sms = (torch.cuda.get_device_properties(self.device).multi_processor_count
                         if self.device.type == "cuda" else None)
        self._workspace = torch.empty(0, dtype=torch.float32)
        self._retired_workspaces: list[torch.Tensor] = []

    @classmethod
    def unsupported_reason(cls, *, head_size: int | None = None, dtype: torch.dtype | None = None,
                           device: torch.device | str | None = None,
                           block_size: int | None = None) -> str | None:
        if device is not None and torch.device(device).type == "cpu":
            problem = _interpreter_problem()
            if problem:
                return problem
        return super().unsupported_reason(head_size=head_size, dtype=dtype, device=device, block_size=block_size)

    @classmethod
    def unsupported_kv_cache_dtype(cls, kv_cache_dtype: str, *,
                                   device: torch.device | str | None = None) -> str | None:
        problem = super().unsupported_kv_cache_dtype(kv_cache_dtype, device=device)
        if problem or KV_CACHE_DTYPES[kv_cache_dtype] != torch.float8_e4m3fn or device is None \
                or torch.device(device).type != "cuda" or not torch.cuda.is_available():
            return problem
        capability = torch.cuda.get_device_capability(device)
        if capability < _E4M3_MIN_CAPABILITY:
            return (f"kv_cache_dtype {kv_cache_dtype!r} (e4m3) needs compute capability >= 8.9 for Triton's fp8 "
                    f"conversions, {device} has {capability[0]}.{capability[1]}: use 'fp8_e5m2' or the 'torch' "
                    "backend")
        return None

    @classmethod
    def capabilities(cls) -> dict[str, Any]:
        return {**super().capabilities(), "kv_cache_dtype_limits": "fp8, fp8_e4m3: CUDA compute capability >= 8.9"}

    @classmethod
    def priority(cls, device: torch.device) -> int:
        # the kernels on CUDA; on CPU the interpreter is for testing them, far slower than torch
        return 10 if device.type == "cuda" else -10

    @staticmethod
    def kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int,
                       head_size: int) -> tuple[int, ...]:
        return (2, num_blocks, block_size, num_kv_heads, head_size)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                metadata: AttentionMetadata, scale: float, *, sliding_window: int | None = None,
                logits_soft_cap: float | None = None) -> torch.Tensor:
        n = metadata.num_actual_tokens
        key_cache, value_cache = kv_cache[0], kv_cache[1]
        kv_scales = self.kv_cache_scales(kv_cache) if kv_cache.dtype in FP8_DTYPES else None
        self._write_kv_cache(k[:n], v[:n], key_cache, value_cache, metadata.slot_mapping[:n], kv_scales)
        out = torch.empty_like(q)
        out[n:].zero_()  # padding rows: any finite value
        num_splits = self.num_kv_splits_for(metadata, sliding_window)
        workspace = self._split_workspace(n, num_splits, q.device) if num_splits > 1 else None
        self._paged_attention(q[:n], key_cache, value_cache, out[:n], block_tables=metadata.block_tables,
                              seq_lens=metadata.seq_lens, query_start_loc=metadata.query_start_loc,
                              max_query_len=metadata.max_query_len, scale=scale, num_splits=num_splits,
                              workspace=workspace, sliding_window=sliding_window, logits_soft_cap=logits_soft_cap,
                              kv_scales=kv_scales)
        return out

    def num_kv_splits_for(self, metadata: AttentionMetadata, sliding_window: int | None = None) -> int:
        """How many KV splits a layer with ``sliding_window`` uses in this step (1: no split);
        a window bounds the keys a decode reads, so it splits less."""
        if self.num_kv_splits is not None:
            return self.num_kv_splits
        if self._num_sms is None or metadata.num_actual_tokens > _SPLIT_MAX_TOKENS:
            return 1
        programs = metadata.num_reqs * self.num_kv_heads
        if programs >= self._num_sms:
            return 1
        max_keys = metadata.max_seq_len if sliding_window is None else min(metadata.max_seq_len, sliding_window)
        splits = min(_MAX_SPLITS, -(-2 * self._num_sms // programs), max_keys // _MIN_KEYS_PER_SPLIT)
        return splits if splits >= 2 else 1

    def _split_workspace(self, num_tokens: int, num_splits: int, device: torch.device) -> torch.Tensor:
        needed = self._split_workspace_numel(num_tokens, self.num_heads, num_splits, self.head_size)
        if self._workspace.numel() < needed or self._workspace.device != device:
            if self._workspace.numel():  # a captured CUDA graph may still write to it: keep it alive
                self._retired_workspaces.append(self._workspace)
            self._workspace = torch.empty(
                max(needed, self._split_workspace_numel(_SPLIT_MAX_TOKENS, self.num_heads, _MAX_SPLITS,
                                                        self.head_size)),
                dtype=torch.float32, device=device)
        return self._workspace
