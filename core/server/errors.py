"""OpenAI-style API errors: ``{"error": {"message", "type", "param", "code"}}``."""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 413: "invalid_request_error", 431: "invalid_request_error",
          500: "internal_server_error", 503: "service_unavailable"}


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None
    code: int


class ErrorResponse(BaseModel):
    """The body of every error answer (``error_body``), as the OpenAPI document shows it."""

    error: ErrorInfo


class APIError(Exception):
    """An error the client caused or must be told about, with its HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param)


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    # a message quoting user text must still encode as UTF-8 (a lone surrogate would not)
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return {"error": {"message": message, "type": _TYPES.get(status, "server_error"), "param": param,
                      "code": status}}


def invalid_input(exc: ValueError, field_names: Mapping[str, str | None]) -> APIError:
    """A 400 for an engine-side ValueError, whose message starts with the field it is about
    (``top_k must be ...``). ``field_names`` maps engine names to the request's field names;
    a name missing from it is not a request field, so no param is named."""
    match = re.match(r"[A-Za-z_]+", str(exc))
    name = match.group(0) if match else ""
    return APIError(400, str(exc), field_names.get(name))
