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

Tensor parallelism (``tokenmill.distributed``): a layer built with ``parallel`` holds only this rank's
part of the checkpoint tensor, cut from the whole one at ``load``, so the loader reads every checkpoint
the same way at any size:

    Linear(parallel="column")   rows of each shard (q, k, v): this rank's slice of the output
    Linear(parallel="row")      input columns (the input is the rank's columns: a column layer's output);
                                partial products summed over the ranks, bias once
    Linear(parallel="vocab")    logits head: vocabulary rows; every rank's logits gathered
    Embedding(parallel="vocab") vocabulary rows; a lookup of another rank's row gives zeros, summed

A quantized checkpoint tensor is cut in its own form (``take_rows``, ``take_columns``: GGUF cuts columns
at block boundaries), so a rank never expands a weight it does not hold.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import TensorParallel, get_tensor_parallel
from .quantization import QuantizedWeight

_LINEAR_PARALLEL = (None, "column", "row", "vocab")


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
    """``nn.Linear`` that can hold its weight quantized (see the module docstring), and only this rank's
    part of it under tensor parallelism.

    ``shard_sizes``: the output rows of each checkpoint tensor packed into this layer, in order
    (None: one tensor). ``logits``: the layer computes logits, so a quantized weight multiplies in
    float32 (``matmul_fp32``) even where a faster, rounder kernel exists: near ties decide greedy
    tokens. ``quantized``: the shards' weights once quantized, else None.

    ``parallel``: None (every rank holds the whole weight), "column", "row" or "vocab" (see the module
    docstring); the ranks are those of ``get_tensor_parallel()`` when the layer is built. The
    arguments ``in_features``, ``out_features`` and ``shard_sizes`` are the checkpoint's sizes, kept as
    ``checkpoint_shape`` and ``checkpoint_shard_sizes``: what ``load`` takes. ``shard_slices``
    (column only): the checkpoint rows ``(start, count)`` of each shard this rank keeps; by default an
    even split of each shard. Attention passes its own where ranks share a KV head. The attributes
    ``in_features``, ``out_features`` and ``shard_sizes`` are this rank's: the weight's shape and the
    rows of each shard in it. At size 1 they equal the checkpoint's and the layer is a plain Linear.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 shard_sizes: Sequence[int] | None = None, logits: bool = False,
                 parallel: str | None = None, shard_slices: Sequence[tuple[int, int]] | None = None) -> None:
        checkpoint_shard_sizes = tuple(shard_sizes or (out_features,))
        if sum(checkpoint_shard_sizes) != out_features:
            raise ValueError(f"shard_sizes {list(checkpoint_shard_sizes)} must add up to out_features={out_features}")
        if parallel not in _LINEAR_PARALLEL:
            raise ValueError(f"parallel must be one of {list(_LINEAR_PARALLEL)}, got {parallel!r}")
        tp = get_tensor_parallel()
        what = f"Linear({in_features}, {out_features}, parallel={parallel!r})"
        if shard_slices is not None and parallel != "column":
            raise ValueError(f"shard_slices choose the rows of a column-parallel Linear; {what} has none")
        columns = (0, in_features)
        padded_rows = out_features
        if parallel == "column":
            if shard_slices is None:
                shard_slices = [tp.split(size, f"the rows of shard {i} of {what}")
                                for i, size in enumerate(checkpoint_shard_sizes)]
            shard_slices = tuple((int(start), int(count)) for start, count in shard_slices)
            if len(shard_slices) != len(checkpoint_shard_sizes) or any(
                    start < 0 or count < 0 or start + count > size
                    for (start, count), size in zip(shard_slices, checkpoint_shard_sizes)):
                raise ValueError(f"shard_slices {list(shard_slices)} must give one (start, count) within each "
                                 f"shard of {list(checkpoint_shard_sizes)}")
        elif parallel == "vocab":
            if len(checkpoint_shard_sizes) != 1:
                raise ValueError(f"a vocab-parallel Linear is one checkpoint tensor, got shard_sizes "
                                 f"{list(checkpoint_shard_sizes)}")
            start, padded_rows = tp.split_padded(out_features)
            shard_slices = ((min(start, out_features), max(0, min(padded_rows, out_features - start))),)
        else:
            shard_slices = tuple((0, size) for size in checkpoint_shard_sizes)
            if parallel == "row":
                columns = tp.split(in_features, f"the input features of {what}")
        local_sizes = tuple(count for _, count in shard_slices)
        super().__init__(columns[1], sum(local_sizes), bias=bias)
        self.weight = _column_major(self.weight)
        self.logits = logits
        self.parallel = parallel
        self.tensor_parallel: TensorParallel = tp
        self.checkpoint_shape = (out_features, in_features)
        self.checkpoint_shard_sizes = checkpoint_shard_sizes
        self.shard_sizes = local_sizes
        self.shard_slices = shard_slices
        self.columns = columns  # (start, count) of the checkpoint's input columns this rank multiplies
        self._padded_rows = padded_rows  # vocab: every rank's logits are this wide before the gather
        self.quantized: list[QuantizedWeight] | None = None
        self._pending: list[QuantizedWeight | None] = [None] * len(self.shard_sizes)
        self._device = self.weight.device  # where the quantized weight goes once loaded
        self.lora = None  # LoRA slots (core/lora.py ``LinearLoRA``), attached when the engine serves adapters

    def reset_parameters(self) -> None:
        """Nothing: the loader fills every weight (dummy weights too), and writing a random one
        first would make the whole full-precision matrix resident even when it stays quantized."""

    def load(self, tensor: torch.Tensor | QuantizedWeight, shard: int | None = None) -> None:
        """Load one checkpoint tensor: the whole weight, or shard ``shard`` of a fused layer; the layer
        keeps this rank's part of it."""
        index = 0 if shard is None else shard
        rows = self.checkpoint_shard_sizes[index] if shard is not None else self.checkpoint_shape[0]
        shape = (tensor.out_features, tensor.in_features) if isinstance(tensor, QuantizedWeight) \
            else tuple(tensor.shape)
        if shape != (rows, self.checkpoint_shape[1]):
            raise ValueError(f"shard {index} has shape {shape}, expected {(rows, self.checkpoint_shape[1])}")
        tensor = self._local_part(tensor, shard)
        rows = self.shard_sizes[index] if shard is not None else self.out_features
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

    def load_bias(self, tensor: torch.Tensor, shard: int | None = None) -> None:
        """Load one checkpoint bias: the whole one, or shard ``shard``'s; this rank keeps the entries of
        its rows (a row-parallel layer keeps them all: it adds the bias once, after the sum)."""
        if self.bias is None:
            raise ValueError(f"{self.extra_repr()} has no bias to load")
        index = 0 if shard is None else shard
        rows = self.checkpoint_shard_sizes[index] if shard is not None else self.checkpoint_shape[0]
        if tuple(tensor.shape) != (rows,):
            raise ValueError(f"bias of shard {index} has shape {tuple(tensor.shape)}, expected {(rows,)}")
        tensor = _select_rows(tensor, self._row_index(shard))
        with torch.no_grad():
            offset = sum(self.shard_sizes[:index]) if shard is not None else 0
            self.bias.narrow(0, offset, tensor.shape[0]).copy_(tensor)

    def _row_index(self, shard: int | None) -> torch.Tensor | None:
        """This rank's rows of checkpoint shard ``shard`` (None: of the whole fused tensor), as an index
        into that tensor's rows; None when they are all of them."""
        shards = range(len(self.shard_slices)) if shard is None else [shard]
        if all(self.shard_slices[i] == (0, self.checkpoint_shard_sizes[i]) for i in shards):
            return None
        parts, offset = [], 0
        for i, size in enumerate(self.checkpoint_shard_sizes):
            if i in shards:
                start, count = self.shard_slices[i]
                parts.append(torch.arange(start, start + count) + (offset if shard is None else 0))
            offset += size
        return torch.cat(parts)

    def _local_part(self, tensor: torch.Tensor | QuantizedWeight,
                    shard: int | None) -> torch.Tensor | QuantizedWeight:
        """This rank's rows and columns of a checkpoint tensor (the tensor itself at size 1)."""
        tensor = _select_rows(tensor, self._row_index(shard))
        start, count = self.columns
        if count == self.checkpoint_shape[1]:
            return tensor
        if isinstance(tensor, QuantizedWeight):
            return _quantized_take(tensor, "take_columns", "input columns", start, start + count)
        return tensor.narrow(1, start, count)

    def quantize(self, make: type, **kwargs) -> None:
        """Replace the loaded full-precision weight by ``make.from_weight(weight, **kwargs)``
        (quantization at load, e.g. fp8's ``Fp8Weight``); this rank's part of it only."""
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
        tp = self.tensor_parallel
        if self.parallel == "row" and tp.size > 1:
            y = tp.all_reduce(self._with_lora(x, self._product(x, with_bias=False).contiguous()))
            return y if self.bias is None else y + self.bias.to(y.dtype)
        y = self._with_lora(x, self._product(x, with_bias=True))
        if self.parallel == "vocab" and tp.size > 1:
            return _gather_vocab(tp, y, self._padded_rows, self.checkpoint_shape[0])
        return y

    def _with_lora(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``y`` plus each token's LoRA delta, added in place (before a row-parallel layer's sum, so each
        rank adds its columns' part), whatever form the base weight has (full precision, GGUF, fp8).
        Nothing at all when the step runs no adapter (``LoRAStepState.token_slots`` is None)."""
        lora = self.lora
        if lora is not None and lora.state.token_slots is not None:
            lora.apply(x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1]))
        return y

    def _product(self, x: torch.Tensor, with_bias: bool) -> torch.Tensor:
        """``x @ W.T`` with this rank's weight, plus its bias when ``with_bias``."""
        bias = self.bias if with_bias else None
        if self.quantized is None:
            return F.linear(x, self.weight, bias)
        flat = x.reshape(-1, x.shape[-1])
        outs = [_matmul(w, flat, self.logits) for w in self.quantized]
        y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        if bias is not None:
            y = y + bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        kinds = "" if self.quantized is None else f", quantized={[type(w).__name__ for w in self.quantized]}"
        parallel = "" if self.parallel is None else f", parallel={self.parallel!r}"
        return super().extra_repr() + parallel + kinds


class Embedding(nn.Embedding):
    """``nn.Embedding`` that can hold its table quantized: a lookup dequantizes only the rows it
    reads; ``as_linear`` serves a tied output head from the same table.

    ``parallel="vocab"``: the table's rows split among the tensor-parallel ranks (``split_padded``:
    every rank owns ``ceil(vocab / size)`` ids, the last ones past the vocabulary owning nothing); a
    lookup gives zeros for the ids of other ranks and the ranks' rows are summed, and ``as_linear``
    gathers every rank's logits. ``vocab_size`` is the checkpoint's rows, ``num_embeddings`` this rank's.

    ``head``: the table is also the model's output head (tied embeddings), so on CPU it is laid out as
    a Linear weight is (``_column_major``): the head runs once per decoded token, a lookup reads a
    handful of rows.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, parallel: str | None = None,
                 head: bool = False) -> None:
        if parallel not in (None, "vocab"):
            raise ValueError(f"an Embedding's parallel must be None or 'vocab', got {parallel!r}")
        tp = get_tensor_parallel()
        start, padded = tp.split_padded(num_embeddings) if parallel else (0, num_embeddings)
        rows = max(0, min(padded, num_embeddings - start))
        super().__init__(rows, embedding_dim)
        if head:
            self.weight = _column_major(self.weight)
        self.parallel = parallel
        self.tensor_parallel: TensorParallel = tp
        self.vocab_size = num_embeddings
        self.vocab_start = start
        self._padded_rows = padded
        self.quantized: QuantizedWeight | None = None
        self.compute_dtype = self.weight.dtype  # what a lookup returns once the table is quantized

    def reset_parameters(self) -> None:
        """Nothing: the loader fills the table (see ``Linear.reset_parameters``)."""

    def load(self, tensor: torch.Tensor | QuantizedWeight) -> None:
        """Load the checkpoint's whole table; this rank keeps its rows."""
        quantized = isinstance(tensor, QuantizedWeight)
        shape = (tensor.out_features, tensor.in_features) if quantized else tuple(tensor.shape)
        if shape != (self.vocab_size, self.embedding_dim):
            raise ValueError(f"embedding table has shape {shape}, expected {(self.vocab_size, self.embedding_dim)}")
        if self.num_embeddings != self.vocab_size:
            tensor = _select_rows(tensor, torch.arange(self.vocab_start, self.vocab_start + self.num_embeddings))
        if quantized:
            self.quantized = tensor.to(self.weight.device)
            self.weight = None
            return
        with torch.no_grad():
            self.weight.copy_(tensor)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        tp = self.tensor_parallel
        if self.parallel is None or tp.size == 1:
            return self._lookup(input_ids)
        local = input_ids - self.vocab_start
        mine = (local >= 0) & (local < self.num_embeddings)
        rows = self._lookup(local.masked_fill(~mine, 0)) if self.num_embeddings else \
            torch.zeros(*input_ids.shape, self.embedding_dim, dtype=self.compute_dtype, device=input_ids.device)
        return tp.all_reduce(rows.masked_fill(~mine[..., None], 0))

    def _lookup(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.quantized is None:
            return super().forward(input_ids)
        rows = self.quantized.dequantize(input_ids.reshape(-1).to(torch.int64))
        return rows.to(self.compute_dtype).reshape(*input_ids.shape, self.embedding_dim)

    def as_linear(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden @ table.T``: the logits of an output head tied to this table (all of them, on every rank)."""
        if self.quantized is None:
            logits = F.linear(hidden, self.weight)
        else:
            logits = _matmul(self.quantized, hidden.to(self.compute_dtype), logits=True)
        if self.parallel is None or self.tensor_parallel.size == 1:
            return logits
        return _gather_vocab(self.tensor_parallel, logits, self._padded_rows, self.vocab_size)

    def extra_repr(self) -> str:
        parallel = "" if self.parallel is None else f", parallel={self.parallel!r}, vocab_size={self.vocab_size}"
        return super().extra_repr() + parallel


def _column_major(weight: nn.Parameter) -> nn.Parameter:
    """On CPU, a weight [out, in] whose memory holds its transpose [in, out] row by row (same values, same
    shape, other strides); elsewhere ``weight`` itself. ``F.linear`` then multiplies by a plain [in, out]
    matrix, which MKL's single-row product (a decode step at batch 1) reads 1.3x (a layer) to 1.9x (a
    vocabulary-wide head) faster than the transposed one; from a few rows on the two run alike. Sums
    may round differently in the last bit, as they do between batch sizes in either layout."""
    if weight.device.type != "cpu":
        return weight
    return nn.Parameter(torch.empty(weight.shape[::-1], dtype=weight.dtype).t(), requires_grad=weight.requires_grad)


def _select_rows(tensor: torch.Tensor | QuantizedWeight, index: torch.Tensor | None) -> torch.Tensor | QuantizedWeight:
    """Rows ``index`` of a checkpoint tensor (dense or quantized, in its own form); all of it for None."""
    if index is None:
        return tensor
    if isinstance(tensor, QuantizedWeight):
        return _quantized_take(tensor, "take_rows", "rows", index)
    return tensor.index_select(0, index.to(tensor.device))


def _quantized_take(tensor: QuantizedWeight, method: str, what: str, *args: object) -> QuantizedWeight:
    """``tensor.method(*args)``, or a ValueError saying the format cannot be split that way."""
    take = getattr(tensor, method, None)
    if take is None:
        raise ValueError(f"a {type(tensor).__name__} weight cannot be split by {what} across tensor-parallel "
                         f"ranks (it has no {method})")
    return take(*args)


def _gather_vocab(tp: TensorParallel, logits: torch.Tensor, padded_rows: int, vocab_size: int) -> torch.Tensor:
    """Every rank's slice of the logits [..., rows] -> all of them [..., vocab_size], on every rank: each
    slice padded to ``padded_rows`` (the ranks past the vocabulary's end own fewer ids), gathered in rank
    order, the padding cut off."""
    if logits.shape[-1] < padded_rows:
        logits = F.pad(logits, (0, padded_rows - logits.shape[-1]))
    gathered = tp.all_gather(logits, dim=-1)
    return gathered if gathered.shape[-1] == vocab_size else gathered[..., :vocab_size].contiguous()


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
