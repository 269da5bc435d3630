"""The "ray" executor: one Ray actor per rank, on the cluster Ray reaches, else on a local Ray instance.

Ray only places and starts the workers: each actor runs ``worker_main.serve``, which connects back to
the driver over TCP on the driver's node address (HMAC handshake with the per-engine key) and speaks
the same msgpack frames as the "mp" workers; ``torch.distributed`` joins through a ``TCPStore`` the
driver hosts. A cluster is the one ``ray.init`` was already called for, else ``RAY_ADDRESS`` /
``ray.init(address="auto")``, else a local instance started here.

    pip install 'tokenmill[ray]'
"""
from __future__ import annotations

import os
from multiprocessing.connection import Listener
from typing import Any

from ..errors import ConfigError
from .multiproc import WorkerGroupExecutor


class _RayWorker:
    """The actor body: serves one rank until the driver says stop."""

    def run(self, address: Any, authkey: bytes, rank: int) -> None:
        from .worker_main import serve
        serve(address, authkey, rank)


def _ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("distributed_executor_backend: 'ray' needs Ray: pip install 'tokenmill[ray]'") from None
    return ray


class RayExecutor(WorkerGroupExecutor):
    """Ranks as Ray actors (see the module docstring)."""

    def _listen(self, authkey: bytes) -> Listener:
        ray = _ray()
        self._local = False
        if not ray.is_initialized():
            try:
                ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), log_to_driver=False)
            except ConnectionError:
                ray.init(log_to_driver=False, include_dashboard=False)  # no cluster to join: a local one
                self._local = True
        self._host = ray.util.get_node_ip_address()
        return Listener((self._host, 0), family="AF_INET", authkey=authkey)

    def _store(self) -> list:
        import datetime

        import torch
        self._tcp_store = torch.distributed.TCPStore(self._host, 0, is_master=True, wait_for_workers=False,
                                                     timeout=datetime.timedelta(seconds=300))
        return ["tcp", self._host, self._tcp_store.port]

    def _launch(self, address: Any, authkey: bytes) -> None:
        ray = _ray()
        import torch
        on_cuda = torch.cuda.is_available() and self._on_cuda
        env = {"GLOO_SOCKET_IFNAME": "lo"} if self._local and "GLOO_SOCKET_IFNAME" not in os.environ else {}
        actor = ray.remote(num_cpus=0, num_gpus=1 if on_cuda else 0,
                           runtime_env={"env_vars": env} if env else None)(_RayWorker)
        self.actors = [actor.remote() for _ in range(self.size)]
        self._runs = [a.run.remote(list(address), authkey, rank) for rank, a in enumerate(self.actors)]

    def _device(self, plan, rank: int) -> str:
        return "cuda:0" if plan.device.type == "cuda" else "cpu"  # Ray gives each actor its own GPU

    def _kill(self) -> None:
        ray = _ray()
        for actor in getattr(self, "actors", []):
            try:
                ray.kill(actor)
            except Exception:  # noqa: BLE001 - already gone
                pass

    def __init__(self, config, plan, **ids) -> None:
        self._on_cuda = plan.device.type == "cuda"  # read by _launch, which the base __init__ calls
        super().__init__(config, plan, **ids)
