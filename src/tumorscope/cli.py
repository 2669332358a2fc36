"""`tumorscope <stage>`: a thin Typer CLI over tumorscope.stages (DVC stages call only these).

Heavy libraries (TensorFlow, Great Expectations, MLflow, Prefect) are imported inside the
commands so that `tumorscope --help` answers at once. A user mistake prints one line and exits 1.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="tumorscope: kidney CT slice classification pipeline.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)



@app.callback()
def _before_any_command() -> None:
    """tumorscope: kidney CT slice classification pipeline."""
    # Before any command imports TensorFlow: oneDNN on, its chatter off (tumorscope.runtime).
    from tumorscope.runtime import apply_cpu_defaults

    apply_cpu_defaults()


ParamsOption = Annotated[Path, typer.Option("--params", "-p", help="params.yaml to read")]
DEFAULT_PARAMS = Path("params.yaml")


def _report(work: Callable[[], str]) -> None:
    """Run one command; print its summary, or a user mistake as one red line and exit 1."""
    from tumorscope import dvc_stage

    code = dvc_stage.run_reported(work)
    if code:
        raise typer.Exit(code)


def _params(path: Path):
    from tumorscope.config import load_params

    return load_params(path)


def _stage(name: str, doc: str):
    """`tumorscope <name>`: what the DVC stage of that name runs (tumorscope.dvc_stage)."""
    def command(params: ParamsOption = DEFAULT_PARAMS) -> None:
        from tumorscope import dvc_stage

        _report(lambda: dvc_stage.run_stage(name, params))

    command.__doc__ = doc
    app.command(name)(command)


for _name, _doc in [
    ("phantom", "Generate the synthetic kidney-CT phantom (the embedded default data)."),
    ("ingest", "Copy data.source (class-per-folder, Kaggle layout, PNG/JPEG/DICOM) into data/raw."),
    ("manifest", "Hash, measure and check every raw file; quarantine unreadable ones."),
    ("validate", "Run the Great Expectations suites in expectations/ on the manifest."),
    ("split", "Leakage-aware stratified train/val/test split (duplicate groups kept whole)."),
    ("preprocess", "Resize/enhance into the memory-mapped uint8 cache."),
    ("audit", "Audit the prepared data: slices and series per class by orientation and source, acquisition-only baselines."),
    ("tune", "Run the Optuna study (tune.*) through the Prefect tuning flow; write the leaderboard and best params."),
    ("evaluate", "Test-split metrics, calibration and plots; log them to MLflow."),
    ("promote", "Register the evaluated model (alias challenger); make it champion if it passes the promote.* gates."),
    ("incoming", "Write a labelled batch of new phantom patients (monitor.phantom_batch: same or another scanner)."),
]:
    _stage(_name, _doc)


@app.command("tune-worker")
def tune_worker(params: ParamsOption = DEFAULT_PARAMS,
                index: Annotated[int, typer.Option(help="worker index (seeds its sampler)")] = 0) -> None:
    """Join the study tune.study_name on tune.storage and run trials until it has tune.n_trials, from
    any host that reaches that database and mlflow.tracking_uri (the tuning flow starts these when
    tune.workers > 1)."""
    def work() -> str:
        from tumorscope.stages import tuning

        loaded = _params(params)
        limits = loaded.tune.architecture_concurrency
        guard = None
        if limits:
            from flows.tuning import architecture_guard

            guard = architecture_guard(limits)
        return tuning.run_tune_worker(loaded, index, guard)

    _report(work)


@app.command()
def train(params: ParamsOption = DEFAULT_PARAMS,
          baseline: Annotated[bool, typer.Option(
              "--baseline", help="train params.yaml's train.* untuned, into <train.model_dir>/baseline")] = False) -> None:
    """Train the tuned best configuration (tune.best_params_path over train.*); log run and model to MLflow."""
    from tumorscope import dvc_stage

    _report(lambda: dvc_stage.train(_params(params), baseline=baseline))


@app.command()
def rollback(reason: Annotated[str, typer.Option("--reason", help="why (recorded in MLflow with who and when)")],
             to: Annotated[str | None, typer.Option("--to", help="version to restore (default: the previous champion)")] = None,
             params: ParamsOption = DEFAULT_PARAMS) -> None:
    """Point the registry's champion alias back at the previous champion."""
    from tumorscope.stages import promotion

    _report(lambda: promotion.run_rollback(_params(params), reason, to))


