"""Engine configuration: pydantic sections, built from keywords, a dict or a file.

Options keep vLLM's flat names (``block_size=32``, ``speculative_config={...}``);
each maps to a field of a section (``cache.block_size``). Nested section
dicts (``{"cache": {"block_size": 32}}``) work too. Unknown and deprecated
options are errors that name the option.
"""
from __future__ import annotations

import difflib
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError
from .sampling_metadata import LOGPROBS_MODE_ALIASES, LogprobsMode

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
STRUCTURED_BACKEND = "xgrammar:no_fallback"  # the default guided decoder; V1 has no fallback mode
NO_FALLBACK = "no_fallback"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    model: str = DEFAULT_MODEL
    tokenizer: str | None = None
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    max_model_len: int | None = Field(default=None, ge=1)
    load_format: Literal["auto", "safetensors", "gguf", "dummy"] = "auto"
    # vLLM's values (see sampling_metadata.LogprobsMode); "raw" and "processed" are aliases of
    # the *_logprobs ones
    logprobs_mode: LogprobsMode = "raw_logprobs"
    # True: every step runs eagerly. Otherwise decode steps replay CUDA graphs (on CUDA, with an
    # attention backend that supports them) captured for these batch sizes; None: 1, 2, 4, 8,
    # then multiples of 8 up to max_num_seqs
    enforce_eager: bool = False
    cudagraph_capture_sizes: list[int] | None = None
    # vLLM's values: "auto" (the model's generation_config.json: its EOS ids and sampling
    # defaults), "vllm" (ignore it) or a folder holding one
    generation_config: str = "auto"
    # vLLM's option: None (the weights as the checkpoint has them: a .gguf file's stay in their
    # block formats), "gguf" (the same, stated), "fp8" (a bf16/fp16/fp32 checkpoint quantized at
    # load to e4m3 with a scale per output channel), "none" (a GGUF file expanded to the dtype)
    quantization: Literal["gguf", "fp8", "none"] | None = None

    @field_validator("cudagraph_capture_sizes")
    @classmethod
    def _positive_sizes(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (not value or min(value) < 1):
            raise ValueError(f"must be a non-empty list of batch sizes >= 1, got {value}")
        return value

    @field_validator("logprobs_mode", mode="before")
    @classmethod
    def _logprobs_mode_aliases(cls, value: Any) -> Any:
        return LOGPROBS_MODE_ALIASES.get(value, value)

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype_aliases(cls, value: Any) -> Any:
        return {"half": "float16", "float": "float32", "bf16": "bfloat16", "fp16": "float16",
                "fp32": "float32"}.get(value, value)


class CacheConfig(_Section):
    block_size: int = 16
    enable_prefix_caching: bool = True
    num_gpu_blocks_override: int | None = Field(default=None, ge=1)
    gpu_memory_utilization: float = Field(default=0.9, gt=0.0, le=1.0)
    kv_cache_memory_bytes: int | None = Field(default=None, ge=1)
    # vLLM's values: "auto" (the model's dtype) or fp8 ("fp8" is "fp8_e4m3"), with per-(layer, KV head)
    # scales calibrated at start-up (see tokenmill.kv_scales)
    kv_cache_dtype: Literal["auto", "fp8", "fp8_e4m3", "fp8_e5m2"] = "auto"

    @field_validator("block_size")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value < 1 or value > 256 or value & (value - 1):
            raise ValueError(f"must be a power of two between 1 and 256, got {value}")
        return value


class SchedulerConfig(_Section):
    max_num_seqs: int = Field(default=256, ge=1)
    max_num_batched_tokens: int = Field(default=8192, ge=1)
    enable_chunked_prefill: bool = True
    max_num_queued_requests: int | None = Field(default=None, ge=1)
    # vLLM's values: "fcfs" (arrival order) or "priority" (each request's ``priority``, lower first, ties by
    # arrival; the KV cache preempts the lowest-priority running request first)
    scheduling_policy: Literal["fcfs", "priority"] = "fcfs"
    # vLLM's option: schedule step N+1 while step N runs on the device, so the host's work (scheduling,
    # updating, detokenizing) overlaps the model's (see EngineCore); the tokens are the synchronous loop's
    async_scheduling: bool = False


class ParallelConfig(_Section):
    """How the model spreads over devices (vLLM's names): ``tensor_parallel_size`` ranks, each holding a
    shard of every layer, run by ``distributed_executor_backend``: "uni" (this process; only size 1),
    "mp" (one worker process per rank on this machine) or "ray" (one Ray actor per rank, on the cluster
    ``ray.init`` reaches, else a local one). None: "uni" at size 1, "mp" above."""

    tensor_parallel_size: int = Field(default=1, ge=1)
    distributed_executor_backend: Literal["uni", "mp", "ray"] | None = None

    @property
    def executor(self) -> str:
        if self.distributed_executor_backend is not None:
            return self.distributed_executor_backend
        return "uni" if self.tensor_parallel_size == 1 else "mp"


class LoRAConfig(_Section):
    """Multi-LoRA serving (vLLM's names): ``enable_lora``; ``max_loras`` adapters resident on the device
    at once (never more distinct adapters in one step); ``max_lora_rank``, the largest rank accepted;
    ``max_cpu_loras`` adapters kept loaded in host memory, least recently used evicted (None: max_loras)."""

    enable_lora: bool = False
    max_loras: int = Field(default=1, ge=1)
    max_lora_rank: int = Field(default=16, ge=1)
    max_cpu_loras: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _cpu_holds_the_device_ones(self) -> LoRAConfig:
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras}), got "
                             f"fewer")
        return self

    @property
    def host_capacity(self) -> int:
        return self.max_cpu_loras if self.max_cpu_loras is not None else self.max_loras


