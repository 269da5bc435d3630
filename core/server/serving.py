"""What the completions and chat endpoints share: admission, merging the streams
of several prompts, gathering non-streamed results, and server-sent events."""
from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from ..input_processor import InputProcessor, PromptType
from ..lora_request import LoRARequest
from ..outputs import CompletionOutput, PositionLogprobs, RequestOutput
from ..sampling_params import SamplingParams, validate_prompt_token_ids
from ..structured import UnsupportedStructuredOutput
from .async_engine import AsyncEngine, RequestStream
from .errors import APIError, invalid_input
from .protocol import GenerationRequest
from .responses import UsageInfo

logger = logging.getLogger(__name__)

SSE_DONE = "data: [DONE]\n\n"


@dataclass(slots=True)
class ServerState:
    engine: AsyncEngine
    model_names: list[str]
    chat_template: str | None = None
    trust_request_chat_template: bool = False  # vLLM's flag: a request's own template is code to run
    # the model's generation_config.json defaults, for the fields a request leaves unset
    sampling_defaults: Mapping[str, Any] = field(default_factory=dict)
    # LoRA adapters served by name (--lora-modules, /v1/load_lora_adapter); a request's model picks one
    lora_adapters: dict[str, LoRARequest] = field(default_factory=dict)
    _next_lora_id: int = 1

    @property
    def model_name(self) -> str:
        return self.model_names[0]

    def add_lora(self, name: str, path: str) -> LoRARequest:
        """A new adapter named ``name`` (its id the next free one); ValueError for a taken name."""
        if name in self.lora_adapters or name in self.model_names:
            raise ValueError(f"lora_name: the name {name!r} is already served")
        lora = LoRARequest(name, self._next_lora_id, path)
        self._next_lora_id += 1
        return lora

    def lora_request(self, request: GenerationRequest) -> LoRARequest | None:
        """The adapter the request's ``model`` names, or None for the base model."""
        return self.lora_adapters.get(request.model) if request.model is not None else None

    def response_model(self, request: GenerationRequest) -> str:
        """The ``model`` a response names: the served name or adapter asked for, else the first name."""
        served = request.model in self.model_names or request.model in self.lora_adapters
        return request.model if served else self.model_name

    def check_request(self, request: GenerationRequest) -> None:
        """The model must be one this server serves and every string valid Unicode; unknown
        fields are only logged."""
        request.check_unicode()
        if (request.model is not None and request.model not in self.model_names
                and request.model not in self.lora_adapters):
            raise APIError(404, f"The model `{request.model}` does not exist.", "model")
        if request.model_extra:
            logger.warning("ignoring unknown request fields: %r", sorted(request.model_extra))
        request.check_stream_options()

    async def tokenize(self, prompts: list[PromptType], request: GenerationRequest) -> list[dict[str, Any]]:
        """Each prompt as ``{"prompt": text or None, "prompt_token_ids": ids}``, tokenized in the
        engine's tokenizer pool and checked against the vocabulary and max_model_len: a 400
        naming the field when it does not fit."""
        try:
            return list(await asyncio.gather(*(self.engine.tokenize(functools.partial(_tokenize, prompt),
                                                                    _num_chars(prompt)) for prompt in prompts)))
        except ValueError as exc:
            raise invalid_input(exc, request.field_names()) from None

    def check_context(self, prompts: list[dict[str, Any]], params: SamplingParams,
                      request: GenerationRequest) -> None:
        """Each prompt's tokens plus max_tokens must fit max_model_len (the engine would
        otherwise cut the completion short): a 400 naming the three numbers."""
        limit = self.engine.max_model_len
        name = request.field_names()["max_tokens"]
        for prompt in prompts:
            num_prompt_tokens = len(prompt["prompt_token_ids"])
            if params.max_tokens is not None and num_prompt_tokens + params.max_tokens > limit:
                raise APIError(400, f"the prompt's {num_prompt_tokens} tokens plus {name}={params.max_tokens} make "
                                    f"{num_prompt_tokens + params.max_tokens} tokens, more than this model's "
                                    f"max_model_len={limit}; ask for at most {limit - num_prompt_tokens}", name)


