"""The sampler: logits [B, V] -> one token per row, plus logprobs, in vLLM V1 order.

    logits ──► raw logprobs / logits            (logprobs_mode "raw_logprobs" / "raw_logits")
      │
      ├─ allowed_token_ids mask, bad words, min_tokens, logit_bias
      ├─ penalties: repetition (prompt + output), frequency and presence (output)
      │
      ├─ greedy rows: argmax  (temperature, min-p, top-k and top-p do not apply)
      └─ random rows: / temperature ──► processed ("processed_logprobs" / "processed_logits")
                      ──► min-p ──► top-k, top-p ──► exponential race

Everything is batched tensor code; Python loops run only over the rows that use
a ragged feature (bad words, min_tokens, logit_bias) or a seeded generator.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .logprobs import LogprobsTensors, compute_logprobs, compute_logprobs_tensors, to_logprobs
from .sampling_metadata import SAMPLING_EPS, SamplingMetadata

# The sampler's public face: the model runner needs nothing else from the three modules.
__all__ = [
    "LogprobsTensors", "ProcessedLogits", "Sampler", "SamplerOutput", "SamplingMetadata", "apply_logits_processors",
    "apply_min_p", "apply_top_k_top_p", "compute_logprobs", "compute_logprobs_tensors",
    "exponential_race", "mark_rows_without_token", "NO_TOKEN", "process_logits", "to_logprobs",
]

_NEG_INF = float("-inf")
# The token id of a row that has none to sample: its masks exclude every token (say a grammar
# and min_tokens that contradict each other), or its logits hold no finite value.
NO_TOKEN = -1


@dataclass(slots=True)
class SamplerOutput:
    sampled_token_ids: torch.Tensor  # int64 [B]; NO_TOKEN for a row with no token to sample
    logprobs: LogprobsTensors | None  # k = metadata.max_num_logprobs; None when no row asked


@dataclass(slots=True)
class ProcessedLogits:
    """Logits ready to draw from, one row per metadata row (see the module diagram)."""

    logits: torch.Tensor  # float32 [B, V]: masked and penalised; random rows also / temperature, truncated
    greedy: torch.Tensor | None  # int64 [B]: argmax after masks and penalties; None when every row is random
    is_greedy: torch.Tensor  # bool [B]
    logprobs: torch.Tensor | None  # float32 [B, V] in the metadata's logprobs_mode; None when no row asked


def process_logits(logits: torch.Tensor, metadata: SamplingMetadata) -> ProcessedLogits:
    """Everything before the draw, shared by the sampler and the rejection sampler so that a
    verified draft position sees exactly the distribution a plain step would. Does not modify
    the caller's logits."""
    # [B, V] in float32; the stages below work in place, so on a copy, unless none of them runs
    logits = logits.to(torch.float32, copy=not metadata.all_greedy or _has_logits_processors(metadata))
    wants_logprobs = metadata.max_num_logprobs is not None
    mode = metadata.logprobs_mode

    def scores(values: torch.Tensor) -> torch.Tensor:  # what the mode reports: log-softmax, or the logits
        return values.clone() if mode.endswith("_logits") else compute_logprobs(values)

    logprobs = scores(logits) if wants_logprobs and mode.startswith("raw_") else None

    apply_logits_processors(logits, metadata)
    greedy = None if metadata.all_random else logits.argmax(dim=-1)
    is_greedy = metadata.temperature < SAMPLING_EPS  # [B]
    if not metadata.all_greedy:
        # Greedy rows divide by 1: their processed logprobs carry no temperature.
        logits.div_(metadata.temperature.masked_fill(is_greedy, 1.0).unsqueeze(1))
    # Processed logprobs are taken before truncation: after min-p/top-k/top-p most
    # entries would be -inf and the top-k columns and ranks would say nothing.
    if wants_logprobs and logprobs is None:
        logprobs = scores(logits)
    if not metadata.all_greedy:
        if metadata.min_p is not None:
            apply_min_p(logits, metadata.min_p)
        logits = apply_top_k_top_p(logits, metadata.top_k, metadata.top_p)
    return ProcessedLogits(logits, greedy, is_greedy, logprobs)


