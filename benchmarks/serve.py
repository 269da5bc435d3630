"""The HTTP server under load: N concurrent streaming clients over loopback.

    .venv/bin/python benchmarks/serve.py --num-clients 8 --requests-per-client 4 --output-len 32

Starts ``tokenmill serve`` (the default model, or --model) on a free port, and
runs N clients (AsyncOpenAI), each sending its requests one after another as
streamed completions of exactly --output-len tokens (EOS ignored). Reports
requests/s, output tokens/s, and time to first token (TTFT) and inter-token
latency (ITL) median and p99, as the clients see them. Then, per DESIGN.md's
method, the same prompts go through the offline ``LLM.generate`` in this
process, --num-clients at a time, on a worker thread like the server's engine
loop, and the server/offline throughput ratio is printed: the cost of the HTTP
layer on this machine (skip with --no-offline). On a shared CPU, set
OMP_NUM_THREADS for both.
"""
import argparse
import asyncio
import concurrent.futures
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time

import httpx
import openai

from tokenmill.cli import parse_option
from tokenmill.config import DEFAULT_MODEL

TOPICS = ["the sea", "a lighthouse", "mountains", "a robot", "bread", "the moon", "trains", "a garden",
          "winter", "a library", "rivers", "a violin", "deserts", "a market", "owls", "glass"]


def prompts(num: int) -> list[str]:
    return [f"Write a short story about {TOPICS[i % len(TOPICS)]} (story {i})." for i in range(num)]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))] if ordered else float("nan")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(args: argparse.Namespace, port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "tokenmill.cli", "serve", args.model, "--port", str(port),
               "--served-model-name", "bench", "--log-level", "warning", "--max-model-len", str(args.max_model_len)]
    for flag in ("device", "dtype"):
        if getattr(args, flag):
            command += [f"--{flag}", getattr(args, flag)]
    for option in args.option:
        command += ["-o", option]
    return launch(command, port, args.startup_timeout)


def launch(command: list[str], port: int, startup_timeout: float) -> subprocess.Popen:
    """Run a ``tokenmill serve`` command line and wait until its /health answers 200."""
    process = subprocess.Popen(command)
    deadline = time.monotonic() + startup_timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"tokenmill serve exited with {process.returncode} during start-up")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1.0).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    process.kill()
    raise SystemExit(f"tokenmill serve did not answer /health with 200 within {startup_timeout} s")


async def one_request(client: openai.AsyncOpenAI, prompt: str, output_len: int) -> dict:
    began = time.perf_counter()
    arrivals = []
    num_tokens = 0
    stream = await client.completions.create(model="bench", prompt=prompt, max_tokens=output_len, temperature=0.0,
                                             stream=True, stream_options={"include_usage": True},
                                             extra_body={"ignore_eos": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            arrivals.append(time.perf_counter())
        if chunk.usage is not None:
            num_tokens = chunk.usage.completion_tokens
    return {"ttft": arrivals[0] - began, "itl": [b - a for a, b in zip(arrivals, arrivals[1:])],
            "tokens": num_tokens}


async def load(url: str, args: argparse.Namespace) -> tuple[list[dict], float]:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    all_prompts = prompts(args.num_clients * args.requests_per_client)
    await one_request(client, "warm up", 4)

    async def run_client(index: int) -> list[dict]:
        mine = all_prompts[index::args.num_clients]
        return [await one_request(client, prompt, args.output_len) for prompt in mine]

    began = time.perf_counter()
    per_client = await asyncio.gather(*(run_client(i) for i in range(args.num_clients)))
    return [r for results in per_client for r in results], time.perf_counter() - began


def offline_tokens_per_s(args: argparse.Namespace) -> float:
    from tokenmill.llm import LLM
    from tokenmill.sampling_params import SamplingParams

    options = {"max_model_len": args.max_model_len}
    for flag in ("device", "dtype"):
        if getattr(args, flag):
            options[flag] = getattr(args, flag)
    options.update(parse_option(item) for item in args.option)
    llm = LLM(args.model, **options)
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    llm.generate(["warm up"], SamplingParams(max_tokens=4), use_tqdm=False)
    all_prompts = prompts(args.num_clients * args.requests_per_client)
    # waves of num_clients prompts: the server's concurrency (its clients' requests are
    # all equally long, so they start and end together)
    waves = [all_prompts[i:i + args.num_clients] for i in range(0, len(all_prompts), args.num_clients)]

    def run_waves() -> int:
        return sum(len(o.outputs[0].token_ids) for wave in waves for o in llm.generate(wave, params, use_tqdm=False))

    began = time.perf_counter()
    # in a worker thread, as the server runs its engine loop: torch's CPU thread pools
    # behave differently on the main thread (much slower on an oversubscribed machine)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        num_tokens = pool.submit(run_waves).result()
    return num_tokens / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--num-clients", type=int, default=8)
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--device")
    parser.add_argument("--dtype")
    parser.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE",
                        help="an engine option for the server (and the offline run)")
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    parser.add_argument("--no-offline", action="store_true", help="skip the offline LLM.generate comparison")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    port = free_port()
    server = start_server(args, port)
    try:
        results, elapsed = asyncio.run(load(f"http://127.0.0.1:{port}", args))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)
    ttfts = [r["ttft"] for r in results]
    itls = [gap for r in results for gap in r["itl"]]
    num_tokens = sum(r["tokens"] for r in results)
    report = {
        "model": args.model, "num_clients": args.num_clients, "num_requests": len(results),
        "output_len": args.output_len, "elapsed_s": round(elapsed, 3),
        "requests_per_s": round(len(results) / elapsed, 3), "output_tokens_per_s": round(num_tokens / elapsed, 1),
        "ttft_median_ms": round(statistics.median(ttfts) * 1e3, 1),
        "ttft_p99_ms": round(percentile(ttfts, 99) * 1e3, 1),
        "itl_median_ms": round(statistics.median(itls) * 1e3, 1),
        "itl_p99_ms": round(percentile(itls, 99) * 1e3, 1),
    }
    if not args.no_offline:
        offline = offline_tokens_per_s(args)
        report["offline_output_tokens_per_s"] = round(offline, 1)
        report["server_over_offline"] = round(report["output_tokens_per_s"] / offline, 3)
    for key, value in report.items():
        print(f"{key:>28}: {value}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
