"""Tuning: trial overhead, and 2 PostgreSQL-backed worker processes vs 1 on the same study.

Prints, measured in one run on a small phantom (built in a temporary folder):
(1) per trial: wall time of the whole trial vs time inside `model.fit` (the per-epoch validation
    macro-F1 that Optuna's pruner reads is a Keras metric of fit's own validation pass, so it counts
    as training); the overhead fraction 1 - fit/trial (goal < 10%);
(2) with PostgreSQL reachable: wall time for the same number of trials done by 1 worker process
    and by 2 worker processes on one study each, and the speed-up ratio 1-worker / 2-workers.
    Pruning is off so both do the same work.

Usage: uv run python benchmarks/bench_tuning.py [--images 400] [--trials 6] [--epochs 6]
        [--postgres postgresql://root@127.0.0.1:5432/test]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import yaml

from tumorscope.runtime import apply_cpu_defaults  # noqa: E402

apply_cpu_defaults()  # before TensorFlow is imported
REPO = Path(__file__).resolve().parents[1]


def make_project(root: Path, images: int, trials: int, epochs: int) -> dict:
    """Phantom data through the preprocess stage; params for a pruning-free small-CNN study."""
    from tumorscope.config import load_params, merge
    from tumorscope.stages import data as stages

    shutil.copytree(REPO / "expectations", root / "expectations")
    raw = {
        "phantom": {"n_images": images, "image_size": 96},
        "preprocess": {"image_size": 64},
        "train": {"batch_size": 32},
        "evaluate": {"bootstrap_samples": 500},
        "tune": {"n_trials": trials, "trial_epochs": epochs, "pruner": "none", "min_critical_recall": 0.0,
                 "search_space": {"architecture": ["small_cnn"], "lr": {"low": 0.0005, "high": 0.003, "log": True},
                                  "filters": [16, 24], "dropout": {"low": 0.1, "high": 0.4}}},
    }
    space = raw["tune"]["search_space"]  # this space alone, not merged into the project's
    raw = merge(yaml.safe_load((REPO / "params.yaml").read_text()), raw)  # the project's params with these changes
    raw["tune"]["search_space"] = space
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    with contextlib.chdir(root):  # the stages read and write relative to the project
        stages.run_data_stages(load_params("params.yaml"))
    return raw


def trial_overhead(root: Path) -> None:
    from tumorscope.config import load_params
    from tumorscope.tuning.study import load_study, open_study, run_worker

    here = os.getcwd()
    os.chdir(root)
    try:
        params = load_params("params.yaml")
        run_worker(params, open_study(params))
        trials = [t for t in load_study(params).get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    finally:
        os.chdir(here)
    print(f"(1) trial overhead, {len(trials)} trials x {params.tune.trial_epochs} epochs, SQLite storage, "
          f"MLflow SQLite tracking")
    print("    trial  trial_s  fit_s  overhead")
    for t in trials:
        total, fit = t.user_attrs["trial_seconds"], t.user_attrs["fit_seconds"]
        print(f"    {t.number:5d}  {total:7.2f}  {fit:5.2f}  {1 - fit / total:8.1%}")
    total = sum(t.user_attrs["trial_seconds"] for t in trials)
    fit = sum(t.user_attrs["fit_seconds"] for t in trials)
    later = trials[1:]
    later_total = sum(t.user_attrs["trial_seconds"] for t in later)
    later_fit = sum(t.user_attrs["fit_seconds"] for t in later)
    print(f"    overhead fraction, all trials: {1 - fit / total:.1%}; "
          f"excluding the first (one-off graph tracing): {1 - later_fit / later_total:.1%}  (goal < 10%)")
    import resource

    # Trials skip the full garbage collection on CPU (tumorscope.models.devices.fresh_session):
    # the peak memory shows whether that lets memory pile up.
    print(f"    peak resident memory of this process after the trials: "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


def workers_speedup(root: Path, postgres: str) -> None:
    from tumorscope.config import load_params, with_overrides
    from tumorscope.tuning.study import load_study, open_study, stored_study_name

    timings = {}
    for workers in (1, 2):
        name = f"bench-{workers}w-{uuid.uuid4().hex[:6]}"
        params = with_overrides(load_params(root / "params.yaml"), {
            "tune": {"storage": f"{postgres}?options=-csearch_path%3Dtumorscope_bench_optuna", "study_name": name,
                     "workers": workers},
            "mlflow": {"tracking_uri": f"{postgres}?options=-csearch_path%3Dtumorscope_bench_mlflow",
                       "experiment": name}})
        path = root / f"params-{workers}.yaml"
        path.write_text(yaml.safe_dump(params.model_dump(mode="json", by_alias=True)))
        here = os.getcwd()
        os.chdir(root)
        try:
            open_study(params)
            started = time.perf_counter()
            running = [subprocess.Popen([sys.executable, "-m", "tumorscope.cli", "tune-worker", "--params", path.name, "--index", str(i)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                       for i in range(workers)]
            errors = [p.communicate()[1] for p in running]
            timings[workers] = time.perf_counter() - started
            if any(p.returncode for p in running):
                raise SystemExit(f"worker failed: {errors}")
            trials = load_study(params).get_trials(deepcopy=False)
            print(f"    {workers} worker(s): {len(trials)} trials in {timings[workers]:.1f} s "
                  f"({len({t.user_attrs.get('worker') for t in trials})} processes did trials)")
            import optuna

            optuna.delete_study(study_name=stored_study_name(params), storage=params.tune.storage)
        finally:
            os.chdir(here)
    print(f"    speed-up 2 workers vs 1: {timings[1] / timings[2]:.2f}x on {os.cpu_count()} CPU cores "
          "(each worker process also trains on every core)")


def postgres_reachable(url: str) -> bool:
    try:
        import psycopg

        psycopg.connect(url, connect_timeout=3).close()
        return True
    except Exception:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--postgres", default="postgresql://root@127.0.0.1:5432/test")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        make_project(root, args.images, args.trials, args.epochs)
        trial_overhead(root)
        print(f"(2) {args.trials} trials on one PostgreSQL-backed study ({args.postgres})")
        if postgres_reachable(args.postgres):
            workers_speedup(root, args.postgres)
        else:
            print(f"    skipped: PostgreSQL not reachable at {args.postgres}")


if __name__ == "__main__":
    main()
