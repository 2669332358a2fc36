"""The OpenAPI document as a client needs it (ASGI middleware on ``GET /docs.json``).

BentoML 1.4 generates the document from the API methods' types, with three gaps filled here:
* its top-level answer schema is flattened, and the flattening keeps only the first branch of an
  optional field (``float | None`` is documented as a number): the answer is pointed at the full
  component schema instead;
* it documents BentoML's own error shape; this service answers ``{"error", "status"}`` with the
  statuses each route can give, documented here as ``ErrorBody``;
* it knows nothing of API keys or of the GET that ``/health`` and ``/metadata`` also answer.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

from tumorscope.api.contract import ErrorBody

DOCUMENT_PATH = "/docs.json"
REF = "#/components/schemas/{model}"
SECURITY_SCHEMES = {"bearer": {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer <API key>"},
                    "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}}


def _error_response(status: int) -> dict[str, Any]:
    return {"description": HTTPStatus(status).phrase,
            "content": {"application/json": {"schema": {"$ref": REF.format(model="ErrorBody")}}}}


def documented(spec: dict[str, Any], errors: Mapping[str, tuple[int, ...]], get_paths: tuple[str, ...],
               keys_enabled: bool) -> dict[str, Any]:
    """``spec`` with full answer schemas, ``ErrorBody`` answers for ``errors`` (path -> statuses),
    a GET operation for ``get_paths`` and, with keys, the security schemes (401 on every route)."""
    spec = copy.deepcopy(spec)
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    schemas["ErrorBody"] = ErrorBody.model_json_schema(ref_template=REF)
    for path, statuses in errors.items():
        operation = spec.get("paths", {}).get(path, {}).get("post")
        if operation is None:
            continue
        responses = operation.setdefault("responses", {})
        answer = responses.get("200", {}).get("content", {}).get("application/json", {})
        if answer.get("schema", {}).get("title") in schemas:
            answer["schema"] = {"$ref": REF.format(model=answer["schema"]["title"])}
        for status in (*statuses, *((401,) if keys_enabled else ())):
            responses[str(status)] = _error_response(status)
        if keys_enabled:
            operation["security"] = [{"bearer": []}, {"apiKey": []}]
        if path in get_paths:
            read = {k: v for k, v in copy.deepcopy(operation).items() if k != "requestBody"}
            read["operationId"] = f"{operation.get('operationId', path.strip('/'))}_get"
            spec["paths"][path]["get"] = read
    if keys_enabled:
        spec["components"]["securitySchemes"] = SECURITY_SCHEMES
    return spec


class OpenApiDocument:
    """Rewrites the body of ``GET /docs.json`` with ``documented``; every other request passes."""

    def __init__(self, app: Any, errors: Mapping[str, tuple[int, ...]], get_paths: tuple[str, ...], keys_enabled: bool):
        self.app, self.errors, self.get_paths, self.keys_enabled = app, errors, get_paths, keys_enabled

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") != "http" or scope.get("method") != "GET" or scope.get("path") != DOCUMENT_PATH:
            await self.app(scope, receive, send)
            return
        start: dict[str, Any] = {}
        chunks: list[bytes] = []

        async def keep(message: dict) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self.app(scope, receive, keep)
        body = b"".join(chunks)
        if start.get("status") == 200:
            body = json.dumps(documented(json.loads(body), self.errors, self.get_paths, self.keys_enabled)).encode()
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        await send({"type": "http.response.start", "status": start.get("status", 500),
                    "headers": [*headers, (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
