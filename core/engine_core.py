"""EngineCore: the scheduler, structured outputs and the executor that runs the model's ranks;
``step()`` is schedule -> execute -> update.

With ``async_scheduling`` the executor runs steps in the background, at most two queued, and a step
call schedules and launches step N+1 before it waits for step N and applies it:

    main thread    schedule N+1 | wait N | update N, return its outputs | (caller detokenizes) | schedule N+2 ...
    executor                run N          |            run N+1                                | run N+2
"""
from __future__ import annotations

import weakref
from collections import deque
from concurrent.futures import Future

import torch

from .config import EngineConfig
from .distributed import TensorParallel
from .executor import Executor, make_executor
from .generation_config import load_generation_defaults
from .loader import load_tokenizer
from .lora import validate_adapter
from .lora_request import LoRARequest
from .registry import Registry, get_registry
from .request import Request, RequestError, RequestStatus
from .scheduler import Scheduler
from .step import EngineCoreOutput, ModelRunnerOutput, SchedulerOutput
from .structured_output_manager import StructuredOutputManager
from .worker import resolve_device  # noqa: F401 - re-exported: callers resolve "auto" the engine's way
from .worker import plan_model


class EngineCore:
    def __init__(self, config: EngineConfig, registry: Registry | None = None) -> None:
        self.config = config
        registry = registry or (get_registry() if config.plugin_errors == "raise"
                                else Registry(on_plugin_error="warn"))
        self.registry = registry
        self.device = resolve_device(config.device)
        # config-level decisions first, here: a bad option is an error before any worker starts
        plan = plan_model(config, registry, TensorParallel(0, config.parallel.tensor_parallel_size), self.device)
        self.hf_config, self.dtype, self.max_model_len = plan.hf_config, plan.dtype, plan.max_model_len
        self.quantization = plan.quantization
        self.tokenizer = load_tokenizer(plan.source, config.model.tokenizer)
        self.eos_token_id = self.tokenizer.eos_token_id
        self.generation_defaults = load_generation_defaults(config.model.generation_config, plan.source.path)
        self.vocab_size = self.hf_config.vocab_size
        self.structured = StructuredOutputManager(registry, config.structured_outputs.decoder, self.tokenizer,
                                                  self.vocab_size, options=config.structured_outputs.options)
        self.executor: Executor = make_executor(config, registry, plan, bos_token_id=self.tokenizer.bos_token_id,
                                                eos_token_id=self.eos_token_id)
        weakref.finalize(self, self.executor.shutdown)
        self.num_blocks = self.executor.num_blocks
        self._model_cls = plan.model_cls
        self._valid_loras: dict[int, str] = {}  # lora_int_id -> the folder validated for it
        lora = config.lora
        self.scheduler = Scheduler(config.scheduler, config.cache, num_blocks=self.num_blocks,
                                   max_model_len=self.max_model_len, sliding_window=plan.spec.sliding_window,
                                   max_loras=lora.max_loras if lora.enable_lora else None)
        self.async_scheduling = config.scheduler.async_scheduling
        self._in_flight: deque[tuple[SchedulerOutput, Future[ModelRunnerOutput], dict[str, RequestError]]] = deque()
        self.max_steps_in_flight = 0  # the most steps the executor held at once (2 when steps overlapped)

    # ------------------------------------------------------------ the in-process rank ("uni")

    @property
    def model(self) -> torch.nn.Module | None:
        worker = self.executor.worker
        return worker.model if worker is not None else None

    @property
    def runner(self):
        worker = self.executor.worker
        return worker.runner if worker is not None else None

    @property
    def kv_caches(self) -> list[torch.Tensor]:
        worker = self.executor.worker
        return worker.kv_caches if worker is not None else []

    @property
    def drafter(self):
        worker = self.executor.worker
        return worker.drafter if worker is not None else None

    @property
    def memory_profile(self):
        worker = self.executor.worker
        return worker.memory_profile if worker is not None else None

    def shutdown(self) -> None:
        """Stop the executor's workers (idempotent)."""
        self.executor.shutdown()

    # ------------------------------------------------------------ requests

    def validate_structured_outputs(self, request: Request) -> None:
        """Raises ValueError for a structured-output spec the guided decoder cannot honour."""
        if request.sampling_params.structured_outputs is not None:
            self.structured.validate(request.sampling_params.structured_outputs)

    def validate_lora_request(self, lora_request: LoRARequest) -> None:
        """Raises ValueError when the engine serves no adapters, or when this adapter cannot run on the model
        (its folder, rank, target modules or tensor shapes; see ``tokenmill.lora.validate_adapter``)."""
        lora = self.config.lora
        if not lora.enable_lora:
            raise ValueError(f"lora_request {lora_request.lora_name!r}: this engine serves no LoRA adapters; "
                             "start it with enable_lora=True")
        known = self._valid_loras.get(lora_request.lora_int_id)
        if known is not None:
            if known != lora_request.lora_path:
                raise ValueError(f"lora_request {lora_request.lora_name!r}: lora_int_id {lora_request.lora_int_id} "
                                 f"already names the adapter at {known}, not {lora_request.lora_path}")
            return  # read once: a request per adapter does not read its folder again
        validate_adapter(lora_request, self._model_cls, self.hf_config, lora.max_lora_rank)
        self._valid_loras[lora_request.lora_int_id] = lora_request.lora_path

    def add_request(self, request: Request) -> None:
        """Queue a request; a guided one waits for its grammar (compiled in the background).
        Call ``validate_structured_outputs`` first to reject bad specs up front."""
        if request.sampling_params.structured_outputs is not None:
            self.structured.submit(request)
        self.scheduler.add_request(request)

    def abort_requests(self, request_ids: list[str]) -> list[str]:
        self.structured.forget(request_ids)
        return self.scheduler.abort_requests(request_ids)

    def finish_requests(self, request_ids: list[str], status: RequestStatus) -> None:
        self.scheduler.finish_requests(request_ids, status)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def step(self) -> list[EngineCoreOutput]:
        if self.async_scheduling:
            return self._step_overlapped()
        scheduler_output, grammar_failed = self._schedule()
        runner_output = self.executor.execute(scheduler_output)
        runner_output.drop_failed(grammar_failed)  # their tokens were drawn without a valid mask
        return self.scheduler.update_from_output(scheduler_output, runner_output)

    def _schedule(self) -> tuple[SchedulerOutput, dict[str, RequestError]]:
        """The next step, its grammar bitmask filled; and the requests whose grammar failed to fill it."""
        # With nothing running, wait (briefly) for a grammar rather than spin.
        idle = not self.scheduler.running and all(r.status == RequestStatus.WAITING_FOR_GRAMMAR
                                                  for r in self.scheduler.waiting)
        failed = self.structured.update_waiting(block=idle)
        if failed:
            self.scheduler.fail_requests(failed)
        scheduler_output = self.scheduler.schedule()
        return scheduler_output, self.structured.grammar_bitmask(scheduler_output, self.scheduler.requests)

    def _step_overlapped(self) -> list[EngineCoreOutput]:
        """Launch the next step; then, unless it is the only one in flight and has work, wait for the
        oldest and apply it. Empty steps launch too: they carry finished and preempted ids to the runner."""
        scheduler_output, grammar_failed = self._schedule()
        future = self.executor.execute_async(scheduler_output)
        self._in_flight.append((scheduler_output, future, grammar_failed))
        self.max_steps_in_flight = max(self.max_steps_in_flight, len(self._in_flight))
        if len(self._in_flight) < 2 and not scheduler_output.is_empty:
            return []
        scheduler_output, future, grammar_failed = self._in_flight.popleft()
        runner_output = future.result()
        runner_output.drop_failed(grammar_failed)
        return self.scheduler.update_from_output(scheduler_output, runner_output)

    def stats(self) -> dict[str, int | float]:
        stats = self.scheduler.stats()
        drafted, accepted = stats["spec_num_draft_tokens"], stats["spec_num_accepted_tokens"]
        stats["spec_acceptance_rate"] = accepted / drafted if drafted else 0.0
        verify_steps = self.scheduler.spec_num_verify_steps
        # tokens emitted per verifying step: accepted drafts + the bonus/corrected token
        stats["spec_mean_accepted_length"] = (accepted + verify_steps) / verify_steps if verify_steps else 0.0
        stats["num_grammars_compiling"] = self.structured.num_pending
        return stats
