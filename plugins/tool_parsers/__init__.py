"""Built-in tool-call parsers (``hermes``, ``llama3_json``, ``mistral``) and the ``think``
reasoning parser, selected by name by the chat endpoint."""
from tokenmill import hookimpl

from .hermes import HermesToolParser
from .llama3_json import Llama3JsonToolParser
from .mistral import MistralToolParser
from .think import ThinkReasoningParser

__all__ = ["HermesToolParser", "Llama3JsonToolParser", "MistralToolParser", "ThinkReasoningParser"]


@hookimpl
def tokenmill_register_tool_parsers(register):
    register(HermesToolParser)
    register(Llama3JsonToolParser)
    register(MistralToolParser)


@hookimpl
def tokenmill_register_reasoning_parsers(register):
    register(ThinkReasoningParser)
