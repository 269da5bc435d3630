"""``mistral``: Mistral's ``[TOOL_CALLS]`` followed by a JSON list of ``{"name", "arguments"}`` objects.

Text before the marker is content, and so is text after the list. A list that is not all calls
stays in the content, marker included. (The ``[TOOL_CALLS]name[ARGS]{...}`` form of the v11
tokenizers is not parsed by this one.)
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from tokenmill.tool_parsing import MarkupToolParser, Scan, ScannedCall, call_from_json, partial_marker_start

from ._json import decode_at, skip_space

MARKER = "[TOOL_CALLS]"


class MistralToolParser(MarkupToolParser):
    name = "mistral"

    def scan(self, text: str) -> Scan:
        events: list[str | ScannedCall] = []
        pos = 0
        while True:
            start = text.find(MARKER, pos)
            if start < 0:
                held = partial_marker_start(text, pos, MARKER)
                events.append(text[pos:held])
                return Scan(events, held)
            events.append(text[pos:start])
            decoded = decode_at(text, skip_space(text, start + len(MARKER)))
            if decoded is None:  # not complete yet; at the end of the output it is content
                return Scan(events, start)
            value, end = decoded
            items = value if isinstance(value, list) else [value]
            calls = [call_from_json(item) for item in items]
            if items and all(calls):
                events.extend(calls)
            else:
                events.append(text[start:end])
            pos = end

    @classmethod
    def example_output(cls, calls: Sequence[tuple[str, Mapping[str, Any]]], content: str = "") -> str:
        return content + MARKER + json.dumps([{"name": n, "arguments": a} for n, a in calls], ensure_ascii=False)
