"""A step's model inputs, laid out in one place for eager steps and CUDA-graph steps.

The runner hands over the scheduled rows of its persistent batch, how many tokens each
computes and from which position; ``InputLayout.prepare`` writes the flat layout into
persistent staging buffers, copies them to the device and returns the model's inputs
with their ``AttentionMetadata``:

    rows (batch order)     a: decode (1)   b: chunk (4)          c: decode (1)
    input_ids              [a5]           [b0 b1 b2 b3]          [c9]
    positions              [5]            [0  1  2  3]           [9]
    query_start_loc        0              1                      5       6
    seq_lens               6              4                      10

A CUDA-graph step is the same layout padded to the graph's captured size ``s``: the
real rows are written exactly as above (one token each), then rows n..s-1 become
padding, and the metadata is the size's one static object (the graph was captured on
it, so its tensors are views of these same buffers):

    buffer           real row i                          padding row
    input_ids        the request's next input token      0
    positions        its position p                      0
    slot_mapping     its KV slot                         -1 (the KV write skips it)
    seq_lens         p + 1                               1
    query_start_loc  i (one token per row)               i
    block_tables     the request's blocks                column 0 = 0, the reserved null block

    lora_slots       its adapter's device slot (or -1)   -1 (no adapter)

    static metadata: num_actual_tokens = s, max_query_len = 1, max_seq_len = max_model_len

``lora_slots`` (int32, one per token: the device slot of its request's adapter, -1 for the base model) is
laid out only when the runner serves LoRA adapters (``prepare(..., lora_slots=rows' slots)``); a graph
reads the persistent buffer's first s entries, which every step rewrites in place.

Block tables: a step stages only the columns its longest row needs and copies them into
the fixed-width device table ([max_num_reqs, max_blocks_per_req]); an eager step's
metadata views those columns of its rows (a graph step's, every column: its shapes are
fixed at capture). Entries past a row's
``ceil(seq_len / block_size)`` hold whatever earlier steps left there; the attention
contract says a backend never reads them. A padding row reads only column 0.

Buffers grow when an eager step needs more tokens than they hold, unless a CUDA graph
reads them (``freeze``): a captured graph keeps the addresses it was captured with.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .attention import AttentionMetadata


_MAX_CACHED_VIEWS = 1024


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
        self._views: dict[tuple[str, int, bool], torch.Tensor] = {}
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
        self._views = {key: view for key, view in self._views.items() if key[0] != name}

    def view(self, name: str, n: int, *, host: bool = False) -> torch.Tensor:
        """``dev[name][:n]`` (``host[name][:n]`` with ``host``): the same view object from step to step,
        since making a view costs more host time than a small step's whole copy."""
        key = (name, n, host)
        view = self._views.get(key)
        if view is None:
            if len(self._views) >= _MAX_CACHED_VIEWS:  # prefill steps vary in size: keep the cache bounded
                self._views.clear()
            view = self._views[key] = (self.host if host else self.dev)[name][:n]
        return view

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


