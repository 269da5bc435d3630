"""OutputProcessor: engine-core outputs in, user RequestOutputs out.

Per request it keeps a streaming detokenizer (stop strings are found here, and
the engine then ends the request), the logprobs so far, and for ``n`` > 1 the
parent that gathers its children's completions. It also stamps when each child
got its first and last tokens (one clock read per step), which the finished
output carries in ``metrics`` for the server's latency histograms.
"""
from __future__ import annotations

import enum
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from .detokenizer import IncrementalDetokenizer
from .outputs import CompletionOutput, PositionLogprobs, RequestOutput, logprobs_to_dicts
from .request import Request, RequestError
from .step import EngineCoreOutput

logger = logging.getLogger(__name__)


class OutputKind(enum.Enum):
    CUMULATIVE = "cumulative"  # every output holds everything so far
    DELTA = "delta"  # only what is new since the last output
    FINAL_ONLY = "final_only"  # one output when the request ends


@dataclass(slots=True)
class _Child:
    index: int
    request: Request
    detokenizer: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[PositionLogprobs] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    error: RequestError | None = None
    sent_tokens: int = 0
    sent_logprobs: int = 0
    first_token_time: float | None = None
    last_token_time: float | None = None

    def fail(self, stage: str, exc: Exception, to_fail: list[str]) -> None:
        """End with finish reason "error"; the engine must end the request too (``to_fail``)
        unless it already had."""
        logger.exception("request %s: %s failed", self.request.request_id, stage)
        if self.finish_reason is None:
            to_fail.append(self.request.request_id)
        self.finish_reason, self.error = "error", RequestError(f"{stage} failed: {exc!r}")


@dataclass(slots=True)
class _Parent:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    kind: OutputKind
    children: dict[str, _Child]
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        for child in self.children.values():  # asked per request per step: a plain loop, no generator
            if child.finish_reason is None:
                return False
        return True