class _ComponentSection(BaseModel):
    """A section that selects a component: the keys core owns are fields, every other key
    is the component's own option, validated by its ``Options`` when the engine builds it."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class SpeculativeConfig(_ComponentSection):
    """``speculative_config``: the drafter ``method`` (a registered drafter name), how many
    tokens it may draft per step, and the drafter's own options."""

    method: str
    num_speculative_tokens: int

    @field_validator("num_speculative_tokens")
    @classmethod
    def _at_least_one(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"must be >= 1, got {value}")
        return value


class StructuredOutputsConfig(_ComponentSection):
    """``structured_outputs_config``: ``backend`` names a registered guided decoder, optionally
    with the mode ``:no_fallback`` (the only one: a spec the decoder cannot enforce is an
    error, never unconstrained decoding); the other keys are the decoder's own options."""

    backend: str = STRUCTURED_BACKEND

    @field_validator("backend")
    @classmethod
    def _no_fallback_only(cls, value: str) -> str:
        name, _, mode = value.partition(":")
        if not name or mode not in ("", NO_FALLBACK):
            raise ValueError(f"must be a guided decoder's name, optionally with ':{NO_FALLBACK}' (V1 has no "
                             f"fallback mode), got {value!r}")
        return f"{name}:{NO_FALLBACK}"

    @property
    def decoder(self) -> str:
        """The guided decoder's registered name."""
        return self.backend.partition(":")[0]


