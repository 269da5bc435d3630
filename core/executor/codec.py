"""The messages between the engine's driver and its workers: msgpack frames of plain typed data.

Nothing on these connections is pickled: a frame decodes into numbers, strings, lists, dicts, tensors
and instances of the dataclasses named in ``MESSAGE_TYPES`` only, so a peer that can write to the
socket can make the other side build nothing else (pickle would let it run code).

    frame = msgpack(value) where
      dataclass instance -> ExtType(1, msgpack([type name, {field: value}]))   type name from MESSAGE_TYPES
      torch.Tensor       -> ExtType(2, msgpack([dtype name, shape, raw bytes]))   CPU copy, any dtype
      set / frozenset    -> ExtType(3, msgpack([items]))
      tuple              -> ExtType(4, msgpack([items]))
      enum member        -> its value (IntEnum / str enums)

``Channel`` carries frames over a ``multiprocessing.connection.Connection`` with ``send_bytes`` /
``recv_bytes`` (length-prefixed, never ``send`` / ``recv``, which pickle).
"""
from __future__ import annotations

import dataclasses
import enum
import threading
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
import torch

from ..lora_request import LoRARequest
from ..request import RequestError
from ..sampling_params import SamplingParams
from ..step import CachedRequestData, Logprobs, ModelRunnerOutput, NewRequestData, SchedulerOutput
from ..structured import StructuredOutputsParams

_DATACLASS, _TENSOR, _SET, _TUPLE = 1, 2, 3, 4

MESSAGE_TYPES: dict[str, type] = {cls.__name__: cls for cls in (
    SchedulerOutput, NewRequestData, CachedRequestData, ModelRunnerOutput, Logprobs, RequestError, SamplingParams,
    StructuredOutputsParams, LoRARequest)}

_DTYPES = {str(dtype).removeprefix("torch."): dtype for dtype in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16, torch.int8,
    torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2)}


def register_message_type(cls: type) -> type:
    """Allow instances of the dataclass ``cls`` in frames (a decorator; messages of the executor)."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls.__name__} is not a dataclass")
    MESSAGE_TYPES[cls.__name__] = cls
    return cls


def _default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        raw = t.view(torch.uint8).numpy().tobytes() if t.dtype.itemsize else b""
        return msgpack.ExtType(_TENSOR, _pack([str(t.dtype).removeprefix("torch."), list(t.shape), raw]))
    if isinstance(value, (set, frozenset)):
        return msgpack.ExtType(_SET, _pack(list(value)))
    if isinstance(value, tuple):
        return msgpack.ExtType(_TUPLE, _pack(list(value)))
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    cls = type(value)
    if dataclasses.is_dataclass(value) and MESSAGE_TYPES.get(cls.__name__) is cls:
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        return msgpack.ExtType(_DATACLASS, _pack([cls.__name__, fields]))
    raise TypeError(f"{cls.__qualname__} cannot travel between the driver and workers: only plain data, tensors "
                    f"and {sorted(MESSAGE_TYPES)}")


def _ext_hook(code: int, data: bytes) -> Any:
    if code == _TENSOR:
        dtype_name, shape, raw = unpack(data)
        dtype = _DTYPES.get(dtype_name)
        if dtype is None:
            raise ValueError(f"a frame holds a tensor of unknown dtype {dtype_name!r}")
        flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
        return flat.view(dtype).reshape(shape)
    if code == _SET:
        return set(unpack(data))
    if code == _TUPLE:
        return tuple(unpack(data))
    if code == _DATACLASS:
        name, fields = unpack(data)
        cls = MESSAGE_TYPES.get(name)
        if cls is None:
            raise ValueError(f"a frame names {name!r}, which is not a message type")
        obj = object.__new__(cls)  # no __init__: the sender's instance was validated where it was made
        for field in dataclasses.fields(cls):
            object.__setattr__(obj, field.name, fields[field.name])
        return obj
    raise ValueError(f"a frame holds an unknown extension type {code}")


def _pack(value: Any) -> bytes:
    return msgpack.packb(value, default=_default, use_bin_type=True)


def pack(value: Any) -> bytes:
    """``value`` as one frame."""
    return _pack(value)


def unpack(frame: bytes) -> Any:
    """A frame back to its value (only the allowed types; anything else is a ValueError)."""
    return msgpack.unpackb(frame, ext_hook=_ext_hook, raw=False, strict_map_key=False, use_list=True)


class Channel:
    """Frames over a ``multiprocessing.connection.Connection``; ``send`` is thread-safe (a worker's
    heartbeat thread shares it). ``tap``, when set, sees every frame this process sends or receives,
    as ``tap("sent" | "received", frame)`` (the transport test)."""

    tap: Callable[[str, bytes], None] | None = None

    def __init__(self, connection: Any) -> None:
        self.connection = connection
        self._lock = threading.Lock()

    def send(self, value: Any) -> None:
        self.send_frame(pack(value))

    def send_frame(self, frame: bytes) -> None:
        """Send an already packed frame (one step's output packed once for every worker)."""
        if Channel.tap is not None:
            Channel.tap("sent", frame)
        with self._lock:
            self.connection.send_bytes(frame)

    def recv(self) -> Any:
        frame = self.connection.recv_bytes()
        if Channel.tap is not None:
            Channel.tap("received", frame)
        return unpack(frame)

    def poll(self, timeout: float) -> bool:
        return self.connection.poll(timeout)

    def fileno(self) -> int:
        return self.connection.fileno()

    def close(self) -> None:
        self.connection.close()
