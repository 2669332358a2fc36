"""Request-level checks before BentoML parses a body (ASGI middleware): the route, the method, the
declared and streamed size, the multipart structure and field names; what it learnt of the file
parts is left for the API."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from tumorscope.api.refusals import MAX_FILENAME_BYTES, one_line

FILE_FIELD = "file"
BATCH_FIELD = "files"
CLASS_FIELD = "target_class"
# Bytes a multipart body may carry beyond its files: boundaries and part headers.
MULTIPART_SLACK = 16 * 1024
MAX_JSON_BODY = 64 * 1024
STATE_KEY = "tumorscope_uploads"  # where UploadGuard leaves what it learnt of the file parts


def replaying(body: bytes, receive: Any):
    """An ASGI ``receive`` that gives ``body`` whole, once, then passes on what comes after it
    (only a disconnect can)."""
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


@dataclass(frozen=True)
class Route:
    """What an API route accepts: the multipart file field (None: a JSON or empty body), whether it
    takes several files, and the text fields it also takes."""

    file_field: str | None = None
    many: bool = False
    text_fields: tuple[str, ...] = ()


@dataclass
class UploadPart:
    filename: str | None
    content_type: str | None
    size: int


@dataclass
class _Rejection(Exception):
    status: int
    message: str
    close: bool = False  # the body was not read to its end: the connection cannot be reused
    headers: dict[str, str] = field(default_factory=dict)


class UploadGuard:
    """ASGI middleware in front of the API routes: refuses what BentoML would otherwise turn into a
    500 or read whole first, before any of it reaches BentoML.

    * a body over the limit: by its Content-Length before a byte is read, else while it streams;
    * a content type the route cannot take (a file route takes multipart/form-data only; the others
      JSON or nothing: BentoML would parse a form there);
    * a malformed multipart body, a missing file field, a text value in a file field (BentoML would
      fetch it as a URL), a file in a text field, an unknown field, too many files.

    The body is read once here and replayed to BentoML; what was learnt of the file parts (names,
    content types) is left in ``scope["state"][STATE_KEY]`` for the API, since BentoML keeps only
    the bytes. Other paths and methods pass through (BentoML answers 404 and 405)."""

    def __init__(self, app: Any, routes: dict[str, Route], max_upload_bytes: int, max_files: int):
        self.app, self.routes = app, routes
        self.max_upload_bytes, self.max_files = max_upload_bytes, max_files

    def body_limit(self, route: Route) -> int:
        if route.file_field is None:
            return MAX_JSON_BODY
        return self.max_upload_bytes + MULTIPART_SLACK + (1024 * self.max_files if route.many else 1024)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        route = self.routes.get(scope.get("path", "")) if scope.get("type") == "http" else None
        if route is None or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        from starlette.datastructures import Headers

        headers = Headers(scope=scope)
        try:
            body = await self._read_body(headers, receive, self.body_limit(route))
            if body is None:  # the client went away
                return
            parts = await self._check_form(route, headers, body)
        except _Rejection as rejection:
            await self._reject(scope, receive, send, rejection)
            return
        except Exception as err:
            # A bug here must still answer: an exception that escapes a middleware below BentoML's
            # TimeoutMiddleware holds the request open, unanswered, for the whole traffic timeout.
            import logging

            logging.getLogger(__name__).exception("upload check failed")
            await self._reject(scope, receive, send, _Rejection(500, f"upload check failed: {type(err).__name__}", True))
            return
        if parts is not None:
            scope.setdefault("state", {})[STATE_KEY] = parts
        await self.app(scope, replaying(body, receive), send)

    async def _read_body(self, headers: Any, receive: Any, limit: int) -> bytes | None:
        declared = headers.get("content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                raise _Rejection(400, f"invalid Content-Length header {declared!r}") from None
            if length > limit:
                raise _Rejection(413, _too_large(length, limit), close=True)
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > limit:
                raise _Rejection(413, _too_large(total, limit, streamed=True), close=True)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _check_form(self, route: Route, headers: Any, body: bytes) -> dict[str, Any] | None:
        media = headers.get("content-type", "").split(";")[0].strip().lower()
        if route.file_field is None:
            if media not in ("", "application/json"):
                raise _Rejection(415, f"unsupported content type {media!r}: this endpoint takes a JSON body or none")
            _check_json_object(body)
            return None
        example = f"curl -F {route.file_field}=@slice.png"
        if not body:
            raise _Rejection(400, f"empty request body: send the image as multipart/form-data in field "
                                  f"'{route.file_field}' (e.g. {example})")
        if media != "multipart/form-data":
            raise _Rejection(415, f"unsupported content type {media or 'none'!r}: send multipart/form-data with the "
                                  f"image in field '{route.file_field}' (e.g. {example})")
        form = await _parse_multipart(headers, body)
        try:
            allowed = (route.file_field, *route.text_fields)
            parts: list[UploadPart] = []
            for name, value in form.multi_items():
                if name not in allowed:
                    raise _Rejection(400, f"unexpected field {name!r} (this endpoint takes: {', '.join(allowed)})")
                is_file = not isinstance(value, str)
                if name == route.file_field and not is_file:
                    raise _Rejection(400, f"field '{name}' must be a file upload, not a text value (URLs are not fetched)")
                if name != route.file_field and is_file:
                    raise _Rejection(400, f"field '{name}' must be a text value, not a file")
                if not is_file:
                    _check_text_field(name, value)
                if is_file:
                    _check_filename(value.filename)
                    parts.append(UploadPart(value.filename, value.headers.get("content-type"), int(value.size or 0)))
            if not parts:
                raise _Rejection(400, f"missing field '{route.file_field}': send the image as multipart/form-data "
                                      f"(e.g. {example})")
            if not route.many and len(parts) > 1:
                raise _Rejection(400, f"{len(parts)} files in field '{route.file_field}': this endpoint takes one "
                                      "(classify_batch takes several)")
            if route.many and len(parts) > self.max_files:
                raise _Rejection(413, f"too many files: {len(parts)} (limit {self.max_files} per request)")
        finally:
            await form.close()
        return {"field": route.file_field, "parts": parts}

    @staticmethod
    async def _reject(scope: dict, receive: Any, send: Any, rejection: _Rejection) -> None:
        from starlette.responses import JSONResponse

        headers = dict(rejection.headers)
        if rejection.close:
            headers["connection"] = "close"
        response = JSONResponse({"error": one_line(rejection.message), "status": rejection.status},
                                status_code=rejection.status, headers=headers)
        await response(scope, receive, send)


def _check_json_object(body: bytes) -> None:
    """An optional JSON body must be one object (BentoML would answer a pydantic error dump)."""
    if not body.strip():
        return
    try:
        value = json.loads(body)
    except Exception as err:  # ValueError, UnicodeDecodeError, RecursionError on deep nesting
        raise _Rejection(400, f"invalid JSON body: {type(err).__name__}: {err}") from None
    if not isinstance(value, dict):
        raise _Rejection(400, f"the JSON body must be an object, got {type(value).__name__}")


def _check_text_field(name: str, value: str) -> None:
    """BentoML reads a text field as JSON when it parses (123 -> a number) and answers a pydantic
    error dump when that is not the declared string; say it in one line instead."""
    try:
        decoded = json.loads(value)
    except ValueError:
        return
    if decoded is not None and not isinstance(decoded, str):
        raise _Rejection(400, f"field '{name}' must be text, got {type(decoded).__name__} {value[:40]!r} "
                              f"(send a name that looks like JSON as a JSON string, e.g. '\"{value[:20]}\"')")


def _check_filename(filename: str | None) -> None:
    """BentoML names its temporary copy of an upload after the client's file name: a name too long
    for the file system, or one with a NUL or control character, would fail there as a 500."""
    if not filename:
        return
    if any(ord(c) < 32 or ord(c) == 127 for c in filename):
        raise _Rejection(400, "file name contains control characters")
    try:
        size = len(os.path.basename(filename).encode("utf-8"))
    except UnicodeEncodeError:
        raise _Rejection(400, "file name is not valid UTF-8") from None
    if size > MAX_FILENAME_BYTES:
        raise _Rejection(400, f"file name too long: {size} bytes (limit {MAX_FILENAME_BYTES})")


def _too_large(size: int, limit: int, streamed: bool = False) -> str:
    what = "more than" if streamed else ""
    return f"request body too large: {what} {size} bytes (limit {limit} bytes)".replace("  ", " ")


async def _parse_multipart(headers: Any, body: bytes) -> Any:
    """Parse a buffered multipart body with Starlette's parser and BentoML's (Starlette's default)
    limits, so that whatever passes here also parses there."""
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def stream():
        yield body
        yield b""

    try:
        return await MultiPartParser(headers, stream()).parse()
    except MultiPartException as err:
        raise _Rejection(400, f"malformed multipart body: {err.message}") from None
    except Exception as err:  # the parser raises a few other types on broken input
        raise _Rejection(400, f"malformed multipart body: {type(err).__name__}: {err}") from None


def uploads_of(state: Any) -> list[UploadPart]:
    """The file parts ``UploadGuard`` saw, from a request's state (empty outside HTTP)."""
    found = getattr(state, STATE_KEY, None) if state is not None else None
    return list(found["parts"]) if found else []


