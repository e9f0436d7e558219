"""API keys: OpenAI-style ``Authorization: Bearer <key>`` on every route but the open ones,
401 in the OpenAI error shape otherwise (the OpenAI SDK raises ``AuthenticationError``)."""

from __future__ import annotations

import hmac
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from ttscale.errors import ConfigError

ENV_VAR = "TTSCALE_API_KEY"  # one key, or several separated by commas
DOCS_PATHS = ("/docs", "/redoc", "/openapi.json")


def load_api_keys(
    keys: Iterable[str] = (), files: Iterable[str | os.PathLike[str]] = (), *, env: bool = True
) -> list[str]:
    """Keys from the command line, from files (one per line; ``#`` starts a comment) and from
    ``$TTSCALE_API_KEY``; duplicates dropped, order kept."""
    out: list[str] = []
    candidates = list(keys)
    for f in files:
        try:
            text = Path(f).read_text()
        except OSError as e:
            raise ConfigError(f"cannot read the API key file {f}: {e.strerror}") from None
        candidates += [line.split("#", 1)[0] for line in text.splitlines()]
    if env:
        candidates += os.environ.get(ENV_VAR, "").split(",")
    for k in candidates:
        k = k.strip()
        if k and k not in out:
            out.append(k)
    return out


class ApiKeyAuth:
    """ASGI middleware: requests to paths outside ``open_paths`` need one of ``keys``."""

    def __init__(self, app: ASGIApp, keys: Sequence[str], open_paths: Sequence[str] = ("/health",)):
        self.app = app
        self.keys = [k.encode() for k in keys]
        self.open_paths = tuple(open_paths)

    def _is_open(self, path: str) -> bool:
        return any(path == p or path.startswith(p.rstrip("/") + "/") for p in self.open_paths)

    def _allowed(self, scope: Scope) -> bool:
        header = b""
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                header = value
                break
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            return False
        token = token.strip()
        # compare with every key, in constant time per key
        return any([hmac.compare_digest(token, k) for k in self.keys])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope.get("method") == "OPTIONS"
            or self._is_open(scope["path"])
            or self._allowed(scope)
        ):
            await self.app(scope, receive, send)
            return
        has_header = any(name == b"authorization" for name, _ in scope.get("headers", []))
        message = (
            "Incorrect API key provided."
            if has_header
            else "You didn't provide an API key: send it as 'Authorization: Bearer <key>'."
        )
        body = json.dumps(
            {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}}
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b"Bearer"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
