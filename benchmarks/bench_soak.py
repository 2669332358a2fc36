"""A long soak of the Bento service (benchmarks/soak.py): concurrent clients for a fixed time mixing
valid slices, malformed uploads, explanations, batches of 4 and reloads, on loopback only.

Prints, measured in one run: requests served, classify p50/p99, answers by status, answers >= 500
(goal 0), valid requests answered differently from before the soak (goal 0), malformed uploads not
refused with a 4xx (goal 0), and the service's resident memory (the `bentoml serve` process and its
workers) after a warm-up and at the end (goal: growth under 50 MB). Serves the registry's
serve.model (the champion after `make run`) on the test split's slices.

Usage: uv run python benchmarks/bench_soak.py [--seconds 300] [--clients 8] [--params params.yaml]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serving import REPO, bento_command, free_port, server, test_split_files  # noqa: E402
from soak import run_soak  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=300)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()

    from tumorscope.config import load_params

    params = load_params(REPO / args.params)
    files = dict(test_split_files(params)[:32])
    logs = REPO / "benchmarks" / ".logs"
    logs.mkdir(exist_ok=True)
    # The soak's inference log is not the project's: the same params with the log under benchmarks/.logs.
    soak_params = yaml.safe_load((REPO / args.params).read_text())
    soak_params["serve"]["inference_log"] = str(logs / "soak-inference.jsonl")
    soak_params.setdefault("review", {})["queue_dir"] = str(logs / "soak-review")
    (logs / "soak-params.yaml").write_text(yaml.safe_dump(soak_params))
    env = os.environ | {"TUMORSCOPE_PARAMS": str(logs / "soak-params.yaml"), "BENTOML_DO_NOT_TRACK": "true"}
    port, started = free_port(), []
    with server(bento_command(port), port, env, logs / "soak.log", started) as url:
        report = run_soak(url, files, args.seconds, args.clients, server_pid=started[0].pid)
    print(report.summary())
    growth = report.rss_end_mb - report.rss_start_mb if report.rss_start_mb and report.rss_end_mb else float("nan")
    late = report.second_half_growth_mb()
    print("memory (s, MB): " + ", ".join(f"{t:.0f}: {mb:.0f}" for t, mb in report.rss_samples))
    print(f"goals: >= 500 answers 0 ({len(report.server_errors)}; {report.shed} more shed under load and retried), "
          f"wrong answers 0 ({len(report.wrong_answers)}), memory growth < 50 MB ({growth:+.0f} MB over the run, "
          f"{late if late is not None else float('nan'):+.0f} MB over its second half)")


if __name__ == "__main__":
    from tumorscope.errors import UserError

    try:
        main()
    except UserError as err:
        raise SystemExit(f"error: {err} (bench_soak serves the champion: run make run first)") from None
