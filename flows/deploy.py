"""Deploy the training experiment to a Prefect work pool: `uv run python -m flows.deploy`.

With PREFECT_API_URL pointing at a Prefect server, this creates the process work pool (once;
`--pool`, default `tumorscope`) and registers deployment `tumorscope-experiment/train`, whose runs
execute `dvc exp run` in this project folder with the run's parameters. Workers run them:

    prefect worker start --pool tumorscope

A run is triggered from the UI or with
`prefect deployment run tumorscope-experiment/train -p n_trials=4 --watch`. The pool and the
deployment run one flow at a time, since every run writes this folder's outputs (DVC's lock would
refuse a second writer anyway); more machines means more project clones, each with its own worker
and pool. `--serve` skips the pool: this process itself runs the flow runs (one-process use).
Kept apart from the flow code (PrefectHQ examples): importing the flow registers nothing.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import cast

from prefect import Flow
from prefect.deployments.runner import RunnerDeployment

from flows.training import experiment_flow

DEPLOYMENT = "train"
ENTRYPOINT = "flows/training.py:experiment_flow"
DESCRIPTION = ("dvc exp run of the whole pipeline (data -> Optuna tune -> train best -> evaluate); parameters "
               "override params.yaml for this run: architectures, n_trials, data_source, workers, name.")


def ensure_work_pool(name: str) -> None:
    """A process work pool that runs one flow at a time (created if missing, left as is if present)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(
                name=name, type="process", concurrency_limit=1,
                base_job_template=ProcessWorker.get_default_base_job_template()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", default="tumorscope", help="process work pool (created if missing)")
    parser.add_argument("--params", default="params.yaml", help="params file the runs start from")
    parser.add_argument("--cron", default=None, help="optional schedule, e.g. '0 3 * * 0' (weekly retraining)")
    parser.add_argument("--serve", action="store_true", help="no pool: run the flow runs in this process")
    args = parser.parse_args(argv)
    options = dict(name=DEPLOYMENT, parameters={"params_path": args.params}, cron=args.cron,
                   tags=["tumorscope", "training"], description=DESCRIPTION)
    if args.serve:
        experiment_flow.serve(**options)
        return
    ensure_work_pool(args.pool)
    # from_source is sync-compatible (typed as "a flow or a coroutine"): called from sync code, a flow.
    source = cast(Flow, experiment_flow.from_source(source=str(Path.cwd()), entrypoint=ENTRYPOINT))
    # to_deployment + apply rather than Flow.deploy: with prefect 3.8's server, deploy's check for
    # online workers sends a request the server rejects (422 on workers/filter, "limit": null).
    deployment = cast(RunnerDeployment, source.to_deployment(work_pool_name=args.pool, concurrency_limit=1, **options))
    deployment.apply(work_pool_name=args.pool)
    print(f"deployment tumorscope-experiment/{DEPLOYMENT} -> work pool {args.pool!r}; "
          f"start a worker: prefect worker start --pool {args.pool}")


if __name__ == "__main__":
    main()
