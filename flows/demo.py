"""`make demo`: the story on the default phantom, with every component real and started here.

After `dvc repro` (make demo runs it first; a no-op when the workspace is up to date) the champion
is served by BentoML (with API keys: a user, a reviewer and an admin), new patients from the
training scanner are classified (the inference log records them) and judged "no drift"; then a
batch from another scanner arrives and is judged "drift". The service has queued the answers it
referred, and a sample of the others; a simulated radiologist (the demo only: it knows the phantom's
truth) reads them through the review API, and the champion's accuracy on the readings is checked.
The monitoring flow, on a Prefect server started here, alerts, harvests the readings and starts the
experiment deployment with them added to the data: `dvc exp run` on old + new with the champion's
tuned configuration (no new study), listed by `dvc exp show`; its promotion gates decide, and the
service reloads whatever is champion afterwards. A workspace that was clean before the experiment is put back as it was
(`dvc exp apply <name>` brings the experiment back). Everything else the demo writes, except the
MLflow registry and Optuna study (the gates decide in the real registry, so a promoted model
stays champion: `tumorscope rollback` undoes it), is under .demo/; everything it started is
stopped at the end, also on Ctrl-C or an error.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

from tumorscope.config import merge
from tumorscope.runtime import free_port

DEMO = Path(".demo")
BIN = Path(sys.executable).parent


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def wait_http(url: str, process: subprocess.Popen, seconds: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"demo: {what} exited ({process.returncode}); see {log}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise SystemExit(f"demo: {what} not ready after {seconds:.0f} s; see {log}")


def start(command: list[str], log: Path, env: dict, cwd: Path | None = None) -> subprocess.Popen:
    with log.open("wb") as out:  # its own session: stopped with every worker process it started
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def classify_folder(url: str, folder: Path, key: str, batch: int = 32) -> dict[str, int]:
    """POST every slice of ``folder`` to /classify_batch; returns predicted-class counts."""
    import httpx

    files = sorted(folder.rglob("*.png"))
    counts: dict[str, int] = {}
    with httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {key}"}) as client:
        for start_at in range(0, len(files), batch):
            chunk = files[start_at:start_at + batch]
            upload = [("files", (p.name, p.read_bytes(), "image/png")) for p in chunk]
            response = client.post("/classify_batch", files=upload)
            for wait in (2, 5, 10):  # 503: the batching dispatcher shed load (a busy machine); a client retries
                if response.status_code != 503:
                    break
                time.sleep(wait)
                response = client.post("/classify_batch", files=upload)
            response.raise_for_status()
            for item in response.json()["results"]:
                counts[item["class"]] = counts.get(item["class"], 0) + 1
    return counts


def read_queue_as_a_radiologist(url: str, key: str, truth: dict[str, str]) -> dict[str, int]:
    """The demo's stand-in for a radiologist: every pending item read through the review API with
    the phantom's true class (``truth``: item id -> class). Returns counts of agreeing and
    correcting readings."""
    import httpx

    counts = {"agreed": 0, "corrected": 0, "unknown": 0}
    with httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {key}"}) as client:
        for item in client.post("/review_queue", json={"status": "pending", "limit": 10_000}).json()["items"]:
            label = truth.get(item["item"])
            if label is None:
                counts["unknown"] += 1
                continue
            client.post("/review_label", json={"item": item["item"], "label": label}).raise_for_status()
            counts["agreed" if label == item["model_class"] else "corrected"] += 1
    return counts


def phantom_truth(*folders: Path) -> dict[str, str]:
    """Review item id -> class of every slice in class-per-folder phantom batches."""
    import numpy as np
    from PIL import Image

    from tumorscope.review.queue import item_id

    return {item_id(np.asarray(Image.open(path).convert("L"))): path.parent.name
            for folder in folders for path in folder.rglob("*.png")}


def wait_for_log(path: Path, lines: int, seconds: float = 30.0) -> None:
    """The service writes its log from a background thread: wait until the answers are on disk."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.is_file() and sum(1 for _ in path.open("rb")) >= lines:
            return
        time.sleep(0.5)
    raise SystemExit(f"demo: {path} has fewer than {lines} lines after {seconds:.0f} s")


