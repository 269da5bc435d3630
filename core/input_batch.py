"""The persistent input batch: one row per running request, kept across steps.

Rows are added when a request is first scheduled (or resumed) and removed
when it finishes or is preempted; the holes are filled by moving the last
rows down, so rows stay dense and most rows never move. Token ids, block
tables and sampling parameters live in preallocated numpy arrays that are
updated in place, not rebuilt each step.

    row:          0      1      2
    req_ids:     [a]    [c]    [d]          (b finished: d moved into its hole)
    token_ids:   prompt + output so far (+ draft tokens past num_tokens)
    block_table: the request's KV block ids

Sampling state is kept here too, so a step gathers its rows instead of rebuilding it:
the scalar parameters are numpy columns mirrored on the device (refreshed once per step,
only after rows changed; on CPU the mirror is the column itself), the allowed-token mask
is a device tensor, and ``rows_using`` names the rows that use each ragged feature, so
the per-row Python work of a step covers those rows only.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .lora_request import LoRARequest
from .sampling_params import SamplingParams
from .step import NewRequestData


@dataclass(slots=True)
class RowState:
    """Per-row Python objects that do not fit a numpy column."""

    req_id: str
    params: SamplingParams
    output_token_ids: list[int]
    generator: torch.Generator | None
    lora_request: LoRARequest | None = None  # the adapter its tokens run with (None: the base model)


# the per-row scalar sampling parameters, with the value that means "off"
SAMPLING_COLUMNS = {"temperature": None, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "presence_penalty": 0.0,
                    "frequency_penalty": 0.0, "repetition_penalty": 1.0}
# features whose state is ragged per row (Python objects): a step visits only the rows that use them
# ("lora": the rows with a LoRA adapter)
RAGGED_FEATURES = ("generator", "min_tokens", "logit_bias", "bad_words", "logprobs", "allowed_token_ids", "lora")


class InputBatch:
    def __init__(self, *, max_num_reqs: int, max_model_len: int, max_blocks_per_req: int, vocab_size: int = 0,
                 device: torch.device | str = "cpu") -> None:
        self.max_num_reqs = max_num_reqs
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.max_model_len = max_model_len
        self.max_blocks_per_req = max_blocks_per_req
        self.rows: list[RowState] = []
        self.req_id_to_row: dict[str, int] = {}
        n = max_num_reqs
        self.token_ids = np.zeros((n, self.max_model_len + 1), dtype=np.int64)
        self.num_tokens = np.zeros(n, dtype=np.int32)  # prompt + output (no drafts)
        self.num_prompt_tokens = np.zeros(n, dtype=np.int32)
        self.num_computed_tokens = np.zeros(n, dtype=np.int32)
        self.block_table = np.zeros((n, self.max_blocks_per_req), dtype=np.int32)
        self.num_blocks = np.zeros(n, dtype=np.int32)
        self.temperature = np.zeros(n, dtype=np.float32)
        self.top_p = np.ones(n, dtype=np.float32)
        self.top_k = np.zeros(n, dtype=np.int64)
        self.min_p = np.zeros(n, dtype=np.float32)
        self.presence_penalty = np.zeros(n, dtype=np.float32)
        self.frequency_penalty = np.zeros(n, dtype=np.float32)
        self.repetition_penalty = np.ones(n, dtype=np.float32)
        # Python reads and writes one element per row per step: memoryviews of the same buffers take
        # a fraction of numpy's time per element
        self._token_ids_view = memoryview(self.token_ids)
        self._num_tokens_view = memoryview(self.num_tokens)
        # each column's device mirror; on CPU the column itself
        self._device_columns = {name: self._mirror(getattr(self, name)) for name in SAMPLING_COLUMNS}
        self._columns_changed = False
        # column -> the rows whose value is not "off" (moved with their row): a step over the whole
        # batch learns which columns it needs without reading them
        self._rows_setting: dict[str, set[int]] = {name: set() for name, off in SAMPLING_COLUMNS.items()
                                                   if off is not None}
        self._arange = np.arange(n)
        self._device_arange = torch.arange(n, device=self.device)
        self._whole_views: dict[tuple[str, int], torch.Tensor] = {}  # (column or "index", n) -> its first n rows
        # ragged feature -> the rows that use it (moved with their row)
        self.rows_using: dict[str, set[int]] = {feature: set() for feature in RAGGED_FEATURES}
        # bool [max_num_reqs, vocab_size] on the device, True = not allowed: written when a row
        # is added (only once some request has allowed_token_ids) and moved with it, so a step
        # gathers its rows instead of rebuilding [B, V] masks
        self.disallowed: torch.Tensor | None = None

    @property
    def num_reqs(self) -> int:
        return len(self.rows)

    def add_request(self, new: NewRequestData, generator: torch.Generator | None) -> int:
        row = len(self.rows)
        if row >= self.max_num_reqs:
            raise RuntimeError(f"input batch is full ({self.max_num_reqs} rows)")
        tokens = [*new.prompt_token_ids, *new.output_token_ids]
        self.rows.append(RowState(new.req_id, new.sampling_params, list(new.output_token_ids), generator,
                                  new.lora_request))
        self.req_id_to_row[new.req_id] = row
        self.token_ids[row, : len(tokens)] = tokens
        self.num_tokens[row] = len(tokens)
        self.num_prompt_tokens[row] = len(new.prompt_token_ids)
        self.num_computed_tokens[row] = new.num_computed_tokens
        self.num_blocks[row] = 0
        self.append_blocks(row, new.block_ids)
        p = new.sampling_params
        self.temperature[row] = 0.0 if p.temperature < 1e-5 else p.temperature
        self.top_p[row] = p.top_p
        self.top_k[row] = max(p.top_k, 0)
        self.min_p[row] = p.min_p
        self.presence_penalty[row] = p.presence_penalty
        self.frequency_penalty[row] = p.frequency_penalty
        self.repetition_penalty[row] = p.repetition_penalty
        self._columns_changed = True
        used = {"generator": generator is not None, "min_tokens": p.min_tokens > 0, "logit_bias": bool(p.logit_bias),
                "bad_words": bool(p.bad_words_token_ids), "logprobs": p.logprobs is not None,
                "allowed_token_ids": bool(p.allowed_token_ids), "lora": new.lora_request is not None}
        for feature, rows in self.rows_using.items():
            (rows.add if used[feature] else rows.discard)(row)
        for name, rows in self._rows_setting.items():
            (rows.add if getattr(self, name)[row] != SAMPLING_COLUMNS[name] else rows.discard)(row)
        if p.allowed_token_ids and self.disallowed is None:
            self.disallowed = torch.zeros((self.max_num_reqs, self.vocab_size), dtype=torch.bool, device=self.device)
        if self.disallowed is not None:
            self.disallowed[row] = bool(p.allowed_token_ids)
            if p.allowed_token_ids:
                self.disallowed[row, torch.tensor(p.allowed_token_ids, device=self.device)] = False
        return row

    def append_blocks(self, row: int, block_ids: list[int]) -> None:
        if not block_ids:  # most steps of a running request allocate no block
            return
        start = int(self.num_blocks[row])
        self.block_table[row, start: start + len(block_ids)] = block_ids
        self.num_blocks[row] = start + len(block_ids)

    def append_token(self, row: int, token_id: int) -> None:
        n = self._num_tokens_view[row]
        self._token_ids_view[row, n] = token_id
        self._num_tokens_view[row] = n + 1
        self.rows[row].output_token_ids.append(token_id)

    def remove_requests(self, req_ids: set[str]) -> None:
        """Drop rows, then fill each hole with the current last row."""
        for req_id in req_ids:
            row = self.req_id_to_row.pop(req_id, None)
            if row is None:
                continue
            last = len(self.rows) - 1
            if row != last:
                self._move(last, row)
            for rows in (*self.rows_using.values(), *self._rows_setting.values()):
                rows.discard(last)
            self.rows.pop()

    def _move(self, src: int, dst: int) -> None:
        self.rows[dst] = self.rows[src]
        self.req_id_to_row[self.rows[dst].req_id] = dst
        n = int(self.num_tokens[src]) + 1
        self.token_ids[dst, :n] = self.token_ids[src, :n]
        nb = int(self.num_blocks[src])
        self.block_table[dst, :nb] = self.block_table[src, :nb]
        for column in (self.num_tokens, self.num_prompt_tokens, self.num_computed_tokens, self.num_blocks,
                       *(getattr(self, name) for name in SAMPLING_COLUMNS)):
            column[dst] = column[src]
        self._columns_changed = True
        for rows in (*self.rows_using.values(), *self._rows_setting.values()):
            (rows.add if src in rows else rows.discard)(dst)
        if self.disallowed is not None:
            self.disallowed[dst] = self.disallowed[src]

    def _mirror(self, column: np.ndarray) -> torch.Tensor:
        host = torch.from_numpy(column)
        return host if self.device.type == "cpu" else torch.zeros(host.shape, dtype=host.dtype, device=self.device)

    def sampling_columns(self, rows: np.ndarray) -> tuple[dict[str, torch.Tensor | None], torch.Tensor]:
        """The scalar sampling parameters of ``rows`` (a row may repeat) as device tensors,
        a column being None when none of these rows uses it; and ``rows`` on the device.
        The device mirror is refreshed here, once, when rows were added or moved."""
        n = self.num_reqs
        if self._columns_changed and self.device.type != "cpu":
            for name in SAMPLING_COLUMNS:
                self._device_columns[name][:n].copy_(torch.from_numpy(getattr(self, name)[:n]), non_blocking=True)
        self._columns_changed = False
        whole = len(rows) == n and bool((rows == self._arange[:n]).all())  # the common decode step: no gather
        index = self._whole_view("index", n) if whole else torch.from_numpy(rows).to(self.device, non_blocking=True)
        columns = {}
        for name, off in SAMPLING_COLUMNS.items():
            setting = self._rows_setting.get(name)
            if setting is not None and (not setting or not whole and not (getattr(self, name)[rows] != off).any()):
                columns[name] = None
            else:
                columns[name] = self._whole_view(name, n) if whole else self._device_columns[name][index]
        return columns, index

    def _whole_view(self, name: str, n: int) -> torch.Tensor:
        """The first ``n`` rows of a column's device mirror (or of ``arange``: "index"), the same view
        object from step to step."""
        view = self._whole_views.get((name, n))
        if view is None:
            whole = self._device_arange if name == "index" else self._device_columns[name]
            view = self._whole_views[(name, n)] = whole[:n]
        return view

    def prompt_token_ids(self, rows: np.ndarray) -> np.ndarray:
        """int64 [len(rows), the longest prompt]: each row's prompt, padded with vocab_size."""
        width = int(self.num_prompt_tokens[rows].max())
        ids = self.token_ids[rows, :width]
        return np.where(np.arange(width)[None, :] < self.num_prompt_tokens[rows, None], ids, self.vocab_size)
