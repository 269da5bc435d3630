"""POST /v1/chat/completions: the messages (and tools) through the tokenizer's chat template,
then one engine request (with ``n`` children), whose text is split into the message's parts.

Tool calls come one of two ways. With tool_choice "required" or a named function the output is
constrained to JSON (structured outputs) that is the calls, so they always parse and match the
tools' schemas. With "auto" the model writes freely and the server's ``--tool-call-parser`` finds
the calls in its markup. Before either, the server's ``--reasoning-parser`` (if any) takes the
model's reasoning out of the text: the tool parser sees only the answer. Each choice gets its own
parser instances, fed delta by delta when streaming, so a streamed reply adds up to the same
message as an unstreamed one.
"""
from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from starlette.responses import Response, StreamingResponse

from ..components import REASONING_PARSER, TOOL_PARSER
from ..errors import ConfigError, UnknownComponentError
from ..input_processor import InputProcessor
from ..outputs import PositionLogprobs
from ..sampling_params import validate_prompt_token_ids
from .async_engine import EngineError, RequestStream
from .errors import APIError, error_body, invalid_input
from ..registry import get_registry
from ..tool_parsing import DeltaMessage as ParsedDelta
from ..tool_parsing import MarkupToolParser, ReasoningParser, Scan, ScannedCall, ToolParser
from .protocol import ChatCompletionRequest, ChatTool
from .responses import (ChatChoice, ChatCompletionChunk, ChatCompletionResponse, ChatLogprobs, ChatMessageOut,
                        ChatStreamChoice, DeltaFunctionCall, DeltaMessage, DeltaToolCallOut, FunctionCallOut,
                        ToolCallOut, chat_logprobs, prompt_logprobs)
from .serving import SSE_DONE, ServerState, add_all, collect, output_error, sse, usage


@dataclass(frozen=True, slots=True)
class ChatToolSettings:
    """The server's tool options (vLLM's flags): ``--enable-auto-tool-choice``, ``--tool-call-parser`` and
    ``--reasoning-parser``, parsers named as registered."""

    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None

    def __post_init__(self) -> None:
        """Checked when the server starts, so a misspelt parser stops it rather than failing every request."""
        registry = get_registry()
        for flag, kind, name in (("--tool-call-parser", TOOL_PARSER, self.tool_call_parser),
                                 ("--reasoning-parser", REASONING_PARSER, self.reasoning_parser)):
            if name is not None:
                try:
                    registry.get(kind, name)
                except UnknownComponentError as exc:
                    raise ConfigError(f"{flag}: {exc}") from None
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ConfigError("--enable-auto-tool-choice needs --tool-call-parser")

    @property
    def auto_enabled(self) -> bool:
        return self.enable_auto_tool_choice and self.tool_call_parser is not None


def render_chat(tokenizer: Any, conversation: list[dict[str, Any]], request: ChatCompletionRequest,
                default_template: str | None) -> list[int]:
    """The prompt token ids of a conversation; the request's tools go to the template as ``tools``."""
    template = request.chat_template or default_template
    if template is None and not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model's tokenizer has no chat template; start the server with --chat-template")
    tools = request.template_tools()
    kwargs = {"tools": tools} if tools else {}
    try:
        ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=request.add_generation_prompt,
                                            continue_final_message=request.continue_final_message,
                                            chat_template=template, tokenize=True, **kwargs,
                                            **(request.chat_template_kwargs or {}))
    except Exception as exc:  # templates raise what they like (jinja errors, raise_exception(...))
        raise ValueError(f"the chat template cannot format these messages: {exc}") from exc
    if isinstance(ids, Mapping) or hasattr(ids, "input_ids"):  # a BatchEncoding in newer transformers
        ids = ids["input_ids"]
    return list(ids)


