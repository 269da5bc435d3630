"""``think``: reasoning in ``<think>...</think>`` (DeepSeek-R1, QwQ, Qwen3).

By default the output is reasoning until ``</think>``, whether or not it starts with ``<think>``:
R1's chat template writes the opening tag into the prompt, so the model's text starts inside it.
An output that never closes the tag is all reasoning (it was cut off while thinking). With
``starts_in_reasoning=False`` only an output that starts with ``<think>`` has reasoning; any
other is all content (a model that may answer without thinking).
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from tokenmill.tool_parsing import SplittingReasoningParser, partial_marker_start

OPEN, CLOSE = "<think>", "</think>"


class ThinkReasoningParser(SplittingReasoningParser):
    name = "think"

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)
        starts_in_reasoning: bool = True

    def split(self, text: str, final: bool) -> tuple[str, str]:
        if text.startswith(OPEN):
            body = text[len(OPEN):]
        elif OPEN.startswith(text) and not final:  # may still become the opening tag
            return "", ""
        elif self.options.starts_in_reasoning:
            body = text
        else:
            return "", text
        end = body.find(CLOSE)
        if end >= 0:
            return body[:end], body[end + len(CLOSE):]
        return (body, "") if final else (body[:partial_marker_start(body, 0, CLOSE)], "")

    @classmethod
    def example_output(cls, reasoning: str, content: str) -> str:
        return f"{OPEN}{reasoning}{CLOSE}{content}"
