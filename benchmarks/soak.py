"""A soak test: minutes of mixed traffic against one live ``tokenmill serve``, then a report.

    .venv/bin/python benchmarks/soak.py --duration 300            # default model (SmolLM2-135M GGUF), 5 minutes
    .venv/bin/python benchmarks/soak.py --duration 30 --json out.json

The server runs with n-gram speculative decoding (--speculative-config) and a bounded queue.
A few workers (fixed seed, so runs are comparable) pick weighted kinds of traffic: streamed
and plain completions and chats (some n=2, logprobs, seeded sampling), clients that
disconnect mid-stream or abort before the answer, structured outputs (json_schema,
guided_choice, guided_regex: a 200 answer must parse / match) and bad inputs, each in turn,
that must be 4xx. Every ~20-30 s one or two ~7 MB prompts go in, to be refused for length
(400); the first two go in together halfway through the warm-up, and the starting RSS is
read once they are answered, so one-time allocations (the first huge text through the
tokenizer) are not counted as growth. A canary streams one long greedy completion after another.

The report:
  duration      seconds of traffic, and when the last request in flight finished
  requests      sent and 2xx per kind, median and max latency (s)
  errors        (kind -> status) counts: a 4xx (or 2xx) status the kind should not get;
                5xx; transport errors and timeouts; then the verdict line "5xx: N"
  stream errors 200 streams that carried a {"error": ...} event (or no [DONE]), by message
  bad outputs   structured outputs that do not parse / match, a wrong number of choices
  canary        chunks; the longest gap over the run (from the send to the first chunk,
                then between chunks), and the longest that overlapped a huge prompt
  kv            /metrics KV usage, running and waiting once traffic stopped and drained
  rss           server VmRSS once warmed up (--warmup s, and the first huge prompt
                pair answered) and at the end, and the growth
  health        GET /health at the end; then the server's exit code after SIGINT
and one PASS/FAIL line per target: no 5xx, KV back to 0, RSS growth < 10%, canary gap
during huge prompts < 1 s (N/A when no huge prompt overlapped the canary), health 200.
"""
import argparse
import asyncio
import contextlib
import functools
import itertools
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

from serve import free_port, launch  # benchmarks/serve.py: this script's directory is on sys.path

DEFAULT_SPEC_CONFIG = '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}'
REQUEST_DEADLINE_S = 120.0  # no request holds a worker longer, even against a dead engine
TOPICS = ["the sea", "a lighthouse", "mountains", "a robot", "bread", "the moon", "trains", "a garden"]
HUGE_PROMPT = json.dumps({"model": "bench", "prompt": "lorem ipsum " * 583_000, "max_tokens": 4}).encode()  # ~7 MB
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
CHOICES = ["red", "green", "blue"]
REGEX = "[a-z]{3,8}"


def _body(fields: dict) -> bytes:
    return json.dumps({"model": "bench", **fields}).encode()


# (label, path, raw body): each must be answered 4xx
BAD_INPUTS = [
    ("temperature", "/v1/completions", _body({"prompt": "hi", "temperature": -3})),
    ("n_0", "/v1/completions", _body({"prompt": "hi", "n": 0})),
    ("seed_2^64", "/v1/completions", _body({"prompt": "hi", "seed": 18446744073709551616, "max_tokens": 4})),
    ("lone_surrogate", "/v1/completions", b'{"model": "bench", "prompt": "a\\ud800b", "max_tokens": 4}'),
    ("max_tokens_1e9", "/v1/completions", _body({"prompt": "hi", "max_tokens": 1_000_000_000})),
    ("json_schema_missing", "/v1/chat/completions", _body({"messages": [{"role": "user", "content": "hi"}],
                                                           "response_format": {"type": "json_schema"}})),
    ("unknown_model", "/v1/completions", _body({"prompt": "hi", "model": "nope"})),
    ("malformed_json", "/v1/completions", b'{"model": "bench", "prompt": '),
    ("prompt_logprobs_99", "/v1/completions", _body({"prompt": "hi", "prompt_logprobs": 99, "max_tokens": 4})),
]


@dataclass(slots=True)
class Record:
    kind: str
    status: int | str = "none"       # HTTP status, or "aborted" / "timeout" / "transport: <error>"
    latency_s: float = 0.0
    stream_error: str | None = None  # a 200 stream's error event, or "no [DONE]"
    bad_output: str | None = None    # a 200 answer that breaks its request's contract


