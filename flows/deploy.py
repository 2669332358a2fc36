"""Serve the `train` deployment: `uv run python -m flows.deploy` (with PREFECT_API_URL set).

The process registers deployment `tumorscope-train/train` with the Prefect API and runs its flow
runs in place, in the current folder (so params.yaml and its relative paths resolve there). Start
a run from anywhere with `prefect deployment run tumorscope-train/train -p n_trials=4 --watch`.
Kept apart from the flow code (PrefectHQ examples): importing the flow registers nothing.
"""

from __future__ import annotations

import argparse

from flows.training import training_flow

DEPLOYMENT = "train"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="params file the runs read by default")
    parser.add_argument("--cron", default=None, help="optional schedule, e.g. '0 3 * * 0' (weekly retraining)")
    args = parser.parse_args(argv)
    training_flow.serve(
        name=DEPLOYMENT,
        parameters={"params_path": args.params},
        cron=args.cron,
        tags=["tumorscope", "training"],
        description="prepare -> Optuna tune -> train best -> evaluate; parameters: architectures, "
                    "n_trials, data_source, workers (override params.yaml for one run).",
    )


if __name__ == "__main__":
    main()
