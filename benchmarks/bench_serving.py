"""Serving throughput and latency: the Bento service against raw batched prediction and a naive server.

Prints, measured in one run on this machine, for the same model (the registry's serve.model, the
champion after `make run`) and the same slice files (the test split's raw files):
  * in-process, no HTTP: `prepare_bytes` + batched `predict_proba` (images/s), and the batched
    prediction alone on prepared arrays (images/s): the ceiling a server is compared with;
  * the Bento service (`bentoml serve serving.service:TumorScope`, adaptive batching) with N
    concurrent clients posting one slice per `classify` request: requests/s, p50/p99 latency;
  * the naive server (benchmarks/naive_server.py: one request, one Keras `model.predict`) under the
    same load;
  * `classify_batch` with --batch-sizes slices per request (images/s against in-process);
  * the upload guard's multipart parse per request, in process, as a share of a served request's
    time (BentoML parses the body again: the cost of parsing twice);
and the ratios Bento / in-process and Bento / naive. Clients and servers share this machine's cores.

Usage: uv run python benchmarks/bench_serving.py [--clients 8] [--requests 400] [--batch-sizes 16,64]
       [--params params.yaml]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from tumorscope.runtime import apply_cpu_defaults, free_port  # noqa: E402

apply_cpu_defaults()  # before TensorFlow is imported
REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def server(command: list[str], port: int, env: dict, log: Path, started: list | None = None):
    """Start a server, wait for /readyz (up to 180 s), stop it afterwards; its process is appended
    to ``started``."""
    import httpx

    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        if started is not None:
            started.append(process)
        try:
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                if process.poll() is not None:
                    raise SystemExit(f"server exited ({process.returncode}); see {log}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                        break
                time.sleep(0.5)
            else:
                raise SystemExit(f"server not ready after 180 s; see {log}")
            yield f"http://127.0.0.1:{port}"
        finally:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()


def upload(files: list[tuple[str, bytes]], i: int, batch: int | None) -> list[tuple[str, tuple[str, bytes, str]]]:
    """The multipart files of request ``i``: one slice in ``file``, or ``batch`` slices in ``files``."""
    if batch is None:
        name, data = files[i % len(files)]
        return [("file", (name, data, "image/png"))]
    return [("files", (name, data, "image/png")) for name, data in (files[(i * batch + k) % len(files)] for k in range(batch))]


def load(url: str, files: list[tuple[str, bytes]], clients: int, requests: int, batch: int | None = None) -> dict:
    """`requests` calls from `clients` threads, each with its own connection: `classify`, or
    `classify_batch` with `batch` slices per request."""
    import httpx

    route = "/classify" if batch is None else "/classify_batch"

    shed = []

    def worker(index: int) -> list[float]:
        latencies = []
        with httpx.Client(timeout=300) as client:
            for i in range(index, requests, clients):
                started = time.perf_counter()
                for attempt in range(1, 6):  # the dispatcher sheds load it cannot finish in time: retry, count it
                    response = client.post(f"{url}{route}", files=upload(files, i, batch))
                    if response.status_code != 503 or attempt == 5:
                        break
                    shed.append(1)
                    time.sleep(0.2 * attempt)
                latencies.append(time.perf_counter() - started)
                if response.status_code != 200:
                    raise SystemExit(f"{url}: HTTP {response.status_code}: {response.text[:200]}")
        return latencies

    for i in range(clients):  # warm-up: graph tracing, connections
        httpx.post(f"{url}{route}", files=upload(files, i, batch), timeout=300)
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = [t for part in pool.map(worker, range(clients)) for t in part]
    seconds = time.perf_counter() - started
    return {"requests_per_s": requests / seconds, "images_per_s": requests * (batch or 1) / seconds, "shed": len(shed),
            "p50_ms": 1000 * statistics.median(latencies), "p99_ms": 1000 * float(np.percentile(latencies, 99))}


def guard_parse_ms(files: list[tuple[str, bytes]], batch: int | None, repeats: int = 200) -> float:
    """Milliseconds the upload guard spends parsing one request's multipart body (the parse that
    BentoML then repeats), in this process: its share of a served request is the cost of parsing twice."""
    import asyncio

    import httpx
    from starlette.datastructures import Headers

    from tumorscope.api.upload_guard import _parse_multipart

    request = httpx.Request("POST", "http://x/classify", files=upload(files, 0, batch))
    body = request.read()
    headers = Headers(headers={"content-type": request.headers["content-type"]})

    async def parse_many() -> float:
        started = time.perf_counter()
        for _ in range(repeats):
            form = await _parse_multipart(headers, body)
            await form.close()
        return (time.perf_counter() - started) / repeats

    return 1000 * asyncio.run(parse_many())


def in_process(params, files: list[tuple[str, bytes]], batch: int, repeats: int) -> dict:
    from tumorscope import registry, tracking
    from tumorscope.inference import prepare_bytes, stack

    tracking.configure(params.mlflow)
    model = registry.load_model(params.promote.registered_model, params.serve.model)
    prepared = stack([prepare_bytes(data, Path(name).suffix, model.spec) for name, data in files], model.image_size)
    model.predict_proba(prepared[:batch], batch)  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        model.predict_proba(prepared, batch)
    predict_only = repeats * len(files) / (time.perf_counter() - started)
    started = time.perf_counter()
    for _ in range(repeats):
        model.predict_proba(stack([prepare_bytes(d, Path(n).suffix, model.spec) for n, d in files], model.image_size), batch)
    with_decoding = repeats * len(files) / (time.perf_counter() - started)
    return {"model_version": model.version, "predict_images_per_s": predict_only, "decode_predict_images_per_s": with_decoding}


def test_split_files(params) -> list[tuple[str, bytes]]:
    """(name, bytes) of the test split's raw files: what the service is sent."""
    from tumorscope.data.split import read_split_table

    table = read_split_table(str(REPO / params.split.path))
    return [(p.name, p.read_bytes()) for p in (REPO / q for q in table.loc[table["split"] == "test", "path"])]


