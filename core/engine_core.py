"""EngineCore: the model, its KV cache, the scheduler and the runner; ``step()`` is
schedule -> execute -> update."""
from __future__ import annotations

from collections.abc import Callable

import torch

from .attention import FP8_DTYPES, select_attention_backend
from .components import ATTENTION_BACKEND, DRAFTER
from .config import EngineConfig
from .cuda_graphs import decode_graph_mode
from .errors import ConfigError, TokenmillError
from .generation_config import load_generation_defaults
from .kv_cache import blocks_per_request
from .kv_scales import CALIBRATION_TOKENS, calibrate_kv_cache_scales
from .loader import (load_hf_config, load_model, load_tokenizer, resolve_dtype, resolve_max_model_len,
                     resolve_model_class, resolve_model_source, resolve_quantization)
from .memory import MemoryProfile, kv_cache_budget, profile_peak_activations, weights_bytes
from .model_runner import ModelRunner
from .registry import Registry, get_registry
from .request import Request, RequestStatus
from .scheduler import Scheduler
from .step import EngineCoreOutput
from .structured_output_manager import StructuredOutputManager

DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: {device!r} was asked for but no CUDA device is available")
    return torch.device(device)


class EngineCore:
    def __init__(self, config: EngineConfig, registry: Registry | None = None) -> None:
        self.config = config
        registry = registry or (get_registry() if config.plugin_errors == "raise"
                                else Registry(on_plugin_error="warn"))
        self.registry = registry
        self.memory_profile: MemoryProfile | None = None  # CUDA: what sized the KV cache
        self.device = resolve_device(config.device)
        source = resolve_model_source(config.model.model, config.model.load_format)
        self.hf_config = load_hf_config(source)
        self.tokenizer = load_tokenizer(source, config.model.tokenizer)
        model_cls = resolve_model_class(registry, self.hf_config)
        self.dtype = resolve_dtype(config.model.dtype, self.hf_config, self.device)
        self.max_model_len = resolve_max_model_len(config.model.max_model_len, self.hf_config)
        sched = config.scheduler
        if not sched.enable_chunked_prefill and sched.max_num_batched_tokens < self.max_model_len:
            raise ConfigError(f"max_num_batched_tokens ({sched.max_num_batched_tokens}) must be >= max_model_len "
                              f"({self.max_model_len}) when enable_chunked_prefill is False")

        spec = model_cls.kv_cache_spec(self.hf_config)
        self._sliding_window = spec.sliding_window
        block_size = config.cache.block_size
        kv_cache_dtype = config.cache.kv_cache_dtype
        variants = dict(sliding_window=spec.uses_sliding_window, logits_soft_cap=spec.uses_logits_soft_cap)
        backend_name = config.attention_backend or select_attention_backend(
            registry.available(ATTENTION_BACKEND), device=self.device, dtype=self.dtype, head_size=spec.head_size,
            block_size=block_size, kv_cache_dtype=kv_cache_dtype, **variants)
        backend_cls = registry.get(ATTENTION_BACKEND, backend_name)
        problem = backend_cls.unsupported_reason(block_size=block_size)
        if problem:
            raise ConfigError(f"block_size: attention backend '{backend_name}' {problem}")
        problem = backend_cls.unsupported_kv_cache_dtype(kv_cache_dtype, device=self.device)
        if problem:
            raise ConfigError(f"kv_cache_dtype: attention backend '{backend_name}': {problem}")
        problem = backend_cls.unsupported_variant(**variants)
        if problem:
            architecture = (getattr(self.hf_config, "architectures", None) or [type(self.hf_config).__name__])[0]
            raise ConfigError(f"attention_backend: '{backend_name}' cannot run {architecture}: {problem}")
        attention = registry.create(ATTENTION_BACKEND, backend_name, config.attention_config,
                                    section="attention_config", num_heads=self.hf_config.num_attention_heads,
                                    num_kv_heads=spec.num_kv_heads, head_size=spec.head_size, dtype=self.dtype,
                                    device=self.device, kv_cache_dtype=kv_cache_dtype)
        self.quantization = resolve_quantization(config.model.quantization, source, model_cls)
        self.model = load_model(self.hf_config, model_cls, attention, source=source, dtype=self.dtype,
                                device=self.device, seed=config.seed, quantization=self.quantization)
        cache_dtype = attention.cache_dtype
        kv_cache_scales = None
        if cache_dtype in FP8_DTYPES:  # fixed per (layer, KV head) before any step writes the cache: kv_scales
            kv_cache_scales = calibrate_kv_cache_scales(
                self.model, attention, num_layers=spec.num_layers, block_size=block_size,
                vocab_size=self.hf_config.vocab_size, bos_token_id=self.tokenizer.bos_token_id, seed=config.seed,
                num_tokens=min(CALIBRATION_TOKENS, sched.max_num_batched_tokens, self.max_model_len))
        shape = backend_cls.kv_cache_shape(1, block_size, spec.num_kv_heads, spec.head_size)
        bytes_per_block = spec.num_layers * torch.Size(shape).numel() * cache_dtype.itemsize
        self.num_blocks = self._num_blocks(bytes_per_block, lambda: profile_peak_activations(
            self.model, attention, num_layers=spec.num_layers, num_kv_heads=spec.num_kv_heads,
            head_size=spec.head_size, block_size=block_size, cache_dtype=cache_dtype, device=self.device,
            num_tokens=min(sched.max_num_batched_tokens, self.max_model_len), num_seqs=sched.max_num_seqs))
        self.kv_caches = [torch.zeros(backend_cls.kv_cache_shape(self.num_blocks, block_size, spec.num_kv_heads,
                                                                 spec.head_size), dtype=cache_dtype, device=self.device)
                          for _ in range(spec.num_layers)]
        if kv_cache_scales is not None:
            attention.set_kv_cache_scales(self.kv_caches, kv_cache_scales)
        self.model.bind_kv_caches(self.kv_caches)
        self.eos_token_id = self.tokenizer.eos_token_id
        self.generation_defaults = load_generation_defaults(config.model.generation_config, source.path)
        self.vocab_size = self.hf_config.vocab_size
        self.scheduler = Scheduler(sched, config.cache, num_blocks=self.num_blocks, max_model_len=self.max_model_len,
                                   sliding_window=spec.sliding_window)
        self.drafter = None
        if config.speculative is not None:
            speculative = config.speculative
            try:
                registry.get(DRAFTER, speculative.method)
            except TokenmillError as exc:
                raise ConfigError(f"speculative_config.method: {exc}") from exc
            self.drafter = registry.create(DRAFTER, speculative.method, speculative.options,
                                           section="speculative_config",
                                           num_speculative_tokens=speculative.num_speculative_tokens)
        self.structured = StructuredOutputManager(registry, config.structured_outputs.decoder, self.tokenizer,
                                                  self.vocab_size, options=config.structured_outputs.options)
        self.runner = ModelRunner(self.model, vocab_size=self.vocab_size, block_size=block_size,
                                  max_num_reqs=sched.max_num_seqs, max_model_len=self.max_model_len,
                                  device=self.device, logprobs_mode=config.model.logprobs_mode,
                                  eos_token_id=self.eos_token_id, drafter=self.drafter,
                                  num_speculative_tokens=config.speculative.num_speculative_tokens
                                  if config.speculative else 0,
                                  apply_bitmask=self._apply_bitmask,
                                  max_num_tokens=sched.max_num_batched_tokens,
                                  cudagraph_mode=decode_graph_mode(enforce_eager=config.model.enforce_eager,
                                                                   device=self.device, backend=backend_cls),
                                  cudagraph_capture_sizes=config.model.cudagraph_capture_sizes)

    def _apply_bitmask(self, logits: torch.Tensor, bitmask: torch.Tensor, indices: list[int] | None) -> None:
        self.structured.decoder.apply_token_bitmask(logits, bitmask, indices)

    def _num_blocks(self, bytes_per_block: int, profile_activations: Callable[[], int]) -> int:
        """From num_gpu_blocks_override, else kv_cache_memory_bytes, else on CUDA the
        profiled budget (core/memory.py), else 1 GiB on CPU."""
        cache = self.config.cache
        block_size = cache.block_size
        needed = blocks_per_request(self.max_model_len, block_size, self._sliding_window,
                                    self.config.scheduler.max_num_batched_tokens) + 1  # + the reserved null block
        if cache.num_gpu_blocks_override is not None:
            num_blocks = cache.num_gpu_blocks_override
        else:
            budget = cache.kv_cache_memory_bytes
            if budget is None and self.device.type == "cuda":
                activations = profile_activations()
                free, total = torch.cuda.mem_get_info(self.device)
                self.memory_profile = MemoryProfile(total, free, weights_bytes(self.model), activations)
                budget = kv_cache_budget(self.memory_profile, cache.gpu_memory_utilization)
            num_blocks = (budget or DEFAULT_CPU_KV_CACHE_BYTES) // bytes_per_block
        if num_blocks < needed:
            raise ConfigError(f"the KV cache has {num_blocks} blocks of {block_size} tokens; one request of "
                              f"max_model_len={self.max_model_len} needs {needed} (the null block included): raise "
                              "the cache size (gpu_memory_utilization, kv_cache_memory_bytes or "
                              "num_gpu_blocks_override) or lower max_model_len")
        return num_blocks

    # ------------------------------------------------------------ requests

    def validate_structured_outputs(self, request: Request) -> None:
        """Raises ValueError for a structured-output spec the guided decoder cannot honour."""
        if request.sampling_params.structured_outputs is not None:
            self.structured.validate(request.sampling_params.structured_outputs)

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
        # With nothing running, wait (briefly) for a grammar rather than spin.
        idle = not self.scheduler.running and all(r.status == RequestStatus.WAITING_FOR_GRAMMAR
                                                  for r in self.scheduler.waiting)
        failed = self.structured.update_waiting(block=idle)
        if failed:
            self.scheduler.fail_requests(failed)
        scheduler_output = self.scheduler.schedule()
        grammar_failed = self.structured.grammar_bitmask(scheduler_output, self.scheduler.requests)
        runner_output = self.runner.execute(scheduler_output)
        runner_output.drop_failed(grammar_failed)  # their tokens were drawn without a valid mask
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