def _num_chars(prompt: PromptType) -> int:
    text = prompt.get("prompt") if isinstance(prompt, Mapping) else prompt
    return len(text) if isinstance(text, str) else 0  # token ids are not tokenized


def _tokenize(prompt: PromptType, processor: InputProcessor) -> dict[str, Any]:
    """Runs in the tokenizer pool."""
    text, token_ids = processor.tokenize(prompt)
    validate_prompt_token_ids(token_ids, processor.vocab_size, processor.max_model_len)
    return {"prompt": text, "prompt_token_ids": token_ids}


def completion_error(completion: CompletionOutput) -> APIError | None:
    """The error a completion ended with (finish reason "error"), as the client sees it: a
    400 when the request's own options conflict, a 500 when the engine failed it."""
    if completion.finish_reason != "error" or completion.error is None:
        return None
    return APIError(400 if completion.error.kind == "invalid_request" else 500, completion.error.message)


async def add_all(engine: AsyncEngine, base_id: str, prompts: list[PromptType], params: SamplingParams,
                  request: GenerationRequest, lora_request: LoRARequest | None = None,
                  priority: int = 0) -> list[RequestStream]:
    """Add one engine request per prompt, all or nothing: a 400 for bad input (a ``priority`` the
    scheduling policy refuses included)."""
    streams: list[RequestStream] = []
    try:
        for index, prompt in enumerate(prompts):
            request_id = base_id if len(prompts) == 1 else f"{base_id}-{index}"
            streams.append(await engine.add_request(request_id, prompt, params, lora_request, priority))
    except BaseException as exc:
        for stream in streams:
            stream.abort()
        if isinstance(exc, UnsupportedStructuredOutput):
            raise APIError(400, str(exc), request.structured_source()) from None
        if isinstance(exc, ValueError):
            raise invalid_input(exc, request.field_names()) from None
        raise
    return streams


async def merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(stream index, output) as outputs arrive from any of ``streams``."""
    if len(streams) == 1:
        async for output in streams[0]:
            yield 0, output
        return
    pending = {asyncio.ensure_future(anext(stream)): i for i, stream in enumerate(streams)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                index = pending.pop(task)
                try:
                    output = task.result()
                except StopAsyncIteration:
                    continue
                pending[asyncio.ensure_future(anext(streams[index]))] = index
                yield index, output
    finally:
        for task in pending:
            task.cancel()


@dataclass(slots=True)
class Choice:
    """One completion gathered from its deltas."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[PositionLogprobs] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def extend(self, delta: CompletionOutput) -> None:
        self.text += delta.text
        self.token_ids += delta.token_ids
        if delta.logprobs is not None:
            self.logprobs = (self.logprobs or []) + delta.logprobs
        self.finish_reason, self.stop_reason = delta.finish_reason, delta.stop_reason


@dataclass(slots=True)
class Result:
    """One prompt's finished request."""

    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[PositionLogprobs | None] | None
    choices: list[Choice]


def output_error(output: RequestOutput) -> APIError | None:
    """The first error among the output's completions, if one ended with finish reason "error"."""
    return next((error for error in map(completion_error, output.outputs) if error is not None), None)


async def collect(stream: RequestStream) -> Result:
    """The finished request, gathered from its deltas; raises the APIError of a completion
    that failed."""
    choices: dict[int, Choice] = {}
    last: RequestOutput | None = None
    async for last in stream:
        error = output_error(last)
        if error is not None:
            raise error
        for delta in last.outputs:
            choices.setdefault(delta.index, Choice(delta.index)).extend(delta)
    return Result(last.prompt, last.prompt_token_ids, last.prompt_logprobs,
                  [choices[i] for i in sorted(choices)])


def usage(prompt_tokens: int, completion_tokens: int) -> UsageInfo:
    return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens)


def sse(payload: BaseModel | dict[str, Any]) -> str:
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {data}\n\n"
