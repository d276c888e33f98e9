"""API-key check as the outermost ASGI middleware: a request without the key gets 401 before its
body is read or validated, so an unauthenticated caller learns nothing about the schema."""

from __future__ import annotations

import hmac
import json

OPEN_PATHS = ("/health", "/metrics")  # probes and scrapers need no key, as in vLLM


class APIKeyAuth:
    """401 for every path but OPEN_PATHS unless `Authorization: Bearer <key>` names one of the keys
    (each compared in constant time)."""

    def __init__(self, app, api_keys: set[str]) -> None:
        self.app, self.expected = app, [f"Bearer {key}".encode() for key in sorted(api_keys)]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path", "") in OPEN_PATHS:
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers") or {}).get(b"authorization", b"")
        if any([hmac.compare_digest(given, key) for key in self.expected]):  # a list: no early exit
            return await self.app(scope, receive, send)
        await _unauthorized(send)


async def _unauthorized(send) -> None:
    body = json.dumps({"error": {"message": "missing or wrong API key; send 'Authorization: Bearer <key>'",
                                 "type": "authentication_error", "param": None, "code": None}}).encode()
    await send({"type": "http.response.start", "status": 401,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"www-authenticate", b"Bearer")]})
    await send({"type": "http.response.body", "body": body})
