"""Drift monitoring cost: reading the inference log, the Evidently report, saving it, and the Prefect flow.

Prints, measured in one run on this machine:
  1. for synthetic inference logs of N lines (--sizes, default 1,000, 10,000 and 100,000) in the
     service's record format (`serving.inference_record`: image statistics, probabilities over the
     four classes, an 8-value embedding; made with numpy, no model, no images) against a synthetic
     reference of --reference rows (the columns of `features.feature_frame`), the median seconds of
     (a) `read_log_window` (parses the log only; bytes read are shown against the log's size),
     (b) `drift.compare` (the Evidently report; the numeric test it chose is shown: K-S below 1,000
     rows on either side, Wasserstein at or above) and (c) `drift.save_report` (HTML + JSON), the
     rows/s of reading, each part's time ratio largest N / smallest N, and the t-SNE that Evidently's
     embedding-drift plot runs, timed once on its own (it caps its sample, so compare is sublinear);
  2. when this workspace's registry has a champion (`make run`): `run_monitor` (the monitor stage
     alone) against `monitoring_flow(retrain=False)` run in-process on the same log (written with the
     champion's version), the first flow call (starts Prefect's temporary local server) and later
     ones separately, and the flow's overhead over the stage: against separate stage calls, and
     "paired" against the stage's own seconds inside that flow call. Its outputs, the Evidently workspace,
     a copy of the MLflow store and PREFECT_HOME live in a temporary folder: the project's reports,
     mlflow.db and .prefect are not touched.

Usage: uv run python benchmarks/bench_monitoring.py [--sizes 1000,10000,100000] [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd

from tumorscope.runtime import apply_cpu_defaults  # noqa: E402

apply_cpu_defaults()  # before TensorFlow is imported
REPO = Path(__file__).resolve().parents[1]
CLASSES = ("Cyst", "Normal", "Stone", "Tumor")
EMBEDDING_DIMS = 8


# ---------------------------------------------------------------------------------------------
# Synthetic data in the service's format


def synthetic_columns(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Per-slice features and model answers as the service computes them (float32 values, as the
    model and `pixel_features` give them, so log lines carry floats of the real length)."""
    f32 = np.float32
    mean = rng.normal(60, 10, n).astype(f32)
    std = rng.normal(55, 6, n).astype(f32)
    p1 = np.clip(rng.normal(0, 2, n), 0, None).round().astype(f32)
    p50 = np.clip(rng.normal(30, 15, n), 0, 255).astype(f32)
    p99 = np.clip(rng.normal(228, 8, n), 0, 255).astype(f32)
    logits = rng.normal(0, 1.5, (n, len(CLASSES))) + np.log([3709, 5077, 1377, 2283])
    probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities = (probabilities / probabilities.sum(axis=1, keepdims=True)).astype(f32)
    return {"mean": mean, "std": std, "p1": p1, "p50": p50, "p99": p99, "contrast": (p99 - p1).astype(f32),
            "sharpness": rng.lognormal(8.0, 0.4, n).astype(f32), "noise": rng.normal(4.0, 0.5, n).astype(f32),
            "height": np.full(n, 512.0), "width": np.full(n, 512.0), "bit_depth": np.full(n, 8.0),
            "min": np.zeros(n, f32), "max": np.clip(rng.normal(250, 4, n), 0, 255).round().astype(f32),
            "probabilities": probabilities, "embedding": rng.normal(0, 2, (n, EMBEDDING_DIMS)).astype(f32)}


def reference_frame(n: int, seed: int = 0) -> pd.DataFrame:
    """The reference table as `features.feature_frame` gives it (same columns, same order)."""
    from tumorscope.monitoring.features import IMAGE_FEATURES, embedding_columns

    cols = synthetic_columns(n, np.random.default_rng(seed))
    frame = pd.DataFrame({name: cols[name].astype(np.float64) for name in IMAGE_FEATURES})
    probabilities = cols["probabilities"].astype(np.float64)
    frame["predicted_class"] = np.asarray(CLASSES, dtype=object)[probabilities.argmax(axis=1)]
    frame["confidence"] = probabilities.max(axis=1)
    embeddings = pd.DataFrame(cols["embedding"].astype(np.float64), columns=embedding_columns(EMBEDDING_DIMS))
    return pd.concat([frame, embeddings], axis=1)


