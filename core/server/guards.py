"""ASGI guards in front of the app: header size (431), the API key (401) and body size (413).
Each answers with the same error JSON as the app, before any route runs."""
from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable

from starlette.exceptions import HTTPException

from .errors import error_body

MAX_HEADER_BYTES = 32 << 10  # names and values of all request headers together
OPEN_PATHS = frozenset({"/health"})  # reachable without the API key

ASGIApp = Callable[[dict, Callable, Callable], Awaitable[None]]


async def send_error(send: Callable, status: int, message: str,
                      headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    body = json.dumps(error_body(status, message)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


class HeaderLimit:
    """Refuse requests whose headers (names and values) total more than ``max_bytes`` with
    431. h11 bounds only a head that arrives in pieces; one read can hold a far larger one."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http":
            size = sum(len(name) + len(value) for name, value in scope["headers"])
            if size > self.max_bytes:
                await send_error(send, 431, f"the request headers total {size} bytes; at most {self.max_bytes} "
                                             "are accepted")
                return
        await self.app(scope, receive, send)


class APIKeyGuard:
    """Every route but the open ones needs ``Authorization: Bearer <key>``. The scheme is
    case-insensitive (RFC 7235); the key is compared in constant time."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.api_key = api_key.encode()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            scheme, _, credentials = dict(scope["headers"]).get(b"authorization", b"").partition(b" ")
            is_key = hmac.compare_digest(credentials.lstrip(b" "), self.api_key)
            if not (is_key and scheme.lower() == b"bearer"):
                await send_error(send, 401, "invalid or missing API key (Authorization: Bearer <key>)",
                                  headers=((b"www-authenticate", b"Bearer"),))
                return
        await self.app(scope, receive, send)


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` with 413: by Content-Length up front,
    and by counting for chunked uploads."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = f"the request body is larger than {self.max_bytes} bytes"
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await send_error(send, 413, too_large)
            return
        received = 0

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, too_large)
            return message

        await self.app(scope, limited_receive, send)
