"""Layers whose weights may stay quantized: model plugins build their projections and embeddings
from these, and the loader hands them full-precision or quantized tensors alike.

    checkpoint tensor ──model.load_weights──> layer.load(tensor, shard)
        torch.Tensor       copied into the weight rows of that shard (nn.Linear / nn.Embedding as usual)
        QuantizedWeight    kept as that shard's weight; once every shard is quantized the
                           full-precision weight is dropped and forward multiplies by the shards

A fused layer packs several checkpoint tensors along its output rows (q, k, v in ``qkv_proj``);
``shard_sizes`` names their row counts. Shards of one format are merged into one weight when the
format can concatenate rows (GGUF blocks run along the input dimension); a fused layer whose
shards differ in format (a Q4_K_M file stores v in Q6_K) multiplies shard by shard. A weight that
can drop its load-time form once laid out for its kernel (``release_raw``: GGUF rows after CPU int4
packing) does so, unless the layer computes logits.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .quantization import QuantizedWeight


class DenseWeight:
    """A full-precision shard inside a quantized layer (a GGUF file may store one tensor of a
    fused layer as F16 or F32)."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight
        self.out_features, self.in_features = weight.shape

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype))

    def dequantize(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        return (self.weight if rows is None else self.weight[rows]).float()

    def to(self, device: torch.device) -> DenseWeight:
        return DenseWeight(self.weight.to(device))


class Linear(nn.Linear):
    """``nn.Linear`` that can hold its weight quantized (see the module docstring).

    ``shard_sizes``: the output rows of each checkpoint tensor packed into this layer, in order
    (None: one tensor). ``logits``: the layer computes logits, so a quantized weight multiplies in
    float32 (``matmul_fp32``) even where a faster, rounder kernel exists: near ties decide greedy
    tokens. ``quantized``: the shards' weights once quantized, else None.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 shard_sizes: Sequence[int] | None = None, logits: bool = False) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.logits = logits
        self.shard_sizes = tuple(shard_sizes or (out_features,))
        if sum(self.shard_sizes) != out_features:
            raise ValueError(f"shard_sizes {list(self.shard_sizes)} must add up to out_features={out_features}")
        self.quantized: list[QuantizedWeight] | None = None
        self._pending: list[QuantizedWeight | None] = [None] * len(self.shard_sizes)
        self._device = self.weight.device  # where the quantized weight goes once loaded

    def reset_parameters(self) -> None:
        """Nothing: the loader fills every weight (dummy weights too), and writing a random one
        first would make the whole full-precision matrix resident even when it stays quantized."""

    def load(self, tensor: torch.Tensor | QuantizedWeight, shard: int | None = None) -> None:
        """Load one checkpoint tensor: the whole weight, or shard ``shard`` of a fused layer."""
        index = 0 if shard is None else shard
        rows = self.shard_sizes[index] if shard is not None else self.out_features
        shape = (tensor.out_features, tensor.in_features) if isinstance(tensor, QuantizedWeight) \
            else tuple(tensor.shape)
        if shape != (rows, self.in_features):
            raise ValueError(f"shard {index} has shape {shape}, expected {(rows, self.in_features)}")
        if shard is None and isinstance(tensor, QuantizedWeight):  # every shard at once (a checkpoint's fused tensor)
            self._use([tensor])
            return
        if not isinstance(tensor, QuantizedWeight) and self.weight is not None:
            with torch.no_grad():
                self.weight.narrow(0, sum(self.shard_sizes[:index]), rows).copy_(tensor)
            if not any(w is not None for w in self._pending):
                return
            tensor = DenseWeight(tensor.detach().to(self.weight.dtype))
        self._pending[index] = tensor
        if all(w is not None for w in self._pending):
            self._use(self._pending)

    def quantize(self, make: type, **kwargs) -> None:
        """Replace the loaded full-precision weight by ``make.from_weight(weight, **kwargs)``
        (quantization at load, e.g. fp8's ``Fp8Weight``)."""
        self._use([make.from_weight(self.weight.detach(), **kwargs)])

    def _use(self, shards: list[QuantizedWeight]) -> None:
        if any(isinstance(w, DenseWeight) for w in shards) and self.weight is not None:
            # shards loaded before the first quantized one were copied into the weight: take them back
            start = 0
            for i, size in enumerate(self.shard_sizes):
                if shards[i] is None:
                    shards[i] = DenseWeight(self.weight.detach()[start: start + size].clone())
                start += size
        self.quantized = [w.to(self._device) for w in _merge(shards)]
        if not self.logits:  # logits multiply in float32 from the raw form (``matmul_fp32``): keep it there
            for w in self.quantized:
                release = getattr(w, "release_raw", None)
                if release is not None:
                    release()
        self.weight = None  # the full-precision weight is gone: only the quantized one is kept
        self._pending = [None] * len(self.shard_sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantized is None:
            return super().forward(x)
        flat = x.reshape(-1, x.shape[-1])
        outs = [_matmul(w, flat, self.logits) for w in self.quantized]
        y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        kinds = "" if self.quantized is None else f", quantized={[type(w).__name__ for w in self.quantized]}"
        return super().extra_repr() + kinds


class Embedding(nn.Embedding):
    """``nn.Embedding`` that can hold its table quantized: a lookup dequantizes only the rows it
    reads; ``as_linear`` serves a tied output head from the same table."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__(num_embeddings, embedding_dim)
        self.quantized: QuantizedWeight | None = None
        self.compute_dtype = self.weight.dtype  # what a lookup returns once the table is quantized

    def reset_parameters(self) -> None:
        """Nothing: the loader fills the table (see ``Linear.reset_parameters``)."""

    def load(self, tensor: torch.Tensor | QuantizedWeight) -> None:
        if isinstance(tensor, QuantizedWeight):
            if (tensor.out_features, tensor.in_features) != (self.num_embeddings, self.embedding_dim):
                raise ValueError(f"embedding table has shape {(tensor.out_features, tensor.in_features)}, expected "
                                 f"{(self.num_embeddings, self.embedding_dim)}")
            self.quantized = tensor.to(self.weight.device)
            self.weight = None
            return
        with torch.no_grad():
            self.weight.copy_(tensor)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.quantized is None:
            return super().forward(input_ids)
        rows = self.quantized.dequantize(input_ids.reshape(-1).to(torch.int64))
        return rows.to(self.compute_dtype).reshape(*input_ids.shape, self.embedding_dim)

    def as_linear(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden @ table.T``: the logits of an output head tied to this table."""
        if self.quantized is None:
            return F.linear(hidden, self.weight)
        return _matmul(self.quantized, hidden.to(self.compute_dtype), logits=True)


def _matmul(weight: QuantizedWeight, x: torch.Tensor, logits: bool) -> torch.Tensor:
    """``x @ W.T``; for logits in float32 when the weight offers it (``matmul_fp32``)."""
    exact = getattr(weight, "matmul_fp32", None) if logits else None
    return exact(x) if exact is not None else weight.matmul(x)


def _merge(shards: list[QuantizedWeight]) -> list[QuantizedWeight]:
    """Runs of consecutive shards of one type whose class can concatenate rows, as one weight each."""
    merged: list[QuantizedWeight] = []
    for w in shards:
        last = merged[-1] if merged else None
        if last is not None and type(last) is type(w) and _can_cat(last, w):
            merged[-1] = type(w).cat([last, w])
        else:
            merged.append(w)
    return merged


def _can_cat(a: QuantizedWeight, b: QuantizedWeight) -> bool:
    cat = getattr(type(a), "cat", None)
    same_format = getattr(a, "qtype", None) == getattr(b, "qtype", None)
    return cat is not None and same_format and a.in_features == b.in_features
