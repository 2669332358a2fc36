"""Tiny copies of the project for the integration tests: params that make a stage take seconds, a
git + DVC repository with this project's pipeline files, and the tools run as a user runs them."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from helpers.paths import BIN, FIXTURE_SLICES, REPO

# dvc repro on 100 phantom slices at 32 px: the pipeline's mechanics, not its accuracy. Six epochs
# on ~70 slices need not learn anything; the constant-prediction guard has its own tests.
TINY = {
    "phantom": {"n_images": 100, "image_size": 64},
    "preprocess": {"image_size": 32},
    "train": {"epochs": 6, "batch_size": 16, "patience": 3},
    "evaluate": {"fail_on_degenerate": False, "bootstrap_samples": 200},
    "tune": {"n_trials": 2, "trial_epochs": 2, "min_critical_recall": 0.0,
             "search_space": {"architecture": ["small_cnn"], "lr": {"low": 0.0005, "high": 0.005, "log": True}}},
    "monitor": {"min_window": 20, "phantom_batch": {"n_images": 40, "other": {"image_size": 48}}},
}


def tiny_project_params(source: Path = FIXTURE_SLICES) -> dict:
    """params.yaml overrides for a seconds-long run on the 32 fixture slices (mechanics, not accuracy)."""
    return {
        "data": {"source": str(source)},
        "validate": {"min_images_per_class": 5},
        "split": {"train": 0.5, "val": 0.25, "test": 0.25},
        "preprocess": {"image_size": 32},
        "train": {"epochs": 2, "batch_size": 8, "patience": 5},
        "evaluate": {"fail_on_degenerate": False, "bootstrap_samples": 200},
        "tune": {"n_trials": 3, "trial_epochs": 2, "min_critical_recall": 0.0, "pruner_warmup_epochs": 1,
                 "heartbeat_seconds": 2,
                 "search_space": {"architecture": ["small_cnn"], "lr": {"low": 0.0005, "high": 0.005, "log": True},
                                  "filters": [8, 16]}},
    }


def deep_update(base: dict, changes: dict) -> dict:
    for key, value in changes.items():
        base[key] = deep_update(base.get(key, {}), value) if isinstance(value, dict) else value
    return base


def tool_env(cwd: Path, **extra: str) -> dict[str, str]:
    """The environment of a tool run in ``cwd``: the environment's scripts on PATH (DVC stages call
    `tumorscope`), Prefect's home in the project unless a server is given."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.setdefault("PREFECT_HOME", str(cwd / ".prefect"))
    return env | extra


def run_tool(args: list[str], cwd: Path, timeout: float = 900, **env: str) -> subprocess.CompletedProcess:
    """Run one of the environment's tools (dvc, prefect, tumorscope) in ``cwd``; it must succeed."""
    result = subprocess.run([str(BIN / args[0]), *args[1:]], cwd=cwd, capture_output=True, text=True,
                            timeout=timeout, env=tool_env(cwd, **env))
    assert result.returncode == 0, f"{args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def git(args: list[str], cwd: Path) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True,
                   capture_output=True)


def make_project(root: Path, changes: dict) -> Path:
    """A fresh git+DVC repository with this project's pipeline files and tweaked params."""
    root.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", "params.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(REPO / name, root / name)
    with open(root / ".gitignore", "a") as ignore:
        ignore.write("/remote/\n")
    for folder in ("expectations", "data/added"):
        shutil.copytree(REPO / folder, root / folder)
    for code in ("src", "flows"):
        shutil.copytree(REPO / code, root / code, ignore=shutil.ignore_patterns("__pycache__"))
    params = deep_update(yaml.safe_load((root / "params.yaml").read_text()), changes)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    run_tool(["dvc", "init", "-q"], root)
    run_tool(["dvc", "remote", "add", "-d", "local", str(root / "remote")], root)
    return root


def prepare_data(root: Path, changes: dict) -> Path:
    """A project folder (no git, no DVC) whose data stages already ran, called as library functions."""
    from helpers.params import params_with
    from tumorscope.config import load_params
    from tumorscope.stages import data as stages

    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(REPO / "expectations", root / "expectations")
    (root / "params.yaml").write_text(yaml.safe_dump(params_with(changes).model_dump(mode="json", by_alias=True)))
    with contextlib.chdir(root):  # the stages read and write relative to the project
        stages.run_data_stages(load_params("params.yaml"))
    return root


# The tiny project of the shared `dvc repro` (tests/integration/conftest.py): gates any model passes,
# so that promote makes a champion and monitor, the deployment and the closed loop have one to judge.
TINY_PROMOTED = deep_update(json.loads(json.dumps(TINY)), {
    "evaluate": {"max_single_class_share": 1.0},
    "promote": {"min_macro_f1_low": 0.0, "min_critical_recall_low": 0.0, "max_ece": 1.0,
                "require_beating_acquisition_baselines": False},
})


def copy_project(project: Path, destination: Path) -> Path:
    """A private copy of a project that ran (git, DVC cache, MLflow and Optuna stores included) with
    a DVC remote of its own; its MLflow runs keep their artefacts where the original logged them."""
    shutil.copytree(project, destination, symlinks=True)
    if (destination / ".dvc").is_dir():  # its own DVC remote, as make_project gave the original
        run_tool(["dvc", "remote", "modify", "local", "url", str(destination / "remote")], destination)
    return destination


def tracked_outputs(project: Path) -> dict[str, bytes]:
    """The files a repeated run must reproduce byte for byte."""
    names = ["metrics.json", "data/split.csv", "reports/leaderboard.json", "reports/leaderboard.md",
             "reports/best_params.json", "reports/split.json", "reports/validation.json", "evaluation/report.json",
             "models/model.keras", "reports/promotion.json", "reports/monitoring.json"]
    docs = project / "reports" / "data_docs"
    names += [p.relative_to(project).as_posix() for p in sorted(docs.rglob("*")) if p.is_file()]
    return {name: (project / name).read_bytes() for name in names}


def monitoring_flow_with_a_worker(project: Path, env: dict[str, str], pool: str, worker_log: Path) -> tuple[str, dict]:
    """`python -m flows.deploy` on ``pool`` (no drift schedule: a check due at once would queue before
    this one), a `prefect worker` polling it, and one run of the monitoring flow on data/incoming,
    whose retraining the worker runs; returns (the deploy command's output, the flow's result)."""
    from helpers.processes import start, stop

    worker = None
    try:
        deployed = subprocess.run([sys.executable, "-m", "flows.deploy", "--pool", pool, "--monitor-every", "0"],
                                  cwd=project, env=env, capture_output=True, text=True, timeout=180)
        assert deployed.returncode == 0, deployed.stdout[-2000:] + deployed.stderr[-2000:]
        worker = start([str(BIN / "prefect"), "worker", "start", "--pool", pool], worker_log, env, cwd=worker_log.parent)
        checked = subprocess.run([sys.executable, "-m", "flows.monitoring", "data/incoming"], cwd=project, env=env,
                                 capture_output=True, text=True, timeout=1000)
        assert checked.returncode == 0, checked.stdout[-3000:] + checked.stderr[-3000:]
    finally:
        stop(worker)
    return deployed.stdout, json.loads(checked.stdout[checked.stdout.index("{\n"):])
