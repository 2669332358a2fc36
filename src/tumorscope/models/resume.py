"""Resume a killed training at its last finished epoch, ending where an uninterrupted run would.

Keras's ``BackupAndRestore`` keeps the weights and the epoch, but not the state of early stopping
(its best score, patience count and best weights) or of the learning-rate halving, and it knows
nothing of two-phase fine-tuning; a resumed fit would then stop, halve or restore differently. The
backup here keeps, after every epoch: every model variable (the dropout seed state included), the
optimizer's variables (moments, step, learning rate), the plateau callbacks' counters, early
stopping's best weights, the history so far and which phase it is in. ``fingerprint`` names what
is being trained (settings, data, seed): a backup of anything else is discarded, never resumed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

STATE_FILE = "state.json"
ARRAYS_FILE = "arrays.npz"
# Early stopping and the learning-rate halving: the counters that decide when they act.
PLATEAU_FIELDS = ("wait", "best", "best_epoch", "stopped_epoch", "cooldown_counter")


class TrainingBackup:
    def __init__(self, folder: str | Path, fingerprint: str):
        self.folder = Path(folder)
        self.fingerprint = fingerprint

    def state(self) -> dict | None:
        """The backup of this fingerprint, or None (none yet, or of something else: removed)."""
        try:
            state = json.loads((self.folder / STATE_FILE).read_text())
            arrays_present = (self.folder / ARRAYS_FILE).is_file()
        except (OSError, ValueError):
            state, arrays_present = None, False
        if state is not None and state.get("fingerprint") == self.fingerprint and arrays_present:
            return state
        self.clear()
        return None

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def save(self, model, phase: int, epochs_done: int, phase_finished: bool, history: dict,
             plateau: list, best_weights) -> None:
        """Write the state atomically: a kill while writing leaves the previous epoch's backup."""
        arrays = {f"model_{i}": np.asarray(v) for i, v in enumerate(model.variables)}
        if not phase_finished and getattr(model, "optimizer", None) is not None:
            arrays |= {f"optimizer_{i}": np.asarray(v) for i, v in enumerate(model.optimizer.variables)}
        if best_weights is not None:
            arrays |= {f"best_{i}": np.asarray(w) for i, w in enumerate(best_weights)}
        state = {"fingerprint": self.fingerprint, "phase": phase, "epochs_done": epochs_done,
                 "phase_finished": phase_finished, "history": history, "has_best": best_weights is not None,
                 "plateau": [{k: _plain(getattr(c, k)) for k in PLATEAU_FIELDS if hasattr(c, k)} for c in plateau]}
        self.folder.mkdir(parents=True, exist_ok=True)
        partial = self.folder / "arrays.partial.npz"
        np.savez(partial, **arrays)  # type: ignore[arg-type]
        state_partial = self.folder / "state.partial.json"
        state_partial.write_text(json.dumps(state))
        # The arrays first, then the state that names them: the state file is the commit point.
        partial.replace(self.folder / ARRAYS_FILE)
        state_partial.replace(self.folder / STATE_FILE)

    def restore_variables(self, model, with_optimizer: bool) -> None:
        with np.load(self.folder / ARRAYS_FILE) as arrays:
            for i, variable in enumerate(model.variables):
                variable.assign(arrays[f"model_{i}"])
            if with_optimizer:
                if not model.optimizer.built:
                    model.optimizer.build(model.trainable_variables)
                for i, variable in enumerate(model.optimizer.variables):
                    variable.assign(arrays[f"optimizer_{i}"])

    def best_weights(self, state: dict) -> list | None:
        if not state.get("has_best"):
            return None
        with np.load(self.folder / ARRAYS_FILE) as arrays:
            return [arrays[f"best_{i}"] for i in range(sum(k.startswith("best_") for k in arrays.files))]

    def callback(self, phase: int, history_before: dict, plateau: list, resume: dict | None):
        """A Keras callback for one phase's ``fit`` (put it after the plateau callbacks): restores
        ``resume`` (this phase's backup) when training begins, saves after every epoch and when
        the phase ends."""
        import keras

        backup = self
        early_stopping = next((c for c in plateau if isinstance(c, keras.callbacks.EarlyStopping)), None)

        class Backup(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.history = {k: list(v) for k, v in history_before.items()}

            def on_train_begin(self, logs=None):
                # After the plateau callbacks' own on_train_begin, which reset their counters.
                if resume is None:
                    return
                backup.restore_variables(self.model, with_optimizer=True)
                for callback, fields in zip(plateau, resume["plateau"], strict=True):
                    for key, value in fields.items():
                        setattr(callback, key, value)
                if early_stopping is not None:
                    early_stopping.best_weights = backup.best_weights(resume)
                self.history = {k: list(v) for k, v in resume["history"].items()}
                self.model._initial_epoch = resume["epochs_done"]  # read by fit after on_train_begin

            def on_epoch_end(self, epoch, logs=None):
                for key, value in (logs or {}).items():
                    self.history.setdefault(key, []).append(float(value))
                backup.save(self.model, phase, epoch + 1, False, self.history, plateau,
                            early_stopping.best_weights if early_stopping is not None else None)

            def on_train_end(self, logs=None):
                # After early stopping restored the best weights: the phase's final state.
                self.model._initial_epoch = None  # the next phase's fit starts where it is told
                backup.save(self.model, phase, len(self.history.get("loss", [])), True, self.history, plateau, None)

        return Backup()


def _plain(value):
    """A callback counter as JSON (NumPy scalars and infinities included)."""
    if value is None:
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    return float(value)
