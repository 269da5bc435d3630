"""tokenmill: an LLM inference engine with vLLM V1 semantics, built from plugins.

Writing a plugin: subclass one of the component bases below, register the
class from a hook implementation, and expose the module in the
``tokenmill.plugins`` entry-point group (see ``tokenmill.hookspecs``).
"""
__version__ = "0.1.0"

from .attention import AttentionBackend, AttentionMetadata
from .components import KINDS, Component, SupportsV0Only
from .config import (CacheConfig, EngineConfig, ModelConfig, SchedulerConfig, SpeculativeConfig,
                     StructuredOutputsConfig)
from .drafter import DraftContext, Drafter
from .errors import (ConfigError, PluginLoadError, RefusedComponentError, RegistrationError, TokenmillError,
                     UnknownComponentError)
from .hookspecs import hookimpl, hookspec
from .lora_request import LoRARequest
from .model_base import KVCacheSpec, Model
from .outputs import CompletionOutput, Logprob, RequestOutput
from .registry import ComponentRecord, Provider, Registry, get_registry
from .request import Request, RequestError, RequestStatus
from .sampling_params import SamplingParams
from .structured import Grammar, GuidedDecoder, StructuredOutputsParams, UnsupportedStructuredOutput
from .tool_parsing import ReasoningParser, ToolParser

__all__ = [
    "LLM", "LLMEngine", "CompletionOutput", "Logprob", "RequestOutput", "Request", "RequestError", "RequestStatus",
    "SamplingParams", "AttentionBackend", "AttentionMetadata", "CacheConfig", "Component", "ComponentRecord",
    "ConfigError", "DraftContext", "Drafter", "EngineConfig", "Grammar", "GuidedDecoder", "KINDS", "KVCacheSpec",
    "LoRARequest", "Model", "ModelConfig",
    "PluginLoadError", "Provider", "RefusedComponentError", "Registry", "RegistrationError",
    "SchedulerConfig", "SpeculativeConfig", "StructuredOutputsConfig", "StructuredOutputsParams",
    "SupportsV0Only", "TokenmillError", "ToolParser", "ReasoningParser", "UnknownComponentError",
    "UnsupportedStructuredOutput",
    "__version__", "get_registry", "hookimpl", "hookspec",
]


def __getattr__(name: str):
    # The engine pulls in transformers; load it on first use so `tokenmill features` stays quick.
    if name == "LLM":
        from .llm import LLM

        return LLM
    if name == "LLMEngine":
        from .llm_engine import LLMEngine

        return LLMEngine
    raise AttributeError(f"module 'tokenmill' has no attribute {name!r}")
