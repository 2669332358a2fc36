"""What `make clean` removes: the pipeline's outputs and nothing else.

The outputs are the ones dvc.yaml declares (read through DVC, with params interpolated) plus the
two that commands outside DVC write (the untuned baseline model and the cross-validation report).
The local stores (MLflow's SQLite file and artefacts, the Optuna SQLite file, Prefect's home,
monitoring's reference features and Evidently workspace, champions saved for a warm start) go
only on request and only together, so that no store is left pointing into a deleted one. Data
sources, the DVC cache and remote, and server databases are never touched.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tumorscope.artifacts import RETRAIN_DIR, TRAIN_BACKUP_DIR
from tumorscope.config import Params
from tumorscope.data.ingest import folder_relation

PREFECT_HOME = ".prefect"


def dvc_outputs(root: Path) -> list[Path]:
    """Every output dvc.yaml declares, as paths under ``root``."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return sorted({root / out.def_path for stage in repo.index.stages for out in stage.outs})


def local_stores(params: Params, root: Path) -> list[Path]:
    """The file-based stores of MLflow, Optuna and Prefect in this project (none for a server URL), and
    monitoring's reference features and Evidently workspace (both name MLflow model versions)."""
    stores = [root / params.mlflow.artifact_root, root / PREFECT_HOME, root / params.monitor.reference_dir,
              root / params.monitor.workspace, root / RETRAIN_DIR]
    for uri in (params.mlflow.tracking_uri, params.tune.storage):
        if uri.startswith("sqlite:///") and uri != "sqlite:///:memory:":
            stores.append(root / uri.removeprefix("sqlite:///"))
    return stores


def removable(params: Params, root: Path, stores: bool) -> list[Path]:
    """What clean removes: paths inside ``root``, none of which is or holds data.source (unless it
    is the phantom's folder, which the pipeline generates)."""
    extra = [root / params.train.model_dir / "baseline", root / params.crossval.report_path, root / TRAIN_BACKUP_DIR]
    paths = dvc_outputs(root) + extra + (local_stores(params, root) if stores else [])
    source = (root / params.data.source).resolve()
    generated_source = source == (root / params.phantom.out_dir).resolve()
    kept = []
    for path in paths:
        resolved = path.resolve()
        if not resolved.is_relative_to(root.resolve()):
            continue
        if folder_relation(source, resolved) in ("is the same folder as", "is inside") and not generated_source:
            continue  # the user's data lives there
        kept.append(path)
    return kept


def clean(params: Params, root: Path = Path("."), stores: bool = False) -> list[Path]:
    """Remove the outputs (and with ``stores`` the local stores); return what was removed."""
    removed = []
    for path in removable(params, root, stores):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(path)
    return removed
