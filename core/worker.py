"""One tensor-parallel rank's half of the engine: its shard of the model, its KV cache, its runner.

    plan_model(config)      config only: model class, dtype, lengths, attention backend, quantization;
                            the driver runs it first, so a bad option is an error before any worker starts
    Worker(...)             builds the rank's attention backend and model shard (and calibrates fp8 KV scales)
    .available_blocks()     how many KV blocks this rank's memory holds; the executor takes the minimum
    .init_kv_cache(n)       allocates n blocks per layer (this rank's KV heads), builds the runner (and,
                            with enable_lora, the LoRAManager: device slots in every LoRA layer)
    .execute(step)          one scheduler output -> ModelRunnerOutput (every rank samples the same tokens:
                            each holds the full logits, gathered over the vocabulary shards)

At tensor_parallel_size 1 the engine core holds one Worker in its own process (executor "uni").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .attention import FP8_DTYPES, AttentionBackend, select_attention_backend
from .components import ATTENTION_BACKEND, DRAFTER, GUIDED_DECODER
from .config import EngineConfig
from .cuda_graphs import decode_graph_mode
from .distributed import TensorParallel, tensor_parallel
from .errors import ConfigError, TokenmillError
from .kv_cache import blocks_per_request
from .kv_scales import CALIBRATION_TOKENS, calibrate_kv_cache_scales
from .loader import (ModelSource, load_hf_config, load_model, resolve_dtype, resolve_max_model_len,
                     resolve_model_class, resolve_model_source, resolve_quantization)
from .lora import LoRAManager
from .memory import MemoryProfile, kv_cache_budget, profile_peak_activations, weights_bytes
from .model_base import KVCacheSpec, Model
from .model_runner import ModelRunner
from .registry import Registry
from .step import ModelRunnerOutput, SchedulerOutput

DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: {device!r} was asked for but no CUDA device is available")
    return torch.device(device)


@dataclass
class ModelPlan:
    """What the config decides about the model, the same on every rank but for ``local_*``."""

    source: ModelSource
    hf_config: Any
    model_cls: type[Model]
    device: torch.device
    dtype: torch.dtype
    max_model_len: int
    spec: KVCacheSpec  # the whole model's cache geometry (all KV heads)
    num_heads: int  # query heads on this rank
    num_kv_heads: int  # KV heads on this rank (an even share, or one replicated head)
    backend_name: str
    backend_cls: type[AttentionBackend]
    kv_cache_dtype: str
    quantization: str | None


def plan_model(config: EngineConfig, registry: Registry, tp: TensorParallel, device: torch.device) -> ModelPlan:
    """Resolve everything config-level about the model for rank ``tp.rank``; errors are ConfigErrors
    naming the option."""
    source = resolve_model_source(config.model.model, config.model.load_format)
    hf_config = load_hf_config(source)
    model_cls = resolve_model_class(registry, hf_config)
    dtype = resolve_dtype(config.model.dtype, hf_config, device)
    max_model_len = resolve_max_model_len(config.model.max_model_len, hf_config)
    sched = config.scheduler
    if not sched.enable_chunked_prefill and sched.max_num_batched_tokens < max_model_len:
        raise ConfigError(f"max_num_batched_tokens ({sched.max_num_batched_tokens}) must be >= max_model_len "
                          f"({max_model_len}) when enable_chunked_prefill is False")
    spec = model_cls.kv_cache_spec(hf_config)
    if tp.size > 1 and not model_cls.supports_tensor_parallel:
        raise ConfigError(f"tensor_parallel_size: {model_cls.__qualname__} does not declare "
                          "supports_tensor_parallel; it runs at tensor_parallel_size 1 only")
    try:
        _, num_heads = tp.split(hf_config.num_attention_heads, "num_attention_heads")
        _, num_kv_heads = tp.kv_heads(hf_config.num_attention_heads, spec.num_kv_heads)
    except ValueError as exc:
        raise ConfigError(f"tensor_parallel_size: {exc}") from None
    block_size = config.cache.block_size
    kv_cache_dtype = config.cache.kv_cache_dtype
    variants = dict(sliding_window=spec.uses_sliding_window, logits_soft_cap=spec.uses_logits_soft_cap)
    backend_name = config.attention_backend or select_attention_backend(
        registry.available(ATTENTION_BACKEND), device=device, dtype=dtype, head_size=spec.head_size,
        block_size=block_size, kv_cache_dtype=kv_cache_dtype, **variants)
    backend_cls = registry.get(ATTENTION_BACKEND, backend_name)
    problem = backend_cls.unsupported_reason(block_size=block_size)
    if problem:
        raise ConfigError(f"block_size: attention backend '{backend_name}' {problem}")
    problem = backend_cls.unsupported_kv_cache_dtype(kv_cache_dtype, device=device)
    if problem:
        raise ConfigError(f"kv_cache_dtype: attention backend '{backend_name}': {problem}")
    problem = backend_cls.unsupported_variant(**variants)
    if problem:
        architecture = (getattr(hf_config, "architectures", None) or [type(hf_config).__name__])[0]
        raise ConfigError(f"attention_backend: '{backend_name}' cannot run {architecture}: {problem}")
    quantization = resolve_quantization(config.model.quantization, source, model_cls)
    if config.lora.enable_lora:
        if tp.size > 1:
            raise ConfigError(f"enable_lora: LoRA adapters run at tensor_parallel_size 1 only, got "
                              f"tensor_parallel_size={tp.size}")
        if not getattr(model_cls, "lora_modules", None):
            raise ConfigError(f"enable_lora: {model_cls.__qualname__} declares no LoRA modules (lora_modules)")
    return ModelPlan(source, hf_config, model_cls, device, dtype, max_model_len, spec, num_heads, num_kv_heads,
                     backend_name, backend_cls, kv_cache_dtype, quantization)


class Worker:
    """Rank ``tp.rank``'s model shard, KV cache and runner (see the module docstring)."""

    def __init__(self, config: EngineConfig, registry: Registry, plan: ModelPlan, tp: TensorParallel, *,
                 bos_token_id: int | None, eos_token_id: int | None) -> None:
        self.config, self.registry, self.plan, self.tp = config, registry, plan, tp
        self.eos_token_id = eos_token_id
        self.device = plan.device
        self.memory_profile: MemoryProfile | None = None  # CUDA: what sized the KV cache
        self.attention = registry.create(ATTENTION_BACKEND, plan.backend_name, config.attention_config,
                                         section="attention_config", num_heads=plan.num_heads,
                                         num_kv_heads=plan.num_kv_heads, head_size=plan.spec.head_size,
                                         dtype=plan.dtype, device=self.device, kv_cache_dtype=plan.kv_cache_dtype)
        with tensor_parallel(tp):
            self.model = load_model(plan.hf_config, plan.model_cls, self.attention, source=plan.source,
                                    dtype=plan.dtype, device=self.device, seed=config.seed,
                                    quantization=plan.quantization)
        self.cache_dtype = self.attention.cache_dtype
        self._kv_cache_scales = None
        sched = config.scheduler
        if self.cache_dtype in FP8_DTYPES:  # fixed per (layer, KV head) before any step writes the cache: kv_scales
            self._kv_cache_scales = calibrate_kv_cache_scales(
                self.model, self.attention, num_layers=plan.spec.num_layers, block_size=config.cache.block_size,
                vocab_size=plan.hf_config.vocab_size, bos_token_id=bos_token_id, seed=config.seed,
                num_tokens=min(CALIBRATION_TOKENS, sched.max_num_batched_tokens, plan.max_model_len))
        self.kv_caches: list[torch.Tensor] = []
        self.runner: ModelRunner | None = None
        self.drafter = None

    def _cache_shape(self, num_blocks: int) -> tuple[int, ...]:
        """One layer's KV cache of ``num_blocks`` blocks on this rank (its KV heads)."""
        return self.plan.backend_cls.kv_cache_shape(num_blocks, self.config.cache.block_size, self.plan.num_kv_heads,
                                                    self.plan.spec.head_size)

    def available_blocks(self) -> int:
        """KV blocks this rank can hold: ``num_gpu_blocks_override``, else ``kv_cache_memory_bytes``, else
        on CUDA the profiled budget (core/memory.py), else 1 GiB on CPU; at least one request's worth."""
        cache, sched, plan = self.config.cache, self.config.scheduler, self.plan
        block_size = cache.block_size
        bytes_per_block = plan.spec.num_layers * torch.Size(self._cache_shape(1)).numel() * self.cache_dtype.itemsize
        needed = blocks_per_request(plan.max_model_len, block_size, plan.spec.sliding_window,
                                    sched.max_num_batched_tokens) + 1  # + the reserved null block
        if cache.num_gpu_blocks_override is not None:
            num_blocks = cache.num_gpu_blocks_override
        else:
            budget = cache.kv_cache_memory_bytes
            if budget is None and self.device.type == "cuda":
                activations = profile_peak_activations(
                    self.model, self.attention, num_layers=plan.spec.num_layers, num_kv_heads=plan.num_kv_heads,
                    head_size=plan.spec.head_size, block_size=block_size, cache_dtype=self.cache_dtype,
                    device=self.device, num_tokens=min(sched.max_num_batched_tokens, plan.max_model_len),
                    num_seqs=sched.max_num_seqs)
                free, total = torch.cuda.mem_get_info(self.device)
                self.memory_profile = MemoryProfile(total, free, weights_bytes(self.model), activations)
                budget = kv_cache_budget(self.memory_profile, cache.gpu_memory_utilization)
            num_blocks = (budget or DEFAULT_CPU_KV_CACHE_BYTES) // bytes_per_block
        if num_blocks < needed:
            raise ConfigError(f"the KV cache has {num_blocks} blocks of {block_size} tokens; one request of "
                              f"max_model_len={plan.max_model_len} needs {needed} (the null block included): raise "
                              "the cache size (gpu_memory_utilization, kv_cache_memory_bytes or "
                              "num_gpu_blocks_override) or lower max_model_len")
        return num_blocks

    def init_kv_cache(self, num_blocks: int) -> None:
        """Allocate ``num_blocks`` blocks per layer and build the runner (CUDA graphs captured here)."""
        config, plan = self.config, self.plan
        self.kv_caches = [torch.zeros(self._cache_shape(num_blocks), dtype=self.cache_dtype, device=self.device)
                          for _ in range(plan.spec.num_layers)]
        if self._kv_cache_scales is not None:
            self.attention.set_kv_cache_scales(self.kv_caches, self._kv_cache_scales)
        self.model.bind_kv_caches(self.kv_caches)
        speculative = config.speculative
        if speculative is not None:
            try:
                self.registry.get(DRAFTER, speculative.method)
            except TokenmillError as exc:
                raise ConfigError(f"speculative_config.method: {exc}") from exc
            self.drafter = self.registry.create(DRAFTER, speculative.method, speculative.options,
                                                section="speculative_config",
                                                num_speculative_tokens=speculative.num_speculative_tokens)
        lora = None
        if config.lora.enable_lora:  # device slots for max_loras adapters, attached to the model's LoRA layers
            lora = LoRAManager(self.model, plan.hf_config, max_loras=config.lora.max_loras,
                               max_lora_rank=config.lora.max_lora_rank, max_cpu_loras=config.lora.host_capacity,
                               device=self.device, dtype=plan.dtype)
        guided = self.registry.get(GUIDED_DECODER, config.structured_outputs.decoder)
        sched = config.scheduler
        self.runner = ModelRunner(self.model, vocab_size=plan.hf_config.vocab_size, block_size=config.cache.block_size,
                                  max_num_reqs=sched.max_num_seqs, max_model_len=plan.max_model_len,
                                  device=self.device, logprobs_mode=config.model.logprobs_mode,
                                  eos_token_id=self.eos_token_id, drafter=self.drafter,
                                  num_speculative_tokens=speculative.num_speculative_tokens if speculative else 0,
                                  apply_bitmask=guided.apply_token_bitmask,
                                  max_num_tokens=sched.max_num_batched_tokens,
                                  cudagraph_mode=decode_graph_mode(enforce_eager=config.model.enforce_eager,
                                                                   device=self.device, backend=plan.backend_cls),
                                  cudagraph_capture_sizes=config.model.cudagraph_capture_sizes, lora=lora)

    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.runner.execute(scheduler_output)
