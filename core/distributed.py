"""Tensor parallelism: which shard of the model this process holds, and the collectives between shards.

A process runs one rank of ``size`` (``tensor_parallel_size``); the engine sets its ``TensorParallel``
before the model is built, and layers read it when they are constructed (``get_tensor_parallel``):

    column-parallel Linear   out rows split by rank; each rank computes its slice of the output
    row-parallel Linear      in columns split by rank; partial products summed (``all_reduce``), bias once
    vocab-parallel Embedding vocabulary rows split; a lookup outside the rank's rows gives zeros, summed
    logits head             vocabulary rows split; every rank's logits gathered (``all_gather``)
    attention               query heads split; KV heads split too, or, with fewer KV heads than ranks,
                            each rank keeps the one KV head its query heads read (``kv_heads``)

At size 1 (the default, and every process that never joined a group) the collectives are no-ops, so
model code is the same at every size. Processes join with ``init_tensor_parallel``: gloo on CPU, NCCL
on CUDA, over a ``torch.distributed`` store that the engine's driver hosts.
"""
from __future__ import annotations

import contextlib
import datetime
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["TensorParallel", "get_tensor_parallel", "init_tensor_parallel", "tensor_parallel"]


@dataclass(frozen=True)
class TensorParallel:
    """This process's rank among ``size`` tensor-parallel ranks, and their process group."""

    rank: int = 0
    size: int = 1
    group: Any = None  # a torch.distributed ProcessGroup; None at size 1

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.size:
            raise ValueError(f"rank must be in [0, {self.size}), got {self.rank}")

    # ------------------------------------------------------------ splits

    def split(self, total: int, what: str) -> tuple[int, int]:
        """(start, count) of this rank's even share of ``total`` items; ``what`` names them in the error
        raised when ``total`` does not divide."""
        if total % self.size:
            raise ValueError(f"{what} ({total}) must be divisible by tensor_parallel_size ({self.size})")
        count = total // self.size
        return self.rank * count, count

    def split_padded(self, total: int) -> tuple[int, int]:
        """(start, count) of this rank's share of ``total`` rows padded up to a multiple of the size (the
        vocabulary): every rank holds ``ceil(total / size)`` rows, the last ones past ``total`` padding."""
        count = -(-total // self.size)
        return self.rank * count, count

    def kv_heads(self, num_heads: int, num_kv_heads: int) -> tuple[int, int]:
        """(first KV head, count) this rank keeps: an even share when the KV heads divide among the
        ranks, else the single KV head its own query heads read (KV heads replicated)."""
        self.split(num_heads, "num_attention_heads")
        if num_kv_heads >= self.size:
            return self.split(num_kv_heads, "num_key_value_heads")
        if self.size % num_kv_heads:
            raise ValueError(f"tensor_parallel_size ({self.size}) must be a multiple of num_key_value_heads "
                             f"({num_kv_heads}) when it is larger")
        return self.rank * num_kv_heads // self.size, 1

    def local_heads(self, num_heads: int, num_kv_heads: int) -> tuple[int, int]:
        """(query heads, KV heads) this rank's attention computes and its KV cache holds: the geometry
        its attention backend and cache tensors are built with (``kv_heads`` says which KV heads)."""
        return self.split(num_heads, "num_attention_heads")[1], self.kv_heads(num_heads, num_kv_heads)[1]

    # ------------------------------------------------------------ collectives

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of ``x`` over the ranks, in place; ``x`` itself at size 1."""
        if self.size > 1:
            torch.distributed.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's ``x`` concatenated along ``dim`` in rank order; ``x`` itself at size 1."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        torch.distributed.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Rank ``src``'s ``x`` on every rank, in place."""
        if self.size > 1:
            torch.distributed.broadcast(x, src=src, group=self.group)
        return x


_SINGLE = TensorParallel()
_current = _SINGLE


def get_tensor_parallel() -> TensorParallel:
    """The tensor-parallel state the layers being built should use (size 1 unless set)."""
    return _current


@contextlib.contextmanager
def tensor_parallel(state: TensorParallel) -> Iterator[TensorParallel]:
    """Use ``state`` while the block runs (a model built inside it is that rank's shard)."""
    global _current
    previous, _current = _current, state
    try:
        yield state
    finally:
        _current = previous


def set_tensor_parallel(state: TensorParallel) -> None:
    """Use ``state`` from now on in this process (a worker's rank, for its lifetime)."""
    global _current
    _current = state


def init_tensor_parallel(rank: int, size: int, *, store: Any, device: torch.device,
                         timeout_s: float = 60.0) -> TensorParallel:
    """Join the ``size``-rank group through ``store`` (a ``torch.distributed.Store``): NCCL on CUDA, gloo
    elsewhere. A collective that waits longer than ``timeout_s`` for a peer raises."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.distributed.init_process_group(backend, store=store, rank=rank, world_size=size,
                                         timeout=datetime.timedelta(seconds=timeout_s))
    state = TensorParallel(rank, size, torch.distributed.group.WORLD)
    set_tensor_parallel(state)
    return state
