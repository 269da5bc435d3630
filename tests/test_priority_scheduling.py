"""Priority scheduling (``scheduling_policy="priority"``, vLLM's): admission in (priority,
arrival) order, the lowest-priority running request preempted first, FCFS unchanged, and
a priority FCFS would ignore refused; through the scheduler, the engine and the server.

Scheduler tests use block size 4 and a runner that samples ``TOKEN`` once a request's
known tokens are all computed.
"""
import httpx
import openai
import pytest

from builders import TINY_CONFIGS, make_checkpoint, make_llm
from server_builders import MODEL_NAME, make_engine, run_server
from tokenmill.config import CacheConfig, SchedulerConfig
from tokenmill.output_processor import OutputKind
from tokenmill.request import Request
from tokenmill.sampling_params import SamplingParams
from tokenmill.scheduler import Scheduler
from tokenmill.step import ModelRunnerOutput

pytestmark = pytest.mark.timeout(300)

BLOCK_SIZE = 4
TOKEN = 7


def make_scheduler(policy: str = "priority", *, num_blocks: int = 65, max_num_seqs: int = 16) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=64, scheduling_policy=policy),
                     CacheConfig(block_size=BLOCK_SIZE), num_blocks=num_blocks, max_model_len=128)


def make_request(req_id: str, num_prompt_tokens: int = 4, *, priority: int = 0, arrival_time: float,
                 max_tokens: int = 100) -> Request:
    prompt = [1000 + 10 * ord(req_id[0]) + i for i in range(num_prompt_tokens)]  # no shared prefixes
    return Request(req_id, prompt, SamplingParams(max_tokens=max_tokens), arrival_time=arrival_time,
                   priority=priority)


def step(scheduler: Scheduler):
    out = scheduler.schedule()
    req_ids = list(out.num_scheduled_tokens)
    sampled = [[TOKEN] if scheduler.requests[r].num_computed_tokens >= scheduler.requests[r].num_tokens else []
               for r in req_ids]
    return out, scheduler.update_from_output(out, ModelRunnerOutput(req_ids, sampled))


def admission_order(scheduler: Scheduler) -> list[str]:
    admitted: list[str] = []
    for _ in range(100):
        if not scheduler.has_unfinished_requests():
            return admitted
        admitted += [new.req_id for new in step(scheduler)[0].scheduled_new_reqs]
    raise AssertionError("requests still unfinished after 100 steps")


# ---------------------------------------------------------------- the scheduler

def test_priority_admits_lowest_priority_value_first_then_earliest_arrival():
    scheduler = make_scheduler(max_num_seqs=1)
    for req_id, priority, arrival in (("a", 1, 0.0), ("b", 0, 1.0), ("c", 0, 2.0), ("d", -1, 3.0)):
        scheduler.add_request(make_request(req_id, priority=priority, arrival_time=arrival, max_tokens=2))

    assert admission_order(scheduler) == ["d", "b", "c", "a"]


def test_a_later_high_priority_request_overtakes_the_waiting_queue():
    scheduler = make_scheduler(max_num_seqs=1)
    scheduler.add_request(make_request("a", priority=5, arrival_time=0.0, max_tokens=3))
    scheduler.add_request(make_request("b", priority=5, arrival_time=1.0, max_tokens=3))
    step(scheduler)  # a runs; b waits for the seat
    scheduler.add_request(make_request("c", priority=0, arrival_time=2.0, max_tokens=3))

    assert admission_order(scheduler) == ["c", "b"]


def test_fcfs_admits_in_arrival_order_whatever_the_queue():
    scheduler = make_scheduler("fcfs", max_num_seqs=1)
    for req_id, arrival in (("b", 1.0), ("a", 0.0), ("c", 2.0)):  # queue order, not the arrival stamps
        scheduler.add_request(make_request(req_id, arrival_time=arrival, max_tokens=2))

    assert admission_order(scheduler) == ["b", "a", "c"]


