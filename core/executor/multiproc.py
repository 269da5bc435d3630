"""Executors whose ranks live in worker processes: "mp" (processes on this machine) and, through the
same driver logic, "ray" (actors; ray_executor.py).

The driver opens a ``multiprocessing.connection.Listener`` with a fresh random key (an HMAC challenge
on connect: a process without the key is refused), starts one worker per rank, and from then on talks
to them only in ``codec`` frames (``send_bytes``; nothing is pickled). ``torch.distributed`` joins the
workers through a store the driver sets up: a file in the driver's private folder ("mp") or a
``TCPStore`` the driver hosts ("ray").

Liveness: every wait for workers also watches, per worker, its connection (closed: it exited), its
process where there is one, its error frames and its heartbeats: a worker silent for
``WORKER_SILENCE_S`` (stopped, or stuck holding the interpreter) is dead. A collective stuck on a dead
peer raises in the survivors after ``COLLECTIVE_TIMEOUT_S``. Either way ``execute`` raises
``EngineDeadError`` and every worker is reaped.
"""
from __future__ import annotations

import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from multiprocessing.connection import Listener, wait
from typing import Any

import torch

from ..config import EngineConfig
from ..errors import ConfigError
from ..step import ModelRunnerOutput, SchedulerOutput
from ..worker import ModelPlan
from . import EngineDeadError, Executor
from .codec import Channel, pack

WORKER_SILENCE_S = 15.0  # no frame (a heartbeat comes every second) for this long: the worker is dead
STARTUP_TIMEOUT_S = 600.0  # to connect, load the shard and allocate the cache
COLLECTIVE_TIMEOUT_S = 60.0  # a collective waiting on a peer this long raises in the survivors
SHUTDOWN_GRACE_S = 5.0