class Sampler:
    """Samples one token per row. Does not modify the caller's logits."""

    def __call__(self, logits: torch.Tensor, metadata: SamplingMetadata) -> SamplerOutput:
        return self.forward(logits, metadata)

    def forward(self, logits: torch.Tensor, metadata: SamplingMetadata) -> SamplerOutput:
        _check_inputs(logits, metadata)
        processed = process_logits(logits, metadata)
        if metadata.all_greedy:
            sampled = processed.greedy
        else:
            sampled = exponential_race(processed.logits, metadata.generators)
            if processed.greedy is not None:
                sampled = torch.where(processed.is_greedy, processed.greedy, sampled)
        logprobs = None
        if processed.logprobs is not None:
            logprobs = compute_logprobs_tensors(processed.logprobs, sampled, metadata.max_num_logprobs)
        return SamplerOutput(mark_rows_without_token(processed.logits, sampled), logprobs)


def mark_rows_without_token(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """``token_ids`` [B] with NO_TOKEN where the chosen token's logit in ``logits`` [B, V] (the
    processed ones it was drawn from) is not finite. Argmax and the exponential race pick a
    finite logit whenever the row has one, so this finds exactly the rows with none, at the
    cost of a gather."""
    chosen = logits.gather(1, token_ids.unsqueeze(1)).squeeze(1)  # [B]
    return torch.where(torch.isfinite(chosen), token_ids, NO_TOKEN)


def _check_inputs(logits: torch.Tensor, metadata: SamplingMetadata) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, V], got shape {tuple(logits.shape)}")
    num_rows = logits.shape[0]
    if metadata.num_rows != num_rows:
        raise ValueError(f"metadata.temperature has {metadata.num_rows} rows, logits have {num_rows}")
    uses_outputs = metadata.has_penalties or metadata.bad_words_token_ids or metadata.min_tokens
    if uses_outputs and len(metadata.output_token_ids) != num_rows:
        raise ValueError(f"metadata.output_token_ids needs one list per row ({num_rows}), "
                         f"got {len(metadata.output_token_ids)}")
    if metadata.logit_bias and len(metadata.logit_bias) != num_rows:
        raise ValueError(f"metadata.logit_bias needs one entry per row ({num_rows}), "
                         f"got {len(metadata.logit_bias)}")


# ---------------------------------------------------------------- logits processors

def _has_logits_processors(metadata: SamplingMetadata) -> bool:
    """Whether ``apply_logits_processors`` changes anything for this batch."""
    return (metadata.allowed_token_ids_mask is not None or bool(metadata.bad_words_token_ids)
            or bool(metadata.min_tokens) or any(metadata.logit_bias) or metadata.has_penalties)


def apply_logits_processors(logits: torch.Tensor, metadata: SamplingMetadata) -> None:
    """Masks, bias and penalties, in place on float32 logits [B, V] (vLLM V1 order)."""
    if metadata.allowed_token_ids_mask is not None:
        logits.masked_fill_(metadata.allowed_token_ids_mask, _NEG_INF)
    if metadata.bad_words_token_ids:
        _apply_bad_words(logits, metadata.bad_words_token_ids, metadata.output_token_ids)
    if metadata.min_tokens:
        _apply_min_tokens(logits, metadata.min_tokens, metadata.output_token_ids)
    if any(metadata.logit_bias):
        _apply_logit_bias(logits, metadata.logit_bias)
    if metadata.has_penalties:
        _apply_penalties(logits, metadata)