@dataclass(slots=True)
class Soak:
    client: httpx.AsyncClient
    stop_at: float
    records: list[Record] = field(default_factory=list)
    huge_windows: list[tuple[float, float]] = field(default_factory=list)  # (sent, answered)
    canary_streams: list[list[float]] = field(default_factory=list)        # [sent, chunk arrivals...]
    bad_inputs: itertools.cycle = field(default_factory=lambda: itertools.cycle(BAD_INPUTS))
    first_huge_answered: asyncio.Event = field(default_factory=asyncio.Event)

    async def run_one(self, kind: str, traffic, *args) -> Record:
        record = Record(kind)
        began = time.monotonic()
        try:
            await asyncio.wait_for(traffic(self, record, *args), REQUEST_DEADLINE_S)
        except (asyncio.TimeoutError, httpx.TimeoutException):
            record.status = "timeout"
        except httpx.TransportError as exc:
            record.status = f"transport: {type(exc).__name__}"
        except (ValueError, KeyError, TypeError) as exc:  # a body that is not the JSON the API promises
            record.bad_output = f"{kind}: unreadable answer: {exc!r}"[:120]
        record.latency_s = time.monotonic() - began
        self.records.append(record)
        return record


def expects(record: Record) -> bool:
    """Whether ``record`` got what its kind should get."""
    if record.kind.startswith("bad/"):
        return isinstance(record.status, int) and 400 <= record.status < 500
    if record.kind == "huge_prompt":
        return record.status == 400
    return record.status == 200 or (record.kind == "abort" and record.status == "aborted")


# ---------------------------------------------------------------- requests

def prompt(rng: random.Random) -> str:
    return f"Write a short story about {rng.choice(TOPICS)}."


def chat(text: str) -> dict:
    return {"messages": [{"role": "user", "content": text}]}


async def streamed(soak: Soak, record: Record, path: str, body: dict, max_chunks: int | None = None,
                   arrivals: list[float] | None = None) -> None:
    """Read a stream to [DONE], or ``max_chunks`` data chunks (then the client walks away),
    appending each chunk's arrival time to ``arrivals``; an error event or a missing [DONE]
    is noted on ``record``."""
    arrivals = [] if arrivals is None else arrivals
    async with soak.client.stream("POST", path, json={"model": "bench", "stream": True, **body}) as response:
        record.status = response.status_code
        if response.status_code != 200:
            return
        num_chunks = 0
        async for line in response.aiter_lines():
            if line == "data: [DONE]":
                return
            if line.startswith("data: "):
                arrivals.append(time.monotonic())
                num_chunks += 1
                event = json.loads(line[6:])
                if "error" in event:
                    record.stream_error = str(event["error"].get("message", event["error"]))
                if num_chunks == max_chunks:
                    return
    record.stream_error = record.stream_error or "no [DONE]"


async def post(soak: Soak, record: Record, path: str, body: dict) -> list[str] | None:
    """The choices' texts of a 200 answer."""
    response = await soak.client.post(path, json={"model": "bench", **body})
    record.status = response.status_code
    if response.status_code != 200:
        return None
    return [c["text"] if "text" in c else c["message"]["content"] for c in response.json()["choices"]]


async def stream_completion(soak: Soak, record: Record, rng: random.Random) -> None:
    await streamed(soak, record, "/v1/completions", {"prompt": prompt(rng), "max_tokens": rng.randint(8, 48)})


async def stream_chat(soak: Soak, record: Record, rng: random.Random) -> None:
    await streamed(soak, record, "/v1/chat/completions", {**chat(prompt(rng)), "max_tokens": rng.randint(8, 48)})


async def plain(soak: Soak, record: Record, rng: random.Random, chat_api: bool) -> None:
    """A non-streamed request: plain, n=2, with logprobs, or seeded sampling at 0.8."""
    logprobs = {"logprobs": True, "top_logprobs": 2} if chat_api else {"logprobs": 2}
    variant = rng.choice([{}, {"n": 2}, logprobs, {"seed": rng.randrange(2**31), "temperature": 0.8}])
    body = {**(chat(prompt(rng)) if chat_api else {"prompt": prompt(rng)}), **variant, "max_tokens": rng.randint(8, 48)}
    texts = await post(soak, record, "/v1/chat/completions" if chat_api else "/v1/completions", body)
    if texts is not None and len(texts) != variant.get("n", 1):
        record.bad_output = f"{len(texts)} choices for n={variant.get('n', 1)}"