async def create_chat_completion(state: ServerState, request: ChatCompletionRequest,
                                 tool_settings: ChatToolSettings | None = None) -> Response:
    settings = tool_settings or ChatToolSettings()
    state.check_request(request)
    if request.chat_template is not None and not state.trust_request_chat_template:
        raise APIError(400, "chat_template: this server does not run chat templates sent with requests; start it "
                            "with --trust-request-chat-template to allow them", "chat_template")
    conversation = request.conversation()
    tool_choice = request.effective_tool_choice(settings.auto_enabled)
    if tool_choice == "required" or isinstance(tool_choice, dict):
        request.force_tool_calls(forced_calls_schema(request.tools, tool_choice, request.parallel_tool_calls))
    params = request.sampling_params(state.sampling_defaults)
    # one per choice, built before the engine request so that nothing can fail once it runs
    splitters = {index: MessageSplitter.build(request, tool_choice, settings) for index in range(params.n)}

    def render(processor: InputProcessor) -> list[int]:  # in the tokenizer pool
        try:
            token_ids = render_chat(processor.tokenizer, conversation, request, state.chat_template)
        except ValueError as exc:
            raise APIError(400, str(exc), "messages") from None
        validate_prompt_token_ids(token_ids, processor.vocab_size, processor.max_model_len)
        return token_ids

    try:
        prompt = {"prompt_token_ids": await state.engine.tokenize(
            render, num_chars=sum(len(message["content"]) for message in conversation))}
    except ValueError as exc:
        raise invalid_input(exc, request.field_names()) from None
    state.check_context([prompt], params, request)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    [stream] = await add_all(state.engine, request_id, [prompt], params, request, state.lora_request(request),
                             request.priority)
    if request.stream:
        model = state.response_model(request)
        return StreamingResponse(_stream(request, request_id, model, stream, params.n, splitters),
                                 media_type="text/event-stream")
    try:
        result = await collect(stream)
    finally:
        stream.abort()
    choices = []
    for c in result.choices:
        splitter = splitters.get(c.index)
        message = splitter.message(c.text) if splitter is not None else ChatMessageOut(content=c.text)
        choices.append(ChatChoice(index=c.index, message=message, logprobs=_logprobs(request, c.token_ids, c.logprobs),
                                  finish_reason=_finish_reason(c.finish_reason, bool(message.tool_calls)),
                                  stop_reason=c.stop_reason))
    body = ChatCompletionResponse(id=request_id, model=state.response_model(request), choices=choices,
                                  usage=usage(len(result.prompt_token_ids),
                                              sum(len(c.token_ids) for c in result.choices)),
                                  prompt_logprobs=prompt_logprobs(request.prompt_logprobs, result.prompt_logprobs))
    return Response(body.model_dump_json(), media_type="application/json")


def _logprobs(request: ChatCompletionRequest, token_ids: list[int],
              logprobs: list[PositionLogprobs] | None) -> ChatLogprobs | None:
    if not request.logprobs:
        return None
    return chat_logprobs(token_ids, logprobs or [], request.top_logprobs or 0)


async def _stream(request: ChatCompletionRequest, request_id: str, model: str, stream: RequestStream,
                  n: int, splitters: dict[int, MessageSplitter | None]) -> AsyncIterator[str]:
    created = int(time.time())

    def chunk(choices: list[ChatStreamChoice], **extra: Any) -> str:
        return sse(ChatCompletionChunk(id=request_id, created=created, model=model, choices=choices, **extra))

    prompt_tokens = num_tokens = 0
    finished: set[int] = set()
    try:
        for index in range(n):  # OpenAI's first chunk of each choice names the role
            yield chunk([ChatStreamChoice(index=index, delta=DeltaMessage(role="assistant", content=""))])
        async for output in stream:
            error = output_error(output)
            if error is not None:
                yield sse(error.body())
                break
            prompt_tokens = len(output.prompt_token_ids)
            choices = []
            for delta in output.outputs:
                if delta.index in finished or not (delta.text or delta.token_ids or delta.finish_reason):
                    continue
                splitter = splitters.get(delta.index)
                finish_reason = delta.finish_reason
                if splitter is None:
                    message = DeltaMessage(content=delta.text)
                else:
                    message = splitter.delta(delta.text, final=finish_reason is not None)
                    finish_reason = _finish_reason(finish_reason, splitter.called_tools)
                    if message is None and finish_reason is None and not request.logprobs:
                        num_tokens += len(delta.token_ids)
                        continue  # held back: it may still be markup
                    message = message or DeltaMessage()
                choices.append(ChatStreamChoice(index=delta.index, delta=message,
                                                logprobs=_logprobs(request, delta.token_ids, delta.logprobs),
                                                finish_reason=finish_reason, stop_reason=delta.stop_reason))
                num_tokens += len(delta.token_ids)
                if delta.finish_reason is not None:
                    finished.add(delta.index)
            if choices:
                yield chunk(choices)
        else:
            if request.stream_options is not None and request.stream_options.include_usage:
                yield chunk([], usage=usage(prompt_tokens, num_tokens))
    except EngineError as exc:
        yield sse(error_body(exc.status, str(exc)))
    finally:
        stream.abort()
    yield SSE_DONE


