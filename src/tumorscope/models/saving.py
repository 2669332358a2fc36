"""Save a trained model as a ``.keras`` file that plain Keras opens anywhere and whose bytes
depend on the weights alone (it is a DVC output)."""

from __future__ import annotations

from pathlib import Path

from tumorscope.artifacts import MODEL_FILE


def save_model(model, model_dir: Path) -> Path:
    """Save a ``.keras`` file that plain ``keras.saving.load_model`` opens anywhere (MLflow
    downloads, the Bento service, a user's notebook). The split scores are training-time
    monitors whose class lives in tumorscope, so they are compiled out first; the optimizer
    instance (and its state) and the loss are kept."""
    if getattr(model, "compiled", False):
        model.compile(optimizer=model.optimizer, loss=model.loss, metrics=["accuracy"])
    model_dir.mkdir(parents=True, exist_ok=True)
    path = model_dir / MODEL_FILE
    model.save(path)
    make_reproducible(path)
    return path



def make_reproducible(path: Path) -> None:
    """Make a ``.keras`` zip depend on the model alone: the file is a DVC output, and the same
    weights must give the same bytes. Keras writes the save time (``date_saved`` in metadata.json,
    the weights entry's zip time) and, in config.json, ``shared_object_id``s that are Python object
    addresses; the times go, and the ids are numbered in order of appearance (the same number still
    marks the same shared object, which is all loading needs)."""
    import json
    import zipfile

    with zipfile.ZipFile(path) as source:
        entries = [(info, source.read(info)) for info in source.infolist()]
    with zipfile.ZipFile(path, "w") as target:
        for info, data in entries:
            if info.filename == "metadata.json":
                metadata = json.loads(data)
                metadata.pop("date_saved", None)
                data = json.dumps(metadata).encode()
            elif info.filename == "config.json":
                data = json.dumps(number_shared_objects(json.loads(data))).encode()
            fixed = zipfile.ZipInfo(info.filename, date_time=(1980, 1, 1, 0, 0, 0))
            fixed.compress_type, fixed.external_attr = info.compress_type, info.external_attr
            target.writestr(fixed, data)



def number_shared_objects(config, numbers: dict | None = None):
    """A copy of a Keras config whose ``shared_object_id`` values are 0, 1, ... by first appearance."""
    numbers = {} if numbers is None else numbers
    if isinstance(config, dict):
        return {key: numbers.setdefault(value, len(numbers)) if key == "shared_object_id"
                else number_shared_objects(value, numbers) for key, value in config.items()}
    if isinstance(config, list):
        return [number_shared_objects(value, numbers) for value in config]
    return config
