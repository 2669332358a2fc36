"""Deploy the training experiment and the drift monitor to a Prefect work pool: `uv run python -m flows.deploy`.

With PREFECT_API_URL pointing at a Prefect server, this creates the process work pool (once;
`--pool`, default `tumorscope`) and registers deployment `tumorscope-experiment/train`, whose runs
execute `dvc exp run` in this project folder with the run's parameters. Workers run them:

    prefect worker start --pool tumorscope

A run is triggered from the UI or with
`prefect deployment run tumorscope-experiment/train -p n_trials=4 --watch`. The pool and the
deployment run one flow at a time, since every run writes this folder's outputs (DVC's lock would
refuse a second writer anyway); more machines means more project clones, each with its own worker
and pool. `--serve` skips the pool: this process itself runs the flow runs (one-process use).

It also registers `tumorscope-monitor/drift` (flows/monitoring.py) on an interval schedule
(`--monitor-every`, minutes, default 60; 0 = unscheduled): a drift check of monitor.current that
starts `tumorscope-experiment/train` when it finds drift (monitor.retrain), and
`tumorscope-tune-worker/worker` (flows/tuning.py) on a second process pool (`--tuning-pool`,
default `tumorscope-tuning`, no limit): one Optuna worker per flow run, started by the tuning flow
with tune.fan_out: deployment. Each host that should run trials starts a worker on that pool in
its own clone of the project (`prefect worker start --pool tumorscope-tuning --limit 1`).
Kept apart from the flow code (PrefectHQ examples): importing the flow registers nothing.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, cast

from prefect import Flow
from prefect.deployments.runner import RunnerDeployment

from flows.experiment import experiment_flow
from flows.monitoring import monitoring_flow
from flows.tuning import tune_worker_flow

DEPLOYMENT = "train"
ENTRYPOINT = "flows/experiment.py:experiment_flow"
MONITOR_DEPLOYMENT = "drift"
MONITOR_ENTRYPOINT = "flows/monitoring.py:monitoring_flow"
TUNE_WORKER_DEPLOYMENT = "worker"
TUNE_WORKER_ENTRYPOINT = "flows/tuning.py:tune_worker_flow"
TUNE_WORKER_DESCRIPTION = ("one Optuna worker on the study named by the params (tune.storage, PostgreSQL): trials until "
                           "tune.n_trials are finished; started per worker by tumorscope-tune with tune.fan_out: deployment.")
MONITOR_DESCRIPTION = ("drift of monitor.current (new slices or the inference log) against the champion's reference; "
                       "on drift: alert and start the training deployment (monitor.retrain), the promotion gates decide.")
DESCRIPTION = ("dvc exp run of the whole pipeline (data -> Optuna tune -> train best -> evaluate -> promote); parameters "
               "override params.yaml for this run: architectures, n_trials, data_source, workers, name; "
               "add_data: a labelled folder added to the data first (old + new).")


def ensure_work_pool(name: str, concurrency_limit: int | None = 1) -> None:
    """A process work pool running at most ``concurrency_limit`` flow runs at once (None: no limit);
    created if missing, left as is if present."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(
                name=name, type="process", concurrency_limit=concurrency_limit,
                base_job_template=ProcessWorker.get_default_base_job_template()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", default="tumorscope", help="process work pool (created if missing)")
    parser.add_argument("--tuning-pool", default="tumorscope-tuning",
                        help="process work pool of the tuning workers' flow runs (created if missing, no limit)")
    parser.add_argument("--params", default="params.yaml", help="params file the runs start from")
    parser.add_argument("--cron", default=None, help="optional schedule, e.g. '0 3 * * 0' (weekly retraining)")
    parser.add_argument("--monitor-every", type=float, default=60.0,
                        help="minutes between scheduled drift checks (0: no schedule)")
    parser.add_argument("--serve", action="store_true", help="no pool: run the flow runs in this process")
    args = parser.parse_args(argv)
    options: dict[str, Any] = dict(name=DEPLOYMENT, parameters={"params_path": args.params}, cron=args.cron,
                   tags=["tumorscope", "training"], description=DESCRIPTION)
    monitor_options: dict[str, Any] = dict(name=MONITOR_DEPLOYMENT, parameters={"params_path": args.params},
                           interval=args.monitor_every * 60 if args.monitor_every > 0 else None,
                           tags=["tumorscope", "monitoring"], description=MONITOR_DESCRIPTION)
    worker_options: dict[str, Any] = dict(name=TUNE_WORKER_DEPLOYMENT, parameters={"params_path": args.params},
                                          tags=["tumorscope", "tuning"], description=TUNE_WORKER_DESCRIPTION)
    if args.serve:
        from prefect import serve

        serve(cast(RunnerDeployment, experiment_flow.to_deployment(**options)),
              cast(RunnerDeployment, monitoring_flow.to_deployment(**monitor_options)),
              cast(RunnerDeployment, tune_worker_flow.to_deployment(**worker_options)))
        return
    ensure_work_pool(args.pool)
    ensure_work_pool(args.tuning_pool, concurrency_limit=None)
    # The experiment and the drift check write this folder's outputs: one run at a time. Tuning
    # workers write only to the study and MLflow: as many at once as there are Prefect workers.
    for flow, entrypoint, deployment_options, pool, limit in (
            (experiment_flow, ENTRYPOINT, options, args.pool, 1),
            (monitoring_flow, MONITOR_ENTRYPOINT, monitor_options, args.pool, 1),
            (tune_worker_flow, TUNE_WORKER_ENTRYPOINT, worker_options, args.tuning_pool, None)):
        # from_source is sync-compatible (typed as "a flow or a coroutine"): called from sync code, a flow.
        source = cast(Flow, flow.from_source(source=str(Path.cwd()), entrypoint=entrypoint))
        # to_deployment + apply rather than Flow.deploy: with prefect 3.8's server, deploy's check for
        # online workers sends a request the server rejects (422 on workers/filter, "limit": null).
        deployment = cast(RunnerDeployment, source.to_deployment(work_pool_name=pool, concurrency_limit=limit,
                                                                 **deployment_options))
        deployment.apply(work_pool_name=pool)
        print(f"deployment {flow.name}/{deployment_options['name']} -> work pool {pool!r}")
    print(f"start a worker: prefect worker start --pool {args.pool}")
    print(f"start tuning workers (one per host): prefect worker start --pool {args.tuning_pool} --limit 1")


if __name__ == "__main__":
    main()
