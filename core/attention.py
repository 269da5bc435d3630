"""The attention backend contract and the per-step metadata it receives.

Paged KV cache: every layer has one cache tensor whose shape the backend
chooses (``kv_cache_shape``). Tokens live in fixed-size blocks; a token's
*slot* is ``block_id * block_size + offset_in_block``.

    request r, block_size 4, block table [7, 2, 9]
    token position:  0 1 2 3 | 4 5 6 7 | 8 9
    block id:        7 7 7 7 | 2 2 2 2 | 9 9
    slot:           28 ... 31| 8 ... 11|36 37

A step's batch is a flat run of new tokens, request after request:

    query_start_loc  [0, 1, 5, 6]       request 0: 1 token (decode), 1: 4, 2: 1
    seq_lens         [17, 4, 33]        cached + new tokens of each request

Request ``i``'s new tokens sit at positions ``seq_lens[i] - query_len_i ...
seq_lens[i] - 1``; they attend causally among themselves and fully to the
``seq_lens[i] - query_len_i`` tokens already in the cache, unless the layer
has a sliding window (``forward``'s ``sliding_window``):

    sliding_window 4, query at position 9: keys 6 7 8 9 (p - W < j <= p)
    key position:  0 1 2 3 4 5 6 7 8 9
    visible:       . . . . . . x x x x

The cache's dtype is the model's, or fp8 (``kv_cache_dtype``, vLLM's values) for
a backend that lists it in ``supported_kv_cache_dtypes``. An fp8 cache stores
``clamp(x / scale, -max, max)`` of each key and value and reads back
``stored * scale``, with one scale per layer, KV head and keys or values, fixed
before the first step (``set_kv_cache_scales``; the engine calibrates them,
see ``tokenmill.kv_scales``). Fixed, because an entry is read by every later
step and, through the prefix cache, by other requests: its meaning cannot change
after it is written. One instance serves every layer, so ``forward`` finds the
layer's scales from its cache tensor (``kv_cache_scales``).
"""
from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .components import ATTENTION_BACKEND, Component
from .errors import ConfigError


@dataclass(slots=True)
class AttentionMetadata:
    """Everything a backend needs for one step; built by the model runner.

    ``slot_mapping[t] == -1`` marks a padding token whose K/V must not be written.
    ``block_tables[i]`` holds request i's block ids for its first
    ``ceil(seq_lens[i] / block_size)`` entries; the entries past them are
    unspecified (buffers are reused across steps): a backend never reads them.
    With a sliding window on every layer, entries of blocks wholly behind the
    window may name blocks since given to other requests (or the null block 0):
    a backend reads no key outside a layer's window. The table is at least as
    wide as the step's longest request needs, and may be a view of a wider one
    (rows ``stride(0)`` apart; graph steps use the full ``max_blocks_per_req``).
    Tensors are on the model's device; the ``*_cpu`` copies spare host syncs.
    ``backend_state`` is what the backend's ``prepare`` made of this metadata.
    """

    num_actual_tokens: int
    max_query_len: int
    max_seq_len: int
    query_start_loc: torch.Tensor  # int32 [num_reqs + 1]
    seq_lens: torch.Tensor  # int32 [num_reqs]
    block_tables: torch.Tensor  # int32 [num_reqs, >= the longest request's blocks]
    slot_mapping: torch.Tensor  # int64 [num_tokens]
    query_start_loc_cpu: torch.Tensor  # int32 [num_reqs + 1]
    seq_lens_cpu: torch.Tensor  # int32 [num_reqs]
    backend_state: Any = None

    @property
    def num_reqs(self) -> int:
        return self.seq_lens_cpu.shape[0]