def demo_params(root: Path, n_shifted: int, keys_file: Path) -> dict:
    """params.yaml with the demo's log, review queue, keys, window and retraining settings; paths
    under .demo/ except the MLflow store, which is the project's own (the gates decide against its
    champion). The retraining adds the harvested readings to the data."""
    params = yaml.safe_load(Path("params.yaml").read_text())
    store = params["mlflow"]
    if store["tracking_uri"].startswith("sqlite:///") and not store["tracking_uri"].startswith("sqlite:////"):
        store["tracking_uri"] = f"sqlite:///{(Path.cwd() / store['tracking_uri'].removeprefix('sqlite:///')).resolve()}"
    store["artifact_root"] = str(Path(store["artifact_root"]).resolve())
    params["serve"]["inference_log"] = str(root / "inference.jsonl")
    return merge(params, {
        "serve": {"auth": {"keys_file": str(keys_file.resolve())}},
        # Every read item starts the retraining here (a site would wait for review.retrain_after readings).
        "review": {"queue_dir": str(root / "review"), "retrain_after": 1, "report_path": str(root / "review_accuracy.json")},
        "monitor": {"current": str(root / "inference.jsonl"), "window": n_shifted,
                    "summary_path": str(root / "monitoring.json"), "report_dir": str(root / "report"),
                    "metrics_path": str(root / "monitoring_metrics.json"),  # not the DVC stage's (tracked) file
                    "retrain": {"deployment": "tumorscope-experiment/train", "wait_seconds": 1800}}})


def git_status() -> str:
    done = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True)
    return done.stdout if done.returncode == 0 else "not a git repository"


