"""POST /v1/chat/completions: the messages through the tokenizer's chat template,
then one engine request (with ``n`` children)."""
from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

from starlette.responses import Response, StreamingResponse

from ..input_processor import InputProcessor
from ..outputs import PositionLogprobs
from ..sampling_params import validate_prompt_token_ids
from .async_engine import EngineError, RequestStream
from .errors import APIError, error_body, invalid_input
from .protocol import ChatCompletionRequest
from .responses import (ChatChoice, ChatCompletionChunk, ChatCompletionResponse, ChatLogprobs, ChatMessageOut,
                        ChatStreamChoice, DeltaMessage, chat_logprobs, prompt_logprobs)
from .serving import SSE_DONE, ServerState, add_all, collect, output_error, sse, usage


def render_chat(tokenizer: Any, conversation: list[dict[str, str]], request: ChatCompletionRequest,
                default_template: str | None) -> list[int]:
    """The prompt token ids of a conversation."""
    template = request.chat_template or default_template
    if template is None and not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model's tokenizer has no chat template; start the server with --chat-template")
    try:
        ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=request.add_generation_prompt,
                                            continue_final_message=request.continue_final_message,
                                            chat_template=template, tokenize=True,
                                            **(request.chat_template_kwargs or {}))
    except Exception as exc:  # templates raise what they like (jinja errors, raise_exception(...))
        raise ValueError(f"the chat template cannot format these messages: {exc}") from exc
    if isinstance(ids, Mapping) or hasattr(ids, "input_ids"):  # a BatchEncoding in newer transformers
        ids = ids["input_ids"]
    return list(ids)


async def create_chat_completion(state: ServerState, request: ChatCompletionRequest) -> Response:
    state.check_request(request)
    if request.chat_template is not None and not state.trust_request_chat_template:
        raise APIError(400, "chat_template: this server does not run chat templates sent with requests; start it "
                            "with --trust-request-chat-template to allow them", "chat_template")
    conversation = request.conversation()
    params = request.sampling_params(state.sampling_defaults)

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
        return StreamingResponse(_stream(request, request_id, model, stream, params.n),
                                 media_type="text/event-stream")
    try:
        result = await collect(stream)
    finally:
        stream.abort()
    choices = [ChatChoice(index=c.index, message=ChatMessageOut(content=c.text),
                          logprobs=_logprobs(request, c.token_ids, c.logprobs), finish_reason=c.finish_reason,
                          stop_reason=c.stop_reason) for c in result.choices]
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
                  n: int) -> AsyncIterator[str]:
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
                choices.append(ChatStreamChoice(index=delta.index, delta=DeltaMessage(content=delta.text),
                                                logprobs=_logprobs(request, delta.token_ids, delta.logprobs),
                                                finish_reason=delta.finish_reason, stop_reason=delta.stop_reason))
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
