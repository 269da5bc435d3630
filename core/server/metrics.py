"""Server metrics in the Prometheus text exposition format (version 0.0.4), by hand.

vLLM's metric set under our prefix, with its ``model_name`` label. Gauges and
the engine's cumulative counters come from the latest ``LLMEngine.get_stats()``
snapshot (taken after every step, so a new step in it is one observation of the
per-step token histogram); token counters and latency histograms are observed by
the engine thread as outputs leave each step. The phases of a request (queue,
prefill, decode, inference) come from the engine's own stamps on its finished
output (``RequestOutput.metrics``); time to first token, inter-token latency and
end-to-end latency from when the server saw each output. Rendering happens on
the event loop, so every update and the rendering take one lock.
"""
from __future__ import annotations

import bisect
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ..outputs import RequestOutput


CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "tokenmill:"

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               10.0)
E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 240.0,
               480.0, 960.0)
# queue, prefill, decode and inference time: a phase can take milliseconds (a prefill) or minutes (a queue)
PHASE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0,
                 320.0, 640.0, 1280.0)
# tokens per request: 1, 2, 5, 10, 20, 50, ... (any context length fits under the last)
TOKEN_COUNT_BUCKETS = tuple(float(m * 10 ** e) for e in range(7) for m in (1, 2, 5))
# tokens per step: powers of two up to a large max_num_batched_tokens
ITERATION_TOKEN_BUCKETS = tuple(float(2 ** e) for e in range(16))

# (metric, get_stats key, help): gauges, then counters the engine keeps itself
_STAT_GAUGES = (
    ("num_requests_running", "num_running", "Requests (sequences) in the running batch."),
    ("num_requests_waiting", "num_waiting", "Requests (sequences) waiting to be scheduled."),
    ("kv_cache_usage_perc", "kv_cache_usage", "Fraction of KV cache blocks in use, 0 to 1."),
)
_STAT_COUNTERS = (
    ("num_preemptions_total", "num_preemptions", "Requests preempted (recomputed) so far."),
    ("prefix_cache_queries_total", "prefix_cache_queries", "Prefix cache lookups, in tokens."),
    ("prefix_cache_hits_total", "prefix_cache_hits", "Prefix cache hits, in tokens."),
    ("spec_decode_num_draft_tokens_total", "spec_num_draft_tokens", "Draft tokens proposed."),
    ("spec_decode_num_accepted_tokens_total", "spec_num_accepted_tokens", "Draft tokens accepted."),
    ("spec_decode_num_verify_steps_total", "spec_num_verify_steps", "Request-steps that verified drafts."),
)


@dataclass(slots=True)
class RequestTiming:
    """One request's clock for the latency histograms; written by the engine thread only."""

    arrival_time: float = field(default_factory=time.monotonic)
    last_token_time: float | None = None
    num_generation_tokens: list[int] = field(default_factory=list)  # per completion index, so far


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1


