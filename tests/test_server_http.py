"""HTTP details the OpenAI clients do not look at: what the OpenAPI document promises,
the headers that go with 401, 405 and 503, the Authorization scheme, the limit on
request headers, and how ``tokenmill serve`` ends streams its shutdown cannot wait for.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import jsonschema
import pytest

from server_builders import CHAT_TEMPLATE, MODEL_NAME, make_engine, make_tiny_model, run_server, wait_until
from tokenmill.server.metrics import CONTENT_TYPE

pytestmark = pytest.mark.timeout(120)

PROMPT = "w5 w6 w7"
API_KEY = "s3cret"
GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")
ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def server(tiny_model):
    with run_server(make_engine(tiny_model)) as running:
        yield running


@pytest.fixture(scope="module")
def keyed_server(tiny_model):
    with run_server(make_engine(tiny_model), api_key=API_KEY) as running:
        yield running


def openapi(server, **headers) -> dict:
    return httpx.get(f"{server.url}/openapi.json", headers=headers).json()


def error_responses(operation: dict) -> dict[str, dict]:
    return {status: response for status, response in operation["responses"].items() if status != "200"}


class SlowForward:
    """Replaces a model's forward with one that sleeps ``delay`` seconds first."""

    def __init__(self, model, delay: float) -> None:
        self.inner = model.forward
        self.delay = delay
        model.forward = self

    def __call__(self, *args, **kwargs):
        time.sleep(self.delay)
        return self.inner(*args, **kwargs)


# ---------------------------------------------------------------- the OpenAPI document

def test_generation_routes_document_400_and_no_422(server):
    document = openapi(server)

    for path in GENERATION_PATHS:
        errors = error_responses(document["paths"][path]["post"])
        assert sorted(errors) == ["400", "404", "413", "431", "503"]
        assert all(response["content"] == {"application/json": {"schema": ERROR_REF}} for response in errors.values())
    assert "422" not in json.dumps(document["paths"])
    assert not {"HTTPValidationError", "ValidationError"} & set(document["components"]["schemas"])


def test_error_schema_is_the_body_of_a_400(server):
    schemas = openapi(server)["components"]["schemas"]
    response = httpx.post(f"{server.api_url}/completions", json={"model": MODEL_NAME, "prompt": PROMPT, "n": "x"})

    assert response.status_code == 400
    assert schemas["ErrorInfo"]["required"] == ["message", "type", "param", "code"]
    jsonschema.validate(response.json(), {**ERROR_REF, "components": {"schemas": schemas}})


def test_an_api_key_adds_401_to_every_route_but_health(keyed_server):
    paths = openapi(keyed_server, authorization=f"Bearer {API_KEY}")["paths"]

    for path in GENERATION_PATHS:
        assert sorted(error_responses(paths[path]["post"])) == ["400", "401", "404", "413", "431", "503"]
    assert sorted(error_responses(paths["/v1/models"]["get"])) == ["401", "431"]
    assert sorted(error_responses(paths["/metrics"]["get"])) == ["401", "431"]
    assert sorted(error_responses(paths["/health"]["get"])) == ["431", "503"]


def test_health_is_documented_as_an_empty_200_and_answers_one(server):
    responses = openapi(server)["paths"]["/health"]["get"]["responses"]
    response = httpx.get(f"{server.url}/health")

    assert "content" not in responses["200"]
    assert responses["503"]["content"] == {"application/json": {"schema": ERROR_REF}}
    assert (response.status_code, response.content, response.headers.get("content-type")) == (200, b"", None)


def test_metrics_are_documented_as_prometheus_text(server):
    responses = openapi(server)["paths"]["/metrics"]["get"]["responses"]
    response = httpx.get(f"{server.url}/metrics")

    assert responses["200"]["content"] == {CONTENT_TYPE: {"schema": {"type": "string"}}}
    assert response.headers["content-type"] == CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"


# ---------------------------------------------------------------- status headers

def test_405_names_the_allowed_method(server):
    response = httpx.get(f"{server.api_url}/completions")

    assert response.status_code == 405
    assert response.headers["allow"] == "POST"
    assert response.json()["error"]["code"] == 405


