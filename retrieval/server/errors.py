"""Every error the service answers with, mapped to its status code here and nowhere else.

Library errors (features.core's RetrError tree) keep their one-line message, the same line the
CLI prints; the service adds its own few (not found, unauthorised, overloaded, timed out, body
too large). Every error body is `{"detail": "<one line>"}`, an unexpected one included
(`internal error (logged as <id>)`, its traceback in the log).
"""

from __future__ import annotations

import logging
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from features.core import (
    ConfigError,
    ImageReadError,
    IndexError_,
    IndexLockedError,
    RetrError,
)
from retrieval.pictures import ImageNotFoundError

logger = logging.getLogger(__name__)


class ServiceError(RetrError):
    """An error of the service itself (not of the library)."""


class NotFound(ServiceError, LookupError):
    pass


class Unauthorized(ServiceError):
    pass


UNAUTHORIZED = "this request needs the service's token: 'Authorization: Bearer TOKEN'"


class Overloaded(ServiceError):
    """Every slot and queue place is taken: come back later."""


class TimedOut(ServiceError):
    pass


class BodyTooLarge(ServiceError):
    pass


STATUS: list[tuple[type[Exception], int]] = [
    # most specific first: the first class an error is an instance of decides
    (NotFound, 404),
    (ImageNotFoundError, 404),
    (Unauthorized, 401),
    (Overloaded, 503),
    (IndexLockedError, 503),  # another process writes the index for longer than we wait
    (TimedOut, 504),
    (BodyTooLarge, 413),
    (ImageReadError, 400),
    (ConfigError, 422),
    (IndexError_, 500),
    (RetrError, 500),
]
RETRY = (Overloaded, IndexLockedError)
"""Errors a client should retry: answered with Retry-After."""


def status_of(exc: Exception) -> int:
    return next((code for cls, code in STATUS if isinstance(exc, cls)), 500)


def error_response(exc: Exception, retry_after: int = 2) -> JSONResponse:
    """The response to `exc`: its status code and its one-line message."""
    code = status_of(exc)
    headers = {}
    if isinstance(exc, RETRY):
        headers["Retry-After"] = str(retry_after)
    if isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"
    if code >= 500 and not isinstance(exc, (*RETRY, TimedOut)):
        logger.error("request failed: %s", exc)
    return JSONResponse({"detail": str(exc)}, status_code=code, headers=headers)


def install_error_handlers(app: FastAPI, retry_after: int) -> None:
    """Answer RetrError, bad parameters and HTTP errors with one-line details."""

    async def on_retr_error(_: Request, exc: Exception) -> JSONResponse:
        return error_response(exc, retry_after)

    async def on_validation(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return JSONResponse({"detail": validation_line(exc)}, status_code=422)

    async def on_http(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        return JSONResponse(
            {"detail": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers
        )

    async def on_unexpected(_: Request, exc: Exception) -> JSONResponse:
        """A bug, not a client's mistake: the traceback goes to the log under an id that the
        client is given, never to the client."""
        ref = uuid.uuid4().hex[:12]
        logger.error("internal error %s", ref, exc_info=exc)
        return JSONResponse({"detail": f"internal error (logged as {ref})"}, status_code=500)

    app.add_exception_handler(RetrError, on_retr_error)
    app.add_exception_handler(Exception, on_unexpected)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)


def validation_line(exc: RequestValidationError) -> str:
    """FastAPI's list of parameter problems as one line: `where: problem; ...`."""
    parts = []
    for e in exc.errors():
        where = ".".join(str(p) for p in e.get("loc", ()) if p not in ("query", "path", "body"))
        parts.append(f"{where or 'request'}: {e.get('msg', 'invalid')}")
    return "; ".join(parts)
