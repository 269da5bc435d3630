"""Logprobs on the device, and their conversion to per-request ``Logprobs``.

One row per position (a sampled token, or a prompt token):

    column:     0          1 .. k
    token_ids:  chosen     top-1 .. top-k   (by logprob, descending)
    logprobs:   its lp     their lps
    ranks:      rank of the chosen token (1 = most likely)

The chosen token may also appear among the top-k columns (as in vLLM).
Tensors are computed for k = the batch's largest request; each request is
cut to its own k only when converted to Python lists.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .step import Logprobs


@dataclass(slots=True)
class LogprobsTensors:
    token_ids: torch.Tensor  # int64 [N, k+1]
    logprobs: torch.Tensor  # float32 [N, k+1]
    ranks: torch.Tensor  # int64 [N]

    @property
    def num_logprobs(self) -> int:
        """k: the number of top-k columns after the chosen one."""
        return self.token_ids.shape[1] - 1


def compute_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax in float32. logits: [N, V] -> [N, V]."""
    return torch.log_softmax(logits, dim=-1, dtype=torch.float32)


def compute_logprobs_tensors(logprobs: torch.Tensor, token_ids: torch.Tensor, k: int) -> LogprobsTensors:
    """The chosen tokens' logprobs and ranks plus the top-k of each row.

    logprobs: float32 [N, V]; token_ids: int [N], the chosen token of each row (the
    sampled token, or for prompt logprobs the next prompt token). The rank counts
    strictly better tokens, so tied tokens share the best rank.
    """
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [N, V], got shape {tuple(logprobs.shape)}")
    if token_ids.shape != logprobs.shape[:1]:
        raise ValueError(f"token_ids must be [N] = [{logprobs.shape[0]}], got shape {tuple(token_ids.shape)}")
    vocab_size = logprobs.shape[1]
    if not 0 <= k <= vocab_size:
        raise ValueError(f"k must be in [0, vocab size {vocab_size}], got {k}")
    token_ids = token_ids.to(torch.int64).unsqueeze(1)  # [N, 1]
    token_logprobs = logprobs.gather(1, token_ids)  # [N, 1]
    ranks = (logprobs > token_logprobs).sum(dim=1) + 1  # [N]
    top_logprobs, top_ids = torch.topk(logprobs, k, dim=1)  # [N, k], descending
    return LogprobsTensors(
        token_ids=torch.cat([token_ids, top_ids], dim=1),
        logprobs=torch.cat([token_logprobs, top_logprobs], dim=1).to(torch.float32),
        ranks=ranks.to(torch.int64),
    )


def to_logprobs(tensors: LogprobsTensors, num_per_row: Sequence[int], *,
                merge: bool = False) -> list[Logprobs] | Logprobs:
    """Python lists, each row cut to the chosen token plus its first num_per_row[i] top-k columns.

    merge=False: one single-position ``Logprobs`` per row (rows are requests, as for
    one step's sampled tokens). merge=True: one ``Logprobs`` whose positions are the
    rows (rows are positions of one request, as for prompt logprobs).
    """
    num_rows = tensors.token_ids.shape[0]
    if len(num_per_row) != num_rows:
        raise ValueError(f"num_per_row needs one entry per row ({num_rows}), got {len(num_per_row)}")
    for num in num_per_row:
        if not 0 <= num <= tensors.num_logprobs:
            raise ValueError(f"num_per_row entries must be in [0, {tensors.num_logprobs}] (the tensors' k), "
                             f"got {num}")
    # One device-to-host copy per tensor, then plain list slicing.
    token_ids = [row[:num + 1] for row, num in zip(tensors.token_ids.tolist(), num_per_row)]
    logprobs = [row[:num + 1] for row, num in zip(tensors.logprobs.tolist(), num_per_row)]
    ranks = tensors.ranks.tolist()
    if merge:
        return Logprobs(token_ids=token_ids, logprobs=logprobs, ranks=ranks)
    return [Logprobs(token_ids=[ids], logprobs=[lps], ranks=[rank])
            for ids, lps, rank in zip(token_ids, logprobs, ranks)]