def bento_command(port: int) -> list[str]:
    return [sys.executable, "-m", "bentoml", "serve", "serving.service:TumorScope", "--host", "127.0.0.1", "--port", str(port)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--batch-sizes", default="16,64", help="classify_batch sizes to measure (comma-separated)")
    args = parser.parse_args()

    from tumorscope.config import load_params

    params = load_params(REPO / args.params)
    files = test_split_files(params)
    print(f"{len(files)} test-split slices, {args.clients} clients, {args.requests} requests per server, "
          f"{os.cpu_count()} CPU cores shared by clients and servers")

    base = in_process(params, files, params.serve.max_batch_size, repeats=3)
    print(f"in-process ({base['model_version']}): batched predict {base['predict_images_per_s']:.0f} img/s; "
          f"decode + predict {base['decode_predict_images_per_s']:.0f} img/s")

    env = os.environ | {"TUMORSCOPE_PARAMS": str(REPO / args.params), "BENTOML_DO_NOT_TRACK": "true"}
    logs = REPO / "benchmarks" / ".logs"
    logs.mkdir(exist_ok=True)
    port = free_port()
    batches = [int(b) for b in args.batch_sizes.split(",") if b]
    with server(bento_command(port), port, env, logs / "bento.log") as url:
        bento = load(url, files, args.clients, args.requests)
        batched = {b: load(url, files, min(args.clients, 4), max(8, args.requests // b), b) for b in batches}
    port = free_port()
    naive_cmd = [sys.executable, "-m", "uvicorn", "--app-dir", "benchmarks", "naive_server:app", "--host", "127.0.0.1",
                 "--port", str(port), "--log-level", "warning"]
    with server(naive_cmd, port, env, logs / "naive.log") as url:
        naive = load(url, files, args.clients, args.requests)
    for name, row in (("bento (adaptive batching)", bento), ("naive (one predict per request)", naive)):
        print(f"{name}: {row['requests_per_s']:.0f} req/s, p50 {row['p50_ms']:.0f} ms, p99 {row['p99_ms']:.0f} ms "
              f"({row['shed']} shed as overloaded and retried)")
    print(f"ratio bento / in-process decode+predict: {bento['requests_per_s'] / base['decode_predict_images_per_s']:.2f}; "
          f"bento / in-process predict alone: {bento['requests_per_s'] / base['predict_images_per_s']:.2f}; "
          f"bento / naive: {bento['requests_per_s'] / naive['requests_per_s']:.1f}x")
    for b, row in batched.items():
        print(f"bento classify_batch of {b}: {row['images_per_s']:.0f} img/s ({row['requests_per_s']:.1f} req/s, "
              f"p50 {row['p50_ms']:.0f} ms); ratio to in-process decode+predict: "
              f"{row['images_per_s'] / base['decode_predict_images_per_s']:.2f}")
    for b in (None, *batches):
        parse = guard_parse_ms(files, b)
        served_ms = 1000 / (bento["requests_per_s"] if b is None else batched[b]["requests_per_s"])
        print(f"upload guard's multipart parse, {'classify' if b is None else f'classify_batch of {b}'}: {parse:.2f} ms "
              f"per request, {100 * parse / served_ms:.1f} % of a served request's time at this load")


if __name__ == "__main__":
    from tumorscope.errors import UserError

    try:
        main()
    except UserError as err:  # no champion yet: say what to run first
        raise SystemExit(f"error: {err} (bench_serving measures the champion: run make run first)") from None