def _finish_reason(finish_reason: str | None, called_tools: bool) -> str | None:
    """OpenAI's "tool_calls" for a reply that ended on its own with calls; a cut-off one stays "length"."""
    return "tool_calls" if called_tools and finish_reason == "stop" else finish_reason


# ---------------------------------------------------------------- tool calls forced by structured outputs


def forced_calls_schema(tools: Sequence[ChatTool] | None, tool_choice: str | dict[str, Any],
                        parallel_tool_calls: bool) -> dict[str, Any]:
    """The JSON schema the output must match: a named function's arguments object, or for
    "required" an array of ``{"name", "parameters"}`` objects, one form per tool (at most one
    call without ``parallel_tool_calls``)."""
    parameters = {tool.function.name: tool.function.parameters or {"type": "object"} for tool in tools or []}
    if isinstance(tool_choice, dict):
        return parameters[tool_choice["function"]["name"]]
    forms = [{"type": "object", "properties": {"name": {"type": "string", "enum": [name]}, "parameters": schema},
              "required": ["name", "parameters"], "additionalProperties": False}
             for name, schema in parameters.items()]
    array: dict[str, Any] = {"type": "array", "items": forms[0] if len(forms) == 1 else {"anyOf": forms},
                             "minItems": 1}
    if not parallel_tool_calls:
        array["maxItems"] = 1
    return array


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


class ForcedToolCalls(MarkupToolParser):
    """Reads the JSON that ``forced_calls_schema`` constrains the output to: each call is decided
    once its JSON value is complete, so a stream sends it whole. Output that does not complete (cut
    off by max_tokens) stays content, as a tool parser leaves markup it cannot read."""

    name = "forced"

    def __init__(self, function: str | None) -> None:
        super().__init__(None)
        self.function = function  # the named function; None for "required"
        self._decoder = json.JSONDecoder()

    def _value(self, text: str, pos: int) -> tuple[Any, int] | None:
        try:
            return self._decoder.raw_decode(text, pos)
        except ValueError:
            return None

    def scan(self, text: str) -> Scan:
        pos = _skip_space(text, 0)
        if self.function is not None:
            decoded = self._value(text, pos)
            if decoded is None or not isinstance(decoded[0], dict):
                return Scan([], 0)
            return Scan([ScannedCall(self.function, json.dumps(decoded[0], ensure_ascii=False))], len(text))
        if not text.startswith("[", pos):
            return Scan([], 0)
        events: list[str | ScannedCall] = []
        pos += 1
        while True:
            pos = _skip_space(text, pos)
            if text.startswith("]", pos):
                return Scan(events, len(text))
            decoded = self._value(text, pos)
            if decoded is None:
                return Scan(events, pos)
            value, end = decoded
            if not (isinstance(value, dict) and isinstance(value.get("name"), str)
                    and isinstance(value.get("parameters"), dict)):
                return Scan(events, pos)
            events.append(ScannedCall(value["name"], json.dumps(value["parameters"], ensure_ascii=False)))
            pos = _skip_space(text, end)
            if text.startswith(",", pos):
                pos += 1


