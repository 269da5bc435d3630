"""The feature matrix: what this installation supports, computed from the registry.

``tokenmill features --json`` prints ``feature_matrix(registry)``:

    {"components": [{"kind", "name", "provider", "status", "reason", "capabilities"}, ...],
     "features":   [{"feature", "status", "detail"}, ...],
     "plugin_errors": [...], "skipped_plugins": [...]}
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch

from .components import ATTENTION_BACKEND, DRAFTER, GUIDED_DECODER, MODEL, REASONING_PARSER, TOOL_PARSER
from .config import _DEPRECATED, NO_FALLBACK


class _Record(Protocol):
    """What a row is made from (``registry.ComponentRecord`` has it)."""

    kind: str
    name: str
    cls: type
    provider: object
    status: str
    reason: str


class ComponentSource(Protocol):
    """What the matrix reads from a registry (``registry.Registry`` has it; this module does
    not import the registry, which imports it)."""

    plugin_errors: list[str]
    skipped_plugins: list[str]

    def available(self, kind: str) -> dict[str, type]: ...

    def records(self, kind: str | None = None) -> Sequence[_Record]: ...

# Engine-level V1 features that no component provides: (feature, status, detail).
# Each row states what the engine in this tree does today.
ENGINE_FEATURES: tuple[tuple[str, str, str], ...] = (
    ("logprobs", "supported", "sample logprobs (top-k + the sampled token) from the raw logits by default "
                              "(V1); logprobs_mode raw_logprobs, raw_logits, processed_logprobs (after masks, "
                              "penalties and temperature) or processed_logits"),
    ("prompt_logprobs", "supported", "from the raw logits; a request asking for them skips prefix-cache reads"),
    ("prefix_caching", "supported", "sha256-chained block hashes, LRU eviction, per-request cache_salt"),
    ("chunked_prefill", "supported", "one token budget per step, no prefill/decode phases"),
    ("preemption", "supported", "by recompute (V1); KV cache swapping is deprecated"),
    ("async_scheduling", "supported", "async_scheduling=True: step N+1 is scheduled while step N runs (two in "
                                      "flight), tokens identical to the synchronous loop; not with speculative "
                                      "decoding; a guided request waits out its own step in flight"),
    ("speculative_decoding", "supported", "drafts scheduled within the token budget, verified in one forward "
                                          "pass by a rejection sampler (greedy: exact match; sampled: the "
                                          "standard rule for a deterministic drafter), with structured outputs"),
    ("cuda_graphs", "supported", "CUDA only, with a graph-capturable attention backend (triton): decode steps "
                                 "replay graphs captured for a ladder of batch sizes; enforce_eager=True turns "
                                 "them off"),
    ("gpu_memory_budget", "supported", "CUDA: KV cache sized from gpu_memory_utilization after a profiling "
                                       "pass of the largest step"),
    ("structured_outputs", "supported", "grammars compiled in a thread pool (the request waits, others run); "
                                        "bad specs rejected when added; no fallback to unconstrained decoding"),
)

def component_row(record: _Record) -> dict[str, Any]:
    return {
        "kind": record.kind,
        "name": record.name,
        "provider": str(record.provider),
        "status": record.status,
        "reason": record.reason,
        "capabilities": record.cls.capabilities() if record.status == "available" else {},
    }


def _listing(feature: str, names: list[str], none_detail: str) -> dict[str, str]:
    if names:
        return {"feature": feature, "status": "supported", "detail": ", ".join(names)}
    return {"feature": feature, "status": "unavailable", "detail": none_detail}


def feature_matrix(registry: ComponentSource) -> dict[str, Any]:
    available = {kind: registry.available(kind)
                 for kind in (ATTENTION_BACKEND, DRAFTER, GUIDED_DECODER, MODEL, TOOL_PARSER, REASONING_PARSER)}
    refused_models = [r for r in registry.records(MODEL) if r.status == "refused"]
    guided = available[GUIDED_DECODER]
    structured = [f"{name}:{NO_FALLBACK} (modes: {', '.join(cls.capabilities().get('modes', []))})"
                  for name, cls in sorted(guided.items())]
    reasons: dict[str, list[str]] = {}
    for r in refused_models:
        reasons.setdefault(r.reason, []).append(r.name)
    spec = _listing("spec_decode_methods", sorted(available[DRAFTER]), "no drafter registered")
    guided_row = _listing("structured_output_backends", structured, "no guided decoder registered")
    features = [
        _listing("attention_backends", sorted(available[ATTENTION_BACKEND]), "no attention backend registered"),
        _attention_choice(available[ATTENTION_BACKEND]),
        _kv_cache_dtypes(available[ATTENTION_BACKEND]),
        _quantization(),
        _tensor_parallel(available[MODEL]),
        _lora(available[MODEL]),
        _listing("model_architectures", sorted(available[MODEL]), "no model class registered"),
        {"feature": "unsupported_model_kinds", "status": "refused" if refused_models else "none",
         "detail": "; ".join(f"{', '.join(names)}: {reason}" for reason, names in reasons.items())},
        spec,
        guided_row,
        _listing("tool_call_parsers", sorted(available[TOOL_PARSER]), "no tool parser registered"),
        _listing("reasoning_parsers", sorted(available[REASONING_PARSER]), "no reasoning parser registered"),
        *({"feature": f, "status": s, "detail": d} for f, s, d in ENGINE_FEATURES),
        {"feature": "deprecated_options", "status": "deprecated",
         "detail": "rejected with an error: " + ", ".join(sorted(_DEPRECATED))},
    ]
    return {
        "components": [component_row(r) for r in registry.records()],
        "features": features,
        "plugin_errors": list(registry.plugin_errors),
        "skipped_plugins": list(registry.skipped_plugins),
    }


def _attention_choice(backends: dict[str, type]) -> dict[str, str]:
    """Which backend each device gets when none is named: by priority, among those that
    support the device (then the model's head size, dtype and block size decide)."""
    parts = []
    for device in ("cpu", "cuda"):
        ranked, passed = [], []
        for name, cls in backends.items():
            problem = cls.unsupported_reason(device=device)
            if problem:
                passed.append(f"{name} ({problem})")
            else:
                ranked.append((-cls.priority(torch.device(device)), name))
        order = ", ".join(f"{name} (priority {-p})" for p, name in sorted(ranked)) or "none"
        parts.append(f"{device}: {order}" + (f"; not: {', '.join(passed)}" if passed else ""))
    return {"feature": "attention_backend_selection", "status": "supported" if backends else "unavailable",
            "detail": " | ".join(parts) + " (the first that supports the model's head size, dtype and block size "
                                         "is used; attention_backend=NAME overrides)"}


def _quantization() -> dict[str, str]:
    """The ``quantization`` methods and how each runs on the devices of this installation."""
    from .quantization.fp8 import has_fp8_matmul
    from .quantization.gguf import FORMATS

    formats = ", ".join(f.qtype.name for f in FORMATS.values() if f.affine is not None)
    cuda = torch.cuda.is_available()
    native_fp8 = cuda and has_fp8_matmul(torch.device("cuda"))
    return {"feature": "quantization", "status": "supported",
            "detail": f"gguf (a .gguf file's default: {formats} kept in their block formats; CPU: PyTorch's int4 "
                      f"kernel with bfloat16 activations, logits in float32; CUDA: the Triton dequantizing matmul"
                      f"{'' if cuda else ', no CUDA device here'}); fp8 (bf16/fp16/fp32 checkpoints quantized at "
                      f"load, e4m3 with a scale per output channel; "
                      f"{'torch._scaled_mm on this GPU' if native_fp8 else 'emulated here: no sm_89+ GPU'}); "
                      "none (a .gguf file expanded to the model dtype)"}


def _tensor_parallel(models: dict[str, type]) -> dict[str, str]:
    """Tensor parallelism: the executors this installation can run and the models that split."""
    import importlib.util

    ray = "ray" if importlib.util.find_spec("ray") is not None else "ray (not installed: pip install 'tokenmill[ray]')"
    split = sorted(name for name, cls in models.items() if getattr(cls, "supports_tensor_parallel", False))
    devices = torch.cuda.device_count()
    return {"feature": "tensor_parallel", "status": "supported" if split else "unavailable",
            "detail": f"tensor_parallel_size N with distributed_executor_backend uni (N = 1), mp, {ray}; "
                      f"gloo on CPU, NCCL on CUDA ({devices} CUDA device{'s' if devices != 1 else ''} here); "
                      f"models that split: {', '.join(split) or 'none'}"}


def _lora(models: dict[str, type]) -> dict[str, str]:
    """Multi-LoRA serving: the models that declare LoRA-able modules, and where the kernels run."""
    able = sorted(name for name, cls in models.items() if getattr(cls, "lora_modules", None))
    kernels = "Triton shrink/expand kernels on CUDA" if torch.cuda.is_available() else "torch path here (no CUDA)"
    return {"feature": "lora", "status": "supported" if able else "unavailable",
            "detail": f"enable_lora with max_loras device slots (LRU), max_cpu_loras in host memory, PEFT adapters up "
                      f"to max_lora_rank; {kernels}; not with tensor_parallel_size > 1; "
                      f"models: {', '.join(able) or 'none'}"}


def _kv_cache_dtypes(backends: dict[str, type]) -> dict[str, str]:
    """The ``kv_cache_dtype`` values each backend accepts on each device it serves here (a CUDA
    device's own limits count only where one is present), and any limits it states."""
    parts, fp8 = [], False
    for name, cls in sorted(backends.items()):
        per_device = []
        for device in ("cpu", "cuda"):
            if cls.unsupported_reason(device=device) is None:
                dtypes = [d for d in cls.supported_kv_cache_dtypes
                          if cls.unsupported_kv_cache_dtype(d, device=torch.device(device)) is None]
                fp8 = fp8 or any(d != "auto" for d in dtypes)
                per_device.append(f"{device}: {', '.join(dtypes)}")
        limits = cls.capabilities().get("kv_cache_dtype_limits")
        parts.append(f"{name} ({'; '.join(per_device) or 'no device here'})" + (f" [{limits}]" if limits else ""))
    detail = (" | ".join(parts) + " (fp8: per-(layer, KV head) scales calibrated at start-up)") if parts \
        else "no attention backend registered"
    return {"feature": "kv_cache_dtypes", "status": "supported" if fp8 else "unavailable", "detail": detail}


def attention_choice_for_model(backends: dict[str, type], *, model: str, device: torch.device, dtype: torch.dtype,
                               head_size: int, block_size: int, sliding_window: bool = False,
                               logits_soft_cap: bool = False) -> dict[str, str]:
    """The row saying which backend serves one model when none is named, and why each other
    backend was or was not chosen (its priority, or what it does not support)."""
    from .attention import select_attention_backend, unsupported
    from .errors import ConfigError

    shape = dict(device=device, dtype=dtype, head_size=head_size, block_size=block_size,
                 sliding_window=sliding_window, logits_soft_cap=logits_soft_cap)
    try:
        chosen = select_attention_backend(backends, **shape)
    except ConfigError as exc:
        return {"feature": "attention_backend_for_model", "status": "unavailable", "detail": str(exc)}
    others = []
    for name, cls in sorted(backends.items()):
        if name == chosen:
            continue
        problem = unsupported(cls, **shape)
        others.append(f"{name}: {problem}" if problem else f"{name}: lower priority ({cls.priority(device)})")
    shape = f"head_size={head_size}, {str(dtype).removeprefix('torch.')}, block_size={block_size} on {device.type}"
    detail = f"{model} ({shape}): {chosen} (priority {backends[chosen].priority(device)})"
    return {"feature": "attention_backend_for_model", "status": "supported",
            "detail": detail + (f"; not chosen: {'; '.join(others)}" if others else "")}


def format_table(matrix: dict[str, Any]) -> str:
    """The matrix as aligned text tables for a terminal."""
    def table(headers: list[str], rows: list[list[str]]) -> list[str]:
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths[:-1]) + "  {}"
        return [fmt.format(*headers), fmt.format(*("-" * w for w in widths)),
                *(fmt.format(*r) for r in rows)]

    def detail(c: dict[str, Any]) -> str:
        if c["status"] == "refused":
            return c["reason"]
        return "; ".join(f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}"
                         for k, v in c["capabilities"].items())

    lines = ["Components", *table(["KIND", "NAME", "PROVIDER", "STATUS", "DETAIL"],
                                 [[c["kind"], c["name"], c["provider"], c["status"], detail(c)]
                                  for c in matrix["components"]])]
    lines += ["", "Features", *table(["FEATURE", "STATUS", "DETAIL"],
                                     [[f["feature"], f["status"], f["detail"]] for f in matrix["features"]])]
    for title, key in (("Plugin errors", "plugin_errors"), ("Skipped plugins (allowlist)", "skipped_plugins")):
        if matrix[key]:
            lines += ["", title, *(f"- {e}" for e in matrix[key])]
    return "\n".join(lines)