# kv_cache_dtype (vLLM's values) -> the cache tensors' dtype; None: the model's
KV_CACHE_DTYPES: dict[str, torch.dtype | None] = {
    "auto": None, "fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def kv_cache_torch_dtype(kv_cache_dtype: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype of a cache for ``kv_cache_dtype`` in a model running in ``dtype``."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {list(KV_CACHE_DTYPES)}, got {kv_cache_dtype!r}")
    return KV_CACHE_DTYPES[kv_cache_dtype] or dtype


class AttentionBackend(Component):
    """A paged attention implementation.

    One instance serves every layer of a model; the layer's cache tensor is
    passed to ``forward``. Class attributes describe what it supports; ``None``
    means "any".
    """

    kind = ATTENTION_BACKEND
    supported_devices: ClassVar[tuple[str, ...]] = ("cpu", "cuda")
    supported_dtypes: ClassVar[tuple[torch.dtype, ...]] = (torch.float32, torch.float16, torch.bfloat16)
    supported_head_sizes: ClassVar[tuple[int, ...] | None] = None
    supported_block_sizes: ClassVar[tuple[int, ...] | None] = None
    # True when a decode step's forward can be captured in a CUDA graph: no host syncs, no
    # allocations outside the graph's pool, a launch configuration fixed by the metadata's
    # host ints (see cuda_graphs)
    supports_cuda_graphs: ClassVar[bool] = False
    # True when ``forward`` honours the ``sliding_window`` / ``logits_soft_cap`` keywords; a
    # model whose layers use either runs only on a backend that declares it
    supports_sliding_window: ClassVar[bool] = False
    supports_logits_soft_cap: ClassVar[bool] = False
    # the ``kv_cache_dtype`` values ``forward`` accepts (see the module docstring for fp8)
    supported_kv_cache_dtypes: ClassVar[tuple[str, ...]] = ("auto",)

    def __init__(self, options: Any = None, *, num_heads: int, num_kv_heads: int, head_size: int,
                 dtype: torch.dtype, device: torch.device | str, kv_cache_dtype: str = "auto") -> None:
        """``options``: the backend's own (``attention_config``), validated by its ``Options``.
        ``kv_cache_dtype``: the engine's option; ``self.cache_dtype`` is the dtype it means."""
        super().__init__(options)
        problem = (self.unsupported_reason(head_size=head_size, dtype=dtype, device=device)
                   or self.unsupported_kv_cache_dtype(kv_cache_dtype, device=device))
        if problem:
            raise ValueError(f"attention backend '{self.name}': {problem}")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_size = head_size
        self.dtype = dtype
        self.device = torch.device(device)
        self.kv_cache_dtype = kv_cache_dtype
        self.cache_dtype = kv_cache_torch_dtype(kv_cache_dtype, dtype)
        # cache storage address -> its layer's fp8 scales [2, num_kv_heads]; unbound caches use 1.0 (vLLM's default)
        self._kv_scales: dict[int, torch.Tensor] = {}
        self._unit_kv_scales = torch.ones(2, num_kv_heads, device=self.device)

    @classmethod
    def unsupported_reason(cls, *, head_size: int | None = None, dtype: torch.dtype | None = None,
                           device: torch.device | str | None = None,
                           block_size: int | None = None) -> str | None:
        """Why this backend cannot serve that shape, or None when it can."""
        if device is not None and torch.device(device).type not in cls.supported_devices:
            return f"device must be one of {list(cls.supported_devices)}, got '{torch.device(device).type}'"
        if dtype is not None and dtype not in cls.supported_dtypes:
            return f"dtype must be one of {[str(d) for d in cls.supported_dtypes]}, got {dtype}"
        if head_size is not None and cls.supported_head_sizes is not None \
                and head_size not in cls.supported_head_sizes:
            return f"head_size must be one of {list(cls.supported_head_sizes)}, got {head_size}"
        if block_size is not None and cls.supported_block_sizes is not None \
                and block_size not in cls.supported_block_sizes:
            return f"block_size must be one of {list(cls.supported_block_sizes)}, got {block_size}"
        return None

    @classmethod
    def unsupported_kv_cache_dtype(cls, kv_cache_dtype: str, *,
                                   device: torch.device | str | None = None) -> str | None:
        """Why this backend cannot keep its cache in ``kv_cache_dtype`` (on ``device``), or None."""
        if kv_cache_dtype not in cls.supported_kv_cache_dtypes:
            return f"kv_cache_dtype must be one of {list(cls.supported_kv_cache_dtypes)}, got {kv_cache_dtype!r}"
        return None

    @classmethod
    def unsupported_variant(cls, *, sliding_window: bool = False, logits_soft_cap: bool = False) -> str | None:
        """Why this backend cannot serve a model whose layers use these attention variants."""
        missing = [name for name, used, supported in (
            ("sliding windows", sliding_window, cls.supports_sliding_window),
            ("logit soft-capping", logits_soft_cap, cls.supports_logits_soft_cap)) if used and not supported]
        return f"the model's layers use {' and '.join(missing)}, which it does not support" if missing else None

    def prepare(self, metadata: AttentionMetadata) -> Any:
        """The backend's own per-step state, made from the step's metadata once before any
        layer runs (and once when a CUDA graph is captured: then only device work may depend
        on it). The runner stores it as ``metadata.backend_state``; every layer's ``forward``
        of that step reads it there. Default: none."""
        return None

    @classmethod
    def priority(cls, device: torch.device) -> int:
        """How much this backend wants to serve ``device`` when none is named: among the
        backends that support the step's shapes, the highest priority is chosen."""
        return 0

    @classmethod
    def capabilities(cls) -> dict[str, Any]:
        return {
            "devices": list(cls.supported_devices),
            "dtypes": [str(d).removeprefix("torch.") for d in cls.supported_dtypes],
            "head_sizes": "any" if cls.supported_head_sizes is None else list(cls.supported_head_sizes),
            "block_sizes": "any" if cls.supported_block_sizes is None else list(cls.supported_block_sizes),
            "sliding_window": cls.supports_sliding_window, "logits_soft_cap": cls.supports_logits_soft_cap,
            "kv_cache_dtypes": list(cls.supported_kv_cache_dtypes),
        }

    def set_kv_cache_scales(self, kv_caches: Sequence[torch.Tensor], scales: torch.Tensor) -> None:
        """Fix each layer's fp8 scales: ``scales[i]`` (fp32 [2, num_kv_heads]: keys, values) for
        the cache ``kv_caches[i]``. Replaces any earlier binding. Call it before the first step
        (and before CUDA graphs are captured: they read the scales where they are now)."""
        if scales.shape != (len(kv_caches), 2, self.num_kv_heads) or not bool((scales > 0).all()) \
                or not bool(scales.isfinite().all()):
            raise ValueError(f"scales must be finite and > 0, [{len(kv_caches)}, 2, {self.num_kv_heads}] "
                             f"(layers, keys/values, KV heads), got {tuple(scales.shape)}")
        scales = scales.to(self.device, torch.float32)
        self._kv_scales = {cache.untyped_storage().data_ptr(): s for cache, s in zip(kv_caches, scales)}

    def kv_cache_scales(self, kv_cache: torch.Tensor) -> torch.Tensor:
        """The fp8 scales bound to the layer whose cache is ``kv_cache`` (fp32 [2, num_kv_heads]:
        keys, values), or ones for a cache bound to none."""
        return self._kv_scales.get(kv_cache.untyped_storage().data_ptr(), self._unit_kv_scales)

    def kv_cache_amax(self, kv_cache: torch.Tensor) -> torch.Tensor:
        """Per KV head, the largest |key| and |value| in ``kv_cache`` (fp32 [2, num_kv_heads]):
        what calibration reads from a scratch cache in the model's dtype. This default reads the
        ``[2, ..., num_kv_heads, head_size]`` layout of the built-in backends; override it for another."""
        other_dims = tuple(d for d in range(1, kv_cache.dim()) if d != kv_cache.dim() - 2)
        return kv_cache.abs().amax(dim=other_dims).float()

    @staticmethod
    @abstractmethod
    def kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int,
                       head_size: int) -> tuple[int, ...]:
        """Shape of one layer's cache tensor (keys and values together)."""

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                metadata: AttentionMetadata, scale: float, *, sliding_window: int | None = None,
                logits_soft_cap: float | None = None) -> torch.Tensor:
        """Write ``k``/``v`` into ``kv_cache`` at ``metadata.slot_mapping``, then attend.

        q: [num_tokens, num_heads, head_size]; k, v: [num_tokens, num_kv_heads,
        head_size]. Returns [num_tokens, num_heads, head_size] in q's dtype.
        Rows past ``metadata.num_actual_tokens`` are padding: any finite value.

        The layer's own attention variant, passed on every call (one instance
        serves layers that differ, e.g. Gemma 2's alternating local and global ones):

        - ``sliding_window`` W >= 1 (HuggingFace semantics): the query at position
          p sees only the keys at positions j with p - W < j <= p, the last W
          positions, its own included. None: full causal attention. A window at
          least as long as the context is the same as none.
        - ``logits_soft_cap`` c > 0: each score s = scale * q . k becomes
          c * tanh(s / c) before the mask and the softmax. None: no cap.

        Tokens before the window stay in the cache (the model runner owns it);
        the backend only leaves them out of the attention.
        """