async def disconnect(soak: Soak, record: Record, rng: random.Random) -> None:
    await streamed(soak, record, "/v1/completions", {"prompt": prompt(rng), "max_tokens": 48}, rng.randint(1, 3))


async def abort(soak: Soak, record: Record, rng: random.Random) -> None:
    task = asyncio.ensure_future(soak.client.post("/v1/completions",
                                                  json={"model": "bench", "prompt": prompt(rng), "max_tokens": 48}))
    await asyncio.sleep(rng.uniform(0.05, 0.5))
    if task.done():
        record.status = task.result().status_code
        return
    task.cancel()  # closes the connection under the pending request
    record.status = "aborted"


def is_person(text: str) -> bool:
    try:
        value = json.loads(text)
        return set(value) == {"name", "age"} and len(value["name"]) <= 12 and 0 <= value["age"] <= 120
    except (ValueError, TypeError):
        return False


# kind: (path, body, the check a 200 answer's text must pass)
STRUCTURED = {
    "json_schema": ("/v1/chat/completions", {**chat("Describe a person as JSON."), "max_tokens": 64,
                    "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": PERSON}}},
                    is_person),
    "guided_choice": ("/v1/completions", {"prompt": "My favourite colour is", "guided_choice": CHOICES,
                                          "max_tokens": 8}, lambda text: text in CHOICES),
    "guided_regex": ("/v1/completions", {"prompt": "One lowercase word:", "guided_regex": REGEX, "max_tokens": 12},
                     lambda text: re.fullmatch(REGEX, text) is not None),
}


async def structured(soak: Soak, record: Record, rng: random.Random) -> None:
    path, body, check = STRUCTURED[record.kind]
    texts = await post(soak, record, path, body)
    if texts is not None and not check(texts[0]):
        record.bad_output = f"{record.kind}: {texts[0][:60]!r}"


async def raw(soak: Soak, record: Record, path: str, body: bytes) -> None:
    response = await soak.client.post(path, content=body, headers={"content-type": "application/json"})
    record.status = response.status_code


async def canary(soak: Soak, record: Record) -> None:
    times = [time.monotonic()]  # the send, then the chunks: kept even if the stream breaks off
    soak.canary_streams.append(times)
    body = {"prompt": "Count slowly: one, two, three,", "max_tokens": 200, "ignore_eos": True, "temperature": 0}
    await streamed(soak, record, "/v1/completions", body, arrivals=times)


TRAFFIC = {  # kind: (traffic, weight); "bad" takes the next of BAD_INPUTS
    "stream_completion": (stream_completion, 3), "stream_chat": (stream_chat, 3),
    "completion": (functools.partial(plain, chat_api=False), 2), "chat": (functools.partial(plain, chat_api=True), 2),
    "disconnect": (disconnect, 1), "abort": (abort, 1), "json_schema": (structured, 1),
    "guided_choice": (structured, 1), "guided_regex": (structured, 1), "bad": (raw, 2),
}


# ---------------------------------------------------------------- loops

async def worker(soak: Soak, rng: random.Random) -> None:
    kinds, weights = list(TRAFFIC), [weight for _, weight in TRAFFIC.values()]
    while time.monotonic() < soak.stop_at:
        kind = rng.choices(kinds, weights)[0]
        if kind == "bad":
            label, path, body = next(soak.bad_inputs)
            await soak.run_one(f"bad/{label}", raw, path, body)
        else:
            await soak.run_one(kind, TRAFFIC[kind][0], rng)
        await asyncio.sleep(rng.uniform(0.0, 0.3))  # think time; also paces fast failures


async def canary_loop(soak: Soak) -> None:
    while time.monotonic() < soak.stop_at:
        if (await soak.run_one("canary", canary)).status != 200:
            await asyncio.sleep(0.5)


async def huge_prompt_loop(soak: Soak, rng: random.Random, first_pause: float) -> None:
    async def send() -> None:
        began = time.monotonic()
        await soak.run_one("huge_prompt", raw, "/v1/completions", HUGE_PROMPT)
        soak.huge_windows.append((began, time.monotonic()))

    pause, num_at_once = first_pause, 2  # the first two at once: each tokenizer worker allocates its buffers
    while time.monotonic() + pause < soak.stop_at:
        await asyncio.sleep(pause)
        await asyncio.gather(*(send() for _ in range(num_at_once)))
        soak.first_huge_answered.set()
        pause, num_at_once = rng.uniform(20, 30), 2 if rng.random() < 0.3 else 1


