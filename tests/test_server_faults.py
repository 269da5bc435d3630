"""The server when things go wrong: wrong API keys, a full queue, clients that leave,
an engine whose model raises, and a shutdown signal while a request is in flight.

Servers here are built in-process around an engine whose model forward is
wrapped (``ScriptedForward``): each step can be slowed down, and the model can
be told to raise from some step on.
"""
import asyncio
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

from server_builders import CHAT_TEMPLATE, MODEL_NAME, make_engine, make_tiny_model, run_server, wait_until

pytestmark = pytest.mark.timeout(120)

PROMPT = "w5 w6 w7"
LONG = dict(model=MODEL_NAME, prompt=PROMPT, temperature=0.0, extra_body={"ignore_eos": True})


class ScriptedForward:
    """Replaces a model's forward: sleeps ``delay`` seconds a step, and raises on every
    step after ``fail_after`` steps once that is set."""

    def __init__(self, model, delay: float = 0.0) -> None:
        self.inner = model.forward
        self.delay = delay
        self.num_calls = 0
        self.fail_after: int | None = None
        model.forward = self

    def __call__(self, *args, **kwargs):
        self.num_calls += 1
        if self.fail_after is not None and self.num_calls > self.fail_after:
            raise RuntimeError("injected failure: the accelerator fell over")
        time.sleep(self.delay)
        return self.inner(*args, **kwargs)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


def slow_engine(tiny_model, delay: float = 0.01, **options):
    engine = make_engine(tiny_model, **options)
    return engine, ScriptedForward(engine.core.model, delay)


def client_for(server, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.api_url, api_key=api_key, max_retries=0)


def aborted_count(server) -> int:
    line = next((line for line in httpx.get(f"{server.url}/metrics").text.splitlines()
                 if line.startswith("tokenmill:request_success_total") and 'finished_reason="abort"' in line), None)
    return 0 if line is None else int(float(line.rsplit(" ", 1)[1]))


def is_idle(server) -> bool:
    stats = server.engine.stats
    return stats["num_running"] == stats["num_waiting"] == 0 and stats["num_free_blocks"] == \
        stats["num_total_blocks"] and server.engine.num_in_flight == 0


# ---------------------------------------------------------------- API key

def test_api_key_guards_every_route_but_health(tiny_model):
    with run_server(make_engine(tiny_model), api_key="s3cret") as server:
        with pytest.raises(openai.AuthenticationError):
            client_for(server, "wrong").completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=2)
        with pytest.raises(openai.AuthenticationError):
            client_for(server, "wrong").models.list()
        assert httpx.get(f"{server.url}/metrics").status_code == 401
        assert httpx.get(f"{server.url}/health").status_code == 200

        response = client_for(server, "s3cret").completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=2)
        assert response.choices[0].finish_reason == "length"


# ---------------------------------------------------------------- admission

def test_full_queue_answers_503_while_admitted_requests_continue(tiny_model):
    engine, _ = slow_engine(tiny_model, max_num_seqs=1, max_num_queued_requests=1)
    with run_server(engine) as server:
        client = client_for(server)
        running = client.completions.create(max_tokens=60, stream=True, **LONG)
        next(iter(running))  # generating: it holds the only running slot
        waiting = client.completions.create(max_tokens=10, stream=True, **LONG)

        with pytest.raises(openai.APIStatusError) as raised:
            client.completions.create(max_tokens=10, **LONG)
        assert raised.value.status_code == 503

        assert [c.choices[0].finish_reason for c in running][-1] == "length"
        assert [c.choices[0].finish_reason for c in waiting][-1] == "length"
        assert wait_until(lambda: is_idle(server))


def test_shutting_down_answers_503_and_finishes_in_flight_requests(tiny_model):
    engine, _ = slow_engine(tiny_model)
    with run_server(engine) as server:
        client = client_for(server)
        in_flight = client.completions.create(max_tokens=30, stream=True, **LONG)
        next(iter(in_flight))

        server.engine.stop_admitting()

        assert httpx.get(f"{server.url}/health").status_code == 503
        with pytest.raises(openai.APIStatusError) as raised:
            client.completions.create(max_tokens=2, **LONG)
        assert raised.value.status_code == 503
        assert [c.choices[0].finish_reason for c in in_flight][-1] == "length"


# ---------------------------------------------------------------- clients that leave

def test_client_leaving_a_non_streamed_request_aborts_it(tiny_model):
    engine, _ = slow_engine(tiny_model)  # 100 tokens take more than a second
    with run_server(engine) as server:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server.api_url}/completions", timeout=0.3,
                       json={"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 100, "ignore_eos": True})

        assert wait_until(lambda: is_idle(server))
        assert aborted_count(server) == 1  # not run to its end


# ---------------------------------------------------------------- the engine fails

def test_engine_failure_ends_every_request_and_turns_health_503(tiny_model):
    engine, forward = slow_engine(tiny_model, delay=0.005)
    with run_server(engine) as server:
        aclient = openai.AsyncOpenAI(base_url=server.api_url, api_key="unused", max_retries=0)

        async def stream() -> BaseException | None:
            try:
                async for _ in await aclient.completions.create(max_tokens=100, stream=True, **LONG):
                    pass
            except openai.APIError as exc:
                return exc
            return None

        async def whole() -> BaseException | None:
            try:
                await aclient.completions.create(max_tokens=100, **LONG)
            except openai.APIError as exc:
                return exc
            return None

        async def fail_once_all_run() -> None:
            while server.engine.stats["num_running"] < 4:
                await asyncio.sleep(0.005)
            forward.fail_after = forward.num_calls + 2

        async def scenario():
            return await asyncio.gather(stream(), stream(), stream(), whole(), fail_once_all_run())

        *stream_errors, whole_error, _ = asyncio.run(scenario())

        assert all(isinstance(e, openai.APIError) and "injected failure" in str(e) for e in stream_errors)
        assert isinstance(whole_error, openai.InternalServerError) and whole_error.status_code == 500
        assert wait_until(lambda: httpx.get(f"{server.url}/health").status_code == 503, timeout=2.0)
        with pytest.raises(openai.APIStatusError) as raised:
            client_for(server).completions.create(max_tokens=2, **LONG)
        assert raised.value.status_code == 503


# ---------------------------------------------------------------- tokenmill serve

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.timeout(180)
def test_serve_finishes_in_flight_requests_on_sigterm_and_exits_0(tiny_model):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "tokenmill.cli", "serve", str(tiny_model), "--port", str(port),
               "--served-model-name", MODEL_NAME, "--chat-template", CHAT_TEMPLATE, "--log-level", "warning",
               "--device", "cpu", "--dtype", "float32", "--max-model-len", "256", "--num-gpu-blocks-override", "64"]
    process = subprocess.Popen(command, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert wait_until(lambda: _is_up(url), timeout=120, interval=0.2), "tokenmill serve did not come up"
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        stream = client.completions.create(max_tokens=200, stream=True, **LONG)
        chunks = [next(iter(stream))]

        process.send_signal(signal.SIGTERM)
        chunks += list(stream)

        assert chunks[-1].choices[0].finish_reason == "length"
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _is_up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1.0).status_code == 200
    except httpx.TransportError:
        return False
