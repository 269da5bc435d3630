"""The FastAPI application: routes, OpenAI-style errors, and an OpenAPI document that
says what the server answers (the guards in front of it are in ``guards``)."""
from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Coroutine
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware

from .. import __version__
from .async_engine import AsyncEngine, EngineError
from .chat import ChatToolSettings, create_chat_completion
from .completions import create_completion
from .errors import APIError, ErrorResponse, error_body
from .guards import MAX_HEADER_BYTES, APIKeyGuard, BodyLimit, HeaderLimit
from .metrics import CONTENT_TYPE
from ..errors import ConfigError
from .protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, LoadLoRAAdapterRequest,
                       TokenizeRequest, UnloadLoRAAdapterRequest)
from .responses import DetokenizeResponse, ModelCard, ModelList, TokenizeResponse, VersionResponse
from .serving import ServerState
from . import tokenization

DEFAULT_MAX_BODY_BYTES = 8 << 20


_ERROR_DESCRIPTIONS = {
    400: "The body is not valid JSON, or a field is invalid (`param` names it).",
    401: "The API key is missing or wrong (`Authorization: Bearer <key>`).",
    404: "The model is not one this server serves.",
    413: "The request body is too large.",
    431: f"The request headers total more than {MAX_HEADER_BYTES} bytes.",
    503: "No new requests are admitted: the queue is full, the server is shutting down, or the engine has failed.",
}


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorResponse, "description": _ERROR_DESCRIPTIONS[status]} for status in statuses}


def check_cors_options(allowed_origins: list[str] | None, allowed_methods: list[str] | None,
                       allowed_headers: list[str] | None, allow_credentials: bool) -> None:
    """The CORS details mean nothing without origins: a ConfigError rather than a setting silently unused."""
    if not allowed_origins and (allowed_methods is not None or allowed_headers is not None or allow_credentials):
        raise ConfigError("--allowed-methods, --allowed-headers and --allow-credentials need --allowed-origins")