def restore_workspace(batch: Path) -> None:
    """Put a workspace that was clean before the experiment back at HEAD: tracked files, the DVC
    outputs of HEAD's dvc.lock, and only the batch the experiment added (nothing else of data/added)."""
    subprocess.run(["git", "checkout", "-q", "HEAD", "--", "."], check=True)
    shutil.rmtree(batch, ignore_errors=True)
    batch.with_name(batch.name + ".dvc").unlink(missing_ok=True)
    ignore = batch.parent / ".gitignore"
    if ignore.is_file():
        kept = [line for line in ignore.read_text().splitlines() if line.strip("/") != batch.name]
        ignore.write_text("\n".join(kept) + "\n") if kept else ignore.unlink()
    subprocess.run([str(BIN / "dvc"), "checkout", "-q", "--force"], check=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--same", type=int, default=120, help="new patients from the training scanner")
    args = parser.parse_args(argv)
    from tumorscope.api.auth import new_key
    from tumorscope.config import load_params, parse_params
    from tumorscope.data.ingest import batch_folder
    from tumorscope.data.phantom import generate_batch

    if DEMO.exists():
        shutil.rmtree(DEMO)
    DEMO.mkdir()
    base = load_params("params.yaml")
    shifted = Path(base.monitor.phantom_batch.out_dir)
    if not shifted.is_dir():
        raise SystemExit(f"demo: {shifted} not found: run dvc repro first (make demo does)")
    same_batch = base.monitor.phantom_batch.model_copy(update={"scanner": "same", "out_dir": str(DEMO / "same"),
                                                              "n_images": args.same, "seed": 7})
    generate_batch(same_batch, base.phantom)
    n_shifted = sum(1 for _ in shifted.rglob("*.png"))
    keys = {"user": new_key(), "reviewer": new_key(), "admin": new_key()}
    keys_file = DEMO / "service.keys"
    keys_file.write_text(f"user {keys['user']} demo-client\nreviewer {keys['reviewer']} demo-radiologist\n"
                         f"admin {keys['admin']} demo-admin\n")
    params = demo_params(DEMO, n_shifted, keys_file)
    params_path = DEMO / "params.yaml"
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    parse_params(params)
    env = os.environ | {"TUMORSCOPE_PARAMS": str(params_path.resolve()), "PYTHONUNBUFFERED": "1",
                        "PREFECT_HOME": str((DEMO / "prefect").resolve()), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                        "PYTHONPATH": str(Path.cwd())}
    started: list[subprocess.Popen] = []
    try:
        say("1. the champion served by BentoML")
        port = free_port()
        service_log = DEMO / "service.log"
        started.append(start([str(BIN / "bentoml"), "serve", "serving.service:TumorScope", "--host", "127.0.0.1",
                              "--port", str(port)], service_log, env))
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/readyz", started[-1], 300, "the Bento service", service_log)
        import httpx

        user = {"Authorization": f"Bearer {keys['user']}"}
        served = httpx.post(f"{url}/metadata", json={}, headers=user, timeout=30).json()
        print(f"serving {served.get('model_version')} at {url} (clinician page {url}/ui/; keys in {keys_file})")

        say(f"2. {args.same} new patients from the training scanner -> /classify_batch -> inference log")
        print(classify_folder(url, DEMO / "same", keys["user"]))
        wait_for_log(DEMO / "inference.jsonl", args.same)
        from tumorscope.stages.monitoring import run_monitor

        demo = load_params(params_path)
        print(run_monitor(demo.model_copy(update={"monitor": demo.monitor.model_copy(update={"window": args.same})}))[0])

        say(f"3. {n_shifted} slices from another scanner ({shifted}) -> /classify_batch")
        print(classify_folder(url, shifted, keys["user"]))
        wait_for_log(DEMO / "inference.jsonl", args.same + n_shifted)

        say("4. referred answers (and a sample of the others) were queued; a radiologist reads them")
        health = httpx.post(f"{url}/health", json={}, headers=user, timeout=30).json()["review_queue"]
        print(f"queued for review: {health['referred']} referred, {health['sampled']} sampled")
        time.sleep(1)  # the queue's writer thread
        print("readings (the demo's simulated radiologist knows the phantom's truth):",
              read_queue_as_a_radiologist(url, keys["reviewer"], phantom_truth(DEMO / "same", shifted)))
        from tumorscope.stages.review import run_review_accuracy

        print(run_review_accuracy(load_params(params_path))[0])

        say("5. the monitoring flow on a Prefect server: drift and readings -> alert -> harvest -> "
            "DVC experiment on old + new data (the champion's configuration) -> gates")
        prefect_port = free_port()
        env["PREFECT_API_URL"] = f"http://127.0.0.1:{prefect_port}/api"
        os.environ.update({k: env[k] for k in ("PREFECT_API_URL", "PREFECT_HOME", "PREFECT_SERVER_ANALYTICS_ENABLED")})
        prefect_log = DEMO / "prefect-server.log"
        started.append(start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
                             prefect_log, env))
        wait_http(f"http://127.0.0.1:{prefect_port}/api/health", started[-1], 180, "the Prefect server", prefect_log)
        runner_log = DEMO / "experiment-runner.log"
        # The experiment deployment, served by a process in the project folder (one that `make deploy`
        # puts on a work pool): its runs are `dvc exp run` here.
        started.append(start([sys.executable, "-c", "from flows.experiment import experiment_flow; "
                              "experiment_flow.serve(name='train')"], runner_log, env))
        clean_before = git_status() == ""
        if not clean_before:
            print(f"(the workspace has changes, so the experiment's results will stay in it:\n{git_status()})")
        from flows.experiment import experiment_name
        from flows.monitoring import monitoring_flow

        result = monitoring_flow(params_path=str(params_path))
        print(result["line"])
        print(result["review"]["line"])
        retraining = result.get("retraining") or {}
        print(f"retraining: flow run {retraining.get('flow_run_name')} with {retraining.get('parameters')}: "
              f"{retraining.get('state')}")
        decision = retraining.get("promotion") or {}
        print(decision.get("line", f"no promotion decision ({retraining.get('note', 'see ' + str(runner_log))})"))
        if retraining.get("state") == "COMPLETED":
            # The experiment flow names its DVC experiment after its flow run; its results are in the workspace.
            experiment = experiment_name(retraining["flow_run_name"])
            harvested = Path(retraining.get("harvested") or retraining["parameters"]["add_data"])
            batch = batch_folder(harvested, Path(base.data.added_dir))
            metrics = json.loads(Path(base.evaluate.metrics_path).read_text())
            print(f"DVC experiment {experiment}: test macro-F1 {metrics['macro_f1']:.3f} on {metrics['n_test']} test slices "
                  f"of old + new data (added batch {batch}); `dvc exp show` lists it")
            if clean_before:
                restore_workspace(batch)
                print(f"workspace put back at HEAD; `dvc exp apply {experiment}` brings the experiment back")

        say("6. the service follows the champion alias")
        print(httpx.post(f"{url}/reload", json={}, headers={"Authorization": f"Bearer {keys['admin']}"},
                         timeout=120).json())
    finally:
        if "prefect" in sys.modules:  # send the flow run's last log lines before its server stops
            from prefect.logging.handlers import APILogHandler

            APILogHandler().flush()
        for process in reversed(started):
            stop(process)
    say("where to look")
    print(f"""  drift report       {DEMO / 'report' / 'drift.html'} (open in a browser); verdict {DEMO / 'monitoring.json'}
  review queue       {DEMO / 'review'}; accuracy on readings {DEMO / 'review_accuracy.json'}
  Evidently history  make evidently-ui        -> http://127.0.0.1:8000
  MLflow             make mlflow-ui           -> http://127.0.0.1:5000 (registry: {base.promote.registered_model})
  Prefect runs       PREFECT_HOME=$PWD/.demo/prefect uv run prefect server start -> http://127.0.0.1:4200
  the service        make serve               -> http://127.0.0.1:3000/ui/
  undo a promotion   uv run tumorscope rollback --reason "demo"
Everything the demo started has been stopped.""")


if __name__ == "__main__":
    main()
