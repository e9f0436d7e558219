"""Guards around the app: the request body's size, what happens when an engine dies, and the
graceful shutdown (drain) of requests in flight."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ttscale.engine import ModelPool

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 16 << 20  # a request body beyond this is refused (413) before it is read whole


class BodyLimit:
    """ASGI middleware: a body larger than ``max_bytes`` (by its Content-Length, or as it
    arrives) answers 413 in the OpenAI error shape; nothing of it is parsed. The body is read
    here (as the app would read it whole anyway) and handed on in one piece."""

    def __init__(self, app: ASGIApp, max_bytes: int = DEFAULT_MAX_BODY_BYTES):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await self._refuse(send)
                return
        parts: list[bytes] = []
        size = 0
        first: Message | None = None
        while True:
            msg = await receive()
            if msg["type"] != "http.request":  # the client left while sending
                first = msg
                break
            body = msg.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                await self._refuse(send)
                return
            parts.append(body)
            if not msg.get("more_body", False):
                first = {"type": "http.request", "body": b"".join(parts), "more_body": False}
                break
        pending = [first]

        async def replay() -> Message:
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send) -> None:
        body = json.dumps(
            {
                "error": {
                    "message": f"the request body is larger than {self.max_bytes} bytes (--max-request-bytes)",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "request_too_large",
                }
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})


async def watch_engines(pool: ModelPool, on_death: Callable[[list[str]], None], interval_s: float = 1.0) -> None:
    """Call ``on_death(names)`` once, as soon as an engine of ``pool`` is no longer alive."""
    while True:
        dead = [name for name, alive in pool.alive.items() if not alive]
        if dead:
            log.error("engine(s) of %s stopped", ", ".join(dead))
            on_death(dead)
            return
        await asyncio.sleep(interval_s)


class Drain:
    """Graceful shutdown. :meth:`begin` stops admissions (new requests get 503 ``shutting_down``,
    ``/health`` turns 503 ``draining``) and gives the requests in flight ``grace_s`` seconds to
    finish; then :attr:`expired` is set and each of them ends with an OpenAI-shaped 503 error
    (a stream: a final error event), its engine requests aborted."""

    def __init__(self) -> None:
        self.draining = False
        self.grace_s = 0.0
        self.began: float | None = None
        self.expired = asyncio.Event()

    def begin(self, grace_s: float) -> None:
        if self.draining:
            return
        self.draining, self.grace_s, self.began = True, grace_s, time.monotonic()
        log.info("draining: no new requests; those in flight have %.1f s to finish", grace_s)
        asyncio.get_running_loop().call_later(max(grace_s, 0.0), self.expire)

    def expire(self) -> None:
        if not self.expired.is_set():
            log.warning("grace period over: ending the requests still in flight")
            self.expired.set()

    async def wait_expired(self) -> None:
        await self.expired.wait()