def _fill_cache(policy: str, priorities: tuple[int, int, int]) -> Scheduler:
    """Three blocks, all held by running [a, b, c] (admitted in that order, a a step before
    the others); b's next token needs a fourth block while a and c fit in theirs."""
    scheduler = make_scheduler(policy, num_blocks=4)
    a, b, c = (make_request(req_id, length, priority=priority, arrival_time=float(i))
               for i, (req_id, length, priority) in enumerate(zip("abc", (1, 4, 2), priorities)))
    scheduler.add_request(a)
    step(scheduler)
    scheduler.add_request(b)
    scheduler.add_request(c)
    step(scheduler)
    assert [r.request_id for r in scheduler.running] == ["a", "b", "c"]
    assert scheduler.kv_cache_manager.num_free_blocks == 0
    return scheduler


def test_priority_preempts_the_lowest_priority_running_request_even_one_already_scheduled():
    scheduler = _fill_cache("priority", (2, 0, 1))

    out, _ = step(scheduler)

    assert out.preempted_req_ids == {"a"}  # scheduled first this step, then taken back for b
    assert out.num_scheduled_tokens == {"b": 1, "c": 1} and out.total_num_scheduled_tokens == 2
    assert [cached.req_id for cached in out.scheduled_cached_reqs] == ["b", "c"]
    assert [r.request_id for r in scheduler.running] == ["b", "c"]
    assert [r.request_id for r in scheduler.waiting] == ["a"] and scheduler.requests["a"].num_computed_tokens == 0
    assert scheduler.stats()["num_preemptions"] == 1


def test_priority_preemption_on_a_tie_takes_the_latest_arrival():
    scheduler = _fill_cache("priority", (0, 0, 0))

    out, _ = step(scheduler)

    assert out.preempted_req_ids == {"c"} and out.num_scheduled_tokens == {"a": 1, "b": 1}


def test_fcfs_preempts_the_last_admitted_request():
    scheduler = _fill_cache("fcfs", (0, 0, 0))

    out, _ = step(scheduler)

    assert out.preempted_req_ids == {"c"} and out.num_scheduled_tokens == {"a": 1, "b": 1}
    assert [r.request_id for r in scheduler.waiting] == ["c"]


def test_a_preempted_request_waits_in_priority_order():
    scheduler = _fill_cache("priority", (2, 0, 1))
    step(scheduler)  # a is preempted
    scheduler.add_request(make_request("d", priority=3, arrival_time=9.0, max_tokens=1))
    scheduler.add_request(make_request("e", priority=1, arrival_time=9.0, max_tokens=1))
    scheduler.abort_requests(["b", "c"])  # room for everyone again

    assert [new.req_id for new in step(scheduler)[0].scheduled_new_reqs] == ["e", "a", "d"]


@pytest.mark.parametrize("priority", [1, -1])
def test_fcfs_refuses_a_nonzero_priority(priority):
    scheduler = make_scheduler("fcfs")
    with pytest.raises(ValueError, match=r"^priority=.*scheduling_policy='priority'"):
        scheduler.add_request(make_request("a", priority=priority, arrival_time=0.0))
    assert not scheduler.has_unfinished_requests()


@pytest.mark.parametrize("priority", [1.5, "1", True])
def test_priority_must_be_an_int(priority):
    scheduler = make_scheduler()
    with pytest.raises(ValueError, match=r"^priority must be an int"):
        scheduler.add_request(make_request("a", priority=priority, arrival_time=0.0))


def test_the_flat_option_and_its_values():
    from tokenmill.config import EngineConfig
    from tokenmill.errors import ConfigError

    assert EngineConfig.build().scheduler.scheduling_policy == "fcfs"
    assert EngineConfig.build(scheduling_policy="priority").scheduler.scheduling_policy == "priority"
    with pytest.raises(ConfigError, match="scheduling_policy"):
        EngineConfig.build(scheduling_policy="lifo")


def test_the_cli_passes_the_scheduling_policy():
    from tokenmill.cli import _engine_options, build_parser

    args = build_parser().parse_args(["serve", "m", "--scheduling-policy", "priority"])
    assert _engine_options(args)["scheduling_policy"] == "priority"


# ---------------------------------------------------------------- the engine

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
PROMPTS = [[5, 6, 7], [8, 9, 10], [11, 12, 13]]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    make_checkpoint(path, TINY_CONFIGS["llama-gqa-untied"])
    return path


