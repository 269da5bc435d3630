"""POST /v1/completions: one engine request per prompt; choice ``i`` of prompt ``p``
is choice ``p * n + i`` of the response."""
from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.responses import Response, StreamingResponse

from ..input_processor import InputProcessor
from ..outputs import PositionLogprobs
from .async_engine import EngineError, RequestStream
from .errors import error_body
from .protocol import CompletionRequest
from .responses import CompletionChoice, CompletionResponse, completion_logprobs, prompt_logprobs
from .serving import SSE_DONE, ServerState, add_all, collect, merge, output_error, sse, usage


@dataclass(slots=True)
class _Echo:
    """A prompt to echo before its completions."""

    text: str
    first_token_text: str  # the first prompt token has no logprob, only a text


async def create_completion(state: ServerState, request: CompletionRequest) -> Response:
    state.check_request(request)
    params = request.sampling_params(state.sampling_defaults)
    prompts = await state.tokenize(request.prompts(), request)
    state.check_context(prompts, params, request)
    echoes = None
    if request.echo:  # decoding prompts that fit max_model_len: a regular worker's job
        echoes = await state.engine.tokenize(lambda processor: _echoes(processor, prompts), num_chars=0)
    request_id = f"cmpl-{uuid.uuid4().hex}"
    streams = await add_all(state.engine, request_id, prompts, params, request, state.lora_request(request),
                            request.priority)
    if request.stream:
        model = state.response_model(request)
        return StreamingResponse(_stream(request, request_id, model, streams, echoes, params.n),
                                 media_type="text/event-stream")
    try:
        results = [await collect(stream) for stream in streams]
    finally:
        for stream in streams:
            stream.abort()
    choices = [_choice(request, p * params.n + c.index, c.text, c.token_ids, c.logprobs, c.finish_reason,
                       c.stop_reason, echoes[p] if echoes else None, result.prompt_token_ids, result.prompt_logprobs)
               for p, result in enumerate(results) for c in result.choices]
    num_prompt_tokens = sum(len(result.prompt_token_ids) for result in results)
    num_tokens = sum(len(c.token_ids) for result in results for c in result.choices)
    body = CompletionResponse(id=request_id, model=state.response_model(request), choices=choices,
                              usage=usage(num_prompt_tokens, num_tokens))
    return Response(body.model_dump_json(), media_type="application/json")


def _echoes(processor: InputProcessor, prompts: list[dict[str, Any]]) -> list[_Echo]:
    """Runs in the tokenizer pool: each prompt's text (decoded when it came as token ids)."""
    decode = processor.tokenizer.decode
    return [_Echo(decode(p["prompt_token_ids"]) if p["prompt"] is None else p["prompt"],
                  decode(p["prompt_token_ids"][:1])) for p in prompts]


def _choice(request: CompletionRequest, index: int, text: str, token_ids: list[int],
            logprobs: list[PositionLogprobs] | None, finish_reason: str | None, stop_reason: int | str | None,
            echo: _Echo | None, prompt_token_ids: list[int],
            prompt_logprobs_in: list[PositionLogprobs | None] | None, text_offset: int = 0) -> CompletionChoice:
    positions: list[PositionLogprobs | None] = list(logprobs or [])
    if echo is not None:
        text = echo.text + text
        token_ids = prompt_token_ids + token_ids
        positions = list(prompt_logprobs_in or [None] * len(prompt_token_ids)) + positions
    choice_logprobs = None
    if request.logprobs is not None:
        choice_logprobs = completion_logprobs(token_ids, positions, request.logprobs, text_offset,
                                              echo.first_token_text if echo else "")
    return CompletionChoice(index=index, text=text, logprobs=choice_logprobs, finish_reason=finish_reason,
                            stop_reason=stop_reason,
                            prompt_logprobs=prompt_logprobs(request.prompt_logprobs, prompt_logprobs_in))


async def _stream(request: CompletionRequest, request_id: str, model: str, streams: list[RequestStream],
                  echoes: list[_Echo] | None, n: int) -> AsyncIterator[str]:
    created = int(time.time())
    prompt_tokens = [0] * len(streams)
    num_tokens = 0
    text_offsets: dict[int, int] = {}
    finished: set[int] = set()
    try:
        async for p, output in merge(streams):
            error = output_error(output)
            if error is not None:
                yield sse(error.body())
                break
            prompt_tokens[p] = len(output.prompt_token_ids)
            choices = []
            for delta in output.outputs:
                index = p * n + delta.index
                if index in finished or not (delta.text or delta.token_ids or delta.finish_reason):
                    continue
                echo = echoes[p] if echoes and index not in text_offsets else None
                choice = _choice(request, index, delta.text, delta.token_ids, delta.logprobs, delta.finish_reason,
                                 delta.stop_reason, echo, output.prompt_token_ids, output.prompt_logprobs,
                                 text_offsets.get(index, 0))
                text_offsets[index] = text_offsets.get(index, 0) + len(choice.text)
                num_tokens += len(delta.token_ids)
                if delta.finish_reason is not None:
                    finished.add(index)
                choices.append(choice)
            if choices:
                yield sse(CompletionResponse(id=request_id, created=created, model=model, choices=choices))
        else:
            if request.stream_options is not None and request.stream_options.include_usage:
                yield sse(CompletionResponse(id=request_id, created=created, model=model, choices=[],
                                             usage=usage(sum(prompt_tokens), num_tokens)))
    except EngineError as exc:
        yield sse(error_body(exc.status, str(exc)))
    finally:
        for stream in streams:
            stream.abort()
    yield SSE_DONE
