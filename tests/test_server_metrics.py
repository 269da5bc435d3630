"""``/metrics`` exposes vLLM's metric set under the ``tokenmill:`` prefix, each sample
labelled with ``model_name``, with values that add up after a few known requests; and
the engine's stamps the request phases are timed from (``RequestOutput.metrics``).
"""
import math

import openai
import pytest

from server_builders import MODEL_NAME, make_engine, make_tiny_model, run_server
from test_server import _get_metrics, _parse_metrics, _samples
from tokenmill.server.metrics import ServerMetrics

pytestmark = pytest.mark.timeout(120)

COUNTERS = ("num_preemptions_total", "prefix_cache_queries_total", "prefix_cache_hits_total", "prompt_tokens_total",
            "generation_tokens_total", "request_success_total")
GAUGES = ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc")
HISTOGRAMS = ("request_prompt_tokens", "request_generation_tokens", "request_queue_time_seconds",
              "request_prefill_time_seconds", "request_decode_time_seconds", "request_inference_time_seconds",
              "e2e_request_latency_seconds", "time_to_first_token_seconds", "inter_token_latency_seconds",
              "iteration_tokens_total")


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """/metrics after four finished requests: 3-token prompts; 4 + 4 tokens (n=2), 5 tokens (streamed),
    2 tokens (chat, a 2-token prompt) and 3 tokens, the last two with a priority."""
    engine = make_engine(make_tiny_model(tmp_path_factory.mktemp("tiny")), scheduling_policy="priority")
    with run_server(engine) as server:
        client = openai.OpenAI(base_url=server.api_url, api_key="unused", max_retries=0)
        client.completions.create(model=MODEL_NAME, prompt="w5 w6 w7", max_tokens=4, n=2, temperature=0.0)
        for _ in client.completions.create(model=MODEL_NAME, prompt="w8 w9 w10", max_tokens=5, stream=True,
                                           temperature=0.0):
            pass
        client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "w5 w6"}],
                                       max_tokens=2, temperature=0.0, extra_body={"priority": -1})
        client.completions.create(model=MODEL_NAME, prompt="w5 w6 w7", max_tokens=3, temperature=0.0,
                                  extra_body={"priority": 2})
        yield _parse_metrics(_get_metrics(server))


def histogram(families, name: str) -> tuple[list[float], float, float]:
    """(cumulative bucket counts, sum, count) of one histogram family."""
    samples = families[f"tokenmill:{name}"]["samples"]
    buckets = [value for sample, _, value in samples if sample.endswith("_bucket")]
    total = next(value for sample, _, value in samples if sample.endswith("_sum"))
    count = next(value for sample, _, value in samples if sample.endswith("_count"))
    return buckets, total, count


def test_every_metric_is_exposed_with_its_type_and_the_model_name_label(families):
    expected = {**{name: "counter" for name in COUNTERS}, **{name: "gauge" for name in GAUGES},
                **{name: "histogram" for name in HISTOGRAMS}}
    for name, kind in expected.items():
        family = families[f"tokenmill:{name}"]
        assert family["type"] == kind, name
        assert family["samples"] and all(labels["model_name"] == MODEL_NAME for _, labels, _ in family["samples"])


def test_token_counters_and_finish_reasons_add_up(families):
    assert _samples(families, "tokenmill:prompt_tokens_total")[()] == 3 + 3 + 2 + 3  # a prompt once, whatever n
    assert _samples(families, "tokenmill:generation_tokens_total")[()] == 8 + 5 + 2 + 3
    assert _samples(families, "tokenmill:request_success_total") == {("length",): 5}
    assert _samples(families, "tokenmill:num_preemptions_total")[()] == 0
    queries = _samples(families, "tokenmill:prefix_cache_queries_total")[()]
    assert 0 <= _samples(families, "tokenmill:prefix_cache_hits_total")[()] <= queries and queries > 0


def test_idle_gauges_read_zero(families):
    for name in GAUGES:
        assert _samples(families, f"tokenmill:{name}")[()] == 0


def test_per_request_token_histograms_count_each_completion(families):
    buckets, total, count = histogram(families, "request_generation_tokens")
    assert (total, count) == (4 + 4 + 5 + 2 + 3, 5)
    assert buckets[:3] == [0, 1, 5]  # le=1: none; le=2: the chat; le=5: all
    buckets, total, count = histogram(families, "request_prompt_tokens")
    assert (total, count) == (3 + 3 + 3 + 2 + 3, 5)


def test_latency_histograms_are_consistent(families):
    for name in HISTOGRAMS:
        buckets, total, count = histogram(families, name)
        assert buckets == sorted(buckets) and buckets[-1] == count > 0, name
        assert total >= 0 and math.isfinite(total), name
    # one observation per request for the phases, per completion for the token counts
    for name in ("request_queue_time_seconds", "request_prefill_time_seconds", "request_decode_time_seconds",
                 "request_inference_time_seconds", "e2e_request_latency_seconds", "time_to_first_token_seconds"):
        assert histogram(families, name)[2] == 4, name
    # every generated token after a completion's first comes in a later step: 3 + 5 - 1 + 1 + 2 gaps at least
    assert histogram(families, "inter_token_latency_seconds")[2] >= 4
    # inference = prefill + decode, request by request, so in sum too
    inference = histogram(families, "request_inference_time_seconds")[1]
    prefill, decode = histogram(families, "request_prefill_time_seconds")[1], \
        histogram(families, "request_decode_time_seconds")[1]
    assert inference == pytest.approx(prefill + decode)
    assert inference <= histogram(families, "e2e_request_latency_seconds")[1]


def test_iteration_tokens_count_every_scheduled_token(families):
    buckets, total, count = histogram(families, "iteration_tokens_total")
    # every request computes its prompt (a 3-token prompt fills no block, so the n=2 children each compute
    # theirs) and every generated token but its last
    assert total == (3 + 3 + 3 + 2 + 3) + (3 + 3 + 4 + 1 + 2) and count >= 5


def test_phases_without_a_stamp_are_not_observed():
    from tokenmill.outputs import CompletionOutput, RequestOutput
    from tokenmill.server.metrics import RequestTiming

    metrics = ServerMetrics(MODEL_NAME)
    aborted = RequestOutput("r", None, [5, 6], None, [CompletionOutput(0, "", [], None, None, "abort")], True,
                            metrics={"arrival_time": 1.0})
    metrics.observe_output(RequestTiming(arrival_time=1.0), aborted, 2.0)

    assert metrics.queue_time.count == metrics.prefill_time.count == metrics.decode_time.count == 0
    assert metrics.finished == {"abort": 1} and metrics.request_generation_tokens.sum == 0


def test_a_new_step_in_the_stats_is_one_iteration_observation():
    metrics = ServerMetrics(MODEL_NAME)
    for num_steps, tokens in ((0, 0), (1, 7), (1, 7), (2, 3)):
        metrics.update_engine_stats({"num_steps": num_steps, "last_step_num_tokens": tokens})

    assert (metrics.iteration_tokens.count, metrics.iteration_tokens.sum) == (2, 10)
