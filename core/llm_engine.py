"""LLMEngine: input processing, the engine core and output processing, in one process."""
from __future__ import annotations

import itertools
from typing import Any

from .config import EngineConfig
from .engine_core import EngineCore
from .lora_request import LoRARequest
from .input_processor import InputProcessor, PromptType
from .output_processor import OutputKind, OutputProcessor
from .outputs import RequestOutput
from .registry import Registry
from .request import RequestStatus
from .sampling_params import SamplingParams
from .scheduler import check_priority


class LLMEngine:
    def __init__(self, config: EngineConfig, registry: Registry | None = None) -> None:
        self.config = config
        self.core = EngineCore(config, registry)
        self.tokenizer = self.core.tokenizer
        self.input_processor = InputProcessor(self.tokenizer, vocab_size=self.core.vocab_size,
                                              max_model_len=self.core.max_model_len,
                                              eos_token_id=self.core.eos_token_id,
                                              extra_eos_token_ids=self.core.generation_defaults.eos_token_ids)
        self.output_processor = OutputProcessor(self.tokenizer)
        self._ids = itertools.count()

    def next_request_id(self) -> str:
        return str(next(self._ids))

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams,
                    kind: OutputKind = OutputKind.CUMULATIVE, lora_request: LoRARequest | None = None,
                    priority: int = 0) -> None:
        """Validate and queue; raises ValueError (naming the field) and queues nothing on bad input.
        ``priority``: lower runs first under ``scheduling_policy="priority"``; "fcfs" allows only 0."""
        if self.output_processor.has_request(request_id):
            raise ValueError(f"request_id {request_id!r} is already in use")
        # checked before anything is queued: the scheduler would refuse it only after the output processor took it
        check_priority(priority, self.config.scheduler.scheduling_policy == "priority")
        if lora_request is not None:
            self.core.validate_lora_request(lora_request)
        text, requests = self.input_processor.process(request_id, prompt, params, lora_request=lora_request,
                                                      priority=priority)
        self.core.validate_structured_outputs(requests[0])  # children share the spec
        self.output_processor.add_request(request_id, text, requests, kind)
        for request in requests:
            self.core.add_request(request)

    def abort_request(self, request_ids: list[str]) -> list[RequestOutput]:
        """Abort requests in any state; returns their final outputs (finish reason "abort")."""
        finals = []
        for request_id in request_ids:
            self.core.abort_requests(self.output_processor.child_ids(request_id))
            final = self.output_processor.abort(request_id)
            if final is not None:
                finals.append(final)
        return finals

    def has_unfinished_requests(self) -> bool:
        return self.output_processor.num_unfinished() > 0 or self.core.has_unfinished_requests()

    def step(self) -> list[RequestOutput]:
        outputs, to_stop, to_fail = self.output_processor.process(self.core.step())
        if to_stop:  # stop strings found by the detokenizer end the requests in the core
            self.core.finish_requests(to_stop, RequestStatus.FINISHED_STOPPED)
        if to_fail:
            self.core.finish_requests(to_fail, RequestStatus.FINISHED_ERROR)
        return outputs

    def get_stats(self) -> dict[str, Any]:
        """The core's stats, plus ``num_steps`` (steps that scheduled tokens) and ``last_step_num_tokens``
        (what the latest one scheduled), from which the server's per-step token histogram is drawn."""
        stats = self.core.stats()
        scheduler = self.core.scheduler
        stats["num_steps"], stats["last_step_num_tokens"] = scheduler.num_steps, scheduler.last_step_num_tokens
        return stats

    def shutdown(self) -> None:
        """Stop the engine's workers (tensor_parallel_size > 1); idempotent."""
        self.core.shutdown()