@app.command()
def bento(params: ParamsOption = DEFAULT_PARAMS) -> None:
    """Build a Bento (serving/bentofile.yaml) with the champion inside, tagged with model and data versions."""
    from tumorscope.stages import packaging

    _report(lambda: packaging.run_bento(_params(params)))


@app.command()
def predict(sources: Annotated[list[Path], typer.Argument(help="image files or folders (a folder of class folders is "
                                                                "also scored: external validation)")],
            model: Annotated[str | None, typer.Option(
                "--model", help="registry alias or version, an MLflow models:/ or runs:/ URI, or a model folder "
                                "(default serve.model)")] = None,
            out: Annotated[Path | None, typer.Option("--out", help="CSV to write (default serve.predictions_dir/predictions.csv)")] = None,
            params: ParamsOption = DEFAULT_PARAMS) -> None:
    """Classify slices (PNG/JPEG/DICOM) with the champion: a CSV of class and probabilities per image."""
    from tumorscope.stages import prediction

    _report(lambda: prediction.run_predict(_params(params), sources, model, out))


@app.command()
def monitor(params: ParamsOption = DEFAULT_PARAMS,
            current: Annotated[str | None, typer.Option("--current", help="a folder of new slices or an inference "
                                                        "log (*.jsonl); default monitor.current")] = None) -> None:
    """Drift of a current window against the champion's reference (Evidently report, summary, MLflow)."""
    from tumorscope import dvc_stage

    _report(lambda: dvc_stage.monitor(_params(params), current))


@app.command()
def crossval(params: ParamsOption = DEFAULT_PARAMS) -> None:
    """Grouped k-fold cross-validation of train.* (duplicate groups kept whole); MLflow runs."""
    from tumorscope.stages import crossval as crossval_stage

    _report(lambda: crossval_stage.run_crossval(_params(params)))


@app.command()
def ablate(params: ParamsOption = DEFAULT_PARAMS,
           variant: Annotated[list[str] | None, typer.Option(
               "--variant", help="run only this variant (repeat the option; the baseline always runs)")] = None) -> None:
    """Paired ablation: every ablation.variants entry on the same grouped folds, differences to the
    baseline with group-bootstrap intervals; resumable (reports/ablation.json, .md, .png; MLflow)."""
    from tumorscope.stages import ablation

    _report(lambda: ablation.run_ablate(_params(params), variant))


review_app = typer.Typer(help="The review queue: radiologists' readings of queued answers become labelled data.",
                         no_args_is_help=True)
app.add_typer(review_app, name="review")


@review_app.command("list")
def review_list(params: ParamsOption = DEFAULT_PARAMS,
                status: Annotated[str, typer.Option(help="all | pending | labelled | harvested")] = "pending") -> None:
    """The queued items: id, status, why queued, the model's answer and the reading."""
    from tumorscope.stages import review

    if status not in ("all", "pending", "labelled", "harvested"):
        _report(lambda: _fail(f"--status must be all, pending, labelled or harvested, not {status!r}"))
    _report(lambda: review.run_review_list(_params(params), status))


@review_app.command("label")
def review_label(item: Annotated[str, typer.Argument(help="the item id (tumorscope review list)")],
                 label: Annotated[str, typer.Argument(help="a class of the model, or 'cannot assess'")],
                 reviewer: Annotated[str, typer.Option(help="who read it (recorded with the reading)")],
                 params: ParamsOption = DEFAULT_PARAMS) -> None:
    """Record a reading (a new line in the item's history; the previous reading stays)."""
    from tumorscope.stages import review

    _report(lambda: review.run_review_label(_params(params), item, label, reviewer))


@review_app.command("export")
def review_export(out: Annotated[Path, typer.Argument(help="the Label Studio tasks JSON to write")],
                  params: ParamsOption = DEFAULT_PARAMS) -> None:
    """Pending items as Label Studio tasks (the model's answer as a prediction) and the project's labelling config."""
    from tumorscope.stages import review

    _report(lambda: review.run_review_export(_params(params), out))


