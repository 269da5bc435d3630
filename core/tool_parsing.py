"""Tool-call and reasoning parsers: turning a chat model's raw text into OpenAI message parts.

A model writes tool calls and its reasoning in its own markup (``<tool_call>...</tool_call>``,
``[TOOL_CALLS][...]``, ``<think>...</think>``). The chat endpoint selects one ``ToolParser`` and
one ``ReasoningParser`` by name and asks them to split the output into ``content``,
``reasoning_content`` and ``tool_calls``, either once for a finished output (``extract``) or
delta by delta while it streams (``extract_streaming``).

The contract both kinds keep, and the conformance suite checks: the streamed deltas of one
request, concatenated, equal ``extract`` of the whole text: the same content (and reasoning)
strings, the same calls in the same order with the same names and arguments (the ids differ:
each call gets a fresh one). A parser instance is stateful and serves one request; the server
builds one per request with ``registry.create(kind, name, tokenizer=...)``. Streaming ends with
``finish(current_text, ...)``: text a parser held back because it might have become markup (an
unfinished ``<tool_call>``, a partial ``</think>``) is released there, as content, so nothing
the model wrote is lost.

Order of use in the chat endpoint: the reasoning parser first, on the model's text; the tool
parser on the content it leaves.

A parser for markup that can be recognised by scanning the text from the start derives from
``MarkupToolParser`` and writes only ``scan``; the base class does both ways of extracting from
that one function, which is what keeps them equal.
"""
from __future__ import annotations

import json
import uuid
from abc import abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

from .components import REASONING_PARSER, TOOL_PARSER, Component

Tools = Union[Sequence[Mapping[str, Any]], None]
"""The request's ``tools`` (OpenAI format: ``{"type": "function", "function": {"name", ...}}``)."""


def make_tool_call_id() -> str:
    """A fresh OpenAI-style id: ``call_`` and 24 hex digits."""
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One complete function call. ``arguments`` is a JSON object as a string, as in the OpenAI API."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class ExtractedToolCalls:
    """A finished output split into the message text (None when there is none) and its calls."""

    content: str | None
    tool_calls: list[ToolCall] = field(default_factory=list)

    @property
    def tools_called(self) -> bool:
        return bool(self.tool_calls)


@dataclass(frozen=True, slots=True)
class DeltaToolCall:
    """A piece of the call at ``index`` (0, 1, ... in the order of the calls): ``id`` and ``name``
    come with its first piece and are None after; ``arguments_delta`` continues its arguments."""

    index: int
    id: str | None
    name: str | None
    arguments_delta: str = ""


@dataclass(frozen=True, slots=True)
class DeltaMessage:
    """What one streamed step adds to the message (an OpenAI chat chunk's ``delta``)."""

    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] = field(default_factory=list)


def partial_marker_start(text: str, start: int, marker: str) -> int:
    """Where the longest suffix of ``text[start:]`` that is a proper prefix of ``marker`` begins
    (``len(text)`` when there is none): the text from there may still become the marker."""
    for size in range(min(len(marker) - 1, len(text) - start), 0, -1):
        if marker.startswith(text[len(text) - size:]):
            return len(text) - size
    return len(text)


def _none_if_empty(text: str) -> str | None:
    return text or None


# ---------------------------------------------------------------- tool parsers