def select_attention_backend(backends: Mapping[str, type[AttentionBackend]], *, device: torch.device,
                             dtype: torch.dtype, head_size: int, block_size: int, sliding_window: bool = False,
                             logits_soft_cap: bool = False, kv_cache_dtype: str = "auto") -> str:
    """The name of the supported backend with the highest ``priority(device)``; an error
    saying why each backend was passed over when none supports this model and cache.
    ``sliding_window`` / ``logits_soft_cap``: whether the model's layers use them."""
    ranked, reasons = [], []
    for name, cls in sorted(backends.items()):
        problem = unsupported(cls, head_size=head_size, dtype=dtype, device=device, block_size=block_size,
                              sliding_window=sliding_window, logits_soft_cap=logits_soft_cap,
                              kv_cache_dtype=kv_cache_dtype)
        if problem:
            reasons.append(f"'{name}': {problem}")
        else:
            ranked.append((cls.priority(device), name))
    if not ranked:
        option = "attention_backend" if kv_cache_dtype == "auto" else "attention_backend, kv_cache_dtype"
        cache = "" if kv_cache_dtype == "auto" else f", kv_cache_dtype={kv_cache_dtype}"
        raise ConfigError(f"{option}: no registered backend serves head_size={head_size}, {dtype}, "
                          f"block_size={block_size}{cache} on {device.type}: "
                          f"{'; '.join(reasons) or 'none is registered'}")
    return max(ranked)[1]


def unsupported(cls: type[AttentionBackend], *, head_size: int, dtype: torch.dtype, device: torch.device,
                block_size: int, sliding_window: bool = False, logits_soft_cap: bool = False,
                kv_cache_dtype: str = "auto") -> str | None:
    """Why ``cls`` cannot serve this model and cache (its shapes, its cache dtype, then its attention variants)."""
    return (cls.unsupported_reason(head_size=head_size, dtype=dtype, device=device, block_size=block_size)
            or cls.unsupported_kv_cache_dtype(kv_cache_dtype, device=device)
            or cls.unsupported_variant(sliding_window=sliding_window, logits_soft_cap=logits_soft_cap))