class OutputProcessor:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._token_texts: dict[int, str] = {}  # token id -> its text alone (logprobs), at most one per vocab entry
        self._parents: dict[str, _Parent] = {}
        self._parent_of: dict[str, _Parent] = {}

    def add_request(self, request_id: str, prompt: str | None, requests: list[Request], kind: OutputKind) -> None:
        children = {}
        for index, req in enumerate(requests):
            p = req.sampling_params
            detok = IncrementalDetokenizer(self.tokenizer, req.prompt_token_ids,
                                           skip_special_tokens=p.skip_special_tokens,
                                           spaces_between_special_tokens=p.spaces_between_special_tokens,
                                           stop=p.stop or [], include_stop_str_in_output=p.include_stop_str_in_output)
            children[req.request_id] = _Child(index, req, detok, logprobs=[] if p.logprobs is not None else None,
                                              cumulative_logprob=0.0 if p.logprobs is not None else None)
        parent = _Parent(request_id, prompt, requests[0].prompt_token_ids, kind, children,
                         prompt_logprobs=[None] if requests[0].sampling_params.prompt_logprobs is not None else None)
        self._parents[request_id] = parent
        for child_id in children:
            self._parent_of[child_id] = parent

    def has_request(self, request_id: str) -> bool:
        return request_id in self._parents

    def child_ids(self, request_id: str) -> list[str]:
        parent = self._parents.get(request_id)
        return list(parent.children) if parent else []

    def num_unfinished(self) -> int:
        return len(self._parents)

    def process(self, outputs: list[EngineCoreOutput]) -> tuple[list[RequestOutput], list[str], list[str]]:
        """RequestOutputs to hand out, child ids the engine must stop (stop strings), and
        child ids it must end as failed (their detokenization or logprobs raised: only they
        end, with finish reason "error")."""
        touched: dict[str, _Parent] = {}
        to_stop: list[str] = []
        to_fail: list[str] = []
        now = time.monotonic()
        for out in outputs:
            parent = self._parent_of.get(out.req_id)
            if parent is None:
                continue
            child = parent.children[out.req_id]
            try:
                if out.new_prompt_logprobs is not None and parent.prompt_logprobs is not None:
                    parent.prompt_logprobs.extend(logprobs_to_dicts(out.new_prompt_logprobs, self._decode))
                if child.finish_reason is None:
                    self._update_child(child, out, to_stop, now)
            except Exception as exc:
                child.fail("detokenizing the output or its logprobs", exc, to_fail)
            parent.num_cached_tokens = max(parent.num_cached_tokens, out.num_cached_tokens)
            touched[parent.request_id] = parent
        results = []
        for parent in touched.values():
            if parent.kind is OutputKind.FINAL_ONLY and not parent.finished:
                continue  # no output yet, nothing to forget
            result = self._make_output(parent, to_fail)
            if result is not None:
                results.append(result)
            if parent.finished:
                self._forget(parent)
        return results, to_stop, to_fail

    def _update_child(self, child: _Child, out: EngineCoreOutput, to_stop: list[str], now: float) -> None:
        # ended by EOS or a stop token id: that last token is not part of the text
        stop_terminated = out.finish_reason == "stop" and (out.stop_reason is None or isinstance(out.stop_reason, int))
        stop_string = child.detokenizer.update(out.new_token_ids, stop_terminated)
        # a stop string may end before the last of several new tokens: the rest is dropped
        new_token_ids = out.new_token_ids[:child.detokenizer.num_taken_tokens]
        child.token_ids.extend(new_token_ids)
        if new_token_ids:
            if child.first_token_time is None:
                child.first_token_time = now
            child.last_token_time = now
        if out.new_logprobs is not None and child.logprobs is not None:
            entries = logprobs_to_dicts(out.new_logprobs, self._decode)[:len(new_token_ids)]
            child.logprobs.extend(entries)
            child.cumulative_logprob += sum(e[t].logprob for e, t in zip(entries, new_token_ids))
        if stop_string is not None and out.finish_reason is None:
            child.finish_reason, child.stop_reason = "stop", stop_string
            to_stop.append(child.request.request_id)
        elif out.finish_reason is not None:
            child.finish_reason, child.stop_reason, child.error = out.finish_reason, out.stop_reason, out.error

    def abort(self, request_id: str) -> RequestOutput | None:
        """End every unfinished child of ``request_id`` with finish reason "abort"."""
        parent = self._parents.get(request_id)
        if parent is None:
            return None
        for child in parent.children.values():
            if child.finish_reason is None:
                child.finish_reason = "abort"
        result = self._make_output(parent, [])
        self._forget(parent)
        return result

    def _forget(self, parent: _Parent) -> None:
        self._parents.pop(parent.request_id, None)
        for child_id in parent.children:
            self._parent_of.pop(child_id, None)

    def _make_output(self, parent: _Parent, to_fail: list[str]) -> RequestOutput | None:
        """The parent's output now; a child whose text cannot be made fails (into ``to_fail``)."""
        if parent.kind is OutputKind.FINAL_ONLY and not parent.finished:
            return None
        delta = parent.kind is OutputKind.DELTA
        children = list(parent.children.values())
        if len(children) > 1:
            children.sort(key=lambda c: c.index)
        texts = []
        for child in children:
            try:
                texts.append(child.detokenizer.get_next_output_text(child.finish_reason is not None, delta))
            except Exception as exc:
                texts.append("")
                child.fail("detokenizing the output", exc, to_fail)
        completions = []
        for child, text in zip(children, texts):
            tokens = child.token_ids[child.sent_tokens:] if delta else list(child.token_ids)
            logprobs = child.logprobs
            if delta and logprobs is not None:
                logprobs = logprobs[child.sent_logprobs:]
                child.sent_logprobs = len(child.logprobs)
            child.sent_tokens = len(child.token_ids)
            completions.append(CompletionOutput(child.index, text, tokens, child.cumulative_logprob, logprobs,
                                                child.finish_reason, child.stop_reason, child.error))
        finished = parent.finished
        return RequestOutput(parent.request_id, parent.prompt, parent.prompt_token_ids, parent.prompt_logprobs,
                             completions, finished, parent.num_cached_tokens,
                             _request_metrics(parent) if finished else {})

    def _decode(self, token_id: int) -> str:
        text = self._token_texts.get(token_id)
        if text is None:  # logprobs name k + 1 tokens per position: decode each id once, not every time
            text = self._token_texts[token_id] = self.tokenizer.decode([token_id])
        return text


def _request_metrics(parent: _Parent) -> dict[str, float]:
    """The finished request's stamps (see RequestOutput.metrics); with ``n`` > 1 children the
    request spans the earliest start to the latest token."""
    children = parent.children.values()
    metrics = {"arrival_time": min(c.request.arrival_time for c in children)}
    for key, stamps, pick in (
            ("first_scheduled_time", [c.request.first_scheduled_time for c in children], min),
            ("first_token_time", [c.first_token_time for c in children], min),
            ("last_token_time", [c.last_token_time for c in children], max)):
        present = [stamp for stamp in stamps if stamp is not None]
        if present:
            metrics[key] = pick(present)
    return metrics