class ToolParser(Component):
    """Finds the tool calls in a model's output.

    Built once per request with the model's tokenizer (None is allowed: the built-ins work on
    text). ``tools`` is the request's tool list or None; a parser may use it (a schema, the
    names), the built-ins do not restrict what they report to it.
    """

    kind = TOOL_PARSER

    def __init__(self, tokenizer: Any = None, *, options: Any = None) -> None:
        super().__init__(options)
        self.tokenizer = tokenizer

    @abstractmethod
    def extract(self, text: str, tools: Tools = None) -> ExtractedToolCalls:
        """The content and calls of a finished output. Markup that does not parse as a call
        (bad JSON, a missing field, an unclosed tag) stays in the content, unchanged."""

    @abstractmethod
    def extract_streaming(self, previous_text: str, current_text: str, delta_text: str,
                          tools: Tools = None) -> DeltaMessage | None:
        """What ``delta_text`` (``current_text`` = ``previous_text + delta_text``) adds to the
        message, or None when nothing is decided yet (it may be the start of markup)."""

    def finish(self, current_text: str, tools: Tools = None) -> DeltaMessage | None:
        """Called once when the stream ends: what was held back, or None."""
        return None

    @classmethod
    def example_output(cls, calls: Sequence[tuple[str, Mapping[str, Any]]], content: str = "") -> str:
        """The text a model using this format writes for ``content`` followed by ``calls``
        (name, arguments): what the conformance suite generates its samples with. A parser
        that does not implement it is checked on plain text only."""
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class ScannedCall:
    """A call ``MarkupToolParser.scan`` recognised; ``arguments`` is the JSON text."""

    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class Scan:
    """``scan``'s answer: ``events`` (text pieces and calls, in order) cover ``text[:pending]``;
    the rest may still become a call and is decided by more text (or, at the end, is content)."""

    events: list[str | ScannedCall]
    pending: int


class MarkupToolParser(ToolParser):
    """A tool parser defined by one function, ``scan``, from which both ``extract`` and the
    streaming methods are derived.

    ``scan`` must be stable as the text grows: scanning a longer text gives the same events
    for the part already covered (the last text piece may grow) and decides only more. Then
    content streams as soon as it is known not to be markup, and a call is sent whole (name
    and all its arguments in one ``DeltaToolCall``) when its markup is complete.

    Whitespace that only separates a call from the start or end of the message (the newline
    before ``<tool_call>``) is not content (see ``_decide``); an output without calls comes back
    exactly as written.
    """

    def __init__(self, tokenizer: Any = None, *, options: Any = None) -> None:
        super().__init__(tokenizer, options=options)
        self._sent_content = 0
        self._sent_calls = 0

    @abstractmethod
    def scan(self, text: str) -> Scan:
        """Split ``text`` into decided events and a pending rest (see ``Scan``)."""

    def extract(self, text: str, tools: Tools = None) -> ExtractedToolCalls:
        content, calls = self._decide(text, final=True)
        return ExtractedToolCalls(_none_if_empty(content),
                                  [ToolCall(make_tool_call_id(), c.name, c.arguments) for c in calls])

    def extract_streaming(self, previous_text: str, current_text: str, delta_text: str,
                          tools: Tools = None) -> DeltaMessage | None:
        return self._delta(current_text, final=False)

    def finish(self, current_text: str, tools: Tools = None) -> DeltaMessage | None:
        return self._delta(current_text, final=True)

    def _delta(self, text: str, final: bool) -> DeltaMessage | None:
        content, calls = self._decide(text, final)
        new_content = content[self._sent_content:]
        new_calls = [DeltaToolCall(index, make_tool_call_id(), call.name, call.arguments)
                     for index, call in enumerate(calls) if index >= self._sent_calls]
        self._sent_content, self._sent_calls = max(len(content), self._sent_content), max(len(calls), self._sent_calls)
        if not new_content and not new_calls:
            return None
        return DeltaMessage(content=new_content or None, tool_calls=new_calls)

    def _decide(self, text: str, final: bool) -> tuple[str, list[ScannedCall]]:
        """The content and calls decided for ``text``; with ``final`` the pending rest is content.

        The content is the text around the calls, joined, but whitespace that only separated a
        call from the edge of the message is dropped: the content starts at the first text that is
        not whitespace, and an output with calls has its trailing whitespace cut. An output without
        calls is its content exactly. Until the output ends, trailing whitespace waits: a call may
        follow it (then it is cut) or more text (then it is kept)."""
        scan = self.scan(text)
        events = [*scan.events, text[scan.pending:]] if final else scan.events
        content, calls = "", []
        for event in events:
            if isinstance(event, ScannedCall):
                calls.append(event)
                if content.isspace():
                    content = ""
            else:
                content += event.lstrip() if calls and not content else event
        return (content.rstrip() if calls or not final else content), calls

