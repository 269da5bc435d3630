"""Random workloads through the scheduler and a fake runner, invariants checked every step.

Requests arrive over the first steps (some sharing prompt prefixes, some too long
to ever run), some are aborted; the runner samples random tokens (EOS and stop
tokens among them), proposes random drafts and accepts a random prefix of them.
"""
import random
from collections import Counter, defaultdict
from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_scheduler import assert_no_leaks

from tokenmill.config import CacheConfig, SchedulerConfig
from tokenmill.request import Request, RequestStatus
from tokenmill.sampling_params import SamplingParams
from tokenmill.scheduler import Scheduler
from tokenmill.step import ModelRunnerOutput, SchedulerOutput

VOCAB = 8  # sampled tokens are small ids: EOS (0) and the stop token (1) come up often
EOS, STOP_TOKEN = 0, 1
SHARED_PREFIXES = [list(range(100, 140)), list(range(200, 240))]
MAX_STEPS = 3000


@dataclass
class Arrival:
    step: int
    prefix: int  # index into SHARED_PREFIXES, or -1 for none
    num_prompt_tokens: int
    max_tokens: int
    wants_prompt_logprobs: bool
    cache_salt: str | None
    stops: bool  # EOS and STOP_TOKEN end it (else only length does)


arrivals = st.builds(Arrival, st.integers(0, 15), st.integers(-1, 1), st.integers(1, 40), st.integers(1, 12),
                     st.sampled_from([False, False, False, True]), st.sampled_from([None, None, "tenant"]),
                     st.booleans())
configs = st.fixed_dictionaries({
    "block_size": st.sampled_from([1, 2, 4, 8]), "num_blocks": st.integers(3, 24),
    "max_num_batched_tokens": st.integers(1, 32), "max_num_seqs": st.integers(1, 6),
    "enable_chunked_prefill": st.booleans(), "enable_prefix_caching": st.booleans(),
    "max_model_len": st.integers(4, 48)})


def build_scheduler(config: dict) -> Scheduler:
    capacity = (config["num_blocks"] - 1) * config["block_size"]
    budget = config["max_num_batched_tokens"]
    if not config["enable_chunked_prefill"]:  # the budget must hold the longest sequence
        budget = max(budget, min(config["max_model_len"], capacity + 1))
    return Scheduler(
        SchedulerConfig(max_num_seqs=config["max_num_seqs"], max_num_batched_tokens=budget,
                        enable_chunked_prefill=config["enable_chunked_prefill"]),
        CacheConfig(block_size=config["block_size"], enable_prefix_caching=config["enable_prefix_caching"]),
        num_blocks=config["num_blocks"], max_model_len=config["max_model_len"])


def make_request(req_id: str, arrival: Arrival, fresh_ids) -> Request:
    prefix = SHARED_PREFIXES[arrival.prefix] if arrival.prefix >= 0 else []
    prompt = prefix[:arrival.num_prompt_tokens]
    prompt += [next(fresh_ids) for _ in range(arrival.num_prompt_tokens - len(prompt))]
    params = SamplingParams(max_tokens=arrival.max_tokens, stop_token_ids=[STOP_TOKEN] if arrival.stops else None,
                            prompt_logprobs=0 if arrival.wants_prompt_logprobs else None)
    return Request(req_id, prompt, params, eos_token_id=EOS if arrival.stops else None,
                   cache_salt=arrival.cache_salt)


def run_fake_model(scheduler: Scheduler, out: SchedulerOutput, rng: random.Random) -> ModelRunnerOutput:
    req_ids, sampled, drafts = list(out.num_scheduled_tokens), [], {}
    for req_id in req_ids:
        request = scheduler.requests[req_id]
        if request.num_computed_tokens < request.num_tokens:  # a prompt chunk: nothing sampled yet
            sampled.append([])
            continue
        spec = out.scheduled_spec_decode_tokens.get(req_id, [])
        sampled.append([*spec[:rng.randint(0, len(spec))], rng.randrange(VOCAB)])
        drafts[req_id] = [rng.randrange(VOCAB) for _ in range(rng.randint(0, 3))]
    return ModelRunnerOutput(req_ids, sampled, draft_token_ids=drafts)


