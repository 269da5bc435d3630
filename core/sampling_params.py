"""Per-request sampling parameters (vLLM's names and defaults), validated on construction.

Every rule violation is a ``ValueError`` that names the field, the rule and the
value given. Checks that need the model (token ids against the vocabulary, the
prompt against ``max_model_len``) are separate: ``validate_for_vocab`` and
``validate_prompt_token_ids``, called by the input processor.
"""
from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import InitVar, dataclass, field
from typing import Any

from .structured import StructuredOutputsParams
from .text import check_unicode

MAX_LOGPROBS = 20  # most top-k logprobs a request may ask for, per position
MAX_N = 128
GREEDY_EPSILON = 1e-5  # a temperature below this is greedy sampling
# Seeds are int64, as in vLLM's API; child i of a seeded n > 1 request draws from seed + i,
# wrapped into the same range (see child_seed).
MIN_SEED, MAX_SEED = -(1 << 63), (1 << 63) - 1
MAX_TOP_K = MAX_SEED  # an int64 column of the batch; any k past the vocabulary keeps every token
# OpenAI's range. A larger bias overflows float32 logits to inf, and inf - inf is NaN.
MAX_ABS_LOGIT_BIAS = 100.0
# Penalties are float32 on the device: these keep logit / penalty and logit * penalty finite.
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 100.0


class SamplingType(enum.IntEnum):
    GREEDY = enum.auto()
    RANDOM = enum.auto()
    RANDOM_SEED = enum.auto()  # random with a per-request generator