class EngineConfig(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    lora: LoRAConfig = Field(default_factory=LoRAConfig)
    speculative: SpeculativeConfig | None = None
    structured_outputs: StructuredOutputsConfig = Field(default_factory=StructuredOutputsConfig)
    attention_backend: str | None = None
    attention_config: dict[str, Any] = Field(default_factory=dict)  # the backend's own options
    device: str = "auto"
    seed: int = 0
    plugin_errors: Literal["raise", "warn"] = "raise"

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        base, _, index = value.partition(":")
        if base not in ("auto", "cpu", "cuda") or (index and not (base == "cuda" and index.isdigit())):
            raise ValueError(f"must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {value!r}")
        return value

    @model_validator(mode="after")
    def _uni_runs_one_rank(self) -> EngineConfig:
        parallel = self.parallel
        if parallel.distributed_executor_backend == "uni" and parallel.tensor_parallel_size > 1:
            raise ValueError(f"distributed_executor_backend: 'uni' runs one rank in this process, got "
                             f"tensor_parallel_size={parallel.tensor_parallel_size}; use 'mp' or 'ray'")
        return self

    @model_validator(mode="after")
    def _async_without_drafts(self) -> EngineConfig:
        if self.scheduler.async_scheduling and self.speculative is not None:
            raise ValueError("scheduler.async_scheduling: speculative decoding (speculative_config) is not "
                             "supported with async_scheduling=True; the drafts of step N are needed to schedule "
                             "step N+1")
        return self

    @classmethod
    def build(cls, source: Mapping[str, Any] | str | Path | None = None, **options: Any) -> EngineConfig:
        """An EngineConfig from a dict or a JSON/TOML file, overridden by keyword options."""
        merged: dict[str, Any] = dict(_read_source(source)) if source is not None else {}
        merged.update(options)
        nested = _nest(merged)
        try:
            return cls.model_validate(nested)
        except ValidationError as exc:
            raise ConfigError(_format_errors(exc)) from None


# flat (vLLM) option name -> (section, field); section None means top level
_FLAT: dict[str, tuple[str | None, str]] = {
    **{f: ("model", f) for f in ModelConfig.model_fields},
    **{f: ("cache", f) for f in CacheConfig.model_fields},
    **{f: ("scheduler", f) for f in SchedulerConfig.model_fields},
    **{f: ("parallel", f) for f in ParallelConfig.model_fields},
    **{f: ("lora", f) for f in LoRAConfig.model_fields},
    "speculative_config": (None, "speculative"),
    "structured_outputs_config": (None, "structured_outputs"),
    **{f: (None, f) for f in ("attention_backend", "attention_config", "device", "seed", "plugin_errors")},
}
_SECTIONS = ("model", "cache", "scheduler", "parallel", "lora", "speculative", "structured_outputs")
_DEPRECATED = {
    "best_of": "best_of is deprecated in V1; use n and pick among the outputs",
    "swap_space": "KV cache swapping is deprecated in V1; preempted requests are recomputed",
    "cpu_offload_gb": "offloading weights to CPU memory is not supported by this engine",
    "kv_offloading_size": "KV cache offloading is deprecated in V1",
    "preemption_mode": "preemption_mode is deprecated in V1; preemption is always by recompute",
    "logits_processors": "per-request logits processors are deprecated in V1",
}


def _read_source(source: Mapping[str, Any] | str | Path) -> Mapping[str, Any]:
    if isinstance(source, Mapping):
        return source
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    if path.suffix == ".json":
        return json.loads(path.read_text())
    if path.suffix == ".toml":
        return tomllib.loads(path.read_text())
    raise ConfigError(f"config file must end in .json or .toml, got {str(path)!r}")


def _nest(options: Mapping[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in options.items():
        if key in _DEPRECATED:
            raise ConfigError(f"{key}: {_DEPRECATED[key]}")
        if key == "model" and isinstance(value, Mapping):
            section, field = "model", None
        elif key in _FLAT:
            section, field = _FLAT[key]
        elif key in _SECTIONS:
            section, field = key, None
        else:
            close = difflib.get_close_matches(key, [*_FLAT, *_SECTIONS], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown engine option {key!r}{hint}")
        if field is None:  # a whole section given as a dict
            if not isinstance(value, Mapping):
                raise ConfigError(f"{key} must be a mapping of options, got {type(value).__name__}")
            for sub in value:
                if sub in _DEPRECATED:
                    raise ConfigError(f"{key}.{sub}: {_DEPRECATED[sub]}")
            nested.setdefault(section, {}).update(value)
        elif section is None:
            nested[field] = value
        else:
            nested.setdefault(section, {})[field] = value
    return nested


def _format_errors(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join(str(part) for part in err["loc"]) or "config"
        if err["type"] == "extra_forbidden":
            lines.append(f"{where}: unknown option")
            continue
        message = err["msg"].removeprefix("Value error, ")
        if "got" not in message:
            message += f", got {err.get('input')!r}"
        lines.append(f"{where}: {message}")
    return "invalid engine config: " + "; ".join(lines)
