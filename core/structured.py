"""The structured-output (guided decoding) contract.

A request asks for structure with ``StructuredOutputsParams``; the selected
``GuidedDecoder`` compiles it into a ``Grammar`` (one matcher per request) or
rejects it with ``UnsupportedStructuredOutput`` before it is scheduled.

Token bitmask layout, shared by every decoder: int32 [rows, ceil(vocab/32)];
token ``t`` is allowed in row ``r`` iff bit ``t % 32`` of word ``t // 32`` is set.
"""
from __future__ import annotations

import json as _json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .components import GUIDED_DECODER, Component
from .errors import TokenmillError
from .text import check_unicode

STRUCTURED_MODES = ("json", "regex", "choice", "grammar", "json_object")


class UnsupportedStructuredOutput(TokenmillError, ValueError):
    """The guided decoder cannot honour this spec; the request is rejected."""


@dataclass(slots=True)
class StructuredOutputsParams:
    """Exactly one constraint per request (vLLM's names)."""

    json: str | dict[str, Any] | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def __post_init__(self) -> None:
        given = [m for m in STRUCTURED_MODES if getattr(self, m) not in (None, False)]
        if len(given) != 1:
            raise ValueError("structured_outputs: exactly one of json, regex, choice, grammar, "
                             f"json_object must be set, got {given or 'none'}")
        if self.choice is not None:
            if not isinstance(self.choice, (list, tuple)) or not all(isinstance(c, str) for c in self.choice):
                raise ValueError("structured_outputs.choice must be a list of strings")
            self.choice = list(self.choice)
            for index, choice in enumerate(self.choice):
                check_unicode(f"structured_outputs.choice[{index}]", choice)
        value = getattr(self, self.mode)
        if isinstance(value, str):
            check_unicode(f"structured_outputs.{self.mode}", value)
        elif isinstance(value, dict):  # a schema: the index is into its JSON text
            check_unicode(f"structured_outputs.{self.mode}", _json.dumps(value, ensure_ascii=False))

    @property
    def mode(self) -> str:
        return next(m for m in STRUCTURED_MODES if getattr(self, m) not in (None, False))

    def cache_key(self) -> tuple[str, str]:
        """A hashable key identifying the spec (compiled grammars are cached by it)."""
        value = getattr(self, self.mode)
        if not isinstance(value, str):
            value = _json.dumps(value, sort_keys=True)
        return self.mode, value


class Grammar(ABC):
    """One request's matcher state. Methods are called from the engine loop."""

    @abstractmethod
    def accept_tokens(self, token_ids: Sequence[int]) -> bool:
        """Advance through ``token_ids``; False (state unchanged past the
        first rejected token) if one of them is not allowed."""

    @abstractmethod
    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into ``bitmask[row]`` (see module doc)."""

    @abstractmethod
    def rollback(self, num_tokens: int) -> None:
        """Undo the last ``num_tokens`` accepted tokens (rejected drafts)."""

    @abstractmethod
    def is_terminated(self) -> bool:
        """True once the grammar has reached an accepting end state and ended."""


class GuidedDecoder(Component):
    """A structured-output backend: compiles specs into ``Grammar`` objects.

    Constructed once per model with its tokenizer (a HuggingFace tokenizer)
    and the model's vocabulary size (the logits width, which may exceed the
    tokenizer's). Selected by ``structured_outputs_config={"backend": <name>,
    **options}``; the options go to the class's ``Options`` model.
    """

    kind = GUIDED_DECODER
    modes: ClassVar[tuple[str, ...]] = STRUCTURED_MODES

    def __init__(self, tokenizer: Any, vocab_size: int, *, options: Any = None) -> None:
        super().__init__(options)
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size

    @classmethod
    def capabilities(cls) -> dict[str, Any]:
        return {"modes": list(cls.modes)}

    @abstractmethod
    def compile(self, spec: StructuredOutputsParams) -> Grammar:
        """A fresh matcher for ``spec``; raises ``UnsupportedStructuredOutput``
        (naming the problem) for anything it cannot enforce exactly.

        The engine calls it from a thread pool (it may be slow), so it must be
        thread-safe; the request waits in WAITING_FOR_GRAMMAR meanwhile."""

    def validate(self, spec: StructuredOutputsParams) -> None:
        """Raise ``UnsupportedStructuredOutput`` now, when the request is added, for a spec
        ``compile`` would reject. Called on the caller's thread, so it should be cheap
        (parse, do not compile). The default compiles, which is exact but slow: override it."""
        self.compile(spec)

    @staticmethod
    def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, indices: list[int] | None = None) -> None:
        """Set the logits of disallowed tokens to -inf in place, for the rows ``indices``
        (all when None). A decoder may override this with its own kernel."""
        apply_token_bitmask(logits, bitmask, indices)


def bitmask_width(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def allocate_token_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    """A bitmask with every token allowed in every row."""
    return torch.full((rows, bitmask_width(vocab_size)), -1, dtype=torch.int32)


def bitmask_to_bool(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Unpack int32 words into a bool [rows, vocab_size] allow-mask."""
    bits = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    unpacked = (bitmask.unsqueeze(-1) >> bits) & 1  # [rows, words, 32]
    return unpacked.reshape(bitmask.shape[0], -1)[:, :vocab_size].bool()


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, indices: list[int] | None = None) -> None:
    """Plain torch masking: logits [rows, V] (any device), bitmask int32 [rows, ceil(V/32)]."""
    vocab_size = logits.shape[-1]
    if bitmask.dtype != torch.int32 or bitmask.shape != (logits.shape[0], bitmask_width(vocab_size)):
        raise ValueError(f"bitmask must be int32 [{logits.shape[0]}, {bitmask_width(vocab_size)}], "
                         f"got {bitmask.dtype} {list(bitmask.shape)}")
    rows = list(range(logits.shape[0])) if indices is None else list(indices)
    if not rows:
        return
    allowed = bitmask_to_bool(bitmask[rows].to(logits.device), vocab_size)  # [len(rows), V]
    index = torch.tensor(rows, device=logits.device)
    logits[index] = logits[index].masked_fill(~allowed, float("-inf"))
