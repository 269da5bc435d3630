"""Where prompts are tokenized and chat templates rendered: worker threads, never the
engine thread nor the event loop.

Tokenizing takes time in proportion to the text (seconds for a few megabytes on a
small CPU), so work is routed by size:

    text <= LARGE_TEXT_CHARS   the regular workers (TOKENIZER_POOL_SIZE of them)
    text >  LARGE_TEXT_CHARS   one background worker at a lower CPU priority

A huge prompt then never queues a small one behind it, takes at most one core, and
yields that core to the engine's threads whenever they want it: the running requests'
tokens keep coming. Each worker has an ``InputProcessor`` of its own (a tokenizer is
not shared across threads), with the engine's vocabulary size and max_model_len.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import ctypes
import ctypes.util
import os
import queue
import threading
from collections.abc import Callable
from typing import TypeVar

from ..input_processor import InputProcessor

T = TypeVar("T")

TOKENIZER_POOL_SIZE = 2
LARGE_TEXT_CHARS = 1 << 16  # about 50 ms of tokenizing
BACKGROUND_NICENESS = 10


class _Workers:
    def __init__(self, template: InputProcessor, num_workers: int, name: str, background: bool) -> None:
        self._processors: queue.SimpleQueue[InputProcessor] = queue.SimpleQueue()
        for _ in range(num_workers):
            self._processors.put(_copy_processor(template))
        self._background = background
        self._executor = concurrent.futures.ThreadPoolExecutor(
            num_workers, thread_name_prefix=name, initializer=_lower_priority if background else None)

    async def run(self, fn: Callable[[InputProcessor], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._call, fn)

    def _call(self, fn: Callable[[InputProcessor], T]) -> T:
        processor = self._processors.get()  # one per worker: never waits
        try:
            return fn(processor)
        finally:
            self._processors.put(processor)
            if self._background:
                _release_freed_memory()

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class TokenizerPool:
    def __init__(self, processor: InputProcessor) -> None:
        self._regular = _Workers(processor, TOKENIZER_POOL_SIZE, "tokenmill-tokenize", background=False)
        self._large = _Workers(processor, 1, "tokenmill-tokenize-large", background=True)

    async def run(self, fn: Callable[[InputProcessor], T], num_chars: int) -> T:
        """``fn(processor)`` on a worker chosen by ``num_chars``, the size of the text it handles."""
        workers = self._large if num_chars > LARGE_TEXT_CHARS else self._regular
        return await workers.run(fn)

    def shutdown(self) -> None:
        self._regular.shutdown()
        self._large.shutdown()


def _copy_processor(processor: InputProcessor) -> InputProcessor:
    return InputProcessor(copy.deepcopy(processor.tokenizer), vocab_size=processor.vocab_size,
                          max_model_len=processor.max_model_len, eos_token_id=processor.eos_token_id,
                          extra_eos_token_ids=processor.extra_eos_token_ids)


def _lower_priority() -> None:
    """Make this thread nicer than the engine's (Linux schedules threads by their own nice value)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICENESS)
    except (AttributeError, OSError):  # not Linux: the work still runs, at normal priority
        pass


_LIBC = ctypes.util.find_library("c")


def _release_freed_memory() -> None:
    """Hand the heap that a huge text needed back to the OS: glibc keeps a thread's freed
    arena memory otherwise, and every huge prompt would leave hundreds of MB behind."""
    if _LIBC is None:
        return
    try:
        ctypes.CDLL(_LIBC).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
