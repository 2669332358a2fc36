"""API keys without a server: where keys come from, what each role may call, and the ASGI middleware
driven by httpx against a minimal ASGI app (the real server: tests/integration/test_service_auth.py)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from helpers.params import section
from tumorscope.api import auth
from tumorscope.api.auth import ADMIN, USER, ApiKeyAuth, ApiKeys, KeyConfigError, load_keys
from tumorscope.config import AuthConfig
from tumorscope.errors import UserError

USER_KEY = "u" * 20
ADMIN_KEY = "a" * 20


def keys(user=(USER_KEY,), admin=(ADMIN_KEY,)) -> ApiKeys:
    return load_keys(section(AuthConfig), environ={"TUMORSCOPE_API_KEYS": ",".join(user),
                                            "TUMORSCOPE_ADMIN_KEYS": " ".join(admin)})


def test_no_keys_means_authentication_is_off():
    assert not load_keys(section(AuthConfig), environ={}).enabled
    assert not load_keys(section(AuthConfig), environ={"TUMORSCOPE_API_KEYS": " , "}).enabled


def test_roles_of_presented_keys():
    found = keys(user=(USER_KEY, "v" * 30))
    assert found.enabled
    assert found.role_of(USER_KEY) == USER and found.role_of("v" * 30) == USER
    assert found.role_of(ADMIN_KEY) == ADMIN
    for wrong in (None, "", USER_KEY[:-1], USER_KEY + "x", USER_KEY.upper(), ADMIN_KEY + " "):
        assert found.role_of(wrong) is None
    assert USER_KEY.encode() not in repr(found).encode()  # only digests are kept


def test_a_key_in_both_roles_is_admin():
    assert keys(user=(ADMIN_KEY,)).role_of(ADMIN_KEY) == ADMIN


def test_reviewer_keys_carry_a_name_and_never_the_key(tmp_path: Path):
    from tumorscope.api.auth import REVIEWER

    path = tmp_path / "keys.txt"
    path.write_text(f"reviewer {'r' * 24} dr-okafor\nuser {'u' * 20} pacs-bridge\n")
    found = load_keys(section(AuthConfig, keys_file=str(path)), environ={"TUMORSCOPE_REVIEWER_KEYS": "s" * 20})
    assert found.identify("r" * 24) == (REVIEWER, "dr-okafor")
    assert found.identify("u" * 20) == (USER, "pacs-bridge")
    role, name = found.identify("s" * 20)  # from the environment: known by its digest's start
    assert role == REVIEWER and name.startswith("key-") and "s" * 8 not in name
    assert found.identify("x" * 20) == (None, None) and found.enabled


def test_keys_file_lines_and_environment_add_up(tmp_path: Path):
    path = tmp_path / "keys.txt"
    path.write_text(f"# the service's keys\nuser {'f' * 16}   # the PACS bridge\n\nadmin {'g' * 40}\n")
    found = load_keys(section(AuthConfig, keys_file=str(path)), environ={"TUMORSCOPE_API_KEYS": USER_KEY})
    assert found.role_of("f" * 16) == USER and found.role_of(USER_KEY) == USER
    assert found.role_of("g" * 40) == ADMIN


@pytest.mark.parametrize(("text", "words"), [
    ("user\n", "line 1: expected '<role> <key> [<name>]' with role user, admin or reviewer"),
    (f"root {'k' * 20}\n", "line 1: expected"),
    (f"user {'k' * 20} dr smith\n", "line 1: expected"),
    ("\nadmin short-key\n", "line 2: a key of 9 characters (at least 16"),
])
def test_a_malformed_keys_file_is_one_line_without_the_key(tmp_path: Path, text: str, words: str):
    path = tmp_path / "keys.txt"
    path.write_text(text)
    with pytest.raises(KeyConfigError) as caught:
        load_keys(section(AuthConfig, keys_file=str(path)), environ={})
    message = str(caught.value)
    assert words in message and str(path) in message and "\n" not in message
    assert "short-key" not in message and "k" * 20 not in message


def test_a_missing_keys_file_and_a_short_environment_key_are_named(tmp_path: Path):
    with pytest.raises(KeyConfigError, match="serve.auth.keys_file: .*nowhere.txt does not exist"):
        load_keys(section(AuthConfig, keys_file=str(tmp_path / "nowhere.txt")), environ={})
    with pytest.raises(KeyConfigError, match="environment variable TUMORSCOPE_ADMIN_KEYS: a key of 6 characters"):
        load_keys(section(AuthConfig), environ={"TUMORSCOPE_ADMIN_KEYS": "secret"})


def test_new_keys_are_long_and_different():
    made = {auth.new_key() for _ in range(20)}
    assert len(made) == 20 and all(len(k) >= 40 for k in made)


@pytest.mark.parametrize(("headers", "expected"), [
    ({"authorization": f"Bearer {USER_KEY}"}, USER_KEY),
    ({"authorization": f"bearer   {USER_KEY} "}, USER_KEY),
    ({"x-api-key": USER_KEY}, USER_KEY),
    ({"authorization": f"Basic {USER_KEY}"}, None),
    ({"authorization": "Bearer "}, None),
    ({}, None),
])
def test_presented_key(headers, expected):
    assert auth.presented_key(headers) == expected


async def echo_app(scope, receive, send):
    caller = scope.get("state", {}).get(auth.CALLER_STATE)
    body = {"path": scope["path"]} | ({"caller": caller} if caller and scope["path"].startswith("/review") else {})
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": json.dumps(body).encode()})


def request(found: ApiKeys, method: str, path: str, key: str | None = None, header: str = "authorization"):
    import httpx

    headers = {} if key is None else {header: f"Bearer {key}" if header == "authorization" else key}

    async def go():
        app = ApiKeyAuth(echo_app, found)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await client.request(method, path, headers=headers)

    return asyncio.run(go())


@pytest.mark.parametrize("path", ["/classify", "/classify_batch", "/explain", "/metadata", "/health", "/reload",
                                  "/metrics", "/anything"])
def test_every_route_but_probes_and_pages_needs_a_key(path: str):
    found = keys()
    missing = request(found, "POST", path)
    assert missing.status_code == 401 and missing.json() == {
        "error": "missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'", "status": 401}
    assert missing.headers["www-authenticate"].startswith("Bearer")
    wrong = request(found, "POST", path, "w" * 20)
    assert wrong.status_code == 401 and wrong.json()["error"] == "invalid API key" and "w" * 20 not in wrong.text
    assert request(found, "POST", path, ADMIN_KEY).status_code == 200
    user = request(found, "POST", path, USER_KEY, header="x-api-key")
    if path == "/reload":
        assert user.status_code == 403 and user.json() == {"error": "/reload needs an admin key", "status": 403}
    else:
        assert user.status_code == 200 and user.json() == {"path": path}


@pytest.mark.parametrize(("method", "path"), [("GET", "/livez"), ("GET", "/readyz"), ("GET", "/healthz"),
                                              ("GET", "/ui/"), ("GET", "/ui/index.html"), ("GET", "/"),
                                              ("GET", "/docs.json"), ("GET", "/static_content/swagger-ui.css"),
                                              ("OPTIONS", "/classify")])
def test_probes_pages_and_preflights_are_open(method: str, path: str):
    assert request(keys(), method, path).status_code == 200


def test_without_keys_everything_passes():
    for path in ("/classify", "/reload", "/metrics"):
        assert request(ApiKeys(), "POST", path).status_code == 200


def test_user_keys_only_means_nobody_reloads_over_http():
    found = keys(admin=())
    assert request(found, "POST", "/classify", USER_KEY).status_code == 200
    assert request(found, "POST", "/reload", USER_KEY).status_code == 403


@pytest.mark.parametrize(("host", "loopback"), [("127.0.0.1", True), ("127.3.2.1", True), ("::1", True), ("[::1]", True),
                                                ("localhost", True), ("0.0.0.0", False), ("::", False),
                                                ("10.0.0.5", False), ("ct-reader.hospital.example", False)])
def test_only_loopback_addresses_count_as_this_machine(host, loopback):
    from tumorscope.api.auth import is_loopback

    assert is_loopback(host) is loopback


def test_the_served_address_is_read_from_bentoml_serve_only():
    from tumorscope.api.auth import served_host

    assert served_host(["bentoml", "serve", "serving.service:TumorScope", "--host", "10.0.0.5"], "0.0.0.0") == "10.0.0.5"
    assert served_host(["bentoml", "serve", "svc", "--port", "3000", "--host=::1"], "0.0.0.0") == "::1"
    assert served_host(["bentoml", "serve", "svc"], "0.0.0.0") == "0.0.0.0"  # BentoML's default: every interface
    assert served_host(["_bentoml_impl/worker/service.py", "serving.service:TumorScope", "--fd", "3"], "0.0.0.0") is None
    assert served_host(["bentoml", "build"], "0.0.0.0") is None


def test_a_network_address_without_keys_is_refused_unless_anonymous_is_set():
    from tumorscope.api.auth import check_exposure

    none, some = ApiKeys(), load_keys(section(AuthConfig), environ={"TUMORSCOPE_API_KEYS": "k" * 32})
    check_exposure("127.0.0.1", none, section(AuthConfig))
    check_exposure(None, none, section(AuthConfig))  # not the serving process
    check_exposure("0.0.0.0", some, section(AuthConfig))
    check_exposure("0.0.0.0", none, section(AuthConfig, anonymous=True))
    with pytest.raises(UserError, match=r"reach 10\.0\.0\.5 without an API key: set \$TUMORSCOPE_API_KEYS .*"
                                        r"serve\.auth\.anonymous: true"):
        check_exposure("10.0.0.5", none, section(AuthConfig))


@pytest.mark.parametrize("path", ["/review_queue", "/review_item", "/review_label"])
def test_review_routes_need_a_reviewer_or_admin_key_and_are_closed_without_keys(tmp_path: Path, path: str):
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text(f"reviewer {'r' * 24} dr-okafor\nuser {USER_KEY}\nadmin {ADMIN_KEY}\n")
    found = load_keys(section(AuthConfig, keys_file=str(keys_file)), environ={})
    assert request(found, "POST", path).status_code == 401
    user = request(found, "POST", path, USER_KEY)
    assert user.status_code == 403 and user.json()["error"] == f"{path} needs a reviewer or admin key"
    reviewer = request(found, "POST", path, "r" * 24)
    assert reviewer.status_code == 200 and reviewer.json()["caller"] == {"role": "reviewer", "name": "dr-okafor"}
    assert request(found, "POST", path, ADMIN_KEY).json()["caller"]["role"] == "admin"
    assert request(found, "POST", "/classify", "r" * 24).status_code == 200  # a reviewer may classify too
    closed = request(ApiKeys(), "POST", path)  # no keys: everything else is open, readings are not
    assert closed.status_code == 403 and closed.json()["error"].startswith(f"{path} needs API keys")
