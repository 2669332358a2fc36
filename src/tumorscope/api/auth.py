"""API keys for the service (ASGI middleware): off until keys are set, then every API route needs
one and ``reload`` needs an admin key.

Keys come from environment variables (``serve.auth.keys_env``, ``serve.auth.admin_keys_env``:
comma- or space-separated) and from a file named by ``serve.auth.keys_file`` (lines ``user <key>``
or ``admin <key>``, ``#`` comments), never from params.yaml, so they stay out of git. A client
sends one as ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``.

Keys are kept as SHA-256 digests and a presented key is compared with every one of them with
``hmac.compare_digest`` (constant time, no early exit), so neither the answer time nor a memory dump
gives a key away; no message or log line ever contains a presented key.

Open without a key: liveness and readiness (``/livez``, ``/readyz``, ``/healthz``: probes carry no
credentials), the static pages that hold no data (the clinician page ``/ui/``, which asks for a key
itself; the Swagger UI and its OpenAPI document), and CORS preflights.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tumorscope.errors import UserError

USER, ADMIN, REVIEWER = "user", "admin", "reviewer"
ROLES = (USER, ADMIN, REVIEWER)
MIN_KEY_LENGTH = 16  # shorter keys can be guessed; `tumorscope api-key` makes 43-character ones
OPEN_PATHS = frozenset({"/livez", "/readyz", "/healthz", "/", "/docs.json"})
OPEN_PREFIXES = ("/ui/", "/static_content/")
ADMIN_PATHS = frozenset({"/reload"})
# Readings of queued answers: a reviewer or an admin key, and never without keys.
REVIEW_PATHS = frozenset({"/review_queue", "/review_item", "/review_label"})
# Where the middleware tells the service who is calling (the key's name, never the key).
CALLER_STATE = "tumorscope_caller"


class KeyConfigError(UserError, ValueError):
    """A key source a user can fix (a missing or malformed file, a too-short key): one line that
    names the source, never the key."""


def new_key() -> str:
    """A fresh random key (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


@dataclass(frozen=True)
class ApiKeys:
    """Digests of the accepted keys by role, and the names keys are known by (a reviewer's name goes
    with each reading). No keys at all: authentication is off."""

    user: tuple[bytes, ...] = ()
    admin: tuple[bytes, ...] = ()
    reviewer: tuple[bytes, ...] = ()
    names: tuple[tuple[bytes, str], ...] = ()

    @property
    def enabled(self) -> bool:
        return bool(self.user or self.admin or self.reviewer)

    def role_of(self, presented: str | None) -> str | None:
        return self.identify(presented)[0]

    def identify(self, presented: str | None) -> tuple[str | None, str | None]:
        """(ADMIN, REVIEWER, USER or None; the key's name). Compares against every key whatever
        matches first. A key without a name is known by its digest's first 8 hex characters."""
        if not presented:
            return None, None
        digest = _digest(presented)
        found = dict.fromkeys(ROLES, False)
        for role in ROLES:
            for known in getattr(self, role):
                found[role] |= hmac.compare_digest(known, digest)
        matched = next((r for r in (ADMIN, REVIEWER, USER) if found[r]), None)
        if matched is None:
            return None, None
        name = next((n for known, n in self.names if hmac.compare_digest(known, digest)), None)
        return matched, name or f"key-{digest.hex()[:8]}"


def _checked(keys: Iterable[str], where: str) -> list[str]:
    found = [k for k in keys if k]
    for key in found:
        if len(key) < MIN_KEY_LENGTH:
            raise KeyConfigError(f"{where}: a key of {len(key)} characters (at least {MIN_KEY_LENGTH}; "
                                 "`tumorscope api-key` makes one)")
    return found


def keys_from_env(value: str | None, name: str) -> list[str]:
    """Keys separated by commas or white space in one environment variable."""
    return _checked((value or "").replace(",", " ").split(), f"environment variable {name}")


def keys_from_file(path: Path) -> tuple[dict[str, list[str]], dict[str, str]]:
    """({role: keys}, {key: name}) from lines ``<role> <key> [<name>]``, role user, admin or reviewer."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KeyConfigError(f"serve.auth.keys_file: {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise KeyConfigError(f"serve.auth.keys_file: cannot read {path}: {type(err).__name__}") from None
    found: dict[str, list[str]] = {role: [] for role in ROLES}
    names: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) not in (2, 3) or words[0] not in found:
            raise KeyConfigError(f"{path}, line {number}: expected '<role> <key> [<name>]' with role user, admin "
                                 "or reviewer")
        found[words[0]] += _checked([words[1]], f"{path}, line {number}")
        if len(words) == 3:
            names[words[1]] = words[2]
    return found, names


def load_keys(cfg: Any, base: Path | None = None, environ: Mapping[str, str] | None = None) -> ApiKeys:
    """The keys ``serve.auth`` names (its environment variables and its file, relative to ``base``)."""
    environ = os.environ if environ is None else environ
    keys = {USER: keys_from_env(environ.get(cfg.keys_env), cfg.keys_env),
            ADMIN: keys_from_env(environ.get(cfg.admin_keys_env), cfg.admin_keys_env),
            REVIEWER: keys_from_env(environ.get(cfg.reviewer_keys_env), cfg.reviewer_keys_env)}
    names: dict[str, str] = {}
    if cfg.keys_file:
        path = Path(cfg.keys_file)
        from_file, names = keys_from_file(path if path.is_absolute() or base is None else base / path)
        keys = {role: keys[role] + from_file[role] for role in ROLES}
    return ApiKeys(user=tuple(map(_digest, keys[USER])), admin=tuple(map(_digest, keys[ADMIN])),
                   reviewer=tuple(map(_digest, keys[REVIEWER])),
                   names=tuple((_digest(key), name) for key, name in names.items()))


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key of ``Authorization: Bearer <key>`` or ``X-API-Key: <key>`` (lower-case header names)."""
    authorization = headers.get("authorization", "")
    scheme, _, credentials = authorization.strip().partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return headers.get("x-api-key", "").strip() or None


def is_open(path: str, method: str) -> bool:
    return method == "OPTIONS" or path in OPEN_PATHS or path.startswith(OPEN_PREFIXES) or path == "/ui"


class ApiKeyAuth:
    """ASGI middleware: 401 without a valid key, 403 for a user key on an admin route; a JSON body
    ``{"error", "status"}`` like every other refusal of the service."""

    def __init__(self, app: Any, keys: ApiKeys):
        self.app, self.keys = app, keys

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") == "http" and not self.keys.enabled and scope.get("path") in REVIEW_PATHS:
            # Readings are labels the model will learn from: never taken from whoever can reach the port.
            await _refuse(scope, receive, send, 403, f"{scope.get('path')} needs API keys: set a reviewer key "
                                                     "(serve.auth, docs/serving.md#api-keys)")
            return
        if (not self.keys.enabled or scope.get("type") != "http"
                or is_open(scope.get("path", ""), scope.get("method", ""))):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        presented = presented_key(headers)
        role, name = self.keys.identify(presented)
        path = scope.get("path")
        if role is None:
            await _refuse(scope, receive, send, 401, "invalid API key" if presented is not None else
                          "missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'")
        elif role != ADMIN and path in ADMIN_PATHS:
            await _refuse(scope, receive, send, 403, f"{path} needs an admin key")
        elif role not in (ADMIN, REVIEWER) and path in REVIEW_PATHS:
            await _refuse(scope, receive, send, 403, f"{path} needs a reviewer or admin key")
        else:
            scope.setdefault("state", {})[CALLER_STATE] = {"role": role, "name": name}
            await self.app(scope, receive, send)


async def _refuse(scope: dict, receive: Any, send: Any, status: int, message: str) -> None:
    from starlette.responses import JSONResponse

    # The body is not read: the connection closes, so a large upload is not read to no purpose.
    headers = {"connection": "close"}
    if status == 401:
        headers["www-authenticate"] = 'Bearer realm="tumorscope"'
    await JSONResponse({"error": message, "status": status}, status_code=status, headers=headers)(scope, receive, send)


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or "localhost": reachable from this machine only."""
    import ipaddress

    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: whatever it resolves to, it is meant for others


def served_host(argv: Sequence[str], default: str) -> str | None:
    """The address ``bentoml serve`` binds (``--host X`` / ``--host=X``, else ``default``, BentoML's
    configured host); None when this process is not ``bentoml serve`` (a worker it started, a test
    importing the module)."""
    if "serve" not in argv[1:]:
        return None
    for index, arg in enumerate(argv):
        if arg == "--host" and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith("--host="):
            return arg.split("=", 1)[1]
    return default


def check_exposure(host: str | None, keys: ApiKeys, cfg: Any) -> None:
    """Refuse to serve without API keys on an address others can reach, unless ``serve.auth`` (``cfg``)
    says ``anonymous: true``."""
    if host is None or keys.enabled or cfg.anonymous or is_loopback(host):
        return
    raise UserError(f"the service would answer anyone who can reach {host} without an API key: set "
                    f"${cfg.keys_env} (or serve.auth.keys_file), bind --host 127.0.0.1, or set "
                    "serve.auth.anonymous: true to allow it")
