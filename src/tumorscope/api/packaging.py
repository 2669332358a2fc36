"""A Bento that carries its model: the champion copied into the BentoML model store, and the
service built around it (``serving/bentofile.yaml``), tagged with the model and data versions.

In the project, ``bentoml serve`` loads the model from the MLflow registry (and follows the
champion alias on reload). A built Bento runs where the registry is not reachable (a container, a
hospital's server), so the model travels inside it: the native ``.keras`` file, the input spec
and the trust state (calibration, prediction sets, referral), read back by ``load_from_store``
with the same ``inference.LoadedModel`` the rest uses.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from tumorscope.artifacts import MODEL_FILE, SPEC_FILE, TRUST_FILE
from tumorscope.errors import UserError
from tumorscope.inference import LoadedModel


def store_name(registered_model: str) -> str:
    """A BentoML tag name (lower case letters, digits, '-', '_', '.') for a registered model name."""
    name = re.sub(r"[^a-z0-9_.-]+", "-", registered_model.lower()).strip("-.")
    return name or "tumorscope-model"


def _short(text: str, n: int = 8) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())[:n] or "unknown"


def bento_version(model_version: int | str, data_version: str, code_version: str) -> str:
    """'model<N>-data<data fingerprint, 8>-code<git commit, 7>': a Bento tag says what it serves and
    which service code serves it (a rebuild after a code change gets a new tag)."""
    return f"model{model_version}-data{_short(data_version)}-code{_short(code_version, 7)}"


def store_version(model_version: int | str, run_id: str) -> str:
    """'v<N>-<run id, 8>': registry versions restart at 1 with a new tracking store, runs do not."""
    return f"v{model_version}-{_short(run_id)}"


def save_to_store(loaded: LoadedModel, name: str, version: str, labels: dict[str, str]) -> str:
    """Copy a loaded model (its ``.keras`` file, input spec and trust state) into the BentoML model
    store; return the tag."""
    import bentoml

    try:
        existing = bentoml.models.get(f"{name}:{version}")
    except bentoml.exceptions.NotFound:
        existing = None
    if existing is not None:
        return str(existing.tag)
    with bentoml.models.create(f"{name}:{version}", labels=labels, metadata={"model_version": loaded.version}) as model:
        target = Path(model.path)
        loaded.model.save(target / MODEL_FILE)
        (target / SPEC_FILE).write_text(json.dumps(loaded.spec, indent=2))
        if loaded.trust is not None:
            (target / TRUST_FILE).write_text(json.dumps(loaded.trust))
    return str(model.tag)


def load_from_store(tag: str) -> LoadedModel:
    """The model a Bento carries (see ``save_to_store``)."""
    import bentoml
    import keras

    try:
        model = bentoml.models.get(tag)
    except bentoml.exceptions.NotFound:
        raise UserError(f"BentoML model {tag} not in the model store (build the Bento with tumorscope bento)") from None
    path = Path(model.path)
    spec = json.loads((path / SPEC_FILE).read_text())
    trust = json.loads((path / TRUST_FILE).read_text()) if (path / TRUST_FILE).is_file() else None
    version = str(model.info.metadata.get("model_version", tag))
    return LoadedModel(keras.saving.load_model(path / MODEL_FILE), spec, version, {"bento_model": str(model.tag)}, trust)


def build(bentofile: Path, model_tag: str, version: str, labels: dict[str, str]) -> str:
    """Build the service described by ``bentofile`` with the stored model ``model_tag``; return the Bento tag."""
    import bentoml

    if not bentofile.is_file():
        raise UserError(f"{bentofile} not found")
    name = "tumorscope"
    try:
        existing = bentoml.bentos.get(f"{name}:{version}")
    except bentoml.exceptions.NotFound:
        existing = None
    if existing is not None:  # same model, data and code: nothing to rebuild
        return str(existing.tag)
    bento = bentoml.bentos.build_bentofile(str(bentofile), name=name, version=version, labels=labels,
                                           build_ctx=str(bentofile.resolve().parents[1]), args={"model_tag": model_tag})
    return str(bento.tag)


def export(bento_tag: str, out_dir: Path) -> Path:
    """Write the Bento to ``out_dir`` as a .bento archive (to copy to a machine without the project)."""
    import bentoml

    out_dir.mkdir(parents=True, exist_ok=True)
    path = bentoml.bentos.export_bento(bento_tag, str(out_dir / f"{bento_tag.replace(':', '-')}.bento"))
    return Path(path)


def remove_model(tag: str) -> None:
    """Delete a stored model (tests clean up after themselves)."""
    import bentoml

    bentoml.models.delete(tag)

