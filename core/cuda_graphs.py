"""Decode steps replayed from CUDA graphs, and the staged host -> device inputs of a step.

A decode step (every scheduled request brings one new token) is a few hundred small
kernel launches whose cost on the host dwarfs their run time at small batch sizes.
``DecodeGraphRunner`` captures the model forward once per batch size of a ladder at
start-up and replays it: a batch of n requests runs the graph of the smallest
captured size s >= n, the rows n..s-1 padded with dummy requests.

    capture sizes (max_num_seqs 40)   1 2 4 8 16 24 32 40
    a decode batch of 5               runs the graph of 8: rows 5, 6, 7 are padding

The graphs read fixed (static) device buffers, which each step overwrites in place:

    buffer           real row i                          padding row
    input_ids        the request's next input token      0
    positions        its position p                      0
    slot_mapping     its KV slot                         -1 (the KV write skips it)
    seq_lens         p + 1                               1
    query_start_loc  i (constant: one token per row)     i
    block_tables     the request's blocks (fixed width)  0: the reserved null block

(a step stages only the block-table columns its longest row needs, then copies them
into the fixed-width table on the device: entries past a row's length are never read)
and one static ``AttentionMetadata`` per size refers to them, with
``num_actual_tokens`` = s, ``max_query_len`` = 1 and ``max_seq_len`` =
max_model_len: everything a backend derives its launch configuration from is then a
constant of the size (the ``triton`` backend's split-KV count, for one, is chosen
once at capture from these values; the kernel handles any real length up to it). A
padding row attends to one key in the null block, which nothing writes and which
holds finite values; every op of the model is row-wise, so padding rows never change
a real row. Only the model forward is captured: logits and sampling run eagerly on
the real rows of the graph's static output. Prompt chunks, mixed batches, drafts
(speculative decoding) and prompt logprobs run eagerly.

Graphs are used only on CUDA with an attention backend whose ``supports_cuda_graphs``
is True (its decode path must neither sync with the host nor allocate outside the
graph's pool); ``enforce_eager`` turns them off. ``emulate=True`` (tests) keeps the
static buffers, padding and metadata but calls the forward eagerly instead of
replaying, so the same logic runs on CPU.

``StepBuffers`` stages a step's integer inputs: numpy writes into host buffers
(pinned on CUDA), then one non-blocking copy per buffer into persistent device
buffers; on CPU the two are one tensor.
"""
from __future__ import annotations

import bisect
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch

from .attention import AttentionBackend, AttentionMetadata

ModelForward = Callable[[torch.Tensor, torch.Tensor, AttentionMetadata], torch.Tensor]

_NUM_WARMUP_RUNS = 2  # before each capture: compiles kernels, allocates lazily-sized workspaces


