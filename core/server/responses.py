"""Response bodies of the OpenAI API, and the engine's logprobs in its two shapes.

Completions give ``{tokens, token_logprobs, top_logprobs, text_offset}`` per
choice; chat gives ``{content: [{token, logprob, bytes, top_logprobs}]}``.
"""
from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, Field, SerializerFunctionWrapHandler, model_serializer

from ..outputs import Logprob, PositionLogprobs

MIN_LOGPROB = -9999.0  # JSON has no -inf; vLLM's floor


def _now() -> int:
    return int(time.time())


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class PromptLogprob(BaseModel):
    """vLLM's per-token entry of ``prompt_logprobs``, keyed by token id."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# one entry per prompt position; the first has no logprob (None)
PromptLogprobs = list[dict[int, PromptLogprob] | None]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: PromptLogprobs | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ChatTokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprobEntry(ChatTokenLogprob):
    top_logprobs: list[ChatTokenLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatLogprobEntry] | None = None


class FunctionCallOut(BaseModel):
    name: str
    arguments: str  # a JSON object, as text


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class _OptionalParts(BaseModel):
    """A message whose reasoning and tool calls are left out when it has none: a reply without
    them is what it was before tools existed."""

    @model_serializer(mode="wrap")
    def _drop_unset_parts(self, handler: SerializerFunctionWrapHandler) -> dict:
        data = handler(self)
        for key in ("reasoning_content", "tool_calls"):
            if not data.get(key):
                data.pop(key, None)
        return data


class ChatMessageOut(_OptionalParts):
    role: str = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    prompt_logprobs: PromptLogprobs | None = None


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCallOut(BaseModel):
    """A piece of the call at ``index``; ``id``, ``type`` and ``function.name`` only in its first piece."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class DeltaMessage(_OptionalParts):
    role: str | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCallOut] | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "tokenmill"
    max_model_len: int | None = None
    root: str | None = None  # an adapter's folder
    parent: str | None = None  # an adapter's base model


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---------------------------------------------------------------- logprobs

def completion_logprobs(token_ids: list[int], positions: list[PositionLogprobs | None], num_top: int,
                        text_offset: int = 0, first_token_text: str = "") -> CompletionLogprobs:
    """Completions logprobs. A None position (an echoed prompt's first token) has no
    logprob; its text is ``first_token_text``."""
    out = CompletionLogprobs()
    for token_id, entry in zip(token_ids, positions):
        if entry is None:
            out.tokens.append(first_token_text)
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
        else:
            chosen = entry[token_id]
            out.tokens.append(_text(chosen))
            out.token_logprobs.append(_floor(chosen.logprob))
            top = {_text(lp): _floor(lp.logprob) for lp in _top(entry, num_top)}
            top.setdefault(_text(chosen), _floor(chosen.logprob))
            out.top_logprobs.append(top)
        out.text_offset.append(text_offset)
        text_offset += len(out.tokens[-1])
    return out


def prompt_logprobs(asked: int | None, positions: list[PositionLogprobs | None] | None) -> PromptLogprobs | None:
    """vLLM's ``prompt_logprobs`` of a response: only when the request ``asked`` for them (the
    engine also computes them to echo a prompt with its logprobs)."""
    if asked is None or positions is None:
        return None
    return [None if entry is None else
            {token_id: PromptLogprob(logprob=_floor(lp.logprob), rank=lp.rank, decoded_token=lp.decoded_token)
             for token_id, lp in entry.items()} for entry in positions]


def chat_logprobs(token_ids: list[int], positions: list[PositionLogprobs], num_top: int) -> ChatLogprobs:
    entries = []
    for token_id, entry in zip(token_ids, positions):
        chosen = entry[token_id]
        entries.append(ChatLogprobEntry(**_chat_token(chosen).model_dump(),
                                        top_logprobs=[_chat_token(lp) for lp in _top(entry, num_top)]))
    return ChatLogprobs(content=entries)


def _top(entry: PositionLogprobs, num_top: int) -> list[Logprob]:
    """The ``num_top`` most likely tokens (by rank; the chosen one is only among them
    when its own rank is that high)."""
    ranked = sorted((lp for lp in entry.values() if lp.rank is not None and lp.rank <= num_top),
                    key=lambda lp: lp.rank)
    return ranked[:num_top]


def _chat_token(lp: Logprob) -> ChatTokenLogprob:
    text = _text(lp)
    return ChatTokenLogprob(token=text, logprob=_floor(lp.logprob), bytes=list(text.encode("utf-8")))


def _text(lp: Logprob) -> str:
    return lp.decoded_token or ""


def _floor(value: float) -> float:
    return max(value, MIN_LOGPROB)


class TokenizeResponse(BaseModel):
    """``POST /tokenize`` (vLLM's body): ``max_model_len`` lets a client see whether the prompt fits."""

    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None  # with return_token_strs: each token as the vocabulary spells it


class DetokenizeResponse(BaseModel):
    prompt: str


class VersionResponse(BaseModel):
    version: str
