"""``hermes``: Hermes 2 Pro / Qwen 2.5+ calls, ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``.

Any number of calls, with text before, between and after them. A block whose body is not a call
object (bad JSON, no name) stays in the content as written, tags included; so does an unclosed one.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from tokenmill.tool_parsing import MarkupToolParser, Scan, ScannedCall, call_from_json, partial_marker_start

OPEN, CLOSE = "<tool_call>", "</tool_call>"


class HermesToolParser(MarkupToolParser):
    name = "hermes"

    def scan(self, text: str) -> Scan:
        events: list[str | ScannedCall] = []
        pos = 0
        while True:
            start = text.find(OPEN, pos)
            if start < 0:
                held = partial_marker_start(text, pos, OPEN)
                events.append(text[pos:held])
                return Scan(events, held)
            events.append(text[pos:start])
            end = text.find(CLOSE, start + len(OPEN))
            if end < 0:
                return Scan(events, start)
            end += len(CLOSE)
            try:
                call = call_from_json(json.loads(text[start + len(OPEN):end - len(CLOSE)]))
            except ValueError:
                call = None
            events.append(call or text[start:end])
            pos = end

    @classmethod
    def example_output(cls, calls: Sequence[tuple[str, Mapping[str, Any]]], content: str = "") -> str:
        blocks = [f"{OPEN}\n{json.dumps({'name': n, 'arguments': a}, ensure_ascii=False)}\n{CLOSE}" for n, a in calls]
        return "\n".join(([content] if content else []) + blocks)
