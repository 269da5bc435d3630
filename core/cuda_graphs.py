"""Decode steps replayed from CUDA graphs.

A decode step (every scheduled request brings one new token) is a few hundred small
kernel launches whose cost on the host dwarfs their run time at small batch sizes.
``DecodeGraphRunner`` captures the model forward once per batch size of a ladder at
start-up and replays it: a batch of n requests runs the graph of the smallest
captured size s >= n, the rows n..s-1 padded with dummy requests.

    capture sizes (max_num_seqs 40)   1 2 4 8 16 24 32 40
    a decode batch of 5               runs the graph of 8: rows 5, 6, 7 are padding

The graphs read the runner's input buffers (``input_layout``), which each step
overwrites in place: a graph step is the eager step's layout padded to the captured
size, with padding rows that write nothing to the KV cache and attend to one key of the
reserved null block, and one static ``AttentionMetadata`` per size whose
``num_actual_tokens`` = s, ``max_query_len`` = 1 and ``max_seq_len`` = max_model_len:
everything a backend derives its launch configuration from is then a constant of the
size (the ``triton`` backend's split-KV count, for one, is chosen once at capture from
these values; the kernel handles any real length up to it). The backend's ``prepare``
runs on that metadata at capture; only device work may depend on it. The null block,
which nothing writes, holds finite values, and every op of the model is row-wise, so
padding rows never change a real row. Only the model forward is captured: logits and
sampling run eagerly on the real rows of the graph's static output. Prompt chunks, mixed
batches, drafts (speculative decoding) and prompt logprobs run eagerly.

Graphs are used only on CUDA with an attention backend whose ``supports_cuda_graphs``
is True (its decode path must neither sync with the host nor allocate outside the
graph's pool); ``enforce_eager`` turns them off. ``emulate=True`` (tests) keeps the
static buffers, padding and metadata but calls the forward eagerly instead of
replaying, so the same logic runs on CPU.
"""
from __future__ import annotations

import bisect
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence

import torch

from .attention import AttentionBackend, AttentionMetadata
from .input_layout import InputLayout, StepInputs

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


class DecodeGraphRunner:
    """CUDA graphs of the model forward for decode batches (one token per request).

    ``capture(forward)`` once, after the KV caches are bound; then per decode step of at
    most ``max_size`` requests, the runner lays out its inputs padded to
    ``padded_size(n)`` and calls ``run`` with that size. See the module docstring.
    """

    def __init__(self, *, capture_sizes: Sequence[int], inputs: InputLayout, emulate: bool = False) -> None:
        if not capture_sizes or min(capture_sizes) < 1:
            raise ValueError(f"capture_sizes must be a non-empty list of sizes >= 1, got {list(capture_sizes)}")
        self.device = inputs.device
        if not emulate and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {self.device} (use emulate=True to test "
                             "the padding and static buffers elsewhere)")
        self.sizes = sorted(set(capture_sizes))
        self.max_size = self.sizes[-1]
        self.emulate = emulate
        self.inputs = inputs
        inputs.freeze(self.max_size)
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
        pool = torch.cuda.graph_pool_handle()
        with torch.cuda.device(self.device):
            for s in reversed(self.sizes):
                step = self.inputs.prepare_padding(s)
                args = (step.input_ids, step.positions, step.metadata)
                for _ in range(_NUM_WARMUP_RUNS):
                    forward(*args)
                torch.cuda.synchronize(self.device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    output = forward(*args)
                self._graphs[s] = (graph, output)
            torch.cuda.synchronize(self.device)
        self.capture_seconds = time.perf_counter() - start

    def run(self, step: StepInputs) -> torch.Tensor:
        """The hidden states [s, hidden] of a step laid out at captured size s (its
        ``metadata`` is the size's static one). The result is a view of the graph's static
        output: read it before the next ``run``."""
        if self._forward is None:
            raise RuntimeError("DecodeGraphRunner.run before capture")
        s = step.metadata.num_actual_tokens
        if step.metadata is not self.inputs.static_metadata(s) or s not in self.sizes:
            raise ValueError(f"a graph step must be laid out at a captured size {self.sizes}, padded")
        self.num_runs[s] += 1
        if self.emulate:
            return self._forward(step.input_ids, step.positions, step.metadata)
        graph, output = self._graphs[s]
        graph.replay()
        return output
