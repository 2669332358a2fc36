"""Data-parallel training (train.distribution: auto) on the JAX backend, checked on CPU: XLA is told
to pretend two host devices, so `fit_and_score` shards every batch across them (weights
replicated); the losses match a one-device fit of the same data and seed within float tolerance,
and the model scores and saves like any other."""

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
from helpers.requirements import needs_jax

CHILD = textwrap.dedent("""
    import json, sys, numpy as np, keras
    from helpers.params import section  # tests/ is on the child's PYTHONPATH
    from tumorscope.config import EvaluateConfig, TrainConfig
    from tumorscope.models.train import fit_and_score
    from tumorscope.models.saving import save_model
    from pathlib import Path
    assert keras.backend.backend() == "jax"
    rng = np.random.default_rng(0)
    # 100 slices, batches of 16: every batch (the last has 4) splits evenly over two devices.
    x = rng.integers(0, 255, (100, 32, 32, 1), dtype=np.uint8); y = np.arange(100) % 4
    xv = rng.integers(0, 255, (37, 32, 32, 1), dtype=np.uint8); yv = np.arange(37) % 4
    cfg = section(TrainConfig, epochs=3, batch_size=16, filters=8, warmup_epochs=5, distribution=sys.argv[1])
    out = fit_and_score(cfg, 32, ["a", "b", "c", "d"], 42, (x, y), (xv[:36], yv[:36]), (xv, yv, np.arange(37)),
                        section(EvaluateConfig, fail_on_degenerate=False, bootstrap_samples=50))
    model = out.result.model
    save_model(model, Path(sys.argv[2]))
    json.dump({"loss": out.result.history["loss"], "val_loss": out.result.history["val_loss"],
               "sharding": str(model.weights[0].value.sharding), "n_scored": len(out.probabilities),
               "batch_size": out.result.batch_size}, open(Path(sys.argv[2]) / "fit.json", "w"))
""")


def fit_in_child(tmp_path: Path, name: str, distribution: str, devices: int) -> dict:
    out = tmp_path / name
    env = os.environ | {"KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO / "tests"),
                        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    done = subprocess.run([sys.executable, "-c", CHILD, distribution, str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "fit.json").read_text()) | {"dir": out}


@needs_jax
@pytest.mark.slow
def test_two_device_fit_matches_one_device(tmp_path):
    sharded = fit_in_child(tmp_path, "two", "auto", devices=2)
    single = fit_in_child(tmp_path, "one", "auto", devices=1)   # auto with one device: no distribution
    forced_off = fit_in_child(tmp_path, "off", "none", devices=2)
    assert "Mesh('batch': 2" in sharded["sharding"], sharded["sharding"]
    assert "SingleDeviceSharding" in single["sharding"] and "SingleDeviceSharding" in forced_off["sharding"]
    np.testing.assert_allclose(sharded["loss"], single["loss"], rtol=1e-3)
    np.testing.assert_allclose(sharded["val_loss"], single["val_loss"], rtol=1e-3)
    assert forced_off["loss"] == single["loss"]
    # Every held-out slice scored (37: not a multiple of two), and the saved model loads on one device.
    assert sharded["n_scored"] == 37 and sharded["batch_size"] == 16
    import keras

    reloaded = keras.saving.load_model(sharded["dir"] / "model.keras")
    assert reloaded.predict(np.zeros((3, 32, 32, 1), np.uint8), verbose=0).shape == (3, 4)


def test_batches_split_evenly_over_devices():
    from tumorscope.models.train import make_batches

    labels = np.arange(21) % 3
    images = np.broadcast_to(np.arange(21, dtype=np.uint8)[:, None, None, None], (21, 4, 4, 1))  # pixel = index
    batches = make_batches(images, labels, 8, shuffle=True, seed=1, multiple=2)
    assert [len(batches[i][1]) for i in range(len(batches))] == [8, 8, 4]
    seen = set()
    for epoch in range(12):
        batches.epoch = epoch
        used = [int(v) for i in range(len(batches)) for v in batches[i][0][:, 0, 0, 0]]
        assert len(used) == len(set(used)) == 20  # one slice left out per epoch...
        seen |= set(used)
    assert seen == set(range(21))  # ...a different one: none is never trained on
    unbatched = make_batches(images, labels, 8, shuffle=False, seed=1)
    assert [len(unbatched[i][1]) for i in range(len(unbatched))] == [8, 8, 5]
