"""``hermes``: Hermes 2 Pro / Qwen 2.5+ calls, ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``.

Any number of calls, with text before, between and after them. A block whose body is not a call
object (bad JSON, no name) stays in the content as written, tags included; so does an unclosed one.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from tokenmill.tool_parsing import MarkupToolParser, Scan, ScannedCall, call_from_json, scan_marked_blocks

OPEN, CLOSE = "<tool_call>", "</tool_call>"


class HermesToolParser(MarkupToolParser):
    name = "hermes"

    def scan(self, text: str) -> Scan:
        return scan_marked_blocks(text, OPEN, _read_block)

    @classmethod
    def example_output(cls, calls: Sequence[tuple[str, Mapping[str, Any]]], content: str = "") -> str:
        blocks = [f"{OPEN}\n{json.dumps({'name': n, 'arguments': a}, ensure_ascii=False)}\n{CLOSE}" for n, a in calls]
        return "\n".join(([content] if content else []) + blocks)


def _read_block(text: str, start: int) -> tuple[list[str | ScannedCall], int] | None:
    """The block at ``start``: a call, or its text as written when the body is not one; None until closed."""
    end = text.find(CLOSE, start + len(OPEN))
    if end < 0:
        return None
    end += len(CLOSE)
    try:
        call = call_from_json(json.loads(text[start + len(OPEN):end - len(CLOSE)]))
    except ValueError:
        call = None
    return [call or text[start:end]], end
