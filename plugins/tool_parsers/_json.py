"""JSON helpers shared by the built-in tool parsers."""
from __future__ import annotations

import json
from typing import Any

_DECODER = json.JSONDecoder()


def decode_at(text: str, start: int) -> tuple[Any, int] | None:
    """The JSON value that starts at ``text[start]`` and where it ends, or None when the text
    there is not (or not yet: the output may still be streaming) one complete value."""
    try:
        return _DECODER.raw_decode(text, start)
    except ValueError:
        return None


def skip_space(text: str, index: int) -> int:
    while index < len(text) and text[index].isspace():
        index += 1
    return index