def _index_put(logits: torch.Tensor, rows: list[int], tokens: list[int], values: float | list[float],
               *, accumulate: bool, what: str) -> None:
    """logits[rows[i], tokens[i]] = (or +=) values[i], as one device op."""
    if not tokens:
        return
    vocab_size = logits.shape[1]
    for token in (min(tokens), max(tokens)):
        if not 0 <= token < vocab_size:
            raise ValueError(f"{what} token id {token} is out of range for vocab size {vocab_size}")
    index = (torch.tensor(rows, device=logits.device), torch.tensor(tokens, device=logits.device))
    values_t = torch.tensor(values, dtype=logits.dtype, device=logits.device)  # scalar broadcasts
    logits.index_put_(index, values_t, accumulate=accumulate)


def _apply_bad_words(logits: torch.Tensor, bad_words: dict[int, list[list[int]]],
                     output_token_ids: Sequence[Sequence[int]]) -> None:
    """A bad word's last token is banned when the output so far ends with the rest of it."""
    rows: list[int] = []
    tokens: list[int] = []
    for row, words in bad_words.items():
        past = list(output_token_ids[row])
        for word in words:
            if not word:
                raise ValueError(f"bad word token sequences must not be empty (row {row})")
            prefix = list(word[:-1])
            if len(prefix) <= len(past) and past[len(past) - len(prefix):] == prefix:
                rows.append(row)
                tokens.append(word[-1])
    _index_put(logits, rows, tokens, _NEG_INF, accumulate=False, what="bad word")


def _apply_min_tokens(logits: torch.Tensor, min_tokens: dict[int, tuple[int, set[int]]],
                      output_token_ids: Sequence[Sequence[int]]) -> None:
    rows: list[int] = []
    tokens: list[int] = []
    for row, (num_min_tokens, stop_ids) in min_tokens.items():
        if len(output_token_ids[row]) < num_min_tokens:
            rows.extend([row] * len(stop_ids))
            tokens.extend(stop_ids)
    _index_put(logits, rows, tokens, _NEG_INF, accumulate=False, what="min_tokens stop")


def _apply_logit_bias(logits: torch.Tensor, logit_bias: Sequence[dict[int, float] | None]) -> None:
    rows: list[int] = []
    tokens: list[int] = []
    values: list[float] = []
    for row, bias in enumerate(logit_bias):
        for token, value in (bias or {}).items():
            rows.append(row)
            tokens.append(token)
            values.append(float(value))
    _index_put(logits, rows, tokens, values, accumulate=True, what="logit_bias")


def _apply_penalties(logits: torch.Tensor, metadata: SamplingMetadata) -> None:
    num_rows, vocab_size = logits.shape
    output_counts = _output_token_counts(metadata.output_token_ids, vocab_size, logits)  # [B, V]
    output_mask = output_counts > 0  # [B, V]
    if metadata.repetition_penalties is not None:
        if metadata.prompt_token_ids is None:
            raise ValueError("repetition_penalties need prompt_token_ids (the penalty covers prompt tokens)")
        # Padding is vocab_size: scatter into one spare column, then drop it.
        seen = torch.zeros(num_rows, vocab_size + 1, dtype=torch.bool, device=logits.device)
        seen.scatter_(1, metadata.prompt_token_ids.to(torch.int64), True)
        seen = seen[:, :vocab_size] | output_mask
        penalty = torch.where(seen, metadata.repetition_penalties.unsqueeze(1), 1.0)  # [B, V]
        # Dividing positive and multiplying negative logits both make the token less likely.
        logits.copy_(torch.where(logits > 0, logits / penalty, logits * penalty))
    if metadata.frequency_penalties is not None:
        logits.sub_(metadata.frequency_penalties.unsqueeze(1) * output_counts)
    if metadata.presence_penalties is not None:
        logits.sub_(metadata.presence_penalties.unsqueeze(1) * output_mask)


