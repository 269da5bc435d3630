"""The ``ngram`` drafter: prompt lookup, as in vLLM V1.

For each request, find the longest suffix of its tokens (``n`` between
``prompt_lookup_min`` and ``prompt_lookup_max``) that also occurs earlier in the
same tokens, and propose what followed the earliest such occurrence:

    index    0  1  2  3  4  5
    tokens   1  2  3  4  2  3
                ====     ====    suffix [2 3] (n = 2) and its earliest earlier occurrence, ending at e = 2
                      -------    draft = tokens[e+1 : e+1+k] = [4 2 3]  (k = 4, cut at the last token)

The draft may run into the suffix itself (as above) but stops at the last token.

Algorithm: grow the match one token at a time, keeping the candidate end
positions ``e < last`` whose preceding tokens still equal the suffix: start with
every ``e`` where ``tokens[e] == tokens[-1]``; at length ``n`` keep those with
``tokens[e - n] == tokens[-1 - n]``; stop when none is left or ``n`` reaches
``prompt_lookup_max``. The last non-empty set holds the occurrences of the
longest matching suffix in order, so its first entry is the earliest. These are
numpy passes over the surviving candidates, which thin out fast in ordinary
text. In periodic text (a run of one token) they do not, and the passes would
cost ``N * prompt_lookup_max``; past a budget of ``8 * N`` candidate visits the
drafter switches to KMP on the reversed tokens (the pattern is the reversed
suffix, capped at ``prompt_lookup_max``), a Python loop that is ``O(N)``
whatever the text. Either way the work per request is linear in ``N``.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, model_validator

from tokenmill import Drafter

# A candidate visit in numpy costs ~1/40 of a KMP loop step (measured), so 8 visits per
# token keep ordinary text on the fast path and cap the waste before the fallback at ~20%.
_VISITS_PER_TOKEN = 8


class NgramDrafter(Drafter):
    """Prompt-lookup drafter; needs no model, proposes from each request's own tokens."""

    name = "ngram"

    class Options(BaseModel):
        """vLLM's names. One bound given: both are it; none: both are 5."""

        model_config = ConfigDict(extra="forbid", frozen=True)
        prompt_lookup_min: int | None = None
        prompt_lookup_max: int | None = None

        @model_validator(mode="after")
        def _bounds(self) -> "NgramDrafter.Options":
            lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
            lo, hi = (5, 5) if lo is None and hi is None else (hi if lo is None else lo, lo if hi is None else hi)
            if lo < 1:
                raise ValueError(f"prompt_lookup_min must be >= 1, got {lo}")
            if lo > hi:
                raise ValueError(f"prompt_lookup_min ({lo}) must be <= prompt_lookup_max ({hi})")
            object.__setattr__(self, "prompt_lookup_min", lo)  # frozen: set once, here
            object.__setattr__(self, "prompt_lookup_max", hi)
            return self

    def __init__(self, options: Any = None, *, num_speculative_tokens: int = 1) -> None:
        super().__init__(options, num_speculative_tokens=num_speculative_tokens)
        self.min_n = self.options.prompt_lookup_min
        self.max_n = self.options.prompt_lookup_max

    @classmethod
    def capabilities(cls) -> dict[str, Any]:
        return {"method": cls.name,
                "options": ["num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max"]}

    def propose(self, token_ids: Sequence[Sequence[int]],
                max_num_tokens: Sequence[int]) -> list[list[int]]:
        if len(token_ids) != len(max_num_tokens):
            raise ValueError(f"token_ids has {len(token_ids)} requests but max_num_tokens has "
                             f"{len(max_num_tokens)}; they must match")
        drafts = []
        for i, (tokens, limit) in enumerate(zip(token_ids, max_num_tokens)):
            if limit < 0:
                raise ValueError(f"max_num_tokens[{i}] must be >= 0, got {limit}")
            tokens = np.asarray(tokens)
            if tokens.ndim != 1:
                raise ValueError(f"token_ids[{i}] must be a 1-D token sequence, got shape {tokens.shape}")
            drafts.append(self._propose_one(tokens, min(self.num_speculative_tokens, int(limit))))
        return drafts

    def _propose_one(self, tokens: np.ndarray, limit: int) -> list[int]:
        # An earlier occurrence of a length-n suffix needs at least n + 1 tokens.
        if limit == 0 or tokens.size < self.min_n + 1:
            return []
        n, end = self._longest_suffix_match(tokens)
        if n < self.min_n:
            return []
        return tokens[end + 1:end + 1 + limit].tolist()

    def _longest_suffix_match(self, tokens: np.ndarray) -> tuple[int, int]:
        """(n, e): the longest suffix length n <= max_n that occurs earlier, and the end
        index e of its earliest earlier occurrence; n == 0 when the last token is new."""
        budget = _VISITS_PER_TOKEN * tokens.size
        ends = np.flatnonzero(tokens[:-1] == tokens[-1])  # occurrences of the length-1 suffix
        n, best = 0, ends
        while ends.size and n < self.max_n:
            n, best = n + 1, ends
            budget -= ends.size
            if n == self.max_n:
                break
            if budget < 0:
                return _kmp_longest_suffix_match(tokens.tolist(), self.max_n)
            ends = ends[ends >= n]  # the occurrence must start at index >= 0
            if ends.size:
                ends = ends[tokens[ends - n] == tokens[-1 - n]]
        return n, int(best[0]) if n else -1


def _kmp_longest_suffix_match(tokens: list[int], max_n: int) -> tuple[int, int]:
    """``NgramDrafter._longest_suffix_match`` in O(N) for any text.

    KMP over ``rev = tokens[::-1]`` with the pattern ``rev[:max_n]`` (the reversed
    suffix): after reading ``rev[i]``, ``n`` is the longest suffix that occurs
    reversed at ``rev[i-n+1 .. i]``, i.e. at original indices ``N-1-i .. N-2-i+n``.
    """
    rev = tokens[::-1]
    border = [0] * max_n  # border[j]: longest proper border of rev[:j + 1]
    n = best_n = best_i = 0
    for i in range(1, len(rev)):
        while n and rev[i] != rev[n]:
            n = border[n - 1]
        if rev[i] == rev[n]:
            n += 1
            if n >= best_n:  # ">=": a later i here is an earlier occurrence in tokens
                best_n, best_i = n, i
            if i < max_n:
                border[i] = n
            if n == max_n:
                n = border[n - 1]
    return best_n, len(rev) - 2 - best_i + best_n