def rss_mib(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(round(int(line.split()[1]) / 1024, 1) for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return None


async def drained_gauges(client: httpx.AsyncClient) -> dict[str, float] | str:
    """The /metrics gauges once all are 0, or as they stood after ~10 s of polling."""
    names = ("kv_cache_usage_perc", "num_requests_running", "num_requests_waiting")
    for _ in range(20):
        try:
            text = (await client.get("/metrics", timeout=5)).text
        except httpx.HTTPError as exc:
            return f"unreadable: {exc!r}"
        last = {name: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() for name in names
                if line.startswith((f"tokenmill:{name}{{", f"tokenmill:{name} "))}
        if last and not any(last.values()):
            break
        await asyncio.sleep(0.5)
    return last


async def soak(args: argparse.Namespace, url: str, pid: int) -> dict:
    timeout = httpx.Timeout(60.0, connect=5.0)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=httpx.Limits(max_connections=64)) as client:
        began = time.monotonic()
        state = Soak(client, stop_at=began + args.duration)
        rng = random.Random(args.seed)
        warmup_s = min(args.warmup, args.duration / 2)
        tasks = [asyncio.create_task(worker(state, random.Random(rng.random()))) for _ in range(args.workers)]
        tasks += [asyncio.create_task(canary_loop(state)),
                  asyncio.create_task(huge_prompt_loop(state, random.Random(rng.random()), warmup_s / 2))]
        await asyncio.sleep(warmup_s)
        # the tokenizer workers' buffers for a huge prompt are a one-time allocation too
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(state.first_huge_answered.wait(), max(0.0, state.stop_at - time.monotonic()))
        rss = {"start_read_after_s": round(time.monotonic() - began, 1), "start_mib": rss_mib(pid),
               "start_after_first_huge_prompt": state.first_huge_answered.is_set()}
        await asyncio.gather(*tasks)  # each loop stops at stop_at, after its request in flight
        drained_s = time.monotonic() - began
        kv = await drained_gauges(client)
        rss["end_mib"] = rss_mib(pid)
        try:
            health: int | str = (await client.get("/health", timeout=5)).status_code
        except httpx.HTTPError as exc:
            health = f"transport: {type(exc).__name__}"
    return summarize(state, args.duration, drained_s, kv, rss, health)


# ---------------------------------------------------------------- report

def counts(records: list[Record], label) -> dict[str, int]:
    """How many records share each label; records labelled None or False are left out."""
    return dict(Counter(filter(None, map(label, records))).most_common())


def describe(record: Record) -> str:
    return f"{record.kind} -> {record.status}"


def summarize(state: Soak, traffic_s: float, drained_s: float, kv, rss: dict, health) -> dict:
    by_kind: dict[str, list[Record]] = {}
    for record in state.records:
        by_kind.setdefault(record.kind, []).append(record)
    gaps = [(b - a, a, b) for stream in state.canary_streams for a, b in zip(stream, stream[1:])]
    huge_gaps = [g for g, a, b in gaps if any(a < end and b > start for start, end in state.huge_windows)]
    longest_huge_gap = max(huge_gaps, default=None)
    huge_gap_s = None if longest_huge_gap is None else round(longest_huge_gap, 3)
    start_mib, end_mib = rss["start_mib"], rss["end_mib"]
    growth = (end_mib - start_mib) / start_mib * 100 if start_mib and end_mib else None
    fivexx = counts(state.records, lambda r: isinstance(r.status, int) and r.status >= 500 and describe(r))
    return {
        "traffic_s": traffic_s, "drained_after_s": round(drained_s, 1), "huge_prompts": len(state.huge_windows),
        "requests": {kind: {"sent": len(rs), "2xx": sum(isinstance(r.status, int) and r.status < 300 for r in rs),
                            "median_s": round(statistics.median(r.latency_s for r in rs), 3),
                            "max_s": round(max(r.latency_s for r in rs), 3)} for kind, rs in sorted(by_kind.items())},
        "unexpected_status": counts(state.records, lambda r: not expects(r) and isinstance(r.status, int)
                                    and r.status < 500 and describe(r)),
        "5xx": fivexx,
        "transport_errors": counts(state.records, lambda r: isinstance(r.status, str)
                                   and r.status.startswith(("transport", "timeout")) and describe(r)),
        "stream_errors": counts(state.records, lambda r: r.stream_error),
        "bad_outputs": counts(state.records, lambda r: r.bad_output),
        "canary": {"requests": len(state.canary_streams), "chunks": sum(len(s) - 1 for s in state.canary_streams),
                   "longest_gap_s": round(max((g for g, _, _ in gaps), default=0.0), 3),
                   "longest_gap_during_huge_prompts_s": huge_gap_s,
                   "gaps_during_huge_prompts": len(huge_gaps)},
        "kv_after_drain": kv,
        "rss": {**rss, "growth_perc": None if growth is None else round(growth, 2)},
        "health": health,
        "targets": {"no 5xx": not fivexx, "KV back to 0": isinstance(kv, dict) and bool(kv) and not any(kv.values()),
                    "RSS growth < 10%": growth is not None and growth < 10,
                    "canary gap < 1 s during huge prompts": None if huge_gap_s is None else huge_gap_s < 1,
                    "health 200 at the end": health == 200},
    }


def print_report(report: dict) -> None:
    print(f"duration: {report['traffic_s']} s of traffic, the last request finished after "
          f"{report['drained_after_s']} s; huge prompts sent: {report['huge_prompts']}")
    print(f"{'kind':>28} {'sent':>6} {'2xx':>6} {'median s':>9} {'max s':>8}")
    for kind, row in report["requests"].items():
        print(f"{kind:>28} {row['sent']:>6} {row['2xx']:>6} {row['median_s']:>9} {row['max_s']:>8}")
    for key, title in [("unexpected_status", "unexpected status (kind -> status)"), ("5xx", "5xx (kind -> status)"),
                       ("transport_errors", "transport errors and timeouts (kind -> error)"),
                       ("stream_errors", "error events in 200 streams (message)"),
                       ("bad_outputs", "bad outputs (kind: answer)")]:
        print(f"{title}:" + ("" if report[key] else " none"))
        for what, count in report[key].items():
            print(f"  {count:>5}  {what}")
    print(f"5xx: {sum(report['5xx'].values())}")
    canary = report["canary"]
    print(f"canary: {canary['requests']} requests, {canary['chunks']} chunks, longest gap {canary['longest_gap_s']} s, "
          f"longest gap during huge prompts {canary['longest_gap_during_huge_prompts_s']} s "
          f"({canary['gaps_during_huge_prompts']} gaps overlapped one)")
    print(f"kv after drain: {report['kv_after_drain']}")
    rss = report["rss"]
    print(f"server RSS (start read after {rss['start_read_after_s']} s of traffic, "
          f"{'after' if rss['start_after_first_huge_prompt'] else 'before'} the first huge prompts were answered): "
          f"{rss['start_mib']} MiB -> {rss['end_mib']} MiB, growth {rss['growth_perc']} %")
    print(f"health at the end: {report['health']}")
    print(f"server exit code after SIGINT: {report['exit_code']}")
    for target, passed in report["targets"].items():
        print(f"{'N/A ' if passed is None else 'PASS' if passed else 'FAIL'}  {target}")


# ---------------------------------------------------------------- the server

def start_server(args: argparse.Namespace, port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "tokenmill.cli", "serve", "--port", str(port), "--served-model-name", "bench",
               "--log-level", "warning", "--max-model-len", str(args.max_model_len),
               "--speculative-config", args.speculative_config, "--max-num-queued-requests", "64"]
    command += ["--model", args.model] if args.model else []
    for option in args.option:
        command += ["-o", option]
    return launch(command, port, args.startup_timeout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=300.0, help="seconds of traffic")
    parser.add_argument("--model", help="default: the server's default model")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--speculative-config", default=DEFAULT_SPEC_CONFIG)
    parser.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE",
                        help="an engine option for the server")
    parser.add_argument("--workers", type=int, default=3, help="concurrent traffic workers, besides the canary")
    parser.add_argument("--warmup", type=float, default=20.0,
                        help="seconds of traffic (at most half the duration, and at least until the first "
                        "huge prompts are answered) before the starting RSS is read")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--startup-timeout", type=float, default=120.0)
    parser.add_argument("--json", help="also write the report to this file")
    args = parser.parse_args()

    port = free_port()
    server = start_server(args, port)
    try:
        report = asyncio.run(soak(args, f"http://127.0.0.1:{port}", server.pid))
    finally:
        server.send_signal(signal.SIGINT)
        try:
            exit_code: int | str = server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            exit_code = f"killed after 60 s of SIGINT ({server.wait()})"
    report["exit_code"] = exit_code
    print_report(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