def build_app(engine: AsyncEngine, *, model_names: list[str], api_key: str | None = None,
              chat_template: str | None = None, trust_request_chat_template: bool = False,
              max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, lora_modules: dict[str, str] | None = None,
              allowed_origins: list[str] | None = None, allowed_methods: list[str] | None = None,
              allowed_headers: list[str] | None = None, allow_credentials: bool = False,
              enable_auto_tool_choice: bool = False, tool_call_parser: str | None = None,
              reasoning_parser: str | None = None) -> FastAPI:
    """The OpenAI-compatible app over ``engine``. Its lifespan starts the engine thread
    and, at shutdown, aborts what is still in flight and stops it. ``lora_modules``: adapter name ->
    PEFT folder, served as models of their own (needs an engine with enable_lora). ``model_names``: every
    name a request may use (a response echoes it). ``allowed_origins`` (vLLM's CORS options, the methods
    and headers ``["*"]`` when unset): without it no CORS headers are sent, so browsers on other origins
    cannot read the answers. ``enable_auto_tool_choice``, ``tool_call_parser``, ``reasoning_parser``: the chat
    endpoint's tool calling and reasoning (see ``ChatToolSettings``)."""
    check_cors_options(allowed_origins, allowed_methods, allowed_headers, allow_credentials)
    tool_settings = ChatToolSettings(enable_auto_tool_choice, tool_call_parser, reasoning_parser)
    state = ServerState(engine, model_names, chat_template, trust_request_chat_template,
                        sampling_defaults=engine.engine.core.generation_defaults.sampling)
    lora_enabled = engine.engine.core.config.lora.enable_lora
    if lora_modules and not lora_enabled:
        raise ConfigError("--lora-modules needs --enable-lora (enable_lora=True)")
    for name, path in (lora_modules or {}).items():
        lora = state.add_lora(name, path)
        engine.engine.core.validate_lora_request(lora)  # a bad adapter stops the start, naming it
        state.lora_adapters[name] = lora

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        await engine.shutdown()  # the HTTP server has already drained its connections

    app = FastAPI(title="tokenmill", lifespan=lifespan)
    _add_error_handlers(app)
    _document_errors_as_400(app)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    if api_key is not None:
        app.add_middleware(APIKeyGuard, api_key=api_key)
    if allowed_origins:  # outside the key guard: a browser's preflight carries no key, and a 401 needs the headers
        app.add_middleware(CORSMiddleware, allow_origins=allowed_origins, allow_methods=allowed_methods or ["*"],
                           allow_headers=allowed_headers or ["*"], allow_credentials=allow_credentials)
    app.add_middleware(HeaderLimit, max_bytes=MAX_HEADER_BYTES)  # outermost: refused before anything else
    guarded = (401,) if api_key is not None else ()

    @app.get("/health", response_class=Response,
             responses={200: {"description": "The server admits requests (no body)."}, **_errors(431),
                        503: {"model": ErrorResponse, "description": "The server admits no requests: it is "
                              "starting or shutting down, or the engine has failed."}})
    async def health() -> Response:
        if engine.is_healthy:
            return Response(status_code=200)
        reason = (f"the engine has stopped after an error: {engine.error!r}" if engine.error is not None
                  else "the server is not admitting requests (starting or shutting down)")
        return JSONResponse(error_body(503, reason), status_code=503)

    @app.get("/v1/models", responses=_errors(*guarded, 431))
    async def models() -> ModelList:
        cards = [ModelCard(id=name, max_model_len=engine.max_model_len) for name in model_names]
        cards += [ModelCard(id=name, max_model_len=engine.max_model_len, root=lora.lora_path, parent=model_names[0])
                  for name, lora in state.lora_adapters.items()]
        return ModelList(data=cards)

    if lora_enabled:
        @app.post("/v1/load_lora_adapter", response_class=PlainTextResponse,
                  responses={200: {"description": "The adapter is served under its name."},
                             **_errors(400, *guarded, 431)})
        async def load_lora_adapter(body: LoadLoRAAdapterRequest) -> PlainTextResponse:
            try:
                lora = state.add_lora(body.lora_name, body.lora_path)
                await engine.call(lambda core_engine: core_engine.core.validate_lora_request(lora))
            except ValueError as exc:
                field = "lora_name" if str(exc).startswith("lora_name") else "lora_path"
                raise APIError(400, str(exc), field) from None
            state.lora_adapters[body.lora_name] = lora
            return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

        @app.post("/v1/unload_lora_adapter", response_class=PlainTextResponse,
                  responses={200: {"description": "The adapter is no longer served (requests in flight finish)."},
                             **_errors(400, *guarded, 404, 431)})
        async def unload_lora_adapter(body: UnloadLoRAAdapterRequest) -> PlainTextResponse:
            if state.lora_adapters.pop(body.lora_name, None) is None:
                raise APIError(404, f"The LoRA adapter '{body.lora_name}' is not served.", "lora_name")
            return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    @app.get("/version", responses=_errors(*guarded, 431))
    async def version() -> VersionResponse:
        return VersionResponse(version=__version__)

    tokenizer_errors = _errors(400, *guarded, 404, 413, 431, 503)

    @app.post("/tokenize", responses=tokenizer_errors)
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        return await tokenization.tokenize(state, body)

    @app.post("/detokenize", responses=tokenizer_errors)
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        return await tokenization.detokenize(state, body)

    prometheus_text = {"description": "The Prometheus text exposition format, version 0.0.4.",
                       "content": {CONTENT_TYPE: {"schema": {"type": "string"}}}}

    @app.get("/metrics", response_class=Response, responses={200: prometheus_text, **_errors(*guarded, 431)})
    async def metrics() -> Response:
        return Response(engine.metrics.render(), media_type=CONTENT_TYPE)

    generation_responses = {200: {"description": "The result as JSON or, with `stream: true`, as server-sent "
                                                 "events ending in `data: [DONE]`.",
                                  "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                            **_errors(400, *guarded, 404, 413, 431, 503)}

    @app.post("/v1/completions", responses=generation_responses)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await _cancel_on_disconnect(request, create_completion(state, body))

    @app.post("/v1/chat/completions", responses=generation_responses)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await _cancel_on_disconnect(request, create_chat_completion(state, body, tool_settings))

    return app


async def _cancel_on_disconnect(request: Request, handler: Coroutine[Any, Any, Response]) -> Response:
    """Run ``handler`` unless the client disconnects first; cancelling it aborts its
    engine requests. (A streamed response is watched by Starlette itself once it starts.)"""
    task = asyncio.ensure_future(handler)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return Response(status_code=499)  # nobody is listening any more


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _document_errors_as_400(app: FastAPI) -> None:
    """FastAPI documents a 422 for every route with a body; this server answers 400 (the
    handlers below), so the document drops the 422 and its validation-error schemas."""
    generate = app.openapi
    document: dict[str, Any] | None = None

    def openapi() -> dict[str, Any]:
        nonlocal document
        if document is None:
            document = generate()
            for operations in document["paths"].values():
                for operation in operations.values():
                    operation["responses"].pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                document["components"]["schemas"].pop(name, None)
        return document

    app.openapi = openapi


def _add_error_handlers(app: FastAPI) -> None:
    def reply(status: int, message: str, param: str | None = None,
              headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(error_body(status, message, param), status_code=status, headers=headers)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return reply(exc.status, exc.message, exc.param)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        error = exc.errors()[0]
        if error["type"] == "json_invalid":
            return reply(400, f"the body is not valid JSON: {error.get('ctx', {}).get('error', '')}".rstrip(": "))
        param, union_tag = _field_path(error["loc"])
        if union_tag is None:
            return reply(400, f"{param or 'body'}: {error['msg']}", param)
        paths = [_field_path(e["loc"]) for e in exc.errors()]
        expected = dict.fromkeys(tag for path, tag in paths if path == param and tag is not None)
        return reply(400, f"{param}: invalid value; expected {' or '.join(expected)}", param)

    @app.exception_handler(EngineError)
    async def engine_error(request: Request, exc: EngineError) -> JSONResponse:
        retry_after = getattr(exc, "retry_after", None)  # a full queue or a shutdown: try again later
        headers = None if retry_after is None else {"Retry-After": str(math.ceil(retry_after))}
        return reply(exc.status, str(exc), headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return reply(exc.status_code, str(exc.detail), headers=exc.headers)  # e.g. a 405's Allow

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        return reply(500, f"internal server error: {exc!r}")


_UNION_TAGS = frozenset({"str", "int", "float", "bool"})


def _field_path(loc: tuple) -> tuple[str | None, str | None]:
    """A pydantic error location as a param (``messages.0.role``), cut at the member of
    a union it tried (``prompt`` of ``("body", "prompt", "list[int]", 0)``), and that member."""
    parts: list[str] = []
    for part in loc[1:] if loc[:1] == ("body",) else loc:
        if isinstance(part, str) and ("[" in part or part in _UNION_TAGS):
            return ".".join(parts) or None, part
        parts.append(str(part))
    return ".".join(parts) or None, None