def _output_token_counts(output_token_ids: Sequence[Sequence[int]], vocab_size: int,
                         like: torch.Tensor) -> torch.Tensor:
    """How often each token occurs in each row's output: [B, V], dtype of ``like``."""
    max_len = max((len(ids) for ids in output_token_ids), default=0)
    padded = torch.tensor([list(ids) + [vocab_size] * (max_len - len(ids)) for ids in output_token_ids],
                          dtype=torch.int64).reshape(len(output_token_ids), max_len)  # [B, L]
    padded = padded.to(like.device, non_blocking=True)
    counts = torch.zeros(len(output_token_ids), vocab_size + 1, dtype=like.dtype, device=like.device)
    counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=like.dtype))
    return counts[:, :vocab_size]


# ---------------------------------------------------------------- truncation and sampling

def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> None:
    """In place: drops tokens with p < min_p * p_max (row-wise). min_p: [B], 0 = off."""
    probs = logits.softmax(dim=-1)  # [B, V]
    threshold = min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)  # [B, 1]
    logits.masked_fill_(probs < threshold, _NEG_INF)


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None,
                      top_p: torch.Tensor | None) -> torch.Tensor:
    """Sets every token outside a row's top-k and top-p nucleus to -inf.

    top_k: int [B], 0 or -1 = off; ties with the k-th logit are kept. top_p: [B],
    1.0 = off; keeps the smallest set of best tokens whose mass reaches p, and
    always the best token. May work in place; use the returned tensor.
    """
    vocab_size = logits.shape[1]
    if top_k is not None:
        top_k = top_k.to(device=logits.device, dtype=torch.int64)
        top_k = top_k.masked_fill((top_k <= 0) | (top_k > vocab_size), vocab_size)
    if top_p is None:
        return logits if top_k is None else _apply_top_k_only(logits, top_k)

    sorted_logits, sorted_index = logits.sort(dim=-1)  # ascending: [B, V]
    if top_k is not None:
        kth_best = sorted_logits.gather(1, (vocab_size - top_k).unsqueeze(1))  # [B, 1]
        sorted_logits.masked_fill_(sorted_logits < kth_best, _NEG_INF)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # [B, V]
    # Drop the low tail whose mass is at most 1 - p; what is left holds at least p.
    drop = cumulative <= 1 - top_p.unsqueeze(1)
    drop[:, -1] = False
    sorted_logits.masked_fill_(drop, _NEG_INF)
    return logits.scatter_(1, sorted_index, sorted_logits)


def _apply_top_k_only(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Top-k without a full sort: topk over the largest k in the batch (one host sync)."""
    vocab_size = logits.shape[1]
    is_off = top_k == vocab_size  # [B]
    k = top_k.masked_fill(is_off, 1)
    max_k = int(k.max())
    kth_best = logits.topk(max_k, dim=1).values.gather(1, (k - 1).unsqueeze(1))  # [B, 1]
    kth_best.masked_fill_(is_off.unsqueeze(1), _NEG_INF)
    return logits.masked_fill_(logits < kth_best, _NEG_INF)


def exponential_race(logits: torch.Tensor, generators: dict[int, torch.Generator]) -> torch.Tensor:
    """Samples one token per row from softmax(logits): argmax(p / q), q ~ Exponential(1).

    q_i / p_i ~ Exponential(rate p_i), and the smallest of independent exponentials is
    i with probability p_i / sum(p): a categorical draw without a cumsum or a sync.
    Seeded rows draw q only from their own generator, so their token depends on
    nothing but their own logits and seed; the other rows share one batched draw.
    """
    probs = logits.softmax(dim=-1, dtype=torch.float32)  # [B, V]
    noise = torch.empty_like(probs)  # [B, V]
    if len(generators) < probs.shape[0]:
        noise.exponential_()
    for row, generator in generators.items():
        noise[row].exponential_(generator=generator)
    # exponential_ may return exactly 0, and 0 / 0 = NaN would win the argmax.
    noise.clamp_min_(torch.finfo(noise.dtype).tiny)
    return probs.div_(noise).argmax(dim=-1)
