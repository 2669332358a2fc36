"""Fuzzing the served API on loopback: over a thousand malformed requests (random and mutated files,
impossible declared sizes, wrong content types, empty and oversized bodies, broken multipart, broken
HTTP, wrong methods and paths) within a time budget. Not one may get a 5xx, and the server must
answer a valid request exactly as before."""

from __future__ import annotations

import json
import random
import socket
import struct
import time
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest

from helpers import bento as bento_server
from helpers.bento import Served
from helpers.images import phantom_dicom, phantom_pngs, png_bytes
from helpers.paths import FIXTURE_SLICES

# One session Bento server, on one xdist worker (tests/integration/conftest.py).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("bento")]

N_REQUESTS = 1200
MIN_REQUESTS = 1000
BUDGET_S = 120
FILE_ROUTES = {"/classify": "file", "/explain": "file", "/classify_batch": "files"}
JSON_ROUTES = ("/metadata", "/health", "/reload")



@dataclass
class Case:
    kind: str
    method: str = "POST"
    path: str = "/classify"
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    raw: bytes | None = None  # sent as is over a socket (what an HTTP library refuses to send)
    may_drop: bool = False  # the server may close the connection without an answer


# ---------------------------------------------------------------------------------------------
# Building blocks


def multipart(parts: list[tuple[bytes, bytes]], boundary: bytes = b"fuzzboundary", close: bool = True) -> bytes:
    """parts: (raw part headers, content)."""
    body = b"".join(b"--" + boundary + b"\r\n" + head + b"\r\n\r\n" + content + b"\r\n" for head, content in parts)
    return body + (b"--" + boundary + b"--\r\n" if close else b"")


def file_part(field_name: str, filename: str, content: bytes, content_type: str | None) -> tuple[bytes, bytes]:
    head = f'Content-Disposition: form-data; name="{field_name}"; filename="{filename}"'.encode("utf-8", "surrogateescape")
    if content_type is not None:
        head += f"\r\nContent-Type: {content_type}".encode()
    return head, content


def multipart_headers(boundary: str = "fuzzboundary") -> dict[str, str]:
    return {"content-type": f"multipart/form-data; boundary={boundary}"}


