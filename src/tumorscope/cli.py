"""`tumorscope <stage>`: a thin Typer CLI over tumorscope.pipeline (DVC stages call these).

Heavy libraries (TensorFlow, Great Expectations, MLflow) are imported inside the stage functions
so that `tumorscope --help` answers at once. A user mistake prints one line and exits 1.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Callable

import typer

app = typer.Typer(help="tumorscope: kidney CT slice classification pipeline.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)

ParamsOption = Annotated[Path, typer.Option("--params", "-p", help="params.yaml to read")]


def _run(stage: Callable, params_path: Path) -> None:
    from tumorscope.config import load_params
    from tumorscope.errors import UserError

    # Quiet TensorFlow's C++ start-up chatter; keep its errors.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        typer.echo(stage(load_params(params_path)))
    except UserError as err:
        typer.secho(f"error: {err}", err=True, fg=typer.colors.RED)
        raise typer.Exit(1) from None


def _stage(name: str, doc: str):
    def command(params: ParamsOption = Path("params.yaml")) -> None:
        from tumorscope import pipeline

        _run(getattr(pipeline, f"run_{name}"), params)

    command.__doc__ = doc
    app.command(name)(command)


for _name, _doc in [
    ("phantom", "Generate the synthetic kidney-CT phantom (the embedded default data)."),
    ("ingest", "Copy data.source (class-per-folder, Kaggle layout, PNG/JPEG/DICOM) into data/raw."),
    ("manifest", "Hash, measure and check every raw file; quarantine unreadable ones."),
    ("validate", "Run the Great Expectations suites in expectations/ on the manifest."),
    ("split", "Leakage-aware stratified train/val/test split (duplicate groups kept whole)."),
    ("preprocess", "Resize/enhance into the memory-mapped uint8 cache."),
    ("train", "Train the configured architecture; log the run and model to MLflow."),
    ("evaluate", "Test-split metrics, calibration and plots; log them to MLflow."),
    ("crossval", "Grouped k-fold cross-validation of train.* (duplicate groups kept whole); MLflow runs."),
]:
    _stage(_name, _doc)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
