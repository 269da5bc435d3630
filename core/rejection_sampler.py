"""Verification of draft tokens: one forward pass scores every draft, this keeps a prefix.

A request with k drafts ``d_0 .. d_{k-1}`` gets k + 1 rows of logits: row j is the
target model's distribution for the position of ``d_j`` (given the tokens before it,
the earlier drafts included), row k the one after the last draft.

    rows       0      1      2      3 (bonus)
    draft      d_0    d_1    d_2    -
    accepted   yes    yes    no            -> emitted: d_0 d_1 t_2
                                              (t_2: the corrected token of row 2)

Every row is processed exactly as the plain sampler processes its one row (masks,
penalties over the output so far *including* the earlier drafts, temperature,
min-p, top-k, top-p), so a greedy request emits exactly the tokens it would emit
without drafts, and a sampled one draws from the same distributions:

- greedy row: accept ``d_j`` iff it is the argmax; otherwise emit the argmax;
- random row: accept ``d_j`` with probability ``p_j(d_j)`` (the drafter is
  deterministic, so its own probability is 1); on rejection emit a sample of
  ``p_j`` with ``d_j`` removed (the normalised residual ``max(p_j - q, 0)``);
- all k accepted: one bonus token sampled from row k.

A request with no drafts is one bonus row: the same draw the plain sampler makes.
Stop conditions are applied later by the scheduler, token by token.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .logprobs import LogprobsTensors, compute_logprobs_tensors
from .sampler import NO_TOKEN, exponential_race, mark_rows_without_token, process_logits
from .sampling_metadata import SamplingMetadata

_NEG_INF = float("-inf")


@dataclass(slots=True)
class RejectionOutput:
    # per request: accepted drafts + one corrected or bonus token; the last one is NO_TOKEN
    # when the walk reached a row with no token to sample
    token_ids: list[list[int]]
    # per request: the index of its first row in the logits
    first_rows: list[int]
    # one row per logits row, the chosen token being the one emitted at that position
    # (the draft if accepted, else the corrected/bonus token); None when no row asked
    logprobs: LogprobsTensors | None


class RejectionSampler:
    """Verifies draft tokens against the target model's logits."""

    def __call__(self, logits: torch.Tensor, metadata: SamplingMetadata,
                 draft_token_ids: Sequence[Sequence[int]]) -> RejectionOutput:
        return self.forward(logits, metadata, draft_token_ids)

    def forward(self, logits: torch.Tensor, metadata: SamplingMetadata,
                draft_token_ids: Sequence[Sequence[int]]) -> RejectionOutput:
        """logits: [N, V] with N = sum(len(drafts) + 1); metadata: one row per logits row."""
        num_rows = sum(len(d) + 1 for d in draft_token_ids)
        if logits.dim() != 2 or logits.shape[0] != num_rows:
            raise ValueError(f"logits must be [{num_rows}, V] (one row per draft plus one per request), "
                             f"got shape {tuple(logits.shape)}")
        if metadata.num_rows != num_rows:
            raise ValueError(f"metadata has {metadata.num_rows} rows, logits have {num_rows}")
        device = logits.device
        first_rows: list[int] = []
        drafts_flat: list[int] = []  # per row: its draft token, -1 on bonus rows
        for drafts in draft_token_ids:
            first_rows.append(len(drafts_flat))
            drafts_flat.extend(int(t) for t in drafts)
            drafts_flat.append(-1)
        draft = torch.tensor(drafts_flat, dtype=torch.int64, device=device)  # [N]
        has_draft = draft >= 0

        processed = process_logits(logits, metadata)
        greedy = processed.greedy
        if metadata.all_greedy:
            accepted = has_draft & (greedy == draft)
            emitted = torch.where(accepted, draft, greedy)
        else:
            probs = processed.logits.softmax(dim=-1)  # [N, V]
            safe_draft = draft.clamp_min(0).unsqueeze(1)
            draft_prob = probs.gather(1, safe_draft).squeeze(1)  # [N]
            uniform = self._uniform(num_rows, metadata.generators, [d >= 0 for d in drafts_flat], device)
            passes = uniform < draft_prob
            if greedy is not None:
                passes = torch.where(processed.is_greedy, greedy == draft, passes)
            accepted = has_draft & passes
            # The residual of a deterministic drafter: the target distribution without the draft.
            # A row whose whole mass sits on its draft always accepts it, so it keeps its logits.
            residual = processed.logits.scatter(1, safe_draft, _NEG_INF)
            keep = ~has_draft | (draft_prob >= 1.0)
            residual = torch.where(keep.unsqueeze(1), processed.logits, residual)
            corrected = exponential_race(residual, metadata.generators)
            if greedy is not None:
                corrected = torch.where(processed.is_greedy, greedy, corrected)
            emitted = torch.where(accepted, draft, corrected)

        logprobs = None
        if processed.logprobs is not None:
            logprobs = compute_logprobs_tensors(processed.logprobs, emitted, metadata.max_num_logprobs)
        # A row with no token to sample fails its request if the walk reaches it, exactly
        # where a plain step after the same accepted drafts would.
        emitted = mark_rows_without_token(processed.logits, emitted)
        accepted_list = accepted.tolist()
        emitted_list = emitted.tolist()
        token_ids: list[list[int]] = []
        for first, drafts in zip(first_rows, draft_token_ids):
            tokens = []
            for j in range(len(drafts) + 1):
                tokens.append(emitted_list[first + j])
                if not accepted_list[first + j] or tokens[-1] == NO_TOKEN:
                    break
            token_ids.append(tokens)
        return RejectionOutput(token_ids, first_rows, logprobs)

    @staticmethod
    def _uniform(num_rows: int, generators: dict[int, torch.Generator], has_draft: list[bool],
                 device: torch.device) -> torch.Tensor:
        """U[0, 1) per row; a seeded row with a draft draws from its own generator. Bonus rows
        draw nothing here, so a seeded request without drafts makes exactly the plain sampler's draws."""
        uniform = torch.rand(num_rows, device=device)
        for row, generator in generators.items():
            if has_draft[row]:
                uniform[row] = torch.rand(1, generator=generator, device=device)[0]
        return uniform