def png_with_size(width: int, height: int) -> bytes:
    """A PNG header declaring width x height (valid CRC) followed by a tiny IDAT: a decompression bomb's shape."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def jpeg_with_size(jpeg: bytes, width: int, height: int) -> bytes:
    """The fixture JPEG with its SOF0/SOF2 frame header rewritten to claim another size."""
    data = bytearray(jpeg)
    for marker in (b"\xff\xc0", b"\xff\xc2"):
        at = data.find(marker)
        if at > 0:
            data[at + 5:at + 9] = struct.pack(">HH", height, width)
            break
    return bytes(data)


def mutate(rng: random.Random, data: bytes) -> bytes:
    choice = rng.randrange(6)
    if choice == 0:  # truncated
        return data[: rng.randrange(0, max(1, len(data)))]
    out = bytearray(data)
    if choice == 1:  # bit flips
        for _ in range(rng.randint(1, 40)):
            at = rng.randrange(len(out))
            out[at] ^= 1 << rng.randrange(8)
    elif choice == 2:  # header zeroed
        out[: rng.randint(4, 200)] = bytes(min(len(out), 200))[: rng.randint(4, 200)]
    elif choice == 3:  # random bytes inserted
        at = rng.randrange(len(out))
        out[at:at] = rng.randbytes(rng.randint(1, 500))
    elif choice == 4:  # a slice cut out of the middle
        a = rng.randrange(len(out))
        del out[a:a + rng.randint(1, 2000)]
    else:  # garbage appended
        out += rng.randbytes(rng.randint(1, 3000))
    return bytes(out)


class Corpus:
    def __init__(self):
        jpegs = [p.read_bytes() for p in sorted(FIXTURE_SLICES.glob("*/*.jpg"))[:4]]
        rng = np.random.default_rng(0)
        self.jpeg = jpegs[0]
        self.valid = jpegs + list(phantom_pngs(1, 64).values()) + [
            phantom_dicom("Tumor", size=64), phantom_dicom("Cyst", size=64, spacing=None),
            png_bytes(rng.integers(0, 65535, (48, 48), dtype=np.uint16)),
            png_bytes(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8))]
        self.special = [
            png_with_size(100_000, 100_000), png_with_size(0, 10), png_with_size(3, 100_000), png_with_size(20_000, 8),
            jpeg_with_size(self.jpeg, 65_000, 65_000), jpeg_with_size(self.jpeg, 1, 1),
            phantom_dicom(pixels=False), phantom_dicom(pixels=False, spacing=None),
            b"DICM" * 40, bytes(128) + b"DICM" + bytes(400), b"GIF89a" + bytes(20), b"BM" + bytes(60),
            b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"%PDF-1.4\n", b"<svg xmlns='http://www.w3.org/2000/svg'/>",
            png_bytes(np.zeros((5, 5), np.uint8)), png_bytes(np.zeros((16, 300), np.uint8)),
            png_bytes(np.full((64, 64), 7, np.uint8)),
        ]


PART_TYPES = ["image/png", "image/jpeg", "application/dicom", "application/octet-stream", None, "text/plain",
              "application/json", "", "image/", "foo", "image/png; charset=utf-8", "IMAGE/JPEG", "multipart/mixed",
              "video/mp4", "application/x-sh"]
FILENAMES = ["slice.png", "slice.jpg", "scan.dcm", "noext", "", "../../etc/passwd", "a b c.png", "é.png", "x" * 199,
             "x" * 250 + ".png", ".png", "....", "a\\b.png", "%00.png", "CON", "slice.PNG.exe"]
REQUEST_TYPES = ["application/json", "text/plain", "image/png", "application/octet-stream", "",
                 "application/x-www-form-urlencoded", "multipart/form-data", "multipart/form-data; boundary=",
                 "multipart/mixed; boundary=fuzzboundary", "multipart/form-data; boundary=other", "*/*",
                 "application/vnd.bentoml+pickle", "application/vnd.bentoml.arrow"]


# ---------------------------------------------------------------------------------------------
# Case generators, one per kind of malformation


def file_case(rng: random.Random, corpus: Corpus, content: bytes, kind: str) -> Case:
    path = rng.choice(list(FILE_ROUTES))
    field_name = FILE_ROUTES[path]
    parts = [file_part(field_name, rng.choice(FILENAMES), content, rng.choice(PART_TYPES))]
    if path == "/classify_batch" and rng.random() < 0.5:
        parts += [file_part(field_name, rng.choice(FILENAMES), mutate(rng, rng.choice(corpus.valid)),
                            rng.choice(PART_TYPES)) for _ in range(rng.randint(1, 4))]
    if path == "/explain" and rng.random() < 0.3:
        parts.append((b'Content-Disposition: form-data; name="target_class"',
                      rng.choice([b"Tumor", b"Banana", b"", b"123", b"null", rng.randbytes(20)])))
    return Case(kind, path=path, headers=multipart_headers(), body=multipart(parts))


def random_bytes(rng, corpus):
    return file_case(rng, corpus, rng.randbytes(rng.randint(1, 5000)), "random bytes")


def mutated_file(rng, corpus):
    return file_case(rng, corpus, mutate(rng, rng.choice(corpus.valid)), "mutated file")


def impossible_header(rng, corpus):
    return file_case(rng, corpus, rng.choice(corpus.special), "impossible header")


def empty_file(rng, corpus):
    return file_case(rng, corpus, b"", "empty file")


def wrong_request_type(rng, corpus):
    path = rng.choice([*FILE_ROUTES, *JSON_ROUTES])
    content_type = rng.choice(REQUEST_TYPES)
    body = rng.choice([b"", rng.choice(corpus.valid), rng.randbytes(300), b'{"file": "aGVsbG8="}',
                       multipart([file_part("file", "a.png", corpus.jpeg, "image/jpeg")])])
    return Case("wrong content type", path=path, headers={"content-type": content_type} if content_type else {}, body=body)


def empty_body(rng, corpus):
    path = rng.choice([*FILE_ROUTES, *JSON_ROUTES])
    return Case("empty body", path=path, headers=rng.choice([multipart_headers(), {}, {"content-type": "application/json"}]))


def bad_multipart(rng, corpus):
    path = rng.choice(list(FILE_ROUTES))
    field_name = FILE_ROUTES[path]
    good = file_part(field_name, "slice.jpg", corpus.jpeg, "image/jpeg")
    variants = [
        multipart([good], close=False)[: rng.randint(10, 400)],  # cut short
        multipart([good]).replace(b"\r\n", b"\n"),  # bare newlines
        multipart([(b"Content-Disposition: form-data", corpus.jpeg)]),  # no name
        multipart([(b"Garbage header without colon", corpus.jpeg)]),
        multipart([(b"Content-Type: image/png", corpus.jpeg)]),  # no Content-Disposition
        multipart([good], boundary=b"another"),  # boundary mismatch
        multipart([(b'Content-Disposition: form-data; name="' + field_name.encode() + b'"', b"http://127.0.0.1:1/x.png")]),
        multipart([(b'Content-Disposition: form-data; name="' + field_name.encode() + b'"', rng.randbytes(50))]),
        multipart([file_part("unexpected", "a.png", corpus.jpeg, "image/png"), good]),
        multipart([good, good, good]),
        multipart([file_part(field_name, f"{i}.png", b"x", "image/png") for i in range(bento_server.MAX_BATCH_FILES + 3)]),
        multipart([(b'Content-Disposition: form-data; name="' + field_name.encode() + b'"; filename="\xff\xfe.png"',
                    corpus.jpeg)]),
        multipart([(b'Content-Disposition: form-data; name="' + field_name.encode() + b'"; filename="a\x00b.png"',
                    corpus.jpeg)]),
        multipart([(b'Content-Disposition: form-data; name="target_class"; filename="t.bin"', rng.randbytes(30)), good]),
        multipart([(b'Content-Disposition: form-data; name="\x00\xff"', b"1"), good]),
        multipart([(b"Content-Disposition: form-data; name=" + b"a" * 5000, b"1"), good]),
        b"--fuzzboundary\r\n" * rng.randint(1, 200),
        rng.randbytes(rng.randint(1, 4000)),
        multipart([(b'Content-Disposition: form-data; name="' + field_name.encode() + b'"; filename="a.png"\r\n'
                    b"Content-Type: multipart/mixed; boundary=inner", multipart([good], boundary=b"inner"))]),
    ]
    headers = multipart_headers() if rng.random() < 0.9 else {"content-type": "multipart/form-data; boundary=\"fuzzboundary\""}
    return Case("bad multipart", path=path, headers=headers, body=rng.choice(variants))


def wrong_method(rng, corpus):
    return Case("wrong method", method=rng.choice(["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]),
                path=rng.choice([*FILE_ROUTES, *JSON_ROUTES]), body=rng.choice([b"", rng.randbytes(100)]))


def wrong_path(rng, corpus):
    path = rng.choice(["/classify/", "/classify/extra", "//classify", "/Classify", "/../metadata", "/%00", "/predict",
                       "/info", "/explain.json", "/" + "a" * rng.randint(1, 3000), "/classify?file=x",
                       "/" + "".join(rng.choice("abc/%.-_~") for _ in range(rng.randint(1, 60)))])
    return Case("wrong path", method=rng.choice(["POST", "GET"]), path=path, headers=multipart_headers(),
                body=multipart([file_part("file", "a.jpg", corpus.jpeg, "image/jpeg")]))


def oversized(rng, corpus):
    path = rng.choice(list(FILE_ROUTES))
    size = bento_server.MAX_UPLOAD_BYTES + rng.choice([1, 100, 20_000, 40_000, 120_000])
    content = corpus.jpeg + rng.randbytes(max(0, size - len(corpus.jpeg)))
    return Case("oversized", path=path, headers=multipart_headers(),
                body=multipart([file_part(FILE_ROUTES[path], "big.jpg", content, "image/jpeg")]), may_drop=True)


def bad_json(rng, corpus):
    bodies = [rng.randbytes(rng.randint(1, 200)), b"[" * rng.randint(1, 20_000), b'{"a": ' * 500, b"null", b"[]",
              b'"text"', b"1e999999", b'{"nested": {"deep": [1, 2, {"x": NaN}]}}', b'{"a": 1', b"\xff\xfe{}",
              json.dumps({"k" * rng.randint(1, 50): rng.random()}).encode(), b"{}" * 1000]
    return Case("bad JSON", path=rng.choice(JSON_ROUTES), headers={"content-type": "application/json"},
                body=rng.choice(bodies))


def broken_http(rng, corpus):
    """Requests an HTTP library refuses to send: a declared size the body never reaches, broken
    request lines and headers, broken chunked encoding."""
    body = multipart([file_part("file", "a.jpg", corpus.jpeg, "image/jpeg")])
    head = b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=fuzzboundary\r\n"
    raw = rng.choice([
        head + b"Content-Length: " + str(rng.choice([10**6, 10**10, 10**18, 2**63])).encode() + b"\r\n\r\n" + body[:100],
        head + b"Content-Length: -5\r\n\r\n" + body,
        head + b"Content-Length: abc\r\n\r\n" + body,
        head + b"Transfer-Encoding: chunked\r\n\r\nZZZ\r\n" + body[:50] + b"\r\n0\r\n\r\n",
        head + b"Transfer-Encoding: chunked\r\n\r\n" + hex(len(body) + 10**6)[2:].encode() + b"\r\n" + body[:200],
        b"GARBAGE\r\n\r\n",
        b"POST /classify HTTP/9.9\r\n\r\n",
        b"POST /classify HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
        b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nabcde",
        rng.randbytes(rng.randint(1, 500)),
    ])
    return Case("broken HTTP", raw=raw, may_drop=True)


GENERATORS = [random_bytes, mutated_file, impossible_header, empty_file, wrong_request_type, empty_body, bad_multipart,
              wrong_method, wrong_path, oversized, bad_json, broken_http]


def cases(seed: int = 20261125) -> list[Case]:
    rng, corpus = random.Random(seed), Corpus()
    return [GENERATORS[i % len(GENERATORS)](rng, corpus) for i in range(N_REQUESTS)]


# ---------------------------------------------------------------------------------------------
# Sending


def send_raw(served: Served, raw: bytes) -> int | None:
    where = urlsplit(served.url)
    try:
        with socket.create_connection((where.hostname, where.port), timeout=10) as sock:
            sock.sendall(raw)
            sock.shutdown(socket.SHUT_WR)  # nothing more comes: a server waiting for the declared body gives up
            received = b""
            while len(received) < 64 and (chunk := sock.recv(4096)):
                received += chunk
    except OSError:
        return None
    if not received.startswith(b"HTTP/1."):
        return None
    return int(received.split(b" ", 2)[1])


def send(served: Served, client: httpx.Client, case: Case) -> int | None:
    if case.raw is not None:
        return send_raw(served, case.raw)
    try:
        return client.request(case.method, case.path, headers=case.headers, content=case.body).status_code
    except httpx.TransportError:
        return None


def test_fuzzed_requests_never_get_a_5xx_and_the_server_keeps_answering(served):
    valid = {"file": ("slice.jpg", next(FIXTURE_SLICES.glob("Tumor/*.jpg")).read_bytes(), "image/jpeg")}
    with httpx.Client(base_url=served.url, timeout=30) as client:
        before = client.post("/classify", files=valid)
        assert before.status_code == 200, before.text
    todo = cases()
    deadline = time.monotonic() + BUDGET_S
    outcomes: list[tuple[Case, int | None]] = []

    def worker(shard: list[Case]) -> list[tuple[Case, int | None]]:
        done = []
        with httpx.Client(base_url=served.url, timeout=30) as client:
            for case in shard:
                if time.monotonic() > deadline:
                    break
                done.append((case, send(served, client, case)))
        return done

    with ThreadPoolExecutor(4) as pool:
        for shard in pool.map(worker, [todo[i::4] for i in range(4)]):
            outcomes += shard

    by_status = Counter(status for _, status in outcomes)
    by_kind = Counter((case.kind, status) for case, status in outcomes)
    print(f"\nfuzz: {len(outcomes)} requests; by status {dict(sorted(by_status.items(), key=str))}")
    for (kind, status), n in sorted(by_kind.items(), key=str):
        print(f"  {kind:20s} {status}: {n}")
    assert len(outcomes) >= MIN_REQUESTS, f"only {len(outcomes)} requests in {BUDGET_S} s"
    server_errors = [(case.kind, case.path, status) for case, status in outcomes if status is not None and status >= 500]
    assert not server_errors, f"{len(server_errors)} 5xx answers, e.g. {server_errors[:5]}"
    dropped = [case.kind for case, status in outcomes if status is None and not case.may_drop]
    assert not dropped, f"no answer to {Counter(dropped)}"

    with httpx.Client(base_url=served.url, timeout=30) as client:
        after = client.post("/classify", files=valid)
        assert after.status_code == 200, after.text
        assert after.json()["probabilities"] == pytest.approx(before.json()["probabilities"], abs=1e-6)
        assert client.get("/readyz").status_code == 200
        health = client.post("/health").json()
    assert health["status"] == "ok" and health["inference_log"]["ok"]
