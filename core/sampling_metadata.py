"""Per-step sampling state for a batch: what the sampler needs, one row per request.

The model runner builds it from its persistent batch each step. Everything is
already extracted per row (no ``SamplingParams`` in here), and a field that no
row uses is ``None`` or empty, so the sampler skips that stage entirely.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

# A temperature below this is greedy (vLLM's _SAMPLING_EPS): dividing by it would
# overflow, and the distribution is a point mass on the argmax anyway.
SAMPLING_EPS = 1e-5

# vLLM's values: what sample logprobs report, taken from the raw logits or after masks, bias,
# penalties and temperature; as log-softmax values or as the logits themselves
LogprobsMode = Literal["raw_logprobs", "raw_logits", "processed_logprobs", "processed_logits"]
LOGPROBS_MODES: tuple[str, ...] = LogprobsMode.__args__
LOGPROBS_MODE_ALIASES = {"raw": "raw_logprobs", "processed": "processed_logprobs"}


@dataclass(slots=True)
class SamplingMetadata:
    """Sampling inputs for a batch of B rows over a vocabulary of V tokens.

    Per-row tensors live on the logits' device. A row is greedy when its
    temperature is below ``SAMPLING_EPS`` (the runner writes 0.0).
    """

    temperature: torch.Tensor  # float32 [B]
    all_greedy: bool
    all_random: bool

    # Truncation, random rows only. None = no row uses it.
    top_p: torch.Tensor | None = None  # float32 [B]; 1.0 = off for that row
    top_k: torch.Tensor | None = None  # int [B]; 0 or -1 = off for that row
    min_p: torch.Tensor | None = None  # float32 [B]; 0.0 = off for that row

    # row -> that request's generator, on the logits' device. A seeded row draws its
    # noise only from here, so its token does not depend on the rest of the batch.
    generators: dict[int, torch.Generator] = field(default_factory=dict)

    # Penalties, vLLM semantics: repetition looks at prompt + output tokens,
    # presence and frequency at output tokens only. None = no row uses it.
    presence_penalties: torch.Tensor | None = None  # float32 [B]; 0.0 = off
    frequency_penalties: torch.Tensor | None = None  # float32 [B]; 0.0 = off
    repetition_penalties: torch.Tensor | None = None  # float32 [B]; 1.0 = off
    prompt_token_ids: torch.Tensor | None = None  # int64 [B, max_prompt_len], padded with V

    output_token_ids: list[list[int]] = field(default_factory=list)  # per row, generated so far

    # row -> (min_tokens, stop ids incl. eos): the stop ids are forbidden while the
    # row has fewer than min_tokens output tokens.
    min_tokens: dict[int, tuple[int, set[int]]] = field(default_factory=dict)
    logit_bias: list[dict[int, float] | None] = field(default_factory=list)  # per row, or empty
    allowed_token_ids_mask: torch.Tensor | None = None  # bool [B, V]; True = NOT allowed
    # row -> bad words as token sequences (the engine tokenized the strings)
    bad_words_token_ids: dict[int, list[list[int]]] = field(default_factory=dict)

    max_num_logprobs: int | None = None  # max k over rows asking for logprobs; None = no row
    # "raw_*": of the model's logits (the V1 default). "processed_*": after masks, bias,
    # penalties and temperature, before min-p/top-k/top-p truncation. "raw"/"processed": aliases.
    logprobs_mode: LogprobsMode = "raw_logprobs"

    def __post_init__(self) -> None:
        self.logprobs_mode = LOGPROBS_MODE_ALIASES.get(self.logprobs_mode, self.logprobs_mode)
        if self.logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode must be one of {list(LOGPROBS_MODES)}, got {self.logprobs_mode!r}")
        if self.max_num_logprobs is not None and self.max_num_logprobs < 0:
            raise ValueError(f"max_num_logprobs must be >= 0 or None, got {self.max_num_logprobs}")

    @property
    def num_rows(self) -> int:
        return self.temperature.shape[0]

    @property
    def has_penalties(self) -> bool:
        return (self.presence_penalties is not None or self.frequency_penalties is not None
                or self.repetition_penalties is not None)
