"""Serving throughput and latency: the Bento service against raw batched prediction and a naive server.

Prints, measured in one run on this machine, for the same model (the registry's serve.model, the
champion after `make run`) and the same slice files (the test split's raw files):
  * in-process, no HTTP: `prepare_bytes` + batched `predict_proba` (images/s), and the batched
    prediction alone on prepared arrays (images/s): the ceiling a server is compared with;
  * the Bento service (`bentoml serve serving.service:TumorScope`, adaptive batching) with N
    concurrent clients posting one slice per `classify` request: requests/s, p50/p99 latency;
  * the naive server (benchmarks/naive_server.py: one request, one Keras `model.predict`) under the
    same load;
and the ratios Bento / in-process and Bento / naive. Clients and servers share this machine's cores.

Usage: uv run python benchmarks/bench_serving.py [--clients 8] [--requests 400] [--params params.yaml]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(command: list[str], port: int, env: dict, log: Path):
    """Start a server, wait for /readyz (up to 180 s), stop it afterwards."""
    import httpx

    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
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


def load(url: str, files: list[tuple[str, bytes]], clients: int, requests: int) -> dict:
    """`requests` classify calls from `clients` threads, each with its own connection."""
    import httpx

    def worker(index: int) -> list[float]:
        latencies = []
        with httpx.Client(timeout=120) as client:
            for i in range(index, requests, clients):
                name, data = files[i % len(files)]
                started = time.perf_counter()
                response = client.post(f"{url}/classify", files={"file": (name, data, "image/png")})
                latencies.append(time.perf_counter() - started)
                if response.status_code != 200:
                    raise SystemExit(f"{url}: HTTP {response.status_code}: {response.text[:200]}")
        return latencies

    for name, data in files[:clients]:  # warm-up: graph tracing, connections
        httpx.post(f"{url}/classify", files={"file": (name, data, "image/png")}, timeout=120)
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = [t for part in pool.map(worker, range(clients)) for t in part]
    seconds = time.perf_counter() - started
    return {"requests_per_s": requests / seconds, "p50_ms": 1000 * statistics.median(latencies),
            "p99_ms": 1000 * float(np.percentile(latencies, 99))}


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
    with server(bento_command(port), port, env, logs / "bento.log") as url:
        bento = load(url, files, args.clients, args.requests)
    port = free_port()
    naive_cmd = [sys.executable, "-m", "uvicorn", "--app-dir", "benchmarks", "naive_server:app", "--host", "127.0.0.1",
                 "--port", str(port), "--log-level", "warning"]
    with server(naive_cmd, port, env, logs / "naive.log") as url:
        naive = load(url, files, args.clients, args.requests)
    for name, row in (("bento (adaptive batching)", bento), ("naive (one predict per request)", naive)):
        print(f"{name}: {row['requests_per_s']:.0f} req/s, p50 {row['p50_ms']:.0f} ms, p99 {row['p99_ms']:.0f} ms")
    print(f"ratio bento / in-process decode+predict: {bento['requests_per_s'] / base['decode_predict_images_per_s']:.2f}; "
          f"bento / in-process predict alone: {bento['requests_per_s'] / base['predict_images_per_s']:.2f}; "
          f"bento / naive: {bento['requests_per_s'] / naive['requests_per_s']:.1f}x")


if __name__ == "__main__":
    from tumorscope.errors import UserError

    try:
        main()
    except UserError as err:  # no champion yet: say what to run first
        raise SystemExit(f"error: {err} (bench_serving measures the champion: run make run first)") from None