def write_log(path: Path, n: int, model_version: str, seed: int, chunk: int = 10_000) -> None:
    """n inference-log lines with the keys of `serving.inference_record` (image: the keys of
    `serving.image_statistics`)."""
    from tumorscope.monitoring.features import IMAGE_FEATURES

    rng = np.random.default_rng(seed)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    pixel_names = ("mean", "std", "p1", "p50", "p99", "sharpness", "noise", "contrast")  # image_features' key order
    assert set(pixel_names) | {"height", "width", "bit_depth"} == set(IMAGE_FEATURES)
    with path.open("w") as out:
        for offset in range(0, n, chunk):
            m = min(chunk, n - offset)
            cols = synthetic_columns(m, rng)
            values = {name: cols[name].tolist() for name in (*pixel_names, "height", "width", "bit_depth", "min", "max")}
            probabilities = cols["probabilities"].tolist()
            embeddings = cols["embedding"].tolist()
            lines = []
            for i in range(m):
                probs = dict(zip(CLASSES, probabilities[i], strict=True))
                best = max(probs, key=probs.__getitem__)
                image = {name: values[name][i] for name in (*pixel_names, "height", "width", "bit_depth", "min", "max")}
                image |= {"original_shape": [512, 512], "model_input_shape": [64, 64], "source_mode": "L",
                          "pixel_spacing_mm": None}
                stamp = (start + timedelta(milliseconds=250 * (offset + i))).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
                lines.append(json.dumps({"timestamp": stamp, "endpoint": "classify", "request_id": rng.bytes(16).hex(),
                                         "model_version": model_version, "predicted_class": best, "probabilities": probs,
                                         "alert": probs["Tumor"] >= 0.5, "image": image, "embedding": embeddings[i],
                                         "sha256": rng.bytes(32).hex()}))
            out.write("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------
# Part 1: read, compare, save


def bytes_read() -> int | None:
    """Bytes this process has read through read() calls so far (Linux /proc/self/io rchar)."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("rchar:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def timed(fn):
    started = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - started


def report_methods(summary: dict) -> str:
    """The stat tests the Evidently report ran, by column kind."""
    methods: dict[str, set[str]] = {"numeric": set(), "class": set()}
    for name, score in (summary.get("features") or {}).items():
        if str(score.get("method", "")).startswith("constant"):
            continue
        methods["class" if name == "predicted_class" else "numeric"].add(str(score["method"]))
    text = f"numeric {'/'.join(sorted(methods['numeric'])) or '-'}, class {'/'.join(sorted(methods['class'])) or '-'}"
    if summary.get("embedding"):
        text += f", embeddings {summary['embedding']['method']}"
    return text


def tsne_seconds(reference: pd.DataFrame, current: pd.DataFrame) -> tuple[int, float]:
    """Seconds of the t-SNE that Evidently's EmbeddingsDrift runs for its plot (legacy
    embeddings_drift.py: up to SAMPLE_CONSTANT rows of each side), on the same inputs."""
    from evidently.legacy.metrics.data_drift.embeddings_drift import SAMPLE_CONSTANT
    from sklearn.manifold import TSNE

    from tumorscope.monitoring.features import embedding_columns

    columns = embedding_columns(EMBEDDING_DIMS)
    sample = pd.concat([reference[columns].sample(min(SAMPLE_CONSTANT, len(reference)), random_state=24),
                        current[columns].sample(min(SAMPLE_CONSTANT, len(current)), random_state=24)])
    _, seconds = timed(lambda: TSNE(n_components=2).fit_transform(sample))
    return len(sample), seconds


def load_text() -> str:
    try:
        return "load average " + " ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "load average n/a"


PARTS = ("read", "compare", "save")


def bench_sizes(sizes: list[int], n_reference: int, repeats: int, tmp: Path) -> None:
    from tumorscope.config import load_params
    from tumorscope.monitoring.drift import DriftSettings, compare, numeric_test, save_report
    from tumorscope.monitoring.windows import read_log_window

    version = "tumorscope-kidney-ct/bench"
    settings = DriftSettings.of(load_params(REPO / "params.yaml").monitor)  # Evidently picks the test by window size
    reference = reference_frame(n_reference)
    print(f"part 1: read + compare + save for synthetic logs; reference {n_reference} rows; median (and min) of {repeats} "
          f"run(s); {os.cpu_count()} CPU cores, {load_text()}")
    compare(reference, reference_frame(200, seed=99), settings)  # imports and first-call set-up outside the timings
    rows = []
    for n in sizes:
        log = tmp / f"inference-{n}.jsonl"
        _, generated = timed(lambda n=n, log=log: write_log(log, n, version, seed=n))
        log_mb = log.stat().st_size / 1e6
        times: dict[str, list[float]] = {part: [] for part in PARTS}
        read_mb = None
        for r in range(repeats):
            before = bytes_read()
            window, seconds = timed(lambda n=n, log=log: read_log_window(log, version, size=n, embedding_dims=EMBEDDING_DIMS))
            after = bytes_read()
            read_mb = (after - before) / 1e6 if before is not None and after is not None else None
            times["read"].append(seconds)
            if len(window.frame) != n or window.left_out:
                raise SystemExit(f"window of {len(window.frame)} rows from {n} lines, left out {dict(window.left_out)}")
            result, seconds = timed(lambda window=window: compare(reference, window.frame, settings))
            times["compare"].append(seconds)
            html, js = tmp / f"drift-{n}-{r}.html", tmp / f"drift-{n}-{r}.json"
            _, seconds = timed(lambda result=result, html=html, js=js: save_report(result.snapshot, html, js))
            times["save"].append(seconds)
        tsne_rows, tsne = tsne_seconds(reference, window.frame)
        test, _ = numeric_test(settings, len(reference), n)
        row = {"n": n, "log_mb": log_mb, "read_mb": read_mb, "generated": generated, "test": test,
               "ran": report_methods(result.summary), "status": result.summary["status"], "tsne": tsne, "tsne_rows": tsne_rows,
               "html_mb": html.stat().st_size / 1e6, "json_mb": js.stat().st_size / 1e6}
        row |= {part: statistics.median(values) for part, values in times.items()}
        row |= {f"{part}_min": min(values) for part, values in times.items()}
        rows.append(row)
        print(f"  {n:>7} rows: log {log_mb:.1f} MB written in {generated:.1f} s; "
              + "; ".join(f"{part} " + ", ".join(f"{t:.2f}" for t in times[part]) + " s" for part in PARTS)
              + f" ({row['status']}); Evidently's t-SNE alone on {tsne_rows} rows: {tsne:.2f} s; {load_text()}", flush=True)
        for path in tmp.glob(f"drift-{n}-*"):
            path.unlink()
        log.unlink()

    print()
    print(f"{'rows':>8} {'log MB':>7} {'read MB':>8} {'read s':>7} {'rows/s':>9} {'compare s':>10} {'(min)':>7} {'t-SNE s':>8} "
          f"{'save s':>7} {'total s':>8} {'html MB':>8} {'json MB':>8}  numeric test: drift.numeric_test / tests in the report")
    for row in rows:
        read_mb = f"{row['read_mb']:.1f}" if row["read_mb"] is not None else "n/a"
        total = sum(row[part] for part in PARTS)
        print(f"{row['n']:>8} {row['log_mb']:>7.1f} {read_mb:>8} {row['read']:>7.2f} {row['n'] / row['read']:>9.0f} "
              f"{row['compare']:>10.2f} {row['compare_min']:>7.2f} {row['tsne']:>8.2f} {row['save']:>7.2f} {total:>8.2f} "
              f"{row['html_mb']:>8.2f} {row['json_mb']:>8.2f}  {row['test']} / {row['ran']}")
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        for kind, suffix in (("median", ""), ("min", "_min")):
            ratios = {part: last[part + suffix] / first[part + suffix] for part in PARTS}
            total = sum(last[p + suffix] for p in PARTS) / sum(first[p + suffix] for p in PARTS)
            print(f"scaling {last['n']:,} / {first['n']:,} rows ({last['n'] / first['n']:.0f}x the rows), {kind}s: "
                  + ", ".join(f"{part} {ratio:.1f}x" for part, ratio in ratios.items()) + f", total {total:.1f}x")
        shares = {p: last[p] / sum(last[q] for q in PARTS) for p in PARTS}
        print(f"at {last['n']:,} rows (medians): " + ", ".join(f"{p} {100 * s:.0f}%" for p, s in shares.items()) + " of the total")
    from evidently.legacy.metrics.data_drift.embeddings_drift import SAMPLE_CONSTANT

    print(f"t-SNE s: Evidently's EmbeddingsDrift plots a t-SNE of at most {SAMPLE_CONSTANT:,} rows per side whatever N, "
          f"timed once on its own (an estimate of its share of compare); {load_text()}")


# ---------------------------------------------------------------------------------------------
# Part 2: the monitoring flow against the stage alone


def find_champion(params):
    try:
        from tumorscope import registry, tracking

        tracking.configure(params.mlflow)
        return registry.load_model(params.promote.registered_model, "champion"), None
    except Exception as err:  # no registry, no champion, an unloadable model: the part is skipped
        return None, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


def sandbox_mlflow(tmp: Path, params) -> tuple[str, str]:
    """A copy of the project's SQLite MLflow store and artifact folder under ``tmp`` (the stage logs
    its scores and report to the champion's run: to the copy, not the project's store)."""
    from tumorscope.tracking import absolute_sqlite_uri

    uri = absolute_sqlite_uri(params.mlflow.tracking_uri)
    if not uri.startswith("sqlite:///"):
        raise SystemExit(f"part 2 copies a SQLite MLflow store; mlflow.tracking_uri is {params.mlflow.tracking_uri!r}")
    database = Path(uri.removeprefix("sqlite:///"))
    artifacts = (REPO / params.mlflow.artifact_root).resolve()
    copy_db, copy_artifacts = tmp / "mlflow.db", tmp / "mlartifacts"
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as source, sqlite3.connect(copy_db) as target:
        source.backup(target)
    shutil.copytree(artifacts, copy_artifacts)
    old, new = str(artifacts), str(copy_artifacts)
    with sqlite3.connect(copy_db) as db:
        tables = [t for (t,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            for column in [c[1] for c in db.execute(f'PRAGMA table_info("{table}")')]:
                db.execute(f'UPDATE "{table}" SET "{column}" = replace("{column}", ?, ?) WHERE instr("{column}", ?) > 0',
                           (old, new, old))
    return f"sqlite:///{copy_db}", new


def bench_flow(args, tmp: Path) -> None:
    import yaml

    from tumorscope.config import load_params

    params = load_params(REPO / args.params)
    champion, why = find_champion(params)
    if champion is None:
        print(f"part 2 (monitoring flow vs stage): skipped: run make run first (no champion in the registry: {why})")
        return
    version = champion.version
    del champion

    raw = yaml.safe_load((REPO / args.params).read_text())
    rows = args.flow_rows or params.monitor.window
    log = tmp / "inference.jsonl"
    write_log(log, rows, version, seed=7)
    tracking_uri, artifact_root = sandbox_mlflow(tmp, params)
    reference_dir = tmp / "reference"
    if (REPO / params.monitor.reference_dir).is_dir():
        shutil.copytree(REPO / params.monitor.reference_dir, reference_dir)
    raw["mlflow"] |= {"tracking_uri": tracking_uri, "artifact_root": artifact_root}
    raw["monitor"] |= {"current": str(log), "summary_path": str(tmp / "out" / "monitoring.json"),
                       "report_dir": str(tmp / "out" / "monitoring"), "reference_dir": str(reference_dir),
                       "workspace": str(tmp / "out" / "workspace")}
    raw["monitor"]["retrain"] = (raw["monitor"].get("retrain") or {}) | {"deployment": None}
    params_path = tmp / "params.yaml"
    params_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    bench_params = load_params(params_path)

    # Prefect state in a temporary home; its temporary local server, not a configured one.
    os.environ["PREFECT_HOME"] = str(tmp / "prefect-home")
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    if os.environ.pop("PREFECT_API_URL", None):
        print("  (PREFECT_API_URL unset for this run: the flow uses a temporary local server)")

    import tumorscope.stages.monitoring as stage_module

    run_monitor = stage_module.run_monitor
    inside: list[float] = []  # seconds of run_monitor within each flow call (the flow's check_drift task)

    def run_monitor_timed(*args, **kwargs):
        started = time.perf_counter()
        try:
            return run_monitor(*args, **kwargs)
        finally:
            inside.append(time.perf_counter() - started)

    def stage():
        return run_monitor(bench_params, current=str(log))

    print(f"\npart 2: monitor stage vs Prefect monitoring flow on a {rows}-line log of {version} "
          f"(monitor.window {params.monitor.window}); {load_text()}")
    print(f"  outputs, a copy of the MLflow store and PREFECT_HOME in {tmp}")
    (line, summary), first_stage = timed(stage)  # creates the Evidently project; TensorFlow came with the champion check
    print(f"  {line}")
    print(f"  first stage call (untimed warm-up, creates the Evidently project): {first_stage:.2f} s")
    if summary.get("n_current") != rows:
        print(f"  note: the window holds {summary.get('n_current')} of {rows} rows (left out: {summary.get('left_out')})")

    started = time.perf_counter()
    from flows.monitoring import monitoring_flow
    imported = time.perf_counter() - started
    print(f"  import flows.monitoring (Prefect): {imported:.2f} s (not in the flow times below)", flush=True)
    # check_drift imports run_monitor when it runs: this wrapper times the stage inside each flow call,
    # so "paired" overhead = that flow call - its own stage, free of the stage's run-to-run noise.
    stage_module.run_monitor = run_monitor_timed

    def flow():
        return monitoring_flow(params_path=str(params_path), retrain=False)

    result, cold_flow = timed(flow)
    cold_inside = inside[-1]
    if result.get("status") != summary["status"]:
        print(f"  note: flow verdict {result.get('status')} differs from the stage's {summary['status']}")
    stage_times, flow_times, paired = [], [], []
    for _ in range(args.flow_repeats):  # alternating, so a change in machine load hits both alike
        stage_times.append(timed(stage)[1])
        flow_times.append(timed(flow)[1])
        paired.append(flow_times[-1] - inside[-1])
    stage_module.run_monitor = run_monitor
    stage_s, warm_flow = statistics.median(stage_times), statistics.median(flow_times)

    def runs(values: list[float]) -> str:
        return ", ".join(f"{v:.2f}" for v in values)

    print(f"  stage alone (run_monitor)      {stage_s:7.2f} s  median of {len(stage_times)} ({runs(stage_times)})")
    print(f"  flow, first call (cold server) {cold_flow:7.2f} s  overhead vs stage alone {cold_flow - stage_s:+.2f} s "
          f"({cold_flow / stage_s:.2f}x); paired: its own stage {cold_inside:.2f} s, overhead {cold_flow - cold_inside:+.2f} s")
    print(f"  flow, later calls (warm)       {warm_flow:7.2f} s  overhead vs stage alone {warm_flow - stage_s:+.2f} s "
          f"({warm_flow / stage_s:.2f}x); median of {len(flow_times)} ({runs(flow_times)}); "
          f"paired overhead median {statistics.median(paired):+.2f} s ({runs(paired)})")
    print(f"  {load_text()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000", help="log lines per window, comma-separated")
    parser.add_argument("--reference", type=int, default=1000, help="reference rows")
    parser.add_argument("--repeats", type=int, default=3, help="runs per size (the median is shown)")
    parser.add_argument("--flow-rows", type=int, default=0, help="log lines for part 2 (0: params' monitor.window)")
    parser.add_argument("--flow-repeats", type=int, default=3, help="warm flow and stage calls in part 2")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--skip-flow", action="store_true", help="part 1 only")
    parser.add_argument("--quick", action="store_true", help="smoke run: sizes 1000,10000, one repetition")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.repeats, args.flow_repeats = "1000,10000", 1, 1
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]

    os.chdir(REPO)  # the params' relative paths (the stored reference, the cache) are relative to the project
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))  # flows/
    tmp = Path(tempfile.mkdtemp(prefix="bench-monitoring-"))
    # Registered before Prefect is imported, so it runs after Prefect's own exit handlers have
    # stopped the temporary server whose database lives in this folder.
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    bench_sizes(sizes, args.reference, args.repeats, tmp)
    if not args.skip_flow:
        (tmp / "flow").mkdir()
        bench_flow(args, tmp / "flow")


if __name__ == "__main__":
    main()
