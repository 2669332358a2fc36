"""A soak of the running Bento service: concurrent clients for a fixed time, mixing valid slices,
malformed uploads, explanations, batches and reloads, on loopback only.

`run_soak` is shared by the short soak in the test suite (tests/integration/test_service_soak.py)
and the long one in `make bench` (benchmarks/bench_soak.py). Every valid answer is checked against
the answer the service gave for the same file before the soak (the same model, so the same class
and probabilities), every malformed upload must get a 4xx, and nothing may get a 5xx.
"""

from __future__ import annotations

import random
import statistics
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# What each client sends, by weight.
MIX = (("classify", 55), ("malformed", 15), ("explain", 12), ("batch", 10), ("metadata", 5), ("reload", 3))
BATCH_FILES = 4
SAMPLE_EVERY_S = 10.0


def malformed_uploads(good: bytes) -> list[tuple[str, dict]]:
    """(name, httpx request keywords) of uploads the service must refuse with a 4xx."""
    return [("not an image", {"files": {"file": ("notes.png", b"just some text", "image/png")}}),
            ("truncated", {"files": {"file": ("cut.png", good[: len(good) // 3], "image/png")}}),
            ("empty file", {"files": {"file": ("empty.png", b"", "image/png")}}),
            ("wrong content type", {"files": {"file": ("a.png", good, "text/html")}}),
            ("no multipart", {"content": good, "headers": {"content-type": "image/png"}}),
            ("wrong field", {"files": {"image": ("a.png", good, "image/png")}})]


def process_tree_rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` and all its descendants (Linux /proc), in MB."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    total_kb, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kb += int(line.split()[1])
        except OSError:
            continue
        todo.extend(children.get(current, []))
    return total_kb / 1024


@dataclass
class SoakReport:
    seconds: float
    clients: int
    by_action: Counter = field(default_factory=Counter)
    by_status: Counter = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)   # valid classify requests
    wrong_answers: list[str] = field(default_factory=list)    # a valid request answered differently, or refused
    unrefused: list[str] = field(default_factory=list)        # a malformed upload that did not get a 4xx
    server_errors: list[str] = field(default_factory=list)    # any answer >= 500 but load shedding
    shed: int = 0   # 503 with Retry-After: the batching dispatcher refused work it could not finish in time
    rss_start_mb: float | None = None
    rss_end_mb: float | None = None
    rss_samples: list[tuple[float, float]] = field(default_factory=list)   # (seconds, MB) every SAMPLE_EVERY_S

    def second_half_growth_mb(self) -> float | None:
        """Memory growth over the second half of the soak: a leak keeps growing, warm-up does not."""
        half = [mb for t, mb in self.rss_samples if t >= self.seconds / 2]
        return half[-1] - half[0] if len(half) >= 2 else None

    @property
    def requests(self) -> int:
        return sum(self.by_status.values())

    def summary(self) -> str:
        p50 = statistics.median(self.latencies_ms) if self.latencies_ms else float("nan")
        p99 = float(np.percentile(self.latencies_ms, 99)) if self.latencies_ms else float("nan")
        late = self.second_half_growth_mb()
        memory = (f"; service memory {self.rss_start_mb:.0f} -> {self.rss_end_mb:.0f} MB "
                  f"({self.rss_end_mb - self.rss_start_mb:+.0f} MB; second half "
                  f"{'n/a' if late is None else f'{late:+.0f} MB'})" if self.rss_start_mb is not None
                  and self.rss_end_mb is not None else "")
        statuses = ", ".join(f"{status}: {n}" for status, n in sorted(self.by_status.items()))
        return (f"soak: {self.requests} requests in {self.seconds:.0f} s from {self.clients} clients "
                f"({self.requests / self.seconds:.1f} req/s; {dict(sorted(self.by_action.items()))}); "
                f"classify p50 {p50:.0f} ms, p99 {p99:.0f} ms; statuses {{{statuses}}}; "
                f">= 500: {len(self.server_errors)} (besides {self.shed} shed under load: 503 + Retry-After, retried); "
                f"wrong answers: {len(self.wrong_answers)}; "
                f"malformed not refused: {len(self.unrefused)}{memory}")


def expected_answers(url: str, files: dict[str, bytes], headers: dict[str, str]) -> dict[str, dict]:
    """The service's answer for each file before the soak."""
    import httpx

    with httpx.Client(base_url=url, timeout=120, headers=headers) as client:
        return {name: client.post("/classify", files={"file": (name, data, "image/png")}).json()
                for name, data in files.items()}


def _same(answer: dict, expected: dict) -> bool:
    return (answer.get("class") == expected["class"] and answer.get("model_version") == expected["model_version"]
            and all(abs(answer["raw_probabilities"][c] - p) <= 1e-5 for c, p in expected["raw_probabilities"].items()))


def _warm_up(url: str, good: bytes, bad: list[tuple[str, dict]], headers: dict, admin: dict) -> None:
    """One call of each kind before the memory is first measured: the growth reported is the
    soak's, not the first explanation's model building or the first batch's graph tracing."""
    import httpx

    with httpx.Client(base_url=url, timeout=120, headers=headers) as session:
        session.post("/explain", files={"file": ("w.png", good, "image/png")})
        session.post("/classify_batch", files=[("files", ("w.png", good, "image/png"))] * BATCH_FILES)
        for _, request in bad:
            session.post("/classify", **request)
        session.get("/metadata")
        session.post("/reload", json={}, headers=admin)


def run_soak(url: str, files: dict[str, bytes], seconds: float, clients: int, server_pid: int | None = None,
             key: str | None = None, admin_key: str | None = None, seed: int = 0) -> SoakReport:
    """``clients`` threads call the service at ``url`` for ``seconds`` with the MIX of requests."""
    import httpx

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    admin = {"Authorization": f"Bearer {admin_key}"} if admin_key else headers
    expected = expected_answers(url, files, headers)
    names = sorted(files)
    bad = malformed_uploads(files[names[0]])
    _warm_up(url, files[names[0]], bad, headers, admin)
    report = SoakReport(seconds, clients)
    lock = threading.Lock()
    report.rss_start_mb = process_tree_rss_mb(server_pid) if server_pid else None
    deadline = time.monotonic() + seconds

    def note(action: str, status: int, problem: str | None = None, where: list[str] | None = None) -> None:
        with lock:
            report.by_action[action] += 1
            report.by_status[status] += 1
            if status >= 500:
                report.server_errors.append(f"{action}: {status}")
            if problem is not None and where is not None:
                where.append(problem)

    def post(session, path: str, **request):
        """A client that retries what the service shed under load (503 with Retry-After), as a real
        client would; shed answers are counted apart, and the retried request must then be answered."""
        for attempt in range(1, 6):
            response = session.post(path, **request)
            if response.status_code != 503 or "retry-after" not in response.headers or attempt == 5:
                return response
            with lock:
                report.shed += 1
            time.sleep(min(float(response.headers["retry-after"]), 2.0) * attempt / 2)
        return response

    def client(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        actions, weights = zip(*MIX, strict=True)
        with httpx.Client(base_url=url, timeout=120, headers=headers) as session:
            while time.monotonic() < deadline:
                action = rng.choices(actions, weights)[0]
                name = rng.choice(names)
                upload = {"file": (name, files[name], "image/png")}
                if action == "classify":
                    started = time.perf_counter()
                    response = post(session, "/classify", files=upload)
                    elapsed = 1000 * (time.perf_counter() - started)
                    ok = response.status_code == 200 and _same(response.json(), expected[name])
                    with lock:
                        report.latencies_ms.append(elapsed)
                    note(action, response.status_code, None if ok else f"{name}: {response.status_code}",
                         report.wrong_answers)
                elif action == "malformed":
                    what, request = rng.choice(bad)
                    response = post(session, "/classify", **request)
                    refused = 400 <= response.status_code < 500 and "error" in response.json()
                    note(action, response.status_code, None if refused else f"{what}: {response.status_code}",
                         report.unrefused)
                elif action == "explain":
                    response = post(session, "/explain", files=upload)
                    ok = response.status_code == 200 and response.json()["class"] == expected[name]["class"]
                    note(action, response.status_code, None if ok else f"explain {name}: {response.status_code}",
                         report.wrong_answers)
                elif action == "batch":
                    chosen = [rng.choice(names) for _ in range(BATCH_FILES)]
                    response = post(session, "/classify_batch", files=[("files", (n, files[n], "image/png")) for n in chosen])
                    ok = response.status_code == 200 and all(
                        item["ok"] and _same(item, expected[n]) for item, n in zip(response.json()["results"], chosen,
                                                                                    strict=True))
                    note(action, response.status_code, None if ok else f"batch: {response.status_code}",
                         report.wrong_answers)
                elif action == "metadata":
                    response = session.get("/metadata")
                    note(action, response.status_code, None if response.status_code == 200 else "metadata",
                         report.wrong_answers)
                else:  # reload: the alias has not moved, the same model keeps serving
                    response = session.post("/reload", json={}, headers=admin)
                    note(action, response.status_code, None if response.status_code == 200 else
                         f"reload: {response.status_code}", report.wrong_answers)

    started = time.monotonic()

    def sample_memory() -> None:
        while server_pid and time.monotonic() < deadline:
            report.rss_samples.append((time.monotonic() - started, process_tree_rss_mb(server_pid)))
            time.sleep(min(SAMPLE_EVERY_S, max(0.0, deadline - time.monotonic())))

    threads = [threading.Thread(target=client, args=(i,), name=f"soak-{i}") for i in range(clients)]
    threads.append(threading.Thread(target=sample_memory, name="soak-memory"))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    report.seconds = time.monotonic() - started
    report.rss_end_mb = process_tree_rss_mb(server_pid) if server_pid else None
    return report
