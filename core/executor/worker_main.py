"""A worker: one tensor-parallel rank, serving the driver's steps until it says stop.

    python -m tokenmill.executor.worker_main     (the "mp" executor; stdin: one frame with the address,
                                                 the key and the rank)
    serve(address, authkey, rank)                (the "ray" executor calls it inside an actor)

The conversation (frames of ``codec``):

    worker -> driver  {"op": "hello", "rank", "pid"}
    driver -> worker  {"op": "init", "config", "size", "store", "device", "num_threads", "bos", "eos"}
    worker -> driver  {"op": "available_blocks", "num_blocks"}        the model shard is loaded
    driver -> worker  {"op": "init_kv_cache", "num_blocks"}           the smallest over the ranks
    worker -> driver  {"op": "ready"}
    driver -> worker  {"op": "execute", "step": SchedulerOutput}      every step, to every rank
    worker -> driver  {"op": "output", "output": ModelRunnerOutput}   rank 0; the others send None
    driver -> worker  {"op": "shutdown"}

and from a thread, every ``HEARTBEAT_S``, {"op": "heartbeat"}; a failure is {"op": "error", "message"}
(with "config_error" when an option cannot be honoured: the driver raises it as a ConfigError) and
the worker exits. A worker whose driver is gone (a send fails, the connection closes) exits.
"""
from __future__ import annotations

import os
import sys
import threading
import traceback
from multiprocessing.connection import Client
from typing import Any

HEARTBEAT_S = 1.0


def _heartbeat(channel: Any, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_S):
        try:
            channel.send({"op": "heartbeat"})
        except OSError:  # the driver is gone: nothing left to serve
            os._exit(1)


def serve(address: Any, authkey: bytes, rank: int) -> None:
    """Connect to the driver at ``address`` and serve it (see the module docstring)."""
    import torch

    from ..config import EngineConfig
    from ..distributed import init_tensor_parallel
    from ..errors import ConfigError
    from ..registry import Registry, get_registry
    from ..worker import Worker, plan_model
    from .codec import Channel

    channel = Channel(Client(tuple(address) if isinstance(address, list) else address, authkey=authkey))
    channel.send({"op": "hello", "rank": rank, "pid": os.getpid()})
    stop = threading.Event()
    threading.Thread(target=_heartbeat, args=(channel, stop), daemon=True, name="tokenmill-heartbeat").start()
    try:
        init = channel.recv()
        config = EngineConfig.model_validate(init["config"])
        registry = get_registry() if config.plugin_errors == "raise" else Registry(on_plugin_error="warn")
        device = torch.device(init["device"])
        if device.type == "cpu":
            torch.set_num_threads(init["num_threads"])
        kind, *where = init["store"]
        if kind == "file":
            store = torch.distributed.FileStore(where[0], init["size"])
        else:
            store = torch.distributed.TCPStore(where[0], where[1], is_master=False)
        tp = init_tensor_parallel(rank, init["size"], store=store, device=device, timeout_s=init["timeout_s"])
        torch.manual_seed(config.seed)
        plan = plan_model(config, registry, tp, device)
        worker = Worker(config, registry, plan, tp, bos_token_id=init["bos"], eos_token_id=init["eos"])
        channel.send({"op": "available_blocks", "num_blocks": worker.available_blocks()})
        worker.init_kv_cache(channel.recv()["num_blocks"])
        channel.send({"op": "ready"})
        while True:
            message = channel.recv()
            if message["op"] == "shutdown":
                break
            output = worker.execute(message["step"])
            channel.send({"op": "output", "output": output if rank == 0 else None})
    except (EOFError, ConnectionError):
        pass  # the driver is gone
    except ConfigError as exc:  # an option this rank cannot honour (its memory, say): the user's to fix
        try:
            channel.send({"op": "error", "message": f"rank {rank}: {exc}", "config_error": str(exc)})
        except OSError:
            pass
        raise
    except BaseException:  # noqa: BLE001 - everything goes back to the driver, which ends the engine
        try:
            channel.send({"op": "error", "message": f"rank {rank}: {traceback.format_exc()}"})
        except OSError:
            pass
        raise
    finally:
        stop.set()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def main() -> None:
    from .codec import unpack

    start = unpack(sys.stdin.buffer.read())
    try:
        serve(start["address"], start["authkey"], start["rank"])
    except BaseException:  # noqa: BLE001 - reported to the driver already
        os._exit(1)
    os._exit(0)  # without waiting on threads a collective may still hold


if __name__ == "__main__":
    main()
