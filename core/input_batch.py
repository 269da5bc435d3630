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
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .sampling_params import SamplingParams
from .step import NewRequestData


@dataclass(slots=True)
class RowState:
    """Per-row Python objects that do not fit a numpy column."""

    req_id: str
    params: SamplingParams
    output_token_ids: list[int]
    generator: torch.Generator | None


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
        self.rows.append(RowState(new.req_id, new.sampling_params, list(new.output_token_ids), generator))
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
        if p.allowed_token_ids and self.disallowed is None:
            self.disallowed = torch.zeros((self.max_num_reqs, self.vocab_size), dtype=torch.bool, device=self.device)
        if self.disallowed is not None:
            self.disallowed[row] = bool(p.allowed_token_ids)
            if p.allowed_token_ids:
                self.disallowed[row, torch.tensor(p.allowed_token_ids, device=self.device)] = False
        return row

    def append_blocks(self, row: int, block_ids: list[int]) -> None:
        start = int(self.num_blocks[row])
        self.block_table[row, start: start + len(block_ids)] = block_ids
        self.num_blocks[row] = start + len(block_ids)

    def append_token(self, row: int, token_id: int) -> None:
        n = int(self.num_tokens[row])
        self.token_ids[row, n] = token_id
        self.num_tokens[row] = n + 1
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
            self.rows.pop()

    def _move(self, src: int, dst: int) -> None:
        self.rows[dst] = self.rows[src]
        self.req_id_to_row[self.rows[dst].req_id] = dst
        n = int(self.num_tokens[src]) + 1
        self.token_ids[dst, :n] = self.token_ids[src, :n]
        nb = int(self.num_blocks[src])
        self.block_table[dst, :nb] = self.block_table[src, :nb]
        for column in (self.num_tokens, self.num_prompt_tokens, self.num_computed_tokens, self.num_blocks,
                       self.temperature, self.top_p, self.top_k, self.min_p, self.presence_penalty,
                       self.frequency_penalty, self.repetition_penalty):
            column[dst] = column[src]
        if self.disallowed is not None:
            self.disallowed[dst] = self.disallowed[src]

    def prompt_token_ids(self, rows: np.ndarray) -> np.ndarray:
        """int64 [len(rows), the longest prompt]: each row's prompt, padded with vocab_size."""
        width = int(self.num_prompt_tokens[rows].max())
        ids = self.token_ids[rows, :width]
        return np.where(np.arange(width)[None, :] < self.num_prompt_tokens[rows, None], ids, self.vocab_size)