def scan_marked_blocks(text: str, marker: str,
                       read: Callable[[str, int], tuple[list[str | ScannedCall], int] | None]) -> Scan:
    """A ``scan`` for formats whose calls come in blocks that start at ``marker``: the text between blocks
    is content; ``read(text, start)`` turns the block at ``start`` into its events and where it ends, or
    None while it is not complete yet (then it is held from ``start`` on). A partial marker at the very
    end is held too."""
    events: list[str | ScannedCall] = []
    pos = 0
    while True:
        start = text.find(marker, pos)
        if start < 0:
            held = partial_marker_start(text, pos, marker)
            events.append(text[pos:held])
            return Scan(events, held)
        events.append(text[pos:start])
        block = read(text, start)
        if block is None:
            return Scan(events, start)
        found, pos = block
        events.extend(found)


def call_from_json(value: Any, arguments_key: str | tuple[str, ...] = "arguments") -> ScannedCall | None:
    """``{"name": str, <arguments_key>: object}`` as a call, or None for anything else (other
    keys than ``type``: it is some other JSON). Without arguments only ``{"name": ...}`` is a
    call. The arguments may be a string holding a JSON object (some models write that); they
    are re-serialised so that every parser reports the same JSON text for the same object."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        return None
    keys = (arguments_key,) if isinstance(arguments_key, str) else arguments_key
    present = [key for key in keys if key in value]
    if set(value) - {"name", "type", *keys} or (not present and set(value) != {"name"}):
        return None
    arguments = value[present[0]] if present else {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ScannedCall(value["name"], json.dumps(arguments, ensure_ascii=False))


# ---------------------------------------------------------------- reasoning parsers


class ReasoningParser(Component):
    """Separates a model's reasoning from its answer. Built once per request with the model's
    tokenizer (None is allowed)."""

    kind = REASONING_PARSER

    def __init__(self, tokenizer: Any = None, *, options: Any = None) -> None:
        super().__init__(options)
        self.tokenizer = tokenizer

    @abstractmethod
    def extract(self, text: str) -> tuple[str | None, str | None]:
        """``(reasoning_content, content)`` of a finished output, each None when empty."""

    @abstractmethod
    def extract_streaming(self, previous_text: str, current_text: str, delta_text: str) -> DeltaMessage | None:
        """What ``delta_text`` adds (``reasoning_content`` and/or ``content``), or None."""

    def finish(self, current_text: str) -> DeltaMessage | None:
        """Called once when the stream ends: what was held back, or None."""
        return None

    @classmethod
    def example_output(cls, reasoning: str, content: str) -> str:
        """The text a model using this format writes for ``reasoning`` then ``content``, with
        the parser's default options: the conformance suite's samples. Optional, as for
        ``ToolParser.example_output``."""
        raise NotImplementedError


class SplittingReasoningParser(ReasoningParser):
    """A reasoning parser defined by ``split(text, final)``, the (reasoning, content) decided
    for ``text`` so far, which must only grow as the text does; ``extract`` and streaming are
    derived from it."""

    def __init__(self, tokenizer: Any = None, *, options: Any = None) -> None:
        super().__init__(tokenizer, options=options)
        self._sent = (0, 0)

    @abstractmethod
    def split(self, text: str, final: bool) -> tuple[str, str]:
        """The reasoning and content decided for ``text``; ``final``: the output ended."""

    def extract(self, text: str) -> tuple[str | None, str | None]:
        reasoning, content = self.split(text, final=True)
        return _none_if_empty(reasoning), _none_if_empty(content)

    def extract_streaming(self, previous_text: str, current_text: str, delta_text: str) -> DeltaMessage | None:
        return self._delta(current_text, final=False)

    def finish(self, current_text: str) -> DeltaMessage | None:
        return self._delta(current_text, final=True)

    def _delta(self, text: str, final: bool) -> DeltaMessage | None:
        reasoning, content = self.split(text, final)
        new_reasoning, new_content = reasoning[self._sent[0]:], content[self._sent[1]:]
        self._sent = (max(len(reasoning), self._sent[0]), max(len(content), self._sent[1]))
        if not new_reasoning and not new_content:
            return None
        return DeltaMessage(content=new_content or None, reasoning_content=new_reasoning or None)

