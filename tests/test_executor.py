"""The executor seam: worker processes ("mp") driven by msgpack frames, and what happens when a worker
dies, hangs or the engine shuts down. Tensor-parallel parity lives in test_tensor_parallel.py; these
run one rank in a worker process ("mp" at size 1), which exercises the same transport and liveness
code without the collectives.
"""
from __future__ import annotations

import os
import pickle
import signal
import threading
import time

import msgpack
import pytest
import torch

from builders import TINY_CONFIGS, TINY_ENGINE_OPTIONS, make_checkpoint, random_prompts, token_prompts
from tokenmill import LLM, SamplingParams
from tokenmill.errors import ConfigError
from tokenmill.executor import EngineDeadError, UniExecutor
from tokenmill.executor import multiproc
from tokenmill.executor.codec import Channel, pack, unpack
from tokenmill.executor.multiproc import MultiprocExecutor
from tokenmill.request import RequestError
from tokenmill.sampling_params import SamplingParams as SP
from tokenmill.step import CachedRequestData, Logprobs, ModelRunnerOutput, NewRequestData, SchedulerOutput

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    make_checkpoint(path, TINY_CONFIGS["llama-gqa-untied"])
    return path


def mp_llm(checkpoint, **options) -> LLM:
    return LLM(str(checkpoint), **{**TINY_ENGINE_OPTIONS, "distributed_executor_backend": "mp", **options})


def worker_pids(llm: LLM) -> list[int]:
    return [proc.pid for proc in llm.engine.core.executor.processes]


# ---------------------------------------------------------------- the codec


def test_a_step_round_trips_through_a_frame():
    params = SP(temperature=0.5, seed=7, stop=["x"], logit_bias={3: 1.5}, max_tokens=9)
    step = SchedulerOutput(
        scheduled_new_reqs=[NewRequestData("a", [1, 2, 3], [], params, [4, 5], 0)],
        scheduled_cached_reqs=[CachedRequestData("b", [9], 17)], num_scheduled_tokens={"a": 3, "b": 1},
        total_num_scheduled_tokens=4, finished_req_ids={"c"}, preempted_req_ids=set(),
        grammar_bitmask=torch.tensor([[-1, 5]], dtype=torch.int32), structured_output_request_ids={"a": 0})
    back = unpack(pack(step))
    assert isinstance(back, SchedulerOutput) and back.finished_req_ids == {"c"}
    new = back.scheduled_new_reqs[0]
    assert isinstance(new.sampling_params, SP) and new.sampling_params.logit_bias == {3: 1.5}
    assert new.sampling_params.stop == ["x"] and new.block_ids == [4, 5]
    assert torch.equal(back.grammar_bitmask, step.grammar_bitmask) and back.grammar_bitmask.dtype == torch.int32
    out = ModelRunnerOutput(["a"], [[5, 6]], logprobs={"a": Logprobs([[5, 1]], [[-0.1, -2.0]], [1])},
                            failed={"b": RequestError("bad", "invalid_request")})
    back = unpack(pack(out))
    assert back.logprobs["a"].logprobs == [[-0.1, -2.0]] and back.failed["b"] == RequestError("bad", "invalid_request")


def test_frames_carry_only_allowlisted_types():
    class Evil:
        pass

    with pytest.raises(TypeError, match="cannot travel between the driver and workers"):
        pack({"x": Evil()})
    forged = msgpack.packb(msgpack.ExtType(1, msgpack.packb(["os.system", {"command": "true"}])))
    with pytest.raises(ValueError, match="not a message type"):
        unpack(forged)
    with pytest.raises(Exception):
        unpack(pickle.dumps({"a": 1}))


# ---------------------------------------------------------------- the executors


def test_options_pick_the_executor_and_refuse_what_cannot_run(checkpoint):
    llm = LLM(str(checkpoint), **TINY_ENGINE_OPTIONS)
    assert isinstance(llm.engine.core.executor, UniExecutor)
    with pytest.raises(ConfigError, match="distributed_executor_backend: 'uni' runs one rank"):
        LLM(str(checkpoint), **TINY_ENGINE_OPTIONS, tensor_parallel_size=2, distributed_executor_backend="uni")
    with pytest.raises(ConfigError, match="tensor_parallel_size: num_attention_heads \\(4\\) must be divisible"):
        LLM(str(checkpoint), **TINY_ENGINE_OPTIONS, tensor_parallel_size=3)


