"""Executors: the seam between the engine core (one scheduler) and the model's ranks.

    EngineCore.step: schedule ──SchedulerOutput──> executor.execute ──ModelRunnerOutput──> update
                                                    │
        "uni"  UniExecutor        one Worker in this process (tensor_parallel_size 1)
        "mp"   MultiprocExecutor  one worker process per rank on this machine
        "ray"  RayExecutor        one Ray actor per rank, on a Ray cluster or a local one

Every rank receives every step's scheduler output and runs it (the collectives inside the model need
them all); rank 0's output comes back. Driver and workers talk in msgpack frames of plain data
(``codec``), never pickle, over connections only this machine's user (a Unix socket in a private
folder) or the cluster's members holding the per-engine key (TCP with an HMAC handshake) can open.

A worker that dies, errs or stops answering makes ``execute`` raise ``EngineDeadError`` within a
bounded time (``WORKER_SILENCE_S`` without a heartbeat); ``shutdown`` reaps every worker.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from concurrent.futures import Future, ThreadPoolExecutor

from ..config import EngineConfig
from ..distributed import TensorParallel
from ..registry import Registry
from ..step import ModelRunnerOutput, SchedulerOutput
from ..worker import ModelPlan, Worker

__all__ = ["EngineDeadError", "Executor", "UniExecutor", "make_executor"]


class EngineDeadError(RuntimeError):
    """A worker died, failed or hung: the engine cannot go on (every request in flight is lost)."""


class Executor(ABC):
    """Runs scheduler outputs on the model's ranks (see the module docstring)."""

    num_blocks: int  # KV blocks per layer on every rank (the smallest any rank could hold)
    worker: Worker | None = None  # the in-process worker ("uni"), else None
    _steps: ThreadPoolExecutor | None = None  # runs execute_async's steps, one at a time, in order

    @abstractmethod
    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step on every rank; rank 0's output."""

    def execute_async(self, scheduler_output: SchedulerOutput) -> Future[ModelRunnerOutput]:
        """``execute`` in the background (async scheduling): steps run one at a time, in the order given,
        so a step's inputs may read the tokens the step before it sampled. The future raises what
        ``execute`` raised."""
        if self._steps is None:
            self._steps = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenmill-step")
        return self._steps.submit(self.execute, scheduler_output)

    def shutdown(self) -> None:
        """Stop every worker (idempotent)."""
        self._stop_steps()

    def _stop_steps(self) -> None:
        """Let the steps in flight finish, then stop their thread."""
        if self._steps is not None:
            self._steps.shutdown(wait=True)
            self._steps = None


class UniExecutor(Executor):
    """One rank, in this process: today's path, with no messages at all."""

    def __init__(self, config: EngineConfig, registry: Registry, plan: ModelPlan, *, bos_token_id: int | None,
                 eos_token_id: int | None) -> None:
        self.worker = Worker(config, registry, plan, TensorParallel(), bos_token_id=bos_token_id,
                             eos_token_id=eos_token_id)
        self.num_blocks = self.worker.available_blocks()
        self.worker.init_kv_cache(self.num_blocks)

    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.worker.execute(scheduler_output)

    def shutdown(self) -> None:
        self._stop_steps()


def make_executor(config: EngineConfig, registry: Registry, plan: ModelPlan, *, bos_token_id: int | None,
                  eos_token_id: int | None) -> Executor:
    """The executor ``config.parallel`` names."""
    kind = config.parallel.executor
    ids = dict(bos_token_id=bos_token_id, eos_token_id=eos_token_id)
    if kind == "uni":
        return UniExecutor(config, registry, plan, **ids)
    if kind == "mp":
        from .multiproc import MultiprocExecutor
        return MultiprocExecutor(config, plan, **ids)
    from .ray_executor import RayExecutor
    return RayExecutor(config, plan, **ids)
