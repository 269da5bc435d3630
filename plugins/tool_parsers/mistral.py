"""``mistral``: Mistral's ``[TOOL_CALLS]`` followed by a JSON list of ``{"name", "arguments"}`` objects.

Text before the marker is content, and so is text after the list. A list that is not all calls
stays in the content, marker included. (The ``[TOOL_CALLS]name[ARGS]{...}`` form of the v11
tokenizers is not parsed by this one.)
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from tokenmill.tool_parsing import MarkupToolParser, Scan, ScannedCall, call_from_json, scan_marked_blocks

from ._json import decode_at, skip_space

MARKER = "[TOOL_CALLS]"


class MistralToolParser(MarkupToolParser):
    name = "mistral"

    def scan(self, text: str) -> Scan:
        return scan_marked_blocks(text, MARKER, _read_list)

    @classmethod
    def example_output(cls, calls: Sequence[tuple[str, Mapping[str, Any]]], content: str = "") -> str:
        return content + MARKER + json.dumps([{"name": n, "arguments": a} for n, a in calls], ensure_ascii=False)


def _read_list(text: str, start: int) -> tuple[list[str | ScannedCall], int] | None:
    """The list after the marker at ``start``: its calls, or its text as written (marker included) when
    not every item is one; None while the JSON is not complete (at the end of the output it is content)."""
    decoded = decode_at(text, skip_space(text, start + len(MARKER)))
    if decoded is None:
        return None
    value, end = decoded
    items = value if isinstance(value, list) else [value]
    calls = [call_from_json(item) for item in items]
    return (calls if items and all(calls) else [text[start:end]]), end