@pytest.fixture(scope="module")
def priority_llm(checkpoint):
    return make_llm(checkpoint, scheduling_policy="priority", max_num_seqs=1)


def finish_order(engine) -> list[str]:
    finished: list[str] = []
    while engine.has_unfinished_requests():
        finished += [output.request_id for output in engine.step() if output.finished]
    return finished


def test_a_later_high_priority_request_finishes_first_under_a_full_batch(priority_llm):
    engine = priority_llm.engine
    engine.add_request("first", {"prompt_token_ids": PROMPTS[0]}, GREEDY, OutputKind.FINAL_ONLY, priority=5)
    engine.add_request("low", {"prompt_token_ids": PROMPTS[1]}, GREEDY, OutputKind.FINAL_ONLY, priority=5)
    engine.step()  # "first" holds the only seat
    engine.add_request("urgent", {"prompt_token_ids": PROMPTS[2]}, GREEDY, OutputKind.FINAL_ONLY, priority=0)

    assert finish_order(engine) == ["first", "urgent", "low"]


def test_generate_takes_one_priority_per_prompt(priority_llm):
    plain = priority_llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False)
    ranked = priority_llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False,
                                   priority=[2, 1, 0])

    assert [o.outputs[0].token_ids for o in ranked] == [o.outputs[0].token_ids for o in plain]  # in prompt order
    finished_at = [o.metrics["last_token_time"] for o in ranked]
    assert finished_at[2] < finished_at[1] < finished_at[0]
    scheduled_at = [o.metrics["first_scheduled_time"] for o in ranked]
    assert scheduled_at[2] < scheduled_at[1] < scheduled_at[0]


def test_generate_wants_a_priority_list_with_one_entry_per_prompt(priority_llm):
    with pytest.raises(ValueError, match="priority"):
        priority_llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False, priority=[0, 1])
    with pytest.raises(ValueError, match="priority"):
        priority_llm.generate([{"prompt_token_ids": PROMPTS[0]}], GREEDY, use_tqdm=False, priority=1)
    assert not priority_llm.engine.has_unfinished_requests()


def test_an_fcfs_engine_refuses_a_priority_and_queues_nothing(checkpoint):
    llm = make_llm(checkpoint, max_num_seqs=1)
    with pytest.raises(ValueError, match=r"^priority=1 needs scheduling_policy='priority'"):
        llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False, priority=[0, 1, 0])
    assert not llm.engine.has_unfinished_requests()
    assert len(llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False,
                            priority=[0, 0, 0])) == 3


# ---------------------------------------------------------------- the server

def test_the_server_passes_priority_on_completions_and_chat(checkpoint):
    with run_server(make_engine(checkpoint, scheduling_policy="priority")) as server:
        client = openai.OpenAI(base_url=server.api_url, api_key="unused", max_retries=0)
        completion = client.completions.create(model=MODEL_NAME, prompt="w5 w6", max_tokens=3, temperature=0.0,
                                               extra_body={"priority": -3})
        chat = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "w5 w6"}],
                                              max_tokens=3, temperature=0.0, extra_body={"priority": 4})
        bad = httpx.post(f"{server.api_url}/completions", json={"model": MODEL_NAME, "prompt": "w5",
                                                                "priority": "high"})

    assert completion.choices[0].finish_reason == "length" and chat.choices[0].finish_reason == "length"
    assert bad.status_code == 400


def test_an_fcfs_server_answers_a_priority_with_a_400_naming_it(checkpoint):
    with run_server(make_engine(checkpoint)) as server:
        client = openai.OpenAI(base_url=server.api_url, api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError) as raised:
            client.completions.create(model=MODEL_NAME, prompt=["w5", "w6"], max_tokens=3,
                                      extra_body={"priority": 1})
        assert server.engine.num_in_flight == 0
        ok = client.completions.create(model=MODEL_NAME, prompt="w5", max_tokens=2, extra_body={"priority": 0})

    assert raised.value.body["param"] == "priority"
    assert ok.choices[0].finish_reason == "length"