def test_full_queue_503_asks_to_retry_after_a_second(tiny_model):
    engine = make_engine(tiny_model, max_num_seqs=1, max_num_queued_requests=1)
    SlowForward(engine.core.model, delay=0.02)  # the running request holds its slot for seconds
    long = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 100, "ignore_eos": True, "stream": True}
    with run_server(engine) as server, httpx.Client(base_url=server.api_url) as client:
        with client.stream("POST", "/completions", json=long) as running:
            lines = running.iter_lines()  # kept: a dropped iterator closes the response
            next(lines)  # generating: it holds the only running slot
            with client.stream("POST", "/completions", json=long):  # admitted: it fills the queue
                response = client.post("/completions", json={"model": MODEL_NAME, "prompt": PROMPT})

    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert "max_num_queued_requests=1" in response.json()["error"]["message"]


# ---------------------------------------------------------------- the API key

def test_401_asks_for_a_bearer_token(keyed_server):
    response = httpx.get(f"{keyed_server.api_url}/models", headers={"authorization": "Bearer wrong"})

    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("authorization", [f"Bearer {API_KEY}", f"bearer {API_KEY}", f"BEARER {API_KEY}",
                                           f"Bearer  {API_KEY}"])
def test_the_auth_scheme_is_case_insensitive(keyed_server, authorization):
    response = httpx.get(f"{keyed_server.api_url}/models", headers={"authorization": authorization})

    assert response.status_code == 200


@pytest.mark.parametrize("authorization", [API_KEY, f"Basic {API_KEY}", f"Bearer{API_KEY}", f"Bearer {API_KEY}x",
                                           "Bearer", ""])
def test_anything_but_the_bearer_key_is_refused(keyed_server, authorization):
    response = httpx.get(f"{keyed_server.api_url}/models", headers={"authorization": authorization})

    assert response.status_code == 401


# ---------------------------------------------------------------- header limit

def test_headers_over_32_kib_are_a_431(server):
    response = httpx.get(f"{server.url}/health", headers={"x-padding": "a" * 100_000})

    assert response.status_code == 431
    assert response.json()["error"]["code"] == 431
    assert response.json()["error"]["message"].endswith("at most 32768 are accepted")


def test_headers_under_32_kib_are_accepted(server):
    response = httpx.get(f"{server.url}/health", headers={"x-padding": "a" * 20_000})

    assert response.status_code == 200


# ---------------------------------------------------------------- tokenmill serve

# `tokenmill serve` whose every engine step takes 50 ms, so that a stream outlasts the shutdown timeout
SLOW_SERVE = """
import sys, time
from tokenmill.cli import main
from tokenmill.server import launch

class SlowEngine(launch.LLMEngine):
    def __init__(self, config):
        super().__init__(config)
        forward = self.core.model.forward
        def slow_forward(*args, **kwargs):
            time.sleep(0.05)
            return forward(*args, **kwargs)
        self.core.model.forward = slow_forward

launch.LLMEngine = SlowEngine
sys.exit(main(sys.argv[1:]))
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _is_up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1.0).status_code == 200
    except httpx.TransportError:
        return False


@pytest.mark.timeout(180)
def test_serve_ends_a_stream_past_the_shutdown_timeout_with_an_error_event(tiny_model, tmp_path):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-c", SLOW_SERVE, "serve", str(tiny_model), "--port", str(port),
               "--served-model-name", MODEL_NAME, "--chat-template", CHAT_TEMPLATE, "--log-level", "warning",
               "--device", "cpu", "--dtype", "float32", "--max-model-len", "256", "--num-gpu-blocks-override", "64",
               "--shutdown-timeout", "2"]
    stderr_path = tmp_path / "stderr.txt"
    with open(stderr_path, "w") as stderr:
        process = subprocess.Popen(command, stderr=stderr, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert wait_until(lambda: _is_up(url), timeout=120, interval=0.2), "tokenmill serve did not come up"
        body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 200, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as response:
            lines = response.iter_lines()
            events = [next(lines)]
            process.send_signal(signal.SIGTERM)
            sent_at = time.monotonic()
            events += [line for line in lines if line]
        ended_after = time.monotonic() - sent_at

        assert events[-1] == "data: [DONE]"
        assert "error" in json.loads(events[-2].removeprefix("data: "))
        assert 2 <= ended_after < 5  # failed at the shutdown timeout, not cut by uvicorn's backstop
        assert process.wait(timeout=60) == 0
        assert "Traceback" not in stderr_path.read_text() and "CancelledError" not in stderr_path.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