class ServerMetrics:
    def __init__(self, model_name: str = "") -> None:
        self.labels = {"model_name": model_name}
        self._lock = threading.Lock()
        self._stats: dict[str, Any] = {}
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.finished: dict[str, int] = {}  # finish reason -> requests
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)
        self.request_prompt_tokens = Histogram(TOKEN_COUNT_BUCKETS)
        self.request_generation_tokens = Histogram(TOKEN_COUNT_BUCKETS)
        self.queue_time = Histogram(PHASE_BUCKETS)
        self.prefill_time = Histogram(PHASE_BUCKETS)
        self.decode_time = Histogram(PHASE_BUCKETS)
        self.inference_time = Histogram(PHASE_BUCKETS)
        self.iteration_tokens = Histogram(ITERATION_TOKEN_BUCKETS)
        self._num_steps_seen = 0

    # ------------------------------------------------------------ engine thread

    def update_engine_stats(self, stats: dict[str, Any]) -> None:
        """Called after every engine step (and idle wake-up): a step not seen yet adds its token
        count to the per-step histogram."""
        with self._lock:
            self._stats = stats
            num_steps = stats.get("num_steps", 0)
            if num_steps > self._num_steps_seen:
                self._num_steps_seen = num_steps
                self.iteration_tokens.observe(stats.get("last_step_num_tokens", 0))

    def observe_output(self, timing: RequestTiming, output: RequestOutput, now: float) -> None:
        """Count one DELTA output's tokens and time it against the stream's previous one."""
        num_new = 0
        counts = timing.num_generation_tokens
        for completion in output.outputs:
            if completion.token_ids:
                num_new += len(completion.token_ids)
                if completion.index >= len(counts):
                    counts.extend([0] * (completion.index + 1 - len(counts)))
                counts[completion.index] += len(completion.token_ids)
        with self._lock:
            if num_new:
                if timing.last_token_time is None:
                    self.prompt_tokens += len(output.prompt_token_ids)
                    self.ttft.observe(now - timing.arrival_time)
                else:
                    self.itl.observe(now - timing.last_token_time)
                timing.last_token_time = now
                self.generation_tokens += num_new
            if output.finished:
                self.e2e.observe(now - timing.arrival_time)
                for completion in output.outputs:
                    reason = completion.finish_reason or "abort"
                    self.finished[reason] = self.finished.get(reason, 0) + 1
                    # per completion, as vLLM counts each of n samples as a request of its own
                    self.request_prompt_tokens.observe(len(output.prompt_token_ids))
                    index = completion.index
                    self.request_generation_tokens.observe(counts[index] if index < len(counts) else 0)
                self._observe_phases(output.metrics)

    def _observe_phases(self, stamps: dict[str, float]) -> None:
        """Queue (arrival to first scheduled), prefill (to the first token), decode (first to last
        token) and inference (first scheduled to last token) time of a finished request; a phase it
        never reached (aborted while waiting) is not observed."""
        scheduled = stamps.get("first_scheduled_time")
        first_token, last_token = stamps.get("first_token_time"), stamps.get("last_token_time")
        if scheduled is not None:
            if "arrival_time" in stamps:
                self.queue_time.observe(max(scheduled - stamps["arrival_time"], 0.0))
            if first_token is not None:
                self.prefill_time.observe(max(first_token - scheduled, 0.0))
            if last_token is not None:
                self.inference_time.observe(max(last_token - scheduled, 0.0))
        if first_token is not None and last_token is not None:
            self.decode_time.observe(last_token - first_token)

    # ------------------------------------------------------------ event loop

    def render(self) -> str:
        with self._lock:
            lines: list[str] = []
            stats = self._stats
            for name, key, help_text in _STAT_GAUGES:
                self._family(lines, name, "gauge", help_text, [({}, stats.get(key, 0))])
            for name, key, help_text in _STAT_COUNTERS:
                self._family(lines, name, "counter", help_text, [({}, stats.get(key, 0))])
            self._family(lines, "prefix_cache_hit_rate", "gauge", "Prefix cache hits / queries so far.",
                         [({}, _ratio(stats.get("prefix_cache_hits", 0), stats.get("prefix_cache_queries", 0)))])
            self._family(lines, "spec_decode_acceptance_rate", "gauge", "Accepted / proposed draft tokens so far.",
                         [({}, _ratio(stats.get("spec_num_accepted_tokens", 0),
                                      stats.get("spec_num_draft_tokens", 0)))])
            self._family(lines, "prompt_tokens_total", "counter", "Prompt tokens processed.",
                         [({}, self.prompt_tokens)])
            self._family(lines, "generation_tokens_total", "counter", "Tokens generated.",
                         [({}, self.generation_tokens)])
            self._family(lines, "request_success_total", "counter", "Finished sequences, by finish reason.",
                         [({"finished_reason": r}, n) for r, n in sorted(self.finished.items())])
            self._histogram(lines, "time_to_first_token_seconds", "Time to the first generated token.", self.ttft)
            self._histogram(lines, "inter_token_latency_seconds", "Time between two outputs of a request.",
                            self.itl)
            self._histogram(lines, "e2e_request_latency_seconds", "Time from arrival to the last output.",
                            self.e2e)
            for name, help_text, histogram in (
                    ("request_prompt_tokens", "Prompt tokens of each finished request.", self.request_prompt_tokens),
                    ("request_generation_tokens", "Generated tokens of each finished request.",
                     self.request_generation_tokens),
                    ("request_queue_time_seconds", "Time from arrival to first being scheduled.", self.queue_time),
                    ("request_prefill_time_seconds", "Time from first being scheduled to the first token.",
                     self.prefill_time),
                    ("request_decode_time_seconds", "Time from the first token to the last.", self.decode_time),
                    ("request_inference_time_seconds", "Time from first being scheduled to the last token.",
                     self.inference_time),
                    ("iteration_tokens_total", "Tokens scheduled per engine step (prompt and generated).",
                     self.iteration_tokens)):
                self._histogram(lines, name, help_text, histogram)
        return "\n".join(lines) + "\n"

    def _family(self, lines: list[str], name: str, kind: str, help_text: str,
                samples: list[tuple[dict[str, str], float]]) -> None:
        lines += [f"# HELP {PREFIX}{name} {help_text}", f"# TYPE {PREFIX}{name} {kind}"]
        lines += [f"{PREFIX}{name}{self._labels(extra)} {_number(value)}" for extra, value in samples]

    def _histogram(self, lines: list[str], name: str, help_text: str, histogram: Histogram) -> None:
        lines += [f"# HELP {PREFIX}{name} {help_text}", f"# TYPE {PREFIX}{name} histogram"]
        cumulative = 0
        for bound, count in zip([*histogram.buckets, float("inf")], histogram.counts):
            cumulative += count
            lines.append(f"{PREFIX}{name}_bucket{self._labels({'le': _number(bound)})} {cumulative}")
        lines.append(f"{PREFIX}{name}_sum{self._labels({})} {_number(histogram.sum)}")
        lines.append(f"{PREFIX}{name}_count{self._labels({})} {histogram.count}")

    def _labels(self, extra: dict[str, str]) -> str:
        pairs = {**self.labels, **extra}
        return "{" + ",".join(f'{key}="{_escape(value)}"' for key, value in pairs.items()) + "}"


def _ratio(part: float, whole: float) -> float:
    return part / whole if whole else 0.0


def _number(value: float) -> str:
    if value == float("inf"):
        return "+Inf"
    return repr(float(value))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
