"""The model class contract: a decoder-only transformer over a paged KV cache."""
from __future__ import annotations

import re
from abc import abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .attention import AttentionBackend, AttentionMetadata
from .components import MODEL, Component


_BLOCK_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


@dataclass(frozen=True)
class GGUFNames:
    """How one llama.cpp architecture's tensor names map to a model class's checkpoint names
    (those ``load_weights`` takes from safetensors), so the class loads GGUF files too:

        global_names  token_embd.weight     -> model.embed_tokens.weight
        block_names   blk.3.attn_q.weight   -> {block_prefix}.3.self_attn.q_proj.weight

    ``permuted_qk``: llama.cpp's converter interleaved the q/k rows of each head (Llama).
    ``norm_shift``: the converter added this to every ``*norm.weight`` (Gemma's norms multiply by
    1 + w and are stored as 1 + w); the loader subtracts it."""

    global_names: Mapping[str, str]
    block_names: Mapping[str, str]
    block_prefix: str = "model.layers"
    permuted_qk: bool = False
    norm_shift: float = 0.0

    def checkpoint_name(self, gguf_name: str) -> str:
        if gguf_name in self.global_names:
            return self.global_names[gguf_name]
        match = _BLOCK_TENSOR.fullmatch(gguf_name)
        if match is None or match[2] not in self.block_names:
            raise ValueError(f"GGUF tensor '{gguf_name}' has no checkpoint counterpart; known tensors: "
                             f"{sorted(self.global_names)} and blk.N.{{{', '.join(self.block_names)}}}.{{weight,bias}}")
        return f"{self.block_prefix}.{match[1]}.{self.block_names[match[2]]}.{match[3]}"


@dataclass(frozen=True, slots=True)
class KVCacheSpec:
    """How many cache tensors a model needs and what each holds per token."""

    num_layers: int
    num_kv_heads: int
    head_size: int
    # the window when every layer attends to the last ``sliding_window`` positions only: the
    # engine then frees the KV blocks behind it as a request advances; None when any layer is global
    sliding_window: int | None = None
    # whether any layer uses a sliding window / a logits soft cap: the attention backend must
    # support it (``AttentionBackend.supports_sliding_window`` / ``supports_logits_soft_cap``)
    uses_sliding_window: bool = False
    uses_logits_soft_cap: bool = False


class Model(torch.nn.Module, Component):
    """A model class, registered under the HuggingFace ``architectures`` it implements.

    Construction builds the modules with uninitialised weights on the current
    default device and dtype; ``load_weights`` fills them. The engine then calls
    ``bind_kv_caches`` once with one cache tensor per layer.
    """

    kind = MODEL
    architectures: ClassVar[tuple[str, ...]]
    # llama.cpp architecture (GGUF ``general.architecture``) -> its tensor names; empty: the
    # class loads no GGUF file
    gguf_names: ClassVar[Mapping[str, GGUFNames]] = {}
    # what ``tokenmill features`` lists for the class beside its architectures and GGUF names:
    # e.g. {"sliding_window": True, "logit_soft_cap": True, "rope_types": ["default", "yarn"]}
    features: ClassVar[Mapping[str, Any]] = {}
    # True when the class builds its projections and embeddings from ``tokenmill.layers`` (Linear,
    # Embedding) and ``load_weights`` hands a ``QuantizedWeight`` to ``layer.load`` as it does a
    # tensor: then the ``quantization`` options apply (GGUF block formats kept, fp8). False: a GGUF
    # file is expanded to the model dtype, and asking for a quantization is a ConfigError.
    quantized_weights: ClassVar[bool] = False
    # True when an instance built under ``tokenmill.distributed.tensor_parallel`` (size N) is one rank's
    # shard: it computes ``TensorParallel.local_heads`` of the config's heads (the engine builds its
    # attention backend and KV cache with those), ``load_weights`` takes whole checkpoint tensors and
    # keeps the rank's part, its collectives run in ``forward``, and ``compute_logits`` returns all the
    # logits on every rank. False: the engine refuses tensor_parallel_size > 1 for the class.
    supports_tensor_parallel: ClassVar[bool] = False

    def __init__(self, hf_config: Any, attention: AttentionBackend) -> None:
        torch.nn.Module.__init__(self)
        self.hf_config = hf_config
        self.attention = attention
        self.kv_caches: list[torch.Tensor] = []

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(cls.architectures)

    @classmethod
    def capabilities(cls) -> dict[str, Any]:
        return {"architectures": list(cls.architectures), "gguf": sorted(cls.gguf_names) or "no",
                "quantized_weights": cls.quantized_weights, "supports_tensor_parallel": cls.supports_tensor_parallel,
                **cls.features}

    @classmethod
    def kv_cache_spec(cls, hf_config: Any) -> KVCacheSpec:
        """Read the cache geometry from a HuggingFace config (standard field names)."""
        num_heads = hf_config.num_attention_heads
        head_size = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
        return KVCacheSpec(num_layers=hf_config.num_hidden_layers,
                           num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or num_heads,
                           head_size=head_size)

    @classmethod
    def example_config(cls) -> Any:
        """A tiny HuggingFace config for this class, used by the conformance suite."""
        raise NotImplementedError(f"{cls.__name__}.example_config() is not defined; the "
                                  "conformance suite needs it to build a tiny instance")

    def bind_kv_caches(self, kv_caches: list[torch.Tensor]) -> None:
        self.kv_caches = kv_caches

    @abstractmethod
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: int [num_tokens]. Returns hidden states [num_tokens, hidden]."""

    @abstractmethod
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [n, hidden] (only the rows that need logits). Returns fp32 [n, vocab]."""

    @abstractmethod
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy checkpoint tensors (HuggingFace names) into the parameters.
        Returns the names of the parameters that were loaded."""
