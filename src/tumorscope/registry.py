"""The MLflow model registry: logged models, aliases (``challenger``, ``champion``), promotion
gates and rollback. Registry stages are deprecated in MLflow; aliases are what moves.

The gates are pure functions of scores (tested without MLflow); the registry calls are thin and
work on any tracking store MLflow supports (the SQLite file by default, PostgreSQL alike).
"""

from __future__ import annotations

import getpass
import json
import os
from typing import Any

import numpy as np

from tumorscope.errors import UserError
from tumorscope.inference import SPEC_KEY, TRUST_KEY, LoadedModel
from tumorscope.reports import utc_now

MODEL_NAME_IN_RUN = "model"
CHAMPION, CHALLENGER = "champion", "challenger"
# Registered-model tag holding the champion history: versions in the order they became champion.
HISTORY_TAG = "champion_history"


# ---------------------------------------------------------------------------------------------
# Logging a trained model


class _KerasFlavor:
    """``mlflow.keras`` with the model folder created before MLflow writes the input example into it:
    ``mlflow.keras.save_model`` writes ``input_example.json`` first, into a folder it has not made
    yet, so ``log_model(..., input_example=...)`` fails (mlflow/mlflow#16183, open in 3.x)."""

    __name__ = "mlflow.keras"

    @staticmethod
    def save_model(path, **kwargs):
        import mlflow.keras

        os.makedirs(path, exist_ok=True)
        return mlflow.keras.save_model(path=path, **kwargs)


def pip_requirements() -> list[str]:
    """What loading the model needs, pinned to this environment (listed, so MLflow does not load the
    model in a subprocess to guess them)."""
    from importlib.metadata import PackageNotFoundError, version

    import keras

    backend = {"tensorflow": ("tensorflow-cpu", "tensorflow"), "jax": ("jax", "jaxlib"), "torch": ("torch",)}
    pinned = []
    for name in ("keras", "numpy", *backend.get(keras.backend.backend(), ())):
        try:
            pinned.append(f"{name}=={version(name)}")
        except PackageNotFoundError:  # e.g. tensorflow instead of tensorflow-cpu, or a GPU host with JAX only
            continue
    return pinned


def log_model(model, spec: dict, example: np.ndarray, trust: dict | None = None, weights: dict | None = None) -> str:
    """Log a Keras model to the active run as an MLflow model (native ``.keras`` inside) with a
    signature, an input example (uint8 slices), and the input spec, the trust state
    (``trust.answers.fit_trust``) and the pretrained weights' provenance (``models.pretrained``) in
    its metadata; return its URI."""
    from mlflow.models import Model, infer_signature

    example = np.asarray(example, dtype=np.uint8)
    signature = infer_signature(example, np.asarray(model.predict_on_batch(example)))
    info = Model.log(artifact_path=None, name=MODEL_NAME_IN_RUN, flavor=_KerasFlavor(), model=model, signature=signature,
                     input_example=example, metadata={SPEC_KEY: spec} | ({TRUST_KEY: trust} if trust else {})
                     | ({"tumorscope_pretrained_weights": weights} if weights else {}),
                     pip_requirements=pip_requirements())
    return info.model_uri


# ---------------------------------------------------------------------------------------------
# Resolving and loading


def model_uri(name: str, ref: str) -> str:
    """``ref`` as an MLflow model URI: an alias ('champion'), a version ('3'), or a URI as given."""
    if ":/" in ref:
        return ref
    return f"models:/{name}/{ref}" if ref.isdigit() else f"models:/{name}@{ref}"


