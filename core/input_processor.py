"""InputProcessor: prompts and sampling parameters in, validated Requests out.

Everything a user can get wrong is checked here, before the request reaches
the scheduler, with a ValueError naming the field: a bad request never
disturbs the ones already running.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import Any, Union

from .lora_request import LoRARequest
from .request import Request
from .sampling_params import SamplingParams, child_seed, validate_prompt_token_ids
from .text import check_unicode

# A prompt: text, token ids, {"prompt": text} or {"prompt_token_ids": [...]}
PromptType = Union[str, Sequence[int], Mapping[str, Any]]


class InputProcessor:
    def __init__(self, tokenizer: Any, *, vocab_size: int, max_model_len: int, eos_token_id: int | None,
                 extra_eos_token_ids: tuple[int, ...] = ()) -> None:
        """``extra_eos_token_ids``: ids that end generation besides ``eos_token_id`` (from the
        model's generation_config.json); they join a request's stop_token_ids unless it
        ignores EOS."""
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.eos_token_id = eos_token_id
        self.extra_eos_token_ids = tuple(i for i in extra_eos_token_ids if i != eos_token_id and i < vocab_size)

    def tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        """(prompt text or None, prompt token ids)."""
        if isinstance(prompt, str):
            check_unicode("prompt", prompt)
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, Mapping):
            unknown = set(prompt) - {"prompt", "prompt_token_ids", "cache_salt"}
            if unknown:
                raise ValueError(f"prompt dict has unknown keys {sorted(unknown)}; use 'prompt' or "
                                 "'prompt_token_ids'")
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), self._token_ids(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                return self.tokenize(prompt["prompt"])
            raise ValueError("prompt dict must have 'prompt' or 'prompt_token_ids'")
        return None, self._token_ids(prompt)

    @staticmethod
    def _token_ids(ids: Any) -> list[int]:
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
            raise ValueError(f"prompt_token_ids must be a list of ints, got {type(ids).__name__}")
        for i, t in enumerate(ids):
            if isinstance(t, bool) or not isinstance(t, int):
                raise ValueError(f"prompt_token_ids[{i}] must be an int, got {t!r}")
        return list(ids)

    def process(self, request_id: str, prompt: PromptType, params: SamplingParams,
                arrival_time: float | None = None,
                lora_request: LoRARequest | None = None, priority: int = 0) -> tuple[str | None, list[Request]]:
        """Validate and build the engine requests: one, or ``n`` children for n > 1 (all with the
        same ``priority``: the scheduler checks it against its policy)."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        text, token_ids = self.tokenize(prompt)
        validate_prompt_token_ids(token_ids, self.vocab_size, self.max_model_len)
        params.validate_for_vocab(self.vocab_size)
        if self.extra_eos_token_ids and not params.ignore_eos:
            params = dataclasses.replace(params, stop_token_ids=list(dict.fromkeys(
                [*params.stop_token_ids, *self.extra_eos_token_ids])))
        bad_words_token_ids = self._bad_words(params.bad_words)
        self._check_allowed_tokens(params, bad_words_token_ids)
        cache_salt = prompt.get("cache_salt") if isinstance(prompt, Mapping) else None
        room = self.max_model_len - len(token_ids)
        params = dataclasses.replace(
            params, max_tokens=room if params.max_tokens is None else params.max_tokens,
            bad_words_token_ids=bad_words_token_ids)
        arrival = time.monotonic() if arrival_time is None else arrival_time
        if params.n == 1:
            children = [(request_id, params)]
        else:  # seeded children get distinct, reproducible streams
            children = [(child_request_id(request_id, i), dataclasses.replace(
                             params, n=1, seed=None if params.seed is None else child_seed(params.seed, i)))
                        for i in range(params.n)]
        return text, [Request(request_id=rid, prompt_token_ids=token_ids, sampling_params=p,
                              eos_token_id=self.eos_token_id, arrival_time=arrival, cache_salt=cache_salt,
                              lora_request=lora_request, priority=priority)
                      for rid, p in children]

    def _check_allowed_tokens(self, params: SamplingParams, bad_words_token_ids: list[list[int]] | None) -> None:
        """Options that leave no token to sample from the first step on are rejected here (a
        conflict that shows only later ends the request with finish reason "error")."""
        if not params.allowed_token_ids:
            return
        allowed = set(params.allowed_token_ids)
        banned = {ids[0] for ids in bad_words_token_ids or () if len(ids) == 1}
        if allowed <= banned:
            raise ValueError("bad_words ban every token that allowed_token_ids allows")
        stops = set(params.stop_token_ids)
        if self.eos_token_id is not None and not params.ignore_eos:
            stops.add(self.eos_token_id)
        if params.min_tokens and allowed - banned <= stops:
            raise ValueError(f"min_tokens={params.min_tokens} forbids the stop tokens (EOS and stop_token_ids) "
                             "before that many output tokens, and allowed_token_ids allows no other token")

    def _bad_words(self, words: list[str] | None) -> list[list[int]] | None:
        """Each bad word as token sequences, with and without a leading space. A sequence
        holding an id the model cannot produce (a tokenizer larger than the vocabulary) can
        never occur, so it is dropped."""
        if not words:
            return None
        sequences: list[list[int]] = []
        for word in words:
            for text in (word, " " + word.lstrip()):
                ids = self.tokenizer.encode(text, add_special_tokens=False)
                if ids and ids not in sequences and max(ids) < self.vocab_size:
                    sequences.append(ids)
        return sequences


def child_request_id(parent_id: str, index: int) -> str:
    return f"{index}_{parent_id}"
