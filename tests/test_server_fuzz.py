"""Generated requests against the app, in-process: schemathesis reads the OpenAPI
document and sends each generation route bodies that fit it (positive) and bodies
that break it (negative), over ASGI, to an engine on a tiny random checkpoint.

Whatever a client sends, the answer is never a 5xx, and after every request the
server is healthy and its engine idle with every KV block free. The examples are
derandomized: every run sends the same requests.
"""
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from server_builders import CHAT_TEMPLATE, MODEL_NAME, make_engine, make_tiny_model, wait_until
from tokenmill.server import AsyncEngine, ServerMetrics, build_app

pytestmark = pytest.mark.timeout(300)

MAX_EXAMPLES = 100  # per route and generation mode


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


def is_idle(engine: AsyncEngine) -> bool:
    stats = engine.stats
    return stats["num_running"] == stats["num_waiting"] == 0 and stats["num_free_blocks"] == \
        stats["num_total_blocks"] and engine.num_in_flight == 0


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_no_request_gets_a_5xx_or_leaves_the_server_unhealthy_or_busy(tiny_model, path, mode):
    engine = AsyncEngine(make_engine(tiny_model), ServerMetrics(MODEL_NAME))
    app = build_app(engine, model_names=[MODEL_NAME], chat_template=CHAT_TEMPLATE)
    # loading the document starts the app's lifespan (the engine thread); schemathesis's
    # pytest plugin ends it with the test
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    health = schema["/health"]["GET"].Case()

    # no shrinking: once a request has killed the engine every later one is a 503, and
    # shrinking would blame an innocent body; the first failing one is reported as sent
    @settings(max_examples=MAX_EXAMPLES, derandomize=True, database=None, deadline=None,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=schema[path]["POST"].as_strategy(generation_mode=mode))
    def answer(case):
        case.call_and_validate(checks=[not_a_server_error])

        assert health.call().status_code == 200
        assert wait_until(lambda: is_idle(engine))

    answer()