def test_a_worker_process_gives_the_in_process_tokens_and_no_frame_is_a_pickle(checkpoint):
    frames: list[tuple[str, bytes]] = []
    Channel.tap = lambda direction, frame: frames.append((direction, frame))
    try:
        llm = mp_llm(checkpoint)
        assert isinstance(llm.engine.core.executor, MultiprocExecutor) and llm.engine.core.model is None
        prompts = token_prompts(random_prompts([5, 23, 40], seed=1))
        ours = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
        llm.shutdown()
    finally:
        Channel.tap = None
    local = LLM(str(checkpoint), **TINY_ENGINE_OPTIONS)
    assert ours == [o.outputs[0].token_ids for o in local.generate(prompts, GREEDY, use_tqdm=False)]
    received = [f for d, f in frames if d == "received"]
    sent = [f for d, f in frames if d == "sent"]
    assert any(isinstance(unpack(f), dict) and unpack(f)["op"] == "output" for f in received)
    assert any(unpack(f)["op"] == "execute" for f in sent)
    for _, frame in frames:
        assert not frame.startswith(b"\x80"), "a pickle frame"  # every pickle protocol >= 2 starts so
        unpack(frame)  # and every frame is msgpack of allowed types


def test_shutdown_reaps_every_worker(checkpoint):
    llm = mp_llm(checkpoint)
    processes = llm.engine.core.executor.processes
    assert all(p.poll() is None for p in processes)
    llm.shutdown()
    assert all(p.poll() is not None for p in processes)
    llm.shutdown()  # idempotent


def _kill_during_generation(llm: LLM, sig: int) -> tuple[BaseException | None, float]:
    pid = worker_pids(llm)[0]
    params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
    prompts = token_prompts(random_prompts([30] * 8, seed=2))
    timer = threading.Timer(1.0, os.kill, (pid, sig))
    timer.start()
    began = time.monotonic()
    error = None
    try:
        for _ in range(50):  # long enough that the signal lands mid-generation
            llm.generate(prompts, params, use_tqdm=False)
    except BaseException as exc:  # noqa: BLE001
        error = exc
    finally:
        timer.cancel()
    return error, time.monotonic() - began


def test_a_killed_worker_makes_generate_raise_promptly_and_the_engine_stays_dead(checkpoint):
    llm = mp_llm(checkpoint)
    error, elapsed = _kill_during_generation(llm, signal.SIGKILL)
    assert isinstance(error, EngineDeadError), error
    assert elapsed < 60 and "worker 0" in str(error)
    with pytest.raises(EngineDeadError):
        llm.generate(token_prompts([[5, 6, 7]]), GREEDY, use_tqdm=False)
    assert all(p.poll() is not None for p in llm.engine.core.executor.processes)


def test_a_stopped_worker_is_declared_dead_after_its_silence(checkpoint, monkeypatch):
    monkeypatch.setattr(multiproc, "WORKER_SILENCE_S", 3.0)
    llm = mp_llm(checkpoint)
    pid = worker_pids(llm)[0]
    try:
        error, elapsed = _kill_during_generation(llm, signal.SIGSTOP)
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert isinstance(error, EngineDeadError) and "sent nothing" in str(error), error
    assert elapsed < 30


def test_the_server_answers_503_and_fails_health_when_a_worker_dies(tmp_path):
    import httpx
    import openai

    from server_builders import make_engine, make_tiny_model, run_server, wait_until

    engine = make_engine(make_tiny_model(tmp_path), distributed_executor_backend="mp")
    pid = engine.core.executor.processes[0].pid
    with run_server(engine) as server:
        client = openai.OpenAI(base_url=server.api_url, api_key="unused", max_retries=0)
        assert client.completions.create(model="tiny", prompt="w3 w4", max_tokens=2).choices[0].text
        os.kill(pid, signal.SIGKILL)
        began = time.monotonic()
        with pytest.raises(openai.APIError):
            client.completions.create(model="tiny", prompt="w3 w4 w5", max_tokens=50)
        assert wait_until(lambda: httpx.get(f"{server.url}/health").status_code == 503, timeout=10.0)
        assert time.monotonic() - began < 60
        with pytest.raises(openai.APIStatusError) as raised:
            client.completions.create(model="tiny", prompt="w3", max_tokens=2)
        assert raised.value.status_code == 503
    assert engine.core.executor.processes[0].poll() is not None


def test_an_option_a_worker_cannot_honour_is_a_config_error_not_a_dead_engine(checkpoint):
    with pytest.raises(ConfigError, match="the KV cache has 4 blocks"):
        mp_llm(checkpoint, num_gpu_blocks_override=4)
