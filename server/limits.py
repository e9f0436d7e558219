"""Guards around the app: the request body's size, and what happens when an engine dies."""

from __future__ import annotations

import asyncio
import json
import logging
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