@review_app.command("import")
def review_import(export: Annotated[Path, typer.Argument(help="Label Studio's JSON or JSON-MIN export")],
                  params: ParamsOption = DEFAULT_PARAMS) -> None:
    """Apply Label Studio annotations as readings."""
    from tumorscope.stages import review

    _report(lambda: review.run_review_import(_params(params), export))


@review_app.command("harvest")
def review_harvest(params: ParamsOption = DEFAULT_PARAMS,
                   name: Annotated[str | None, typer.Option(help="the batch folder's name")] = None) -> None:
    """Write the read slices as a class-per-folder batch under data.added_dir (duplicates of the data excluded)."""
    from tumorscope.stages import review

    _report(lambda: review.run_review_harvest(_params(params), name))


@review_app.command("accuracy")
def review_accuracy(params: ParamsOption = DEFAULT_PARAMS) -> None:
    """The champion's accuracy on the readings of its queued answers; an alert when its critical-class recall falls."""
    from tumorscope.stages import review

    _report(lambda: review.run_review_accuracy(_params(params))[0])


def _fail(message: str) -> str:
    from tumorscope.errors import UserError

    raise UserError(message)


@app.command("mlflow-server")
def mlflow_server(params: ParamsOption = DEFAULT_PARAMS) -> None:
    """A shared MLflow tracking server (mlflow.server.*): database backend, artefacts proxied; clients
    then set mlflow.tracking_uri: http://<host>:<port>."""
    import shutil
    import sys

    from tumorscope.errors import UserError
    from tumorscope.tracking import check_database_reachable, redact, server_command

    cfg = _params(params).mlflow
    beside = Path(sys.executable).with_name("mlflow")
    command = server_command(cfg, str(beside) if beside.exists() else (shutil.which("mlflow") or "mlflow"))
    backend = command[command.index("--backend-store-uri") + 1]
    try:
        check_database_reachable(backend, "mlflow.server.backend_store_uri")
    except UserError as err:
        typer.secho(f"error: {err}", err=True, fg=typer.colors.RED)
        raise typer.Exit(1) from None
    shown = [redact(part) if part == backend else part for part in command[1:]]
    typer.echo(f"mlflow-server: {' '.join(shown)}", err=True)
    os.execv(command[0], command)  # the server itself: signals reach it, its exit status is ours


@app.command("dvc-yaml")
def dvc_yaml(params: ParamsOption = DEFAULT_PARAMS,
             check: Annotated[bool, typer.Option("--check", help="fail unless dvc.yaml is what it renders")] = False) -> None:
    """Render dvc.yaml from the stage graph (src/tumorscope/stages/graph.py) and what each stage imports."""
    def work() -> str:
        from tumorscope.errors import UserError
        from tumorscope.stages.graph import REPO, render

        text, path = render(_params(params)), REPO / "dvc.yaml"
        if check:
            if not path.is_file() or path.read_text() != text:
                raise UserError(f"{path} is not what the stage graph renders: run `tumorscope dvc-yaml`")
            return f"{path} is current"
        path.write_text(text)
        return f"wrote {path}"

    _report(work)


@app.command("api-key")
def api_key(admin: Annotated[bool, typer.Option("--admin", help="a key that may also reload the model")] = False,
            reviewer: Annotated[str | None, typer.Option(
                "--reviewer", help="a reviewer's key, named (the name goes with each reading)")] = None) -> None:
    """Print a new random API key as a line of serve.auth.keys_file ('<user|admin|reviewer> <key> [<name>]')."""
    from tumorscope.api.auth import ADMIN, REVIEWER, USER, new_key

    if reviewer is not None:
        typer.echo(f"{REVIEWER} {new_key()} {reviewer}")
    else:
        typer.echo(f"{ADMIN if admin else USER} {new_key()}")


@app.command()
def clean(params: ParamsOption = DEFAULT_PARAMS,
          stores: Annotated[bool, typer.Option(
              "--stores", help="also the local MLflow, Optuna and Prefect stores (together)")] = False) -> None:
    """Remove the pipeline's outputs (never data.source, the DVC cache or remote, or a database server)."""
    def work() -> str:
        from tumorscope.workspace import clean as clean_workspace

        removed = clean_workspace(_params(params), Path("."), stores=stores)
        return f"clean: removed {len(removed)} path(s)" + "".join(f"\n  {p}" for p in removed)

    _report(work)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