@dataclass(slots=True)
class StepInputs:
    """One step's model inputs. ``input_ids``/``positions`` and the metadata are device
    tensors (padded for a graph step); ``query_start_loc``/``seq_lens`` are host arrays
    of the real rows, valid until the next ``prepare``."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    metadata: AttentionMetadata
    query_start_loc: np.ndarray  # int32 [n + 1]
    seq_lens: np.ndarray  # int32 [n]
    lora_slots: torch.Tensor | None = None  # int32 [tokens] on the device (padded too), when LoRA is served


class InputLayout:
    """The persistent input buffers of a model runner and the one function that fills them."""

    def __init__(self, *, max_num_tokens: int, max_num_reqs: int, max_blocks_per_req: int, block_size: int,
                 max_model_len: int, device: torch.device) -> None:
        self.device = torch.device(device)
        self.block_size = block_size
        self.max_model_len = max_model_len
        t, r = max_num_tokens, max_num_reqs
        self.buffers = StepBuffers(self.device, {
            "input_ids": ((t,), torch.int64), "positions": ((t,), torch.int64), "slot_mapping": ((t,), torch.int64),
            "seq_lens": ((r,), torch.int32), "query_start_loc": ((r + 1,), torch.int32),
            "block_columns": ((r * max_blocks_per_req,), torch.int32), "lora_slots": ((t,), torch.int32)})
        self.block_tables = torch.zeros((r, max_blocks_per_req), dtype=torch.int32, device=self.device)
        # on CPU the staged columns go straight into the table; on CUDA they are copied on the device
        self._table_np = self.block_tables.numpy() if self.device.type == "cpu" else None
        self._arange = np.arange(max(t, r) + 1, dtype=np.int64)
        self._arange.flags.writeable = False
        self._static: dict[int, AttentionMetadata] = {}
        self._table_views: dict[tuple[int, int], torch.Tensor] = {}

    # ------------------------------------------------------------ graphs

    def freeze(self, max_size: int) -> None:
        """A CUDA graph reads the buffers from now on: they keep their addresses (a step
        needing more tokens than they hold is an error), and the first ``max_size`` rows
        are padding until a step fills them, so a capture writes nothing to the KV cache."""
        if max_size > len(self.buffers.host["seq_lens"]) or max_size > len(self.buffers.host["input_ids"]):
            raise ValueError(f"a graph of {max_size} rows does not fit the step buffers")
        self.buffers.growable = False
        self.prepare_padding(max_size)
        self.buffers.host["lora_slots"].fill_(-1)  # no adapter: a capture with LoRA adds nothing
        self.buffers.dev["lora_slots"].fill_(-1)

    def prepare_padding(self, size: int) -> StepInputs:
        """A step of ``size`` padding rows only (what a graph is captured on)."""
        empty = np.zeros(0, dtype=np.int64)
        return self.prepare(empty, empty.astype(np.int32), empty.astype(np.int32), token_ids=np.zeros((0, 1), np.int64),
                            block_table=np.zeros((0, 1), np.int32), padded_size=size)

    def lora_slots_view(self, num_tokens: int) -> torch.Tensor:
        """The device token-slot buffer's first ``num_tokens`` entries: what a graph captured with LoRA
        reads (-1 from ``freeze`` until a step writes them)."""
        return self.buffers.dev["lora_slots"][:num_tokens]

    def static_metadata(self, size: int) -> AttentionMetadata:
        """The one metadata object of every graph step padded to ``size`` (see the module
        docstring): its tensors are views of the frozen buffers."""
        md = self._static.get(size)
        if md is None:
            dev, host = self.buffers.dev, self.buffers.host
            md = self._static[size] = AttentionMetadata(
                num_actual_tokens=size, max_query_len=1, max_seq_len=self.max_model_len,
                query_start_loc=dev["query_start_loc"][: size + 1], seq_lens=dev["seq_lens"][:size],
                block_tables=self.block_tables[:size], slot_mapping=dev["slot_mapping"][:size],
                query_start_loc_cpu=host["query_start_loc"][: size + 1], seq_lens_cpu=host["seq_lens"][:size])
        return md

    # ------------------------------------------------------------ one step

    def prepare(self, rows: np.ndarray, counts: np.ndarray, starts: np.ndarray, *, token_ids: np.ndarray,
                block_table: np.ndarray, padded_size: int | None = None,
                lora_slots: np.ndarray | None = None) -> StepInputs:
        """Lay out a step: row ``rows[i]`` of ``token_ids``/``block_table`` computes
        ``counts[i]`` tokens from position ``starts[i]``. ``padded_size``: a graph step
        (every count 1) padded to that captured size. ``lora_slots``: int32 [n], row i's adapter
        slot (-1: none), laid out per token when given."""
        n = len(rows)
        total = int(counts.sum())
        is_decode = total == n  # one token per row (every count is >= 1)
        padded = n if padded_size is None else padded_size
        num_tokens = total if padded_size is None else padded_size
        seq_ends = starts + counts
        max_seq_len = int(seq_ends.max()) if n else 0
        width = max(1, (max_seq_len - 1) // self.block_size + 1)  # the longest row's blocks
        if num_tokens >= len(self._arange):
            self._arange = np.arange(2 * num_tokens + 1, dtype=np.int64)
            self._arange.flags.writeable = False
        buf = self.buffers
        lora_rows = {} if lora_slots is None else {"lora_slots": num_tokens}
        buf.acquire(input_ids=num_tokens, positions=num_tokens, slot_mapping=num_tokens, seq_lens=padded,
                    query_start_loc=padded + 1, block_columns=padded * width, **lora_rows)
        query_start_loc = buf.np["query_start_loc"][: padded + 1]
        query_start_loc[0] = 0
        np.cumsum(counts, out=query_start_loc[1: n + 1])
        # flat token layout: request i covers positions starts[i] .. starts[i] + counts[i] - 1
        positions = buf.np["positions"][:num_tokens]
        token_positions = positions[:total]
        if is_decode:  # the layout is the rows themselves: nothing to repeat
            row_of_token = rows
            token_positions[:] = starts
        else:
            row_of_token = np.repeat(rows, counts)
            np.add(self._arange[:total], np.repeat(starts - query_start_loc[:n], counts), out=token_positions)
        input_ids = buf.np["input_ids"][:num_tokens]
        input_ids[:total] = token_ids[row_of_token, token_positions]
        slot_mapping = buf.np["slot_mapping"][:num_tokens]
        np.multiply(block_table[row_of_token, token_positions // self.block_size], self.block_size,
                    out=slot_mapping[:total], dtype=np.int64)
        slot_mapping[:total] += token_positions % self.block_size
        seq_lens = buf.np["seq_lens"][:padded]
        seq_lens[:n] = seq_ends
        if self._table_np is not None:
            tables = self._table_np[:padded, :width]
        else:
            tables = buf.np["block_columns"][: padded * width].reshape(padded, width)
        np.take(block_table[:, :width], rows, axis=0, out=tables[:n])
        if lora_slots is not None:
            token_slots = buf.np["lora_slots"][:num_tokens]
            token_slots[:total] = np.repeat(lora_slots, counts)
            token_slots[total:] = -1
        if padded > n:  # padding rows: one token each, attending to one key of the null block
            input_ids[total:] = 0
            positions[total:] = 0
            slot_mapping[total:] = -1
            seq_lens[n:] = 1
            query_start_loc[n + 1:] = self._arange[total + 1: total + 1 + padded - n]
            tables[n:, 0] = 0
        buf.upload()
        if self._table_np is None:
            self.block_tables[:padded, :width].copy_(buf.dev["block_columns"][: padded * width].view(padded, width))
        if padded_size is not None:
            metadata = self.static_metadata(padded_size)
        else:
            metadata = AttentionMetadata(
                num_actual_tokens=total, max_query_len=1 if is_decode else int(counts.max()), max_seq_len=max_seq_len,
                query_start_loc=buf.view("query_start_loc", n + 1), seq_lens=buf.view("seq_lens", n),
                block_tables=self._table_view(n, width), slot_mapping=buf.view("slot_mapping", total),
                query_start_loc_cpu=buf.view("query_start_loc", n + 1, host=True),
                seq_lens_cpu=buf.view("seq_lens", n, host=True))
        return StepInputs(buf.view("input_ids", num_tokens), buf.view("positions", num_tokens), metadata,
                          query_start_loc[: n + 1], seq_lens[:n],
                          None if lora_slots is None else buf.view("lora_slots", num_tokens))

    def _table_view(self, n: int, width: int) -> torch.Tensor:
        """``block_tables[:n, :width]``, kept from step to step like the buffers' views."""
        view = self._table_views.get((n, width))
        if view is None:
            if len(self._table_views) >= _MAX_CACHED_VIEWS:
                self._table_views.clear()
            view = self._table_views[(n, width)] = self.block_tables[:n, :width]
        return view
