"""GET for the read-only routes (ASGI middleware): load balancers, uptime checks and Kubernetes
probes send GET, while BentoML's APIs take POST only. A GET of one of ``paths`` is answered as
that route's POST with an empty JSON body (``{}``), so both methods give the same answer."""

from __future__ import annotations

from typing import Any

from tumorscope.api.upload_guard import replaying

EMPTY_JSON = b"{}"


class GetAsPost:
    def __init__(self, app: Any, paths: tuple[str, ...]):
        self.app, self.paths = app, frozenset(paths)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") != "http" or scope.get("method") != "GET" or scope.get("path") not in self.paths:
            await self.app(scope, receive, send)
            return
        headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() not in (b"content-type", b"content-length")]
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(EMPTY_JSON)).encode())]
        await self.app(dict(scope, method="POST", headers=headers), replaying(EMPTY_JSON, receive), send)
