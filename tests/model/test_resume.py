"""A killed training resumes: a process killed at the start of an epoch (os._exit, no clean-up, as a
SIGKILL or a lost node would leave it) and started again continues after its last finished epoch
and ends with the same history, weights and scores as an uninterrupted run (CPU, seeded). Both
the one-phase CNN and two-phase fine-tuning (killed just after the first phase ended, then again,
resumed, inside the second)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from helpers.paths import REPO

CHILD = textwrap.dedent("""
    import json, os, sys, numpy as np, keras
    from pathlib import Path
    from helpers.params import section  # tests/ is on the child's PYTHONPATH
    from tumorscope.config import EvaluateConfig, TrainConfig
    from tumorscope.models.resume import TrainingBackup
    from tumorscope.models.train import fit_and_score

    architecture, backup_dir, out, kill_at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (64, 32, 32, 1), dtype=np.uint8); y = np.arange(64) % 4
    x[y == 1] //= 2; x[y == 2] //= 4  # something to learn, so early stopping and the LR halving act
    xv = rng.integers(0, 255, (40, 32, 32, 1), dtype=np.uint8); yv = np.arange(40) % 4
    xv[yv == 1] //= 2; xv[yv == 2] //= 4
    cfg = section(TrainConfig, architecture=architecture, epochs=4, head_epochs=1, batch_size=16, filters=8, warmup_epochs=1,
                      patience=2, augment_strength=0.1, dropout=0.3)

    class Kill(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == kill_at:
                os._exit(137)

    out_ = fit_and_score(cfg, 32, ["a", "b", "c", "d"], 7, (x, y), (xv, yv), (xv, yv, np.arange(40)),
                         section(EvaluateConfig, fail_on_degenerate=False, bootstrap_samples=50), callbacks=[Kill()],
                         backup=TrainingBackup(backup_dir, "fingerprint"))
    Path(out).write_text(json.dumps({"history": out_.result.history, "probabilities": out_.probabilities.tolist(),
                                     "weights_sum": float(sum(np.abs(np.asarray(w)).sum() for w in out_.result.model.weights))}))
""")


def run_child(tmp_path: Path, architecture: str, name: str, kill_at: int = -1) -> subprocess.CompletedProcess:
    env = os.environ | {"TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(REPO / "tests")}
    return subprocess.run([sys.executable, "-c", CHILD, architecture, str(tmp_path / f"backup-{name}"),
                           str(tmp_path / f"{name}.json"), str(kill_at)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One uninterrupted run per architecture, shared by its kill cases."""
    runs: dict[str, dict] = {}

    def run(architecture: str) -> dict:
        if architecture not in runs:
            folder = tmp_path_factory.mktemp(f"whole-{architecture}")
            whole = run_child(folder, architecture, "whole")
            assert whole.returncode == 0, whole.stderr[-3000:]
            assert not (folder / "backup-whole").exists()  # removed when training ended
            runs[architecture] = json.loads((folder / "whole.json").read_text())
        return runs[architecture]

    return run


@pytest.mark.slow
@pytest.mark.parametrize(("architecture", "kills"), [
    ("small_cnn", [(2, 0)]),              # one phase, killed after its second epoch
    # Two phases (1 + 4 epochs), killed twice: as the second phase began (the first had ended),
    # then, resumed, inside the second phase. (epoch killed at, phase recorded in the backup)
    ("mobilenet_v2", [(1, 0), (2, 1)]),
])
def test_a_killed_training_resumes_and_ends_as_an_uninterrupted_one(tmp_path, uninterrupted, architecture, kills):
    expected = uninterrupted(architecture)
    for kill_at, phase_at_kill in kills:
        killed = run_child(tmp_path, architecture, "resumed", kill_at)
        assert killed.returncode == 137, killed.stderr[-3000:]
        state = json.loads((tmp_path / "backup-resumed" / "state.json").read_text())
        assert (state["epochs_done"], state["phase"]) == (kill_at, phase_at_kill)
        assert not (tmp_path / "resumed.json").exists()

    resumed = run_child(tmp_path, architecture, "resumed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # Only the epochs after the last kill were trained again.
    last_kill = kills[-1][0]
    assert f"Epoch {last_kill + 1}/" in resumed.stdout and f"Epoch {last_kill}/" not in resumed.stdout
    got = json.loads((tmp_path / "resumed.json").read_text())
    assert got["history"].keys() == expected["history"].keys()
    for key in expected["history"]:
        np.testing.assert_allclose(got["history"][key], expected["history"][key], rtol=1e-5, err_msg=key)
    np.testing.assert_allclose(got["probabilities"], expected["probabilities"], atol=1e-5)
    assert got["weights_sum"] == pytest.approx(expected["weights_sum"], rel=1e-6)
    assert not (tmp_path / "backup-resumed").exists()


def test_a_backup_of_another_training_is_discarded(tmp_path):
    import keras

    from tumorscope.models.resume import TrainingBackup

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    TrainingBackup(tmp_path / "b", "settings-a").save(model, 0, 3, False, {"loss": [1.0, 0.9, 0.8]}, [], None)
    assert TrainingBackup(tmp_path / "b", "settings-a").state()["epochs_done"] == 3
    assert TrainingBackup(tmp_path / "b", "settings-b").state() is None  # other settings or data: start afresh
    assert not (tmp_path / "b").exists()
    # A state without its arrays (a kill between the two writes cannot leave this, a hand can): not resumed.
    TrainingBackup(tmp_path / "c", "x").save(model, 0, 1, False, {"loss": [1.0]}, [], None)
    (tmp_path / "c" / "arrays.npz").unlink()
    assert TrainingBackup(tmp_path / "c", "x").state() is None