class WorkerGroupExecutor(Executor):
    """The driver side shared by "mp" and "ray": subclasses start the workers (``_launch``), say how to
    kill them (``_kill``) and, where they can, name a worker's exit (``_check_processes``)."""

    def __init__(self, config: EngineConfig, plan: ModelPlan, *, bos_token_id: int | None,
                 eos_token_id: int | None) -> None:
        self.size = config.parallel.tensor_parallel_size
        self.channels: list[Channel | None] = [None] * self.size
        self._dead: str | None = None
        self._closed = False
        self._folder = tempfile.mkdtemp(prefix="tokenmill-")  # 0700: this user's only
        self._finalizer = weakref.finalize(self, _remove, self._folder)
        authkey = os.urandom(32)
        self.listener = self._listen(authkey)
        try:
            self._launch(self.listener.address, authkey)
            self._accept(config, plan, bos_token_id, eos_token_id)
            blocks = self._collect("available_blocks", STARTUP_TIMEOUT_S)
            self.num_blocks = min(message["num_blocks"] for message in blocks)
            self._broadcast(pack({"op": "init_kv_cache", "num_blocks": self.num_blocks}))
            self._collect("ready", STARTUP_TIMEOUT_S)
        except BaseException:
            self.shutdown()
            raise

    # ------------------------------------------------------------ set-up (subclasses)

    def _listen(self, authkey: bytes) -> Listener:
        return Listener(os.path.join(self._folder, "driver.sock"), family="AF_UNIX", authkey=authkey)

    def _launch(self, address: Any, authkey: bytes) -> None:
        raise NotImplementedError

    def _store(self) -> list:
        """How workers reach the torch.distributed store: ["file", path] or ["tcp", host, port]."""
        return ["file", os.path.join(self._folder, "store")]

    def _device(self, plan: ModelPlan, rank: int) -> str:
        return f"cuda:{rank}" if plan.device.type == "cuda" else "cpu"

    def _kill(self) -> None:
        pass

    # ------------------------------------------------------------ the conversation

    def _accept(self, config: EngineConfig, plan: ModelPlan, bos: int | None, eos: int | None) -> None:
        accepted: queue.Queue = queue.Queue()

        def accept_all() -> None:
            for _ in range(self.size):
                try:
                    accepted.put(Channel(self.listener.accept()))
                except Exception as exc:  # noqa: BLE001 - a refused handshake, or the listener closed
                    accepted.put(exc)
                    return

        threading.Thread(target=accept_all, daemon=True, name="tokenmill-accept").start()
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while any(c is None for c in self.channels):
            self._check_processes()
            try:
                item = accepted.get(timeout=0.2)
            except queue.Empty:
                if time.monotonic() > deadline:
                    self._die(f"workers did not connect within {STARTUP_TIMEOUT_S:.0f} s")
                continue
            if isinstance(item, Exception):
                self._die(f"a worker could not connect: {item!r}")
            hello = item.recv()
            self.channels[hello["rank"]] = item
        threads = max(1, torch.get_num_threads() // self.size)
        store = self._store()
        for rank, channel in enumerate(self.channels):
            channel.send({"op": "init", "config": config.model_dump(mode="json"), "size": self.size,
                          "store": store, "device": self._device(plan, rank), "num_threads": threads,
                          "bos": bos, "eos": eos, "timeout_s": COLLECTIVE_TIMEOUT_S})

    def _broadcast(self, frame: bytes) -> None:
        for rank, channel in enumerate(self.channels):
            try:
                channel.send_frame(frame)
            except OSError as exc:
                self._die(f"worker {rank} is gone: {exc!r}")

    def _collect(self, op: str, timeout: float | None = None) -> list[dict]:
        """One ``op`` frame from every rank, in rank order, skipping heartbeats; raises EngineDeadError."""
        replies: dict[int, dict] = {}
        now = time.monotonic()
        heard = dict.fromkeys(range(self.size), now)
        deadline = None if timeout is None else now + timeout
        by_connection = {id(channel.connection): rank for rank, channel in enumerate(self.channels)}
        while len(replies) < self.size:
            ready = wait([c.connection for c in self.channels], timeout=1.0)
            now = time.monotonic()
            for connection in ready:
                rank = by_connection[id(connection)]
                try:
                    message = self.channels[rank].recv()
                except (EOFError, OSError):
                    self._check_processes()
                    self._die(f"worker {rank} closed its connection (it exited)")
                heard[rank] = now
                if message["op"] == "error":
                    if message.get("config_error"):
                        self.shutdown()
                        raise ConfigError(message["config_error"])
                    self._die(f"worker failed: {message['message']}")
                if message["op"] == op:
                    replies[rank] = message
            silent = [rank for rank, last in heard.items() if now - last > WORKER_SILENCE_S]
            if silent:
                self._die(f"worker {silent[0]} sent nothing for {WORKER_SILENCE_S:.0f} s (hung or stopped)")
            if deadline is not None and now > deadline:
                self._die(f"workers did not answer {op!r} within {timeout:.0f} s")
        return [replies[rank] for rank in range(self.size)]

    def _check_processes(self) -> None:
        """Raise EngineDeadError naming a worker whose process has exited (where processes are visible)."""

    def _die(self, reason: str) -> None:
        self._dead = reason
        self.shutdown()
        raise EngineDeadError(f"the engine's workers failed: {reason}")

    # ------------------------------------------------------------ Executor

    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        if self._dead is not None:
            raise EngineDeadError(f"the engine's workers failed: {self._dead}")
        self._broadcast(pack({"op": "execute", "step": scheduler_output}))
        return self._collect("output")[0]["output"]

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop_steps()  # a step in flight ends first (it raises within WORKER_SILENCE_S on a dead worker)
        for channel in self.channels:
            if channel is not None:
                try:
                    channel.send({"op": "shutdown"})
                except OSError:
                    pass
        self._kill()
        for channel in self.channels:
            if channel is not None:
                channel.close()
        self.listener.close()
        self._finalizer()


class MultiprocExecutor(WorkerGroupExecutor):
    """One worker process per rank on this machine (``python -m tokenmill.executor.worker_main``)."""

    def _launch(self, address: Any, authkey: bytes) -> None:
        env = dict(os.environ)
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # gloo's pairs between local ranks stay on loopback
        self.processes: list[subprocess.Popen] = []
        for rank in range(self.size):
            proc = subprocess.Popen([sys.executable, "-m", "tokenmill.executor.worker_main"],
                                    stdin=subprocess.PIPE, env=env)
            proc.stdin.write(pack({"address": address, "authkey": authkey, "rank": rank}))
            proc.stdin.close()
            self.processes.append(proc)
        self._reaper = weakref.finalize(self, _reap, list(self.processes))

    def _check_processes(self) -> None:
        for rank, proc in enumerate(getattr(self, "processes", [])):
            code = proc.poll()
            if code is not None and not self._closed:
                self._die(f"worker {rank} (pid {proc.pid}) exited with code {code}")

    def _kill(self) -> None:
        _reap(getattr(self, "processes", []))


def _reap(processes: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + SHUTDOWN_GRACE_S
    for proc in processes:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _remove(folder: str) -> None:
    shutil.rmtree(folder, ignore_errors=True)
