"""Quantized weights: layers that keep a checkpoint's weights in a compact form and multiply by
them without ever holding the full-precision matrix.

    checkpoint tensor ──loader──> QuantizedWeight ──Linear / Embedding (core/layers.py)──> matmul, lookup

``QuantizedWeight`` is the contract every format implements:

- ``gguf.GGUFWeight``: a GGUF block format kept as the file stores it (Q4_0, Q4_1, Q5_0, Q5_1,
  Q8_0, Q4_K, Q5_K, Q6_K), repacked at load where a faster kernel wants another layout;
- ``fp8.Fp8Weight``: e4m3 values with a scale per output channel (``quantization="fp8"``).
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class QuantizedWeight(Protocol):
    """A weight matrix [out_features, in_features] in a quantized form."""

    out_features: int
    in_features: int

    @property
    def nbytes(self) -> int:
        """Bytes the weight occupies (all of its tensors)."""

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T``: x [T, in_features] -> [T, out_features], in x's dtype."""

    def dequantize(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The weight (or only ``rows`` of it, an int64 index) as float32 [rows, in_features]."""

    def to(self, device: torch.device) -> QuantizedWeight:
        """The same weight on ``device`` (re-laid out for that device's kernels if need be)."""