def check_schedule(scheduler: Scheduler, out: SchedulerOutput, runner_tables: dict[str, list[int]]) -> None:
    assert 0 <= out.total_num_scheduled_tokens == sum(out.num_scheduled_tokens.values())
    assert out.total_num_scheduled_tokens <= scheduler.max_num_batched_tokens
    assert len(scheduler.running) <= scheduler.max_num_seqs
    assert all(n >= 1 for n in out.num_scheduled_tokens.values())
    new_ids = [r.req_id for r in out.scheduled_new_reqs]
    cached_ids = [r.req_id for r in out.scheduled_cached_reqs]
    assert sorted(new_ids + cached_ids) == sorted(out.num_scheduled_tokens)
    assert not out.preempted_req_ids & set(out.num_scheduled_tokens)
    assert not (out.preempted_req_ids and new_ids)  # nothing admitted in a step that preempted
    # the runner's mirror of the block tables, rebuilt only from scheduler outputs
    for req_id in out.finished_req_ids | out.preempted_req_ids:
        runner_tables.pop(req_id, None)
    for new in out.scheduled_new_reqs:
        assert new.output_token_ids == scheduler.requests[new.req_id].output_token_ids
        runner_tables[new.req_id] = list(new.block_ids)
    for cached in out.scheduled_cached_reqs:
        runner_tables[cached.req_id] += cached.new_block_ids
    block_size = scheduler.kv_cache_manager.block_size
    for request in scheduler.running:
        table = scheduler.kv_cache_manager.get_block_ids(request.request_id)
        assert runner_tables[request.request_id] == table
        assert request.num_computed_tokens <= len(table) * block_size
        assert request.num_computed_tokens <= scheduler.max_model_len - 1
    for req_id, spec in out.scheduled_spec_decode_tokens.items():
        request = scheduler.requests[req_id]
        assert request.num_computed_tokens == request.num_tokens + len(spec)


def check_blocks(scheduler: Scheduler) -> None:
    kv = scheduler.kv_cache_manager
    pool = kv.block_pool
    holders = Counter(block_id for r in scheduler.running for block_id in kv.get_block_ids(r.request_id))
    assert all(block.ref_cnt == holders[block.block_id] for block in pool.blocks)
    assert all(pool.blocks[block_id].block_hash is not None for block_id, n in holders.items() if n > 1)
    free = list(pool.free_queue)
    assert all(block.ref_cnt == 0 for block in free)
    assert len(free) == kv.num_free_blocks == kv.num_usable_blocks - len(holders)
    assert pool.null_block.block_id not in holders and pool.null_block not in free
    assert all(block.block_hash == block_hash for block_hash, block in pool.cached_blocks.items())
    for request in scheduler.waiting:
        assert request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
        assert (kv.get_block_ids(request.request_id), request.num_computed_tokens) == ([], 0)
    assert all(request.status == RequestStatus.RUNNING for request in scheduler.running)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=configs, workload=st.lists(arrivals, min_size=1, max_size=12),
       aborts=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 11)), max_size=4), seed=st.integers(0, 2**16))
def test_random_workloads_keep_every_invariant_and_finish(config, workload, aborts, seed):
    scheduler = build_scheduler(config)
    rng, fresh_ids = random.Random(seed), iter(range(10_000, 100_000))
    requests = {f"r{i}": make_request(f"r{i}", arrival, fresh_ids) for i, arrival in enumerate(workload)}
    tokens: dict[str, list[int]] = defaultdict(list)
    finished: Counter[str] = Counter()
    aborted: set[str] = set()
    runner_tables: dict[str, list[int]] = {}
    for step in range(MAX_STEPS):
        for i, arrival in enumerate(workload):
            if arrival.step == step:
                scheduler.add_request(requests[f"r{i}"])
        aborted.update(scheduler.abort_requests([f"r{i}" for when, i in aborts if when == step]))
        out = scheduler.schedule()
        check_schedule(scheduler, out, runner_tables)
        check_blocks(scheduler)
        for output in scheduler.update_from_output(out, run_fake_model(scheduler, out, rng)):
            tokens[output.req_id] += output.new_token_ids
            if output.finished:
                finished[output.req_id] += 1
        check_blocks(scheduler)
        if step > 15 and not scheduler.has_unfinished_requests():
            break
    assert_no_leaks(scheduler)
    assert set(finished) | aborted == set(requests)
    assert all(n == 1 for n in finished.values())
    for req_id, request in requests.items():
        assert tokens.get(req_id, []) == request.output_token_ids
        assert request.num_output_tokens <= request.sampling_params.max_tokens
        assert request.num_tokens <= scheduler.max_model_len or request.status == RequestStatus.FINISHED_IGNORED
