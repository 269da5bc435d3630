"""Request bodies of the OpenAI API (plus vLLM's extensions), and their SamplingParams.

Every known field is type-checked strictly (``"temperature": "hot"`` is a 400
naming ``temperature``). Ranges are declared on the fields, so the OpenAPI
document carries them, and checked again by ``SamplingParams``, whose errors
start with the field name. Every string must be valid Unicode. Unknown fields
are ignored, with a log line, as vLLM does: clients of newer API versions keep
working.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from ..input_processor import PromptType
from ..sampling_params import (MAX_ABS_LOGIT_BIAS, MAX_LOGPROBS, MAX_N, MAX_REPETITION_PENALTY, MAX_SEED,
                               MAX_TOP_K, MIN_REPETITION_PENALTY, MIN_SEED, SamplingParams)
from ..structured import StructuredOutputsParams
from ..text import check_unicode
from .errors import APIError, invalid_input

NumLogprobs = Annotated[int, Field(ge=0, le=MAX_LOGPROBS)]
TokenId = Annotated[int, Field(ge=0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]

# SamplingParams fields a request may set under the same name
_SAMPLING_FIELDS = ("n", "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                    "repetition_penalty", "seed", "min_tokens", "stop", "stop_token_ids",
                    "include_stop_str_in_output", "ignore_eos", "logit_bias", "allowed_token_ids", "bad_words",
                    "skip_special_tokens", "spaces_between_special_tokens", "prompt_logprobs", "best_of")
_GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                  "guided_grammar": "grammar"}


AUTO_TOOL_CHOICE_MESSAGE = "\"auto\" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set"


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class JsonSchemaFormat(_Body):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsRequest(BaseModel):
    """vLLM's ``structured_outputs``: exactly one constraint."""

    model_config = ConfigDict(strict=True, extra="forbid")
    json_: str | dict[str, Any] | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class GenerationRequest(BaseModel):
    """The fields both endpoints share."""

    model_config = ConfigDict(strict=True, extra="allow")

    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=-1, le=MAX_TOP_K)] | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: Annotated[float, Field(ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY)] | None = None
    seed: Annotated[int, Field(ge=MIN_SEED, le=MAX_SEED)] | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[TokenId] | None = None
    include_stop_str_in_output: bool | None = None
    ignore_eos: bool | None = None
    min_tokens: Annotated[int, Field(ge=0)] | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-MAX_ABS_LOGIT_BIAS, le=MAX_ABS_LOGIT_BIAS)]] | None = None
    allowed_token_ids: Annotated[list[TokenId], Field(min_length=1)] | None = None
    bad_words: list[Annotated[str, Field(min_length=1)]] | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    prompt_logprobs: NumLogprobs | None = None
    best_of: int | None = None
    response_format: ResponseFormat | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: Annotated[list[str], Field(min_length=1)] | None = None
    guided_grammar: str | None = None
    structured_outputs: StructuredOutputsRequest | None = None
    # vLLM's extension: lower is served first when the server runs --scheduling-policy priority
    priority: int = 0

    def field_names(self) -> dict[str, str | None]:
        """The request's name for each engine field name, for the param of a 400 (see invalid_input)."""
        names: dict[str, str | None] = {name: name for name in _SAMPLING_FIELDS}
        names.update(max_tokens="max_tokens", logprobs="logprobs", prompt="prompt", prompt_token_ids="prompt",
                     structured_outputs=self.structured_source(), priority="priority")
        return names

    def check_stream_options(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed when stream is true", "stream_options")
        if self.stream and self.prompt_logprobs is not None:
            raise APIError(400, "prompt_logprobs is only available when stream is false", "prompt_logprobs")

    def check_unicode(self) -> None:
        """A 400 naming the first string (value or key, at any depth) that holds a lone surrogate."""
        for name, info in type(self).model_fields.items():
            _check_unicode_in(info.alias or name, getattr(self, name))

    def structured_source(self) -> str | None:
        """The field that asks for structured output, if any."""
        given = [name for name in ("response_format", *_GUIDED_FIELDS, "structured_outputs")
                 if getattr(self, name) is not None
                 and not (name == "response_format" and self.response_format.type == "text")]
        if len(given) > 1:
            raise APIError(400, f"ask for structured output in one field only, got {' and '.join(given)}",
                           given[1])
        return given[0] if given else None

    def structured_outputs_params(self) -> StructuredOutputsParams | None:
        source = self.structured_source()
        if source is None:
            return None
        if source == "response_format":
            fmt = self.response_format
            if fmt.type == "json_object":
                spec: dict[str, Any] = {"json_object": True}
            elif fmt.json_schema is None:
                raise APIError(400, "response_format of type json_schema needs a json_schema object",
                               "response_format.json_schema")
            elif fmt.json_schema.schema_ is None:
                raise APIError(400, "response_format.json_schema needs a schema", "response_format.json_schema.schema")
            else:
                spec = {"json": fmt.json_schema.schema_}
        elif source == "structured_outputs":
            spec = self.structured_outputs.model_dump(by_alias=True, exclude_none=True)
        else:
            spec = {_GUIDED_FIELDS[source]: getattr(self, source)}
        try:
            return StructuredOutputsParams(**spec)
        except ValueError as exc:
            raise APIError(400, str(exc), source) from None

    def to_sampling_params(self, max_tokens: int | None, logprobs: int | None,
                           defaults: Mapping[str, Any]) -> SamplingParams:
        """The engine's parameters, ``defaults`` (the model's generation config) filling the
        fields the request leaves unset; a 400 naming the field when one is out of range."""
        kwargs: dict[str, Any] = {name: value for name, value in defaults.items() if name != "max_tokens"}
        kwargs.update((name, getattr(self, name)) for name in _SAMPLING_FIELDS if getattr(self, name) is not None)
        if max_tokens is None:
            max_tokens = defaults.get("max_tokens")
        try:
            return SamplingParams(max_tokens=max_tokens, logprobs=logprobs,
                                  structured_outputs=self.structured_outputs_params(), **kwargs)
        except ValueError as exc:
            raise invalid_input(exc, self.field_names()) from None


class CompletionRequest(GenerationRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: Annotated[int, Field(ge=1)] | None = 16
    logprobs: NumLogprobs | None = None
    echo: bool = False
    suffix: str | None = None

    def prompts(self) -> list[PromptType]:
        if self.suffix is not None:
            raise APIError(400, "suffix is not supported", "suffix")
        if isinstance(self.prompt, str):
            return [self.prompt]
        if not self.prompt:
            raise APIError(400, "prompt must not be empty", "prompt")
        if isinstance(self.prompt[0], int):
            return [{"prompt_token_ids": self.prompt}]
        if isinstance(self.prompt[0], str):
            return list(self.prompt)
        return [{"prompt_token_ids": ids} for ids in self.prompt]

    def sampling_params(self, defaults: Mapping[str, Any]) -> SamplingParams:
        max_tokens = self.max_tokens if "max_tokens" in self.model_fields_set else defaults.get("max_tokens", 16)
        params = self.to_sampling_params(max_tokens, self.logprobs, defaults)
        if self.echo and self.logprobs is not None and params.prompt_logprobs is None:
            params.prompt_logprobs = self.logprobs  # echoed prompt tokens carry their logprobs
        return params


class ContentPart(_Body):
    type: Literal["text"]
    text: str


class FunctionCallIn(_Body):
    name: str
    arguments: str


class ToolCallIn(_Body):
    """A call an earlier assistant message made, as the client sends it back."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None  # an assistant message that called tools
    tool_call_id: str | None = None  # a tool message: the call it answers

    def to_template(self) -> dict[str, Any]:
        """The message as chat templates expect it: text parts joined by newlines; a call's
        arguments as an object (transformers' templates index into them), as a string only
        when they are not a JSON object."""
        content = self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content or [])
        message: dict[str, Any] = {"role": self.role, "content": content}
        if self.name is not None:
            message["name"] = self.name
        if self.tool_calls:
            message["tool_calls"] = [{"id": call.id, "type": call.type,
                                      "function": {"name": call.function.name,
                                                   "arguments": _arguments_for_template(call.function.arguments)}}
                                     for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


def _arguments_for_template(arguments: str) -> Any:
    try:
        value = json.loads(arguments)
    except ValueError:
        return arguments
    return value if isinstance(value, dict) else arguments


ToolName = Annotated[str, Field(pattern=r"^[a-zA-Z0-9_.-]{1,64}$")]


class FunctionDefinition(_Body):
    name: ToolName
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(_Body):
    type: Literal["function"]
    function: FunctionDefinition


class ChatCompletionRequest(GenerationRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: NumLogprobs | None = None
    tools: list[ChatTool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    # set by the chat endpoint for tool_choice "required" or a named function: the JSON schema the output must match
    _tool_call_schema: dict[str, Any] | None = PrivateAttr(default=None)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    def field_names(self) -> dict[str, str | None]:
        names = super().field_names()
        names.update(prompt="messages", prompt_token_ids="messages", logprobs="top_logprobs",
                     max_tokens="max_tokens" if self.max_completion_tokens is None else "max_completion_tokens")
        return names

    def conversation(self) -> list[dict[str, Any]]:
        if not self.messages:
            raise APIError(400, "messages must not be empty", "messages")
        return [message.to_template() for message in self.messages]

    def template_tools(self) -> list[dict[str, Any]] | None:
        """The tools as chat templates take them (transformers' ``tools=``), None without any."""
        return [tool.model_dump(exclude_none=True) for tool in self.tools] if self.tools else None

    def effective_tool_choice(self, auto_enabled: bool) -> str | dict[str, Any]:
        """``"none"``, ``"auto"``, ``"required"`` or the named-function dict, checked: a 400
        naming the field. As in the OpenAI API an unset choice is "auto" when there are tools
        and "none" without; "auto" needs a server started with a tool-call parser."""
        self._check_tool_schemas()
        names = [tool.function.name for tool in self.tools or []]
        choice = self.tool_choice
        if choice is None:
            choice = "auto" if names else "none"
            if choice == "auto" and not auto_enabled:
                raise APIError(400, f"tools: {AUTO_TOOL_CHOICE_MESSAGE}, or send tool_choice \"required\", "
                                    "\"none\" or a named function", "tools")
            return choice
        if isinstance(choice, str):
            if choice not in ("none", "auto", "required"):
                raise APIError(400, f"tool_choice: expected \"none\", \"auto\", \"required\" or "
                                    f"{{\"type\": \"function\", \"function\": {{\"name\": ...}}}}, got {choice!r}",
                               "tool_choice")
            if choice == "auto" and not auto_enabled:
                raise APIError(400, AUTO_TOOL_CHOICE_MESSAGE, "tool_choice")
            if choice == "required" and not names:
                raise APIError(400, "tool_choice: \"required\" needs tools", "tool_choice")
            return choice
        function = choice.get("function")
        if (choice.get("type") != "function" or not isinstance(function, dict)
                or not isinstance(function.get("name"), str)):
            raise APIError(400, "tool_choice: a named tool choice is {\"type\": \"function\", \"function\": "
                                "{\"name\": ...}}", "tool_choice")
        if function["name"] not in names:
            raise APIError(400, f"tool_choice: no function named {function['name']!r} in tools "
                                f"(tools has {names or 'none'})", "tool_choice")
        return choice

    def force_tool_calls(self, schema: dict[str, Any]) -> None:
        """Constrain the output to ``schema`` (the calls of tool_choice "required" or a named function)."""
        self._tool_call_schema = schema

    def structured_source(self) -> str | None:
        source = super().structured_source()
        if self._tool_call_schema is None:
            return source
        if source is not None:
            raise APIError(400, f"{source} cannot be combined with tool_choice {self.tool_choice!r}: the tool "
                                "calls already fix the output's format", source)
        return "tools"

    def structured_outputs_params(self) -> StructuredOutputsParams | None:
        if self.structured_source() == "tools":
            return StructuredOutputsParams(json=self._tool_call_schema)
        return super().structured_outputs_params()

    def _check_tool_schemas(self) -> None:
        import jsonschema

        seen: set[str] = set()
        for index, tool in enumerate(self.tools or []):
            name = tool.function.name
            if name in seen:
                raise APIError(400, f"tools: the function name {name!r} is given twice", f"tools.{index}.function.name")
            seen.add(name)
            parameters = tool.function.parameters
            if parameters is None:
                continue
            try:
                jsonschema.validators.validator_for(parameters).check_schema(parameters)
            except jsonschema.SchemaError as exc:
                raise APIError(400, f"tools.{index}.function.parameters: not a valid JSON schema: {exc.message}",
                               f"tools.{index}.function.parameters") from None
            if parameters.get("type", "object") != "object":
                raise APIError(400, f"tools.{index}.function.parameters: the arguments are a JSON object, so the "
                                    f"schema's type must be \"object\"", f"tools.{index}.function.parameters")

    def sampling_params(self, defaults: Mapping[str, Any]) -> SamplingParams:
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs set to true", "top_logprobs")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        max_tokens = self.max_tokens if self.max_completion_tokens is None else self.max_completion_tokens
        return self.to_sampling_params(max_tokens, logprobs, defaults)


def _check_unicode_in(path: str, value: Any) -> None:
    if isinstance(value, str):
        try:
            check_unicode(path, value)
        except ValueError as exc:
            raise APIError(400, str(exc), path) from None
    elif isinstance(value, BaseModel):
        for name, info in type(value).model_fields.items():
            _check_unicode_in(f"{path}.{info.alias or name}", getattr(value, name))
    elif isinstance(value, Mapping):
        for key, item in value.items():
            _check_unicode_in(path, key)
            _check_unicode_in(f"{path}.{key}", item)
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_unicode_in(f"{path}.{index}", item)


class LoadLoRAAdapterRequest(_Body):
    """``POST /v1/load_lora_adapter`` (vLLM's body): serve the PEFT adapter at ``lora_path`` as ``lora_name``."""

    lora_name: str = Field(min_length=1, max_length=256)
    lora_path: str = Field(min_length=1, max_length=4096)


class UnloadLoRAAdapterRequest(_Body):
    """``POST /v1/unload_lora_adapter`` (vLLM's body): stop serving ``lora_name``."""

    lora_name: str = Field(min_length=1, max_length=256)


class TokenizeRequest(_Body):
    """``POST /tokenize`` (vLLM's body) in either of its forms: ``prompt``, a text, or ``messages``, a
    conversation through the chat template (``add_generation_prompt`` and the fields after it apply to
    it only). One model, not a union of the two, so that a 400 names the field and not a union member."""

    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    # unset: true for a prompt; false for messages, whose template writes its own special tokens
    add_special_tokens: bool | None = None
    return_token_strs: bool = False
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    def check(self) -> None:
        """Exactly one form, valid Unicode everywhere, and chat options that agree (a 400 naming the field)."""
        for name in type(self).model_fields:
            _check_unicode_in(name, getattr(self, name))
        if self.prompt is None and self.messages is None:
            raise APIError(400, "give either prompt (a text) or messages (a conversation)", "prompt")
        if self.prompt is not None and self.messages is not None:
            raise APIError(400, "give either prompt or messages, not both", "messages")
        if self.messages is not None and self.continue_final_message and self.add_generation_prompt:
            raise APIError(400, "continue_final_message needs add_generation_prompt set to false",
                           "continue_final_message")

    def with_special_tokens(self) -> bool:
        if self.add_special_tokens is not None:
            return self.add_special_tokens
        return self.messages is None


class DetokenizeRequest(_Body):
    """``POST /detokenize`` (vLLM's body): ``tokens`` back to text (ids are checked against the vocabulary
    in the tokenizer pool, which knows its size)."""

    model: str | None = None
    tokens: list[TokenId]

    def check(self) -> None:
        _check_unicode_in("model", self.model)
