"""The DVC stage graph as a Prefect flow: the same tumorscope.pipeline calls, in the same order.

`dvc repro` stays the way to rebuild only what changed; this flow is what a Prefect deployment
triggers (scheduled retraining, a UI button), with retries and a run history in the Prefect UI.
It never forks the logic: each task calls one stage function.
"""

from __future__ import annotations

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from tumorscope import pipeline
from tumorscope.config import load_params

MODEL_STAGES = ("train", "evaluate")


@task(retries=1, retry_delay_seconds=5)
def run_stage(name: str, params_path: str) -> str:
    """One pipeline stage; params re-read per task so a task retried later sees the same file."""
    return getattr(pipeline, f"run_{name}")(load_params(params_path))


@flow(name="tumorscope-pipeline", log_prints=True)
def pipeline_flow(params_path: str = "params.yaml", skip_phantom: bool | None = None) -> list[str]:
    """Run the stages in order; the phantom stage only when data.source is the phantom's folder."""
    params = load_params(params_path)
    if skip_phantom is None:
        skip_phantom = not pipeline.uses_phantom(params)
    summaries = []
    for name in pipeline.DATA_STAGES + MODEL_STAGES:
        if name == "phantom" and skip_phantom:
            continue
        summary = run_stage(name, params_path)
        print(summary)
        summaries.append(summary)
    create_markdown_artifact("\n".join(f"- {s}" for s in summaries), key="tumorscope-pipeline-summary",
                             description="One line per pipeline stage")
    return summaries


if __name__ == "__main__":
    pipeline_flow()