# ---------------------------------------------------------------- splitting a reply into its parts


class MessageSplitter:
    """One choice's reply split into reasoning, content and tool calls: the reasoning parser on the
    model's text, the tool parser on the content it leaves. Stateful; one per choice."""

    def __init__(self, reasoning: ReasoningParser | None, tools: ToolParser | None,
                 tool_list: list[dict[str, Any]] | None) -> None:
        self.reasoning, self.tools, self.tool_list = reasoning, tools, tool_list
        self.text = self.content = ""
        self.called_tools = False

    @classmethod
    def build(cls, request: ChatCompletionRequest, tool_choice: str | dict[str, Any],
              settings: ChatToolSettings) -> MessageSplitter | None:
        """None when the reply is plain text. Forced calls skip the reasoning parser: the
        constrained output is the calls' JSON from its first token, it has no reasoning."""
        registry = get_registry()
        tool_list = request.template_tools()
        if isinstance(tool_choice, dict) or tool_choice == "required":
            function = tool_choice["function"]["name"] if isinstance(tool_choice, dict) else None
            return cls(None, ForcedToolCalls(function), tool_list)
        # the tokenizer stays in the tokenizer pool's thread: the parsers run on the event loop, on text
        reasoning = (registry.create(REASONING_PARSER, settings.reasoning_parser, tokenizer=None)
                     if settings.reasoning_parser is not None else None)
        tools = (registry.create(TOOL_PARSER, settings.tool_call_parser, tokenizer=None)
                 if tool_choice == "auto" and settings.tool_call_parser is not None else None)
        if reasoning is None and tools is None:
            return None
        return cls(reasoning, tools, tool_list)

    def message(self, text: str) -> ChatMessageOut:
        """The finished reply's message."""
        reasoning, content = self.reasoning.extract(text) if self.reasoning is not None else (None, text)
        if self.tools is None:
            return ChatMessageOut(content=content, reasoning_content=reasoning)
        extracted = self.tools.extract(content or "", self.tool_list)
        calls = [ToolCallOut(id=call.id, function=FunctionCallOut(name=call.name, arguments=call.arguments))
                 for call in extracted.tool_calls]
        self.called_tools = bool(calls)
        return ChatMessageOut(content=extracted.content, reasoning_content=reasoning, tool_calls=calls or None)

    def delta(self, text: str, final: bool) -> DeltaMessage | None:
        """What ``text``, the next piece of the reply, adds; with ``final`` also what was held back."""
        previous, self.text = self.text, self.text + text
        parts: list[ParsedDelta | None] = []
        if self.reasoning is None:
            content_pieces = [text] if text else []
        else:
            pieces = [self.reasoning.extract_streaming(previous, self.text, text) if text else None]
            if final:
                pieces.append(self.reasoning.finish(self.text))
            parts += [ParsedDelta(reasoning_content=p.reasoning_content) for p in pieces if p is not None]
            content_pieces = [p.content for p in pieces if p is not None and p.content]
        for piece in content_pieces:
            if self.tools is None:
                parts.append(ParsedDelta(content=piece))
                continue
            before, self.content = self.content, self.content + piece
            parts.append(self.tools.extract_streaming(before, self.content, piece, self.tool_list))
        if final and self.tools is not None:
            parts.append(self.tools.finish(self.content, self.tool_list))
        return self._merge([part for part in parts if part is not None])

    def _merge(self, parts: list[ParsedDelta]) -> DeltaMessage | None:
        content = "".join(part.content or "" for part in parts)
        reasoning = "".join(part.reasoning_content or "" for part in parts)
        calls = [DeltaToolCallOut(index=call.index, id=call.id, type="function" if call.id is not None else None,
                                  function=DeltaFunctionCall(name=call.name, arguments=call.arguments_delta))
                 for part in parts for call in part.tool_calls]
        self.called_tools = self.called_tools or bool(calls)
        if not (content or reasoning or calls):
            return None
        return DeltaMessage(content=content or None, reasoning_content=reasoning or None, tool_calls=calls or None)