def default_capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then multiples of 8, up to ``max_num_seqs`` (which is always included)."""
    sizes = [s for s in (1, 2, 4) if s < max_num_seqs] + list(range(8, max_num_seqs + 1, 8))
    if not sizes or sizes[-1] != max_num_seqs:
        sizes.append(max_num_seqs)
    return sizes


def resolve_capture_sizes(requested: Iterable[int] | None, max_num_seqs: int,
                          max_num_tokens: int | None = None) -> list[int]:
    """The sizes to capture, ascending: ``requested`` (or the default ladder) without
    the sizes no decode step can reach (more rows than ``max_num_seqs``, or more
    tokens than the step budget ``max_num_tokens``)."""
    limit = max_num_seqs if max_num_tokens is None else min(max_num_seqs, max_num_tokens)
    sizes = default_capture_sizes(limit) if requested is None else sorted(set(requested))
    if any(s < 1 for s in sizes):
        raise ValueError(f"cudagraph_capture_sizes must be >= 1, got {sizes}")
    return [s for s in sizes if s <= limit]


def decode_graph_mode(*, enforce_eager: bool, device: torch.device,
                      backend: type[AttentionBackend] | AttentionBackend) -> str:
    """'capture' when decode steps can replay CUDA graphs, else 'off'."""
    if enforce_eager or torch.device(device).type != "cuda" or not backend.supports_cuda_graphs:
        return "off"
    return "capture"


class StepBuffers:
    """Named integer buffers a step fills on the host and copies to the device.

    ``np[name]`` is the host buffer as numpy (pinned memory on CUDA), ``dev[name]`` the
    persistent device buffer (the same tensor on CPU). A step calls ``acquire`` with
    how many leading rows of each buffer it uses (waiting, on CUDA, until the previous
    step's copies have read the host buffers), fills ``np[name][:n]``, then ``upload``.
    ``growable`` buffers are reallocated when a step needs more rows; buffers that a
    CUDA graph reads must keep their addresses, so those are not growable.
    """

    def __init__(self, device: torch.device, specs: dict[str, tuple[tuple[int, ...], torch.dtype]], *,
                 growable: bool = True) -> None:
        self.device = torch.device(device)
        self.growable = growable
        self._pin = self.device.type == "cuda"
        self._uploaded = torch.cuda.Event() if self.device.type == "cuda" else None
        self._pending = False
        self._sizes: dict[str, int] = {}
        self.host: dict[str, torch.Tensor] = {}
        self.np: dict[str, np.ndarray] = {}
        self.dev: dict[str, torch.Tensor] = {}
        for name, (shape, dtype) in specs.items():
            self._allocate(name, shape, dtype)

    def _allocate(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        host = torch.zeros(shape, dtype=dtype, pin_memory=self._pin)
        self.host[name] = host
        self.np[name] = host.numpy()
        self.dev[name] = host if self.device.type == "cpu" else torch.zeros(shape, dtype=dtype, device=self.device)

    def acquire(self, **rows: int) -> None:
        """Make the host buffers writable for a step that uses ``rows[name]`` leading rows."""
        if self._pending:
            self._uploaded.synchronize()  # the previous step's copies have read the host side
            self._pending = False
        for name, n in rows.items():
            capacity = self.host[name].shape[0]
            if n > capacity:
                if not self.growable:
                    raise ValueError(f"buffer {name!r} holds {capacity} rows, the step needs {n}")
                shape = (max(n, 2 * capacity), *self.host[name].shape[1:])
                self._allocate(name, shape, self.host[name].dtype)
        self._sizes = rows

    def upload(self) -> None:
        """Copy the acquired rows of every buffer to the device (non-blocking)."""
        for name, n in self._sizes.items():
            src, dst = self.host[name], self.dev[name]
            if dst is not src and n:
                dst[:n].copy_(src[:n], non_blocking=True)
        if self._uploaded is not None:
            self._uploaded.record(torch.cuda.current_stream(self.device))
            self._pending = True


class DecodeGraphRunner:
    """CUDA graphs of the model forward for decode batches (one token per request).

    ``capture(forward)`` once, after the KV caches are bound; then ``run(...)`` per
    decode step of at most ``max_size`` requests. See the module docstring.
    """

    def __init__(self, *, capture_sizes: Sequence[int], max_blocks_per_req: int, max_model_len: int,
                 block_size: int, device: torch.device, emulate: bool = False) -> None:
        if not capture_sizes or min(capture_sizes) < 1:
            raise ValueError(f"capture_sizes must be a non-empty list of sizes >= 1, got {list(capture_sizes)}")
        self.device = torch.device(device)
        if not emulate and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {self.device} (use emulate=True to test "
                             "the padding and static buffers elsewhere)")
        self.sizes = sorted(set(capture_sizes))
        self.max_size = self.sizes[-1]
        self.block_size = block_size
        self.max_blocks_per_req = max_blocks_per_req
        self.emulate = emulate
        n = self.max_size
        self.buffers = StepBuffers(self.device, {
            "input_ids": ((n,), torch.int64), "positions": ((n,), torch.int64),
            "slot_mapping": ((n,), torch.int64), "seq_lens": ((n,), torch.int32),
            "query_start_loc": ((n + 1,), torch.int32), "block_columns": ((n * max_blocks_per_req,), torch.int32),
        }, growable=False)
        self.block_tables = torch.zeros((n, max_blocks_per_req), dtype=torch.int32, device=self.device)
        # every row a padding row until a step fills it; query_start_loc never changes
        buf = self.buffers
        buf.acquire(**{name: t.shape[0] for name, t in buf.host.items()})
        buf.np["slot_mapping"][:] = -1
        buf.np["seq_lens"][:] = 1
        buf.np["query_start_loc"][:] = np.arange(n + 1)
        buf.upload()
        self._rows = np.arange(n)
        dev, host = buf.dev, buf.host
        self.metadata = {s: AttentionMetadata(
            num_actual_tokens=s, max_query_len=1, max_seq_len=max_model_len,
            query_start_loc=dev["query_start_loc"][: s + 1], seq_lens=dev["seq_lens"][:s],
            block_tables=self.block_tables[:s], slot_mapping=dev["slot_mapping"][:s],
            query_start_loc_cpu=host["query_start_loc"][: s + 1], seq_lens_cpu=host["seq_lens"][:s])
            for s in self.sizes}
        self._forward: ModelForward | None = None
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.capture_seconds = 0.0
        self.num_runs: Counter[int] = Counter()  # padded size -> decode steps run at it

    def padded_size(self, num_reqs: int) -> int | None:
        """The captured size a batch of ``num_reqs`` runs at, or None when it is too large."""
        i = bisect.bisect_left(self.sizes, num_reqs)
        return self.sizes[i] if i < len(self.sizes) and num_reqs >= 1 else None

    @torch.inference_mode()
    def capture(self, forward: ModelForward) -> None:
        """Capture ``forward`` (input_ids, positions, metadata -> hidden states: the model after
        its attention backend's ``prepare``, as the model runner's step does) for every size,
        largest first so the smaller graphs reuse the shared memory pool. The inputs are all
        padding: nothing is written to the KV cache. Emulated, ``forward`` runs each step on the
        size's one metadata object, so it must prepare it each time."""
        self._forward = forward
        if self.emulate:
            return
        start = time.perf_counter()
        dev = self.buffers.dev
        pool = torch.cuda.graph_pool_handle()
        with torch.cuda.device(self.device):
            for s in reversed(self.sizes):
                args = (dev["input_ids"][:s], dev["positions"][:s], self.metadata[s])
                for _ in range(_NUM_WARMUP_RUNS):
                    forward(*args)
                torch.cuda.synchronize(self.device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    output = forward(*args)
                self._graphs[s] = (graph, output)
            torch.cuda.synchronize(self.device)
        self.capture_seconds = time.perf_counter() - start

    def run(self, input_ids: np.ndarray, positions: np.ndarray, block_table: np.ndarray,
            rows: np.ndarray) -> torch.Tensor:
        """The hidden states [n, hidden] of a decode batch: request i feeds ``input_ids[i]``
        at ``positions[i]``, its blocks being ``block_table[rows[i]]`` (the persistent
        batch's table, ``max_blocks_per_req`` wide). The result is a view of the graph's
        static output: read it before the next ``run``."""
        if self._forward is None:
            raise RuntimeError("DecodeGraphRunner.run before capture")
        n = len(rows)
        s = self.padded_size(n)
        if s is None:
            raise ValueError(f"a decode batch of {n} requests exceeds the largest captured size {self.max_size}")
        buf = self.buffers
        width = int(positions.max()) // self.block_size + 1  # the blocks of the longest row
        buf.acquire(input_ids=s, positions=s, slot_mapping=s, seq_lens=s, block_columns=s * width)
        ids, pos, slots = buf.np["input_ids"], buf.np["positions"], buf.np["slot_mapping"]
        seq_lens, tables = buf.np["seq_lens"], buf.np["block_columns"][: s * width].reshape(s, width)
        ids[:n] = input_ids
        pos[:n] = positions
        np.take(block_table[:, :width], rows, axis=0, out=tables[:n])
        np.multiply(tables[self._rows[:n], positions // self.block_size], self.block_size, out=slots[:n],
                    dtype=np.int64)
        slots[:n] += positions % self.block_size
        np.add(positions, 1, out=seq_lens[:n])
        ids[n:s] = 0
        pos[n:s] = 0
        slots[n:s] = -1
        seq_lens[n:s] = 1
        tables[n:s] = 0
        buf.upload()
        self.block_tables[:s, :width].copy_(buf.dev["block_columns"][: s * width].view(s, width))
        self.num_runs[s] += 1
        if self.emulate:
            return self._forward(buf.dev["input_ids"][:s], buf.dev["positions"][:s], self.metadata[s])[:n]
        graph, output = self._graphs[s]
        graph.replay()
        return output[:n]
