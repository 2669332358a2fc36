"""What the trust layer costs a served `classify`: the same model served with and without it.

The champion (serve.model, after `make run`) is logged twice into a scratch MLflow store (this
project's store is not touched): version 1 with its trust state (calibrated probabilities,
prediction set, out-of-distribution check, referral), version 2 without (the network's own
probabilities only). Both are served at once by `bentoml serve` on loopback, and the same test-split
slices are posted to each in alternating rounds (so both see the same machine load), one slice per
`classify` request from N concurrent clients. Prints requests/s and p50/p99 per round and the ratio
of time per request with / without the trust layer (the goal: <= 1.05).

Usage: uv run python benchmarks/bench_serving_trust.py [--clients 8] [--requests 300] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

import yaml

from tumorscope.runtime import apply_cpu_defaults  # noqa: E402

apply_cpu_defaults()  # before TensorFlow is imported
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_serving import bento_command, free_port, load, server, test_split_files  # noqa: E402


def scratch_store(params, root: Path) -> Path:
    """Log the champion with and without its trust state into a store under ``root``; return the
    params file that serves it (``serve.model`` to be set per server)."""
    import mlflow
    import numpy as np

    from tumorscope import registry, tracking
    from tumorscope.config import with_overrides

    tracking.configure(params.mlflow)
    champion = registry.load_model(params.promote.registered_model, params.serve.model)
    if champion.trust is None:
        raise SystemExit(f"{champion.version} has no trust state: retrain it (make run) to measure the trust layer")
    scratch = with_overrides(params, {"mlflow": {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}",
                                                 "artifact_root": str(root / "mlartifacts"), "experiment": "bench"},
                                      # Two servers share the cores: the batching dispatcher's latency estimate
                                      # grows and it sheds requests (503) over serve.max_latency_ms; both
                                      # servers get the same generous limit, so none is shed.
                                      "serve": {"inference_log": str(root / "inference.jsonl"), "max_latency_ms": 10000}})
    tracking.configure(scratch.mlflow)
    example = np.zeros((1, champion.image_size, champion.image_size, 1), np.uint8)
    with mlflow.start_run(run_name="bench-serving-trust") as run:
        for trust in (champion.trust, None):
            uri = registry.log_model(champion.model, champion.spec, example, trust)
            registry.register(scratch.promote.registered_model, uri, run.info.run_id, {})
    print(f"{champion.version} logged into a scratch store: version 1 with its trust state, version 2 without")
    data = scratch.model_dump(mode="json", by_alias=True)
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()

    from tumorscope.config import load_params

    params = load_params(REPO / args.params)
    files = test_split_files(params)
    print(f"{len(files)} test-split slices, {args.clients} clients, {args.requests} requests per round, "
          f"{args.rounds} rounds per server, {os.cpu_count()} CPU cores shared by clients and servers")
    with tempfile.TemporaryDirectory(prefix="bench-trust-") as tmp, ExitStack() as stack:
        root = Path(tmp)
        base = yaml.safe_load(scratch_store(params, root).read_text())
        logs = REPO / "benchmarks" / ".logs"
        logs.mkdir(exist_ok=True)
        urls = {}
        for label, version in (("with trust", "1"), ("without", "2")):
            served = root / f"params-{version}.yaml"
            served.write_text(yaml.safe_dump(base | {"serve": base["serve"] | {"model": version}}))
            port = free_port()
            env = os.environ | {"TUMORSCOPE_PARAMS": str(served), "BENTOML_DO_NOT_TRACK": "true",
                                "BENTOML_HOME": str(root / f"bentoml-{version}")}
            urls[label] = stack.enter_context(server(bento_command(port), port, env, logs / f"bento-trust-{version}.log"))
        rows: dict[str, list[dict]] = {label: [] for label in urls}
        for round_ in range(1, args.rounds + 1):
            for label, url in urls.items():
                row = load(url, files, args.clients, args.requests)
                rows[label].append(row)
                print(f"round {round_} {label}: {row['requests_per_s']:.1f} req/s, p50 {row['p50_ms']:.0f} ms, "
                      f"p99 {row['p99_ms']:.0f} ms")
    rate = {label: statistics.median(r["requests_per_s"] for r in runs) for label, runs in rows.items()}
    p50 = {label: statistics.median(r["p50_ms"] for r in runs) for label, runs in rows.items()}
    print(f"median of rounds: with trust {rate['with trust']:.1f} req/s (p50 {p50['with trust']:.0f} ms), "
          f"without {rate['without']:.1f} req/s (p50 {p50['without']:.0f} ms)")
    print(f"ratio time per request with / without the trust layer: {rate['without'] / rate['with trust']:.3f} "
          f"(p50 latency {p50['with trust'] / p50['without']:.3f}; goal <= 1.05)")


if __name__ == "__main__":
    from tumorscope.errors import UserError

    try:
        main()
    except UserError as err:  # no champion yet: say what to run first
        raise SystemExit(f"error: {err} (bench_serving_trust measures the champion: run make run first)") from None