def get_version(client, name: str, ref: str):
    """The registered version an alias or number names; one-line UserError when there is none."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, ref) if ref.isdigit() else client.get_model_version_by_alias(name, ref)
    except MlflowException:
        what = f"version {ref}" if ref.isdigit() else f"alias {ref!r}"
        raise UserError(f"registered model {name!r} has no {what} (promote a model first: tumorscope promote)") from None


def load_model(name: str, ref: str) -> LoadedModel:
    """Load a registered model (alias or version) or any MLflow model URI, with its input spec."""
    import mlflow
    import mlflow.keras
    from mlflow.exceptions import MlflowException

    source: dict[str, Any] = {"ref": ref}
    uri = model_uri(name, ref)
    version_label = uri
    if not ref.startswith(("runs:/", "models:/m-")) and ":/" not in ref:
        version = get_version(mlflow.MlflowClient(), name, ref)
        uri = f"models:/{name}/{version.version}"  # pinned: an alias moving mid-load cannot mix two versions
        version_label = f"{name}/{version.version}"
        source |= {"name": name, "version": int(version.version), "run_id": version.run_id}
    try:
        info = mlflow.models.get_model_info(uri)
        model = mlflow.keras.load_model(uri)
    except MlflowException as err:
        raise UserError(f"cannot load model {uri}: {str(err).splitlines()[0]}") from None
    spec = (info.metadata or {}).get(SPEC_KEY)
    if spec is None:
        raise UserError(f"model {uri} has no tumorscope input spec in its metadata (not logged by tumorscope train)")
    source.setdefault("run_id", info.run_id)
    return LoadedModel(model, spec, version_label, source, (info.metadata or {}).get(TRUST_KEY))


# ---------------------------------------------------------------------------------------------
# Registry operations


def register(name: str, uri: str, run_id: str, tags: dict[str, str]):
    """Register a logged model as a new version of ``name`` (created if missing) and mark it the
    challenger."""
    import mlflow

    client = mlflow.MlflowClient()
    if not client.search_registered_models(filter_string=f"name = '{name}'"):
        client.create_registered_model(name, description="tumorscope kidney CT slice classifier")
    # A logged model's URI (models:/m-<id>) names its id; a tracking server requires it alongside.
    model_id = uri.removeprefix("models:/") if uri.startswith("models:/m-") else None
    version = client.create_model_version(name, uri, run_id=run_id, tags=tags, model_id=model_id)
    client.set_registered_model_alias(name, CHALLENGER, version.version)
    return version


def current_champion(name: str):
    """The version the champion alias points at, or None."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def champion_history(client, name: str) -> list[str]:
    tags = client.get_registered_model(name).tags
    return json.loads(tags.get(HISTORY_TAG, "[]"))


def actor() -> str:
    """Who made a registry change: $TUMORSCOPE_USER, else the login name."""
    try:
        return os.environ.get("TUMORSCOPE_USER") or getpass.getuser()
    except Exception:  # no login name in some containers
        return "unknown"


def make_champion(name: str, version: str, reason: str) -> None:
    """Point ``champion`` at ``version``, append it to the history and record who/when/why on it."""
    import mlflow

    client = mlflow.MlflowClient()
    history = champion_history(client, name)
    client.set_registered_model_alias(name, CHAMPION, version)
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps([*history, str(version)]))
    for key, value in {"champion_since": utc_now(), "promoted_by": actor(), "promotion_reason": reason}.items():
        client.set_model_version_tag(name, version, key, value)


def rollback(name: str, reason: str, to_version: str | None = None) -> tuple[str, str]:
    """Point ``champion`` back at the previous champion (or ``to_version``); record who, when and
    why on both versions and on the registered model. Returns (from_version, to_version)."""
    import mlflow

    client = mlflow.MlflowClient()
    current = current_champion(name)
    if current is None:
        raise UserError(f"registered model {name!r} has no champion to roll back")
    history = champion_history(client, name)
    if to_version is None:
        # The champion before the current one took over (the history may name a version twice).
        here = max((i for i, v in enumerate(history) if v == str(current.version)), default=len(history))
        earlier = [v for v in history[:here] if v != str(current.version)]
        if not earlier:
            raise UserError(f"{name} version {current.version} is the only champion there has been: nothing to roll back to")
        to_version = earlier[-1]
    to_version = str(get_version(client, name, str(to_version)).version)  # an alias or "03" -> "3"
    if to_version == str(current.version):
        raise UserError(f"{name} version {to_version} is already the champion")
    stamp, who = utc_now(), actor()
    client.set_registered_model_alias(name, CHAMPION, str(to_version))
    # The rolled-back version leaves the history, so a second rollback goes one further back.
    kept = [v for v in history if v != str(current.version)]
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(kept if kept and kept[-1] == str(to_version)
                                                                  else [*kept, str(to_version)]))
    record = {"at": stamp, "by": who, "reason": reason, "from": str(current.version), "to": str(to_version)}
    client.set_registered_model_tag(name, "last_rollback", json.dumps(record))
    client.set_model_version_tag(name, str(current.version), "rolled_back", json.dumps(record))
    client.set_model_version_tag(name, str(to_version), "champion_since", stamp)
    client.set_model_version_tag(name, str(to_version), "promotion_reason", f"rollback by {who}: {reason}")
    return str(current.version), str(to_version)
