"""Run a function on every rank of a real tensor-parallel group on CPU: ``size`` fresh processes joined by
gloo, as the engine's workers are, so tests exercise the same collectives the model runs in production.

    results = run_ranks(job, 2, config, state)   # job(config, state) on ranks 0 and 1; their results in order
    ranks = start_ranks(job, 2, config, state)   # the same, collected later: ranks.results()

``job`` must be importable from its module (it is pickled by name, and the processes are spawned, not
forked: a forked torch may hang in its thread pool). Each process runs one torch thread, so several
ranks share a small machine without oversubscribing it, and runs ``job`` under its ``TensorParallel``
(``get_tensor_parallel()``), so the layers it builds are that rank's shards. A rank that raises fails
the call with its traceback; the others are stopped at once rather than left waiting in a collective.
"""
from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["Ranks", "run_ranks", "start_ranks"]


def run_ranks(job: Callable[..., Any], size: int, *args: Any, timeout_s: float = 300.0) -> list[Any]:
    """``job(*args)`` on ranks 0..size-1 of a gloo group, each in its own process; each rank's return
    value (anything ``torch.save`` writes), in rank order."""
    return start_ranks(job, size, *args).results(timeout_s)


def start_ranks(job: Callable[..., Any], size: int, *args: Any) -> Ranks:
    """``run_ranks`` without waiting: this process is free until ``Ranks.results`` (to compute the
    size-1 reference meanwhile)."""
    return Ranks(job, size, args)


class Ranks:
    """The processes of one ``start_ranks`` call."""

    def __init__(self, job: Callable[..., Any], size: int, args: tuple) -> None:
        self.job, self.size = job, size
        self._tmp = tempfile.TemporaryDirectory(prefix="tokenmill-tp-")
        self._outputs = [os.path.join(self._tmp.name, f"rank{rank}.pt") for rank in range(size)]
        context = multiprocessing.get_context("spawn")
        store = os.path.join(self._tmp.name, "store")
        self._processes = [context.Process(target=_rank_main, args=(rank, size, store, job, args, output), daemon=True)
                           for rank, output in enumerate(self._outputs)]
        try:
            for process in self._processes:
                process.start()
        except BaseException:
            self._stop()
            raise

    def results(self, timeout_s: float = 300.0) -> list[Any]:
        """Each rank's return value, in rank order, once all are done; a rank's error, raised here with
        its traceback, as soon as one fails."""
        deadline = time.monotonic() + timeout_s
        try:
            pending = list(self._processes)
            while pending:
                ready = multiprocessing.connection.wait([p.sentinel for p in pending],
                                                        max(0.0, deadline - time.monotonic()))
                if not ready:
                    raise TimeoutError(f"tensor-parallel ranks of {self.job.__qualname__} still running after "
                                       f"{timeout_s} s")
                pending = [p for p in pending if p.exitcode is None]
                if any(p.exitcode for p in self._processes if p.exitcode is not None):
                    break  # one rank failed: the others would wait for it in a collective
            failures = [_failure(rank, p, self._outputs[rank]) for rank, p in enumerate(self._processes)
                        if p.exitcode not in (0, None)]
            if failures:
                raise AssertionError(f"{self.job.__qualname__} failed at tensor-parallel size {self.size}:\n"
                                     + "\n".join(failures))
            return [torch.load(path, weights_only=False)["result"] for path in self._outputs]
        finally:
            self._stop()

    def _stop(self) -> None:
        for process in self._processes:
            if process.pid is not None and process.is_alive():
                process.kill()
            if process.pid is not None:
                process.join()
        self._tmp.cleanup()


def _failure(rank: int, process: Any, output: str) -> str:
    saved = torch.load(output, weights_only=False) if os.path.exists(output) else {}
    if "error" in saved:
        return f"rank {rank}: {saved['error']}"
    return f"rank {rank}: exit code {process.exitcode} (no traceback: the process died)"


def _rank_main(rank: int, size: int, store_path: str, job: Callable[..., Any], args: tuple, output: str) -> None:
    """One rank: join the group, run the job, save its result (or traceback), and leave by ``os._exit``
    after a barrier. The barrier keeps a rank from closing its connections while a peer still reads
    from them; skipping the interpreter's teardown keeps gloo's threads from aborting the exit of a
    rank whose work is done (seen when the machine is loaded)."""
    from tokenmill.distributed import init_tensor_parallel

    torch.set_num_threads(1)
    code = 1
    try:
        store = torch.distributed.FileStore(store_path, size)
        init_tensor_parallel(rank, size, store=store, device=torch.device("cpu"), timeout_s=120.0)
        result = job(*args)
        torch.save({"result": result}, output)
        torch.distributed.barrier()
        code = 0
    except BaseException:
        torch.save({"error": traceback.format_exc()}, output)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