@dataclass(slots=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to max_model_len
    min_tokens: int = 0
    stop: str | list[str] | None = None  # normalised to a list
    stop_token_ids: list[int] | None = None  # normalised to a list
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] | None = None  # str keys of ints accepted, as in the OpenAI API
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    structured_outputs: StructuredOutputsParams | None = None  # a dict is converted
    # set by the engine's input processor: bad_words as token sequences
    bad_words_token_ids: list[list[int]] | None = field(default=None, repr=False)
    # V0 options, accepted as keywords only to reject them with a message that says why
    best_of: InitVar[int | None] = None
    logits_processors: InitVar[Any] = None

    def __post_init__(self, best_of: int | None, logits_processors: Any) -> None:
        if best_of is not None:
            raise ValueError("best_of is deprecated in V1; use n and pick among the outputs")
        if logits_processors is not None:
            raise ValueError("logits_processors is deprecated in V1: per-request logits processors are not supported")
        _check_int("n", self.n, 1, MAX_N)
        _check_number("temperature", self.temperature, 0.0, 2.0)
        _check_number("top_p", self.top_p, 0.0, 1.0, low_open=True)
        if not _is_int(self.top_k) or not -1 <= self.top_k <= MAX_TOP_K:
            raise ValueError(f"top_k must be -1, 0 (disabled) or an int in [1, {MAX_TOP_K}], got {self.top_k!r}")
        _check_number("min_p", self.min_p, 0.0, 1.0)
        _check_number("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_number("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        _check_number("repetition_penalty", self.repetition_penalty, MIN_REPETITION_PENALTY,
                      MAX_REPETITION_PENALTY)
        if self.seed is not None:
            _check_int("seed", self.seed, MIN_SEED, MAX_SEED)
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, 1, None)
        _check_int("min_tokens", self.min_tokens, 0, self.max_tokens, high_name="max_tokens")
        _check_logprobs("logprobs", self.logprobs)
        _check_logprobs("prompt_logprobs", self.prompt_logprobs)
        self.stop = _normalise_stop(self.stop)
        self.stop_token_ids = _token_ids("stop_token_ids", self.stop_token_ids or [])
        self.logit_bias = _normalise_logit_bias(self.logit_bias)
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = _token_ids("allowed_token_ids", self.allowed_token_ids)
            if not self.allowed_token_ids:
                raise ValueError("allowed_token_ids must not be empty when given")
        self.bad_words = _normalise_bad_words(self.bad_words)
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        elif not isinstance(self.structured_outputs, (StructuredOutputsParams, type(None))):
            raise ValueError("structured_outputs must be a StructuredOutputsParams or a dict, "
                             f"got {type(self.structured_outputs).__name__}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_EPSILON

    @property
    def sampling_type(self) -> SamplingType:
        if self.is_greedy:
            return SamplingType.GREEDY
        return SamplingType.RANDOM if self.seed is None else SamplingType.RANDOM_SEED

    def validate_for_vocab(self, vocab_size: int) -> None:
        """Every token id this request names must be < ``vocab_size``, and it cannot ask for
        more top logprobs than there are tokens."""
        for name in ("logprobs", "prompt_logprobs"):
            if (getattr(self, name) or 0) > vocab_size:
                raise ValueError(f"{name} must be <= the vocabulary size ({vocab_size}), got {getattr(self, name)}")
        fields = {"stop_token_ids": self.stop_token_ids, "logit_bias": list(self.logit_bias or ()),
                  "allowed_token_ids": self.allowed_token_ids or []}
        for name, token_ids in fields.items():
            bad = [t for t in token_ids if t >= vocab_size]
            if bad:
                raise ValueError(f"{name} holds token id {bad[0]}, outside the vocabulary "
                                 f"(vocab_size={vocab_size})")


def child_seed(seed: int, index: int) -> int:
    """The seed of child ``index`` of a seeded n > 1 request: ``seed + index``, wrapped so it
    stays in [MIN_SEED, MAX_SEED] (a seed near the top must not push a child out of range)."""
    return (seed + index - MIN_SEED) % (1 << 64) + MIN_SEED


def validate_prompt_token_ids(prompt_token_ids: Sequence[int], vocab_size: int, max_model_len: int) -> None:
    """A prompt must be non-empty, shorter than ``max_model_len`` (room for one
    output token) and made of ids in ``[0, vocab_size)``."""
    if len(prompt_token_ids) == 0:
        raise ValueError("prompt must not be empty")
    if len(prompt_token_ids) >= max_model_len:
        raise ValueError(f"prompt has {len(prompt_token_ids)} tokens; it must be shorter than "
                         f"max_model_len={max_model_len}")
    for position, token_id in enumerate(prompt_token_ids):
        if not 0 <= token_id < vocab_size:
            raise ValueError(f"prompt token id {token_id} at position {position} is out of range "
                             f"[0, {vocab_size})")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(name: str, value: Any, low: int, high: int | None, high_name: str | None = None) -> None:
    if not _is_int(value):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if high is None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if high is not None and not low <= value <= high:
        upper = f"{high_name}={high}" if high_name else high
        raise ValueError(f"{name} must be in [{low}, {upper}], got {value}")


def _check_finite(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def _check_number(name: str, value: Any, low: float, high: float, low_open: bool = False) -> None:
    _check_finite(name, value)
    if value < low or value > high or (low_open and value == low):
        raise ValueError(f"{name} must be in {'(' if low_open else '['}{low:g}, {high:g}], got {value}")


def _check_logprobs(name: str, value: Any) -> None:
    if value is None:
        return
    if value == -1 and _is_int(value):
        raise ValueError(f"{name}=-1 (the full vocabulary) is not supported; ask for at most {MAX_LOGPROBS}")
    if not _is_int(value) or not 0 <= value <= MAX_LOGPROBS:
        raise ValueError(f"{name} must be an int in [0, {MAX_LOGPROBS}], got {value!r}")


def _token_ids(name: str, values: Any) -> list[int]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(f"{name} must be a list of token ids, got {values!r}")
    for value in values:
        if not _is_int(value) or value < 0:
            raise ValueError(f"{name} must hold ints >= 0, got {value!r}")
    return list(values)


def _normalise_stop(stop: Any) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, Sequence) or not all(isinstance(s, str) for s in stops):
        raise ValueError(f"stop must be a string or a list of strings, got {stop!r}")
    if any(s == "" for s in stops):
        raise ValueError("stop strings must not be empty")
    for index, text in enumerate(stops):
        check_unicode(f"stop[{index}]", text)
    return list(stops)


def _normalise_logit_bias(logit_bias: Any) -> dict[int, float] | None:
    if logit_bias is None:
        return None
    if not isinstance(logit_bias, dict):
        raise ValueError(f"logit_bias must be a dict of token id -> bias, got {logit_bias!r}")
    normalised: dict[int, float] = {}
    for key, bias in logit_bias.items():
        token_id = int(key) if isinstance(key, str) and key.strip().isdigit() else key
        if not _is_int(token_id) or token_id < 0:
            raise ValueError(f"logit_bias keys must be token ids >= 0 (ints or strings of ints), got {key!r}")
        _check_number(f"logit_bias[{token_id}]", bias, -MAX_ABS_LOGIT_BIAS, MAX_ABS_LOGIT_BIAS)
        normalised[token_id] = float(bias)
    return normalised


def _normalise_bad_words(bad_words: Any) -> list[str] | None:
    if bad_words is None:
        return None
    if isinstance(bad_words, str) or not isinstance(bad_words, Sequence) or not all(
            isinstance(w, str) and w for w in bad_words):
        raise ValueError(f"bad_words must be a list of non-empty strings, got {bad_words!r}")
    for index, word in enumerate(bad_words):
        check_unicode(f"bad_words[{index}]", word)
    return list(bad_words)
