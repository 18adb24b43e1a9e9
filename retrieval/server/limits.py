"""The service's limits: bounded lanes of work with a timeout, and a request body cap.

A `Lane` runs blocking work (a search, an index update) on its own threads: `slots` at once,
`queue` more waiting; a request beyond that is refused at once (Overloaded, 503 + Retry-After)
instead of piling up, and each waits at most `timeout` seconds (TimedOut, 504). Work that timed
out keeps its slot until it finishes (a thread cannot be interrupted), so the bound holds.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import torch
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from retrieval.server.errors import (
    UNAUTHORIZED,
    BodyTooLarge,
    Overloaded,
    TimedOut,
    Unauthorized,
    error_response,
)
from retrieval.verification import default_workers

T = TypeVar("T")


class Lane:
    """`slots` workers and `queue` waiting places for one kind of work.

    Each worker runs torch on `threads` threads (default: the cores shared by the slots).
    torch's thread count is per OS thread and decides the float rounding of a forward pass, so
    fixing it makes every worker give the same descriptors for the same image."""

    def __init__(
        self, name: str, slots: int, queue: int, timeout: float, threads: int | None = None
    ) -> None:
        self.name = name
        self.capacity = slots + queue
        self.timeout = timeout
        threads = threads or max(1, default_workers() // slots)
        self._pool = ThreadPoolExecutor(
            slots,
            thread_name_prefix=f"retr-{name}",
            initializer=torch.set_num_threads,
            initargs=(threads,),
        )
        self._taken = 0
        self._lock = threading.Lock()

    @property
    def taken(self) -> int:
        """Requests running or waiting now."""
        return self._taken

    def _take(self) -> None:
        with self._lock:
            if self._taken >= self.capacity:
                raise Overloaded(
                    f"overloaded: {self._taken} {self.name} requests running or waiting (limit "
                    f"{self.capacity}); retry later"
                )
            self._taken += 1

    def _give(self, _: object = None) -> None:
        with self._lock:
            self._taken -= 1

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on the lane's threads; Overloaded when full, TimedOut after `timeout`."""
        self._take()
        try:
            future: Future[T] = self._pool.submit(fn, *args)
        except BaseException:
            self._give()
            raise
        future.add_done_callback(self._give)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self.timeout)
        except asyncio.TimeoutError:
            future.cancel()  # still queued: never runs; running: finishes, then frees its slot
            raise TimedOut(
                f"{self.name} took longer than the {self.timeout:g} s request timeout"
            ) from None

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` gets 413, whether its Content-Length
    says so up front or a chunked body grows past the cap while it is read (the app's answer
    to the cut-off body is then replaced by the 413)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _error(self) -> BodyTooLarge:
        return BodyTooLarge(f"request body over the {self.max_bytes / 2**20:g} MB limit")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await error_response(self._error())(scope, receive, send)
            return
        seen = 0
        over = False
        started = False

        async def counted() -> Message:
            nonlocal seen, over
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    over = True
                    raise self._error()
            return message

        async def guarded(message: Message) -> None:
            nonlocal started
            if over:
                return
            started = True
            await send(message)

        try:
            await self.app(scope, counted, guarded)
        except Exception:
            if not over:
                raise
        if over and not started:
            await error_response(self._error())(scope, receive, send)


WRITES = ("POST", "DELETE")
"""Methods of the index-update routes (under /images)."""


def token_matches(authorization: str | None, token: str) -> bool:
    """Whether an `Authorization` header carries `Bearer TOKEN` (constant-time comparison)."""
    scheme, _, given = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and secrets.compare_digest(given.encode(), token.encode())


OPEN_PATHS = ("/", "/health")
"""What stays open with private reads: the page (its data comes through the API) and the
liveness check."""


class TokenGate:
    """ASGI middleware refusing requests that need the token before their body is read, so a
    client without it cannot make the service receive an upload first (the routes check the
    token of updates too: `routes.require_token`). Updates always need it; with
    `private_reads`, every request but OPEN_PATHS does."""

    def __init__(self, app: ASGIApp, token: str | None, private_reads: bool = False) -> None:
        self.app = app
        self.token = token
        self.private_reads = private_reads

    def needs_token(self, scope: Scope) -> bool:
        if self.token is None or scope["type"] != "http":
            return False
        path = scope["path"]
        if scope["method"] in WRITES and path.startswith("/images"):
            return True
        return self.private_reads and path not in OPEN_PATHS and not path.startswith("/static/")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.needs_token(scope):
            assert self.token is not None
            header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            if not token_matches(header, self.token):
                refused = Unauthorized(UNAUTHORIZED)
                await error_response(refused)(scope, receive, send)
                return
        await self.app(scope, receive, send)
