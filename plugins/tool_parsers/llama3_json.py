"""``llama3_json``: Llama 3.1+ JSON calls, ``{"name": ..., "parameters": {...}}``.

The calls either make up the output from its start or follow ``<|python_tag|>`` (text before the tag
is content); several are separated by ``;``. ``arguments`` is accepted for ``parameters``. A JSON
value that is not a call ends the calls: it and what follows are content. An output that starts
with ``{`` is held back while streaming until its first value is complete.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from tokenmill.tool_parsing import MarkupToolParser, Scan, ScannedCall, call_from_json, partial_marker_start

from ._json import decode_at, skip_space

TAG = "<|python_tag|>"


class Llama3JsonToolParser(MarkupToolParser):
    name = "llama3_json"

    def scan(self, text: str) -> Scan:
        events: list[str | ScannedCall] = []
        first = skip_space(text, 0)
        if first == len(text):  # nothing but whitespace yet: a call may still start the output
            return Scan(events, 0)
        pos = 0
        if text[first] == "{":
            events.append(text[:first])
            pos, pending = self._calls(text, first, first, events)
            if pending:
                return Scan(events, pos)
        while True:
            start = text.find(TAG, pos)
            if start < 0:
                held = partial_marker_start(text, pos, TAG)
                events.append(text[pos:held])
                return Scan(events, held)
            events.append(text[pos:start])
            pos, pending = self._calls(text, start, start + len(TAG), events)
            if pending:
                return Scan(events, pos)

    @staticmethod
    def _calls(text: str, region: int, index: int, events: list) -> tuple[int, bool]:
        """Parse ``;``-separated calls from ``index`` onto ``events`` (``region``: where their
        markup began). Returns where plain text resumes and False, or where the undecided rest
        begins and True."""
        first = True
        while True:
            index = skip_space(text, index)
            if not first and index < len(text):
                if text[index] != ";":
                    return region, False
                index = skip_space(text, index + 1)
            decoded = decode_at(text, index) if index < len(text) else None
            if decoded is None:
                return region, True
            value, end = decoded
            call = call_from_json(value, ("parameters", "arguments"))
            if call is None:
                if first:  # the markup was not a call: it is text, and scanning goes on after it
                    events.append(text[region:end])
                    return end, False
                return region, False
            events.append(call)
            region, index, first = end, end, False

    @classmethod
    def example_output(cls, calls: Sequence[tuple[str, Mapping[str, Any]]], content: str = "") -> str:
        body = "; ".join(json.dumps({"name": n, "parameters": a}, ensure_ascii=False) for n, a in calls)
        return f"{content}{TAG}{body}" if content else body
