"""oneDNN on against off: images/s of training and of inference of the default small CNN.

TensorFlow 2.21 turns its oneDNN kernels on by default only on CPUs it recognises (on an Intel
Xeon with AVX-512 they are on, on an AMD EPYC without AVX-512 off); every entry point now sets
``TF_ENABLE_ONEDNN_OPTS=1`` (``tumorscope.runtime``). TensorFlow reads the variable once, at import,
so each setting runs in its own process: the same seeded fit of ``train.architecture`` at
``preprocess.image_size`` on random slices, then ``predict``. Rounds alternate the settings so
that drift in machine load hits both alike; the median round is reported with the ratio.

Usage: uv run python benchmarks/bench_onednn.py [--images 512] [--epochs 2] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, sys, time
import numpy as np
import keras
from tensorflow.python.util import _pywrap_util_port as port
from tumorscope.config import load_params
from tumorscope.models.zoo import build_configured

images, epochs = int(sys.argv[1]), int(sys.argv[2])
params = load_params("params.yaml")
size = params.preprocess.image_size
rng = np.random.default_rng(0)
x = rng.integers(0, 256, (images, size, size, 1), dtype=np.uint8)
y = rng.integers(0, 4, images)
keras.utils.set_random_seed(0)
model = build_configured(params.train, size, 4, params.seed)
model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
model.fit(x[:64], y[:64], batch_size=32, epochs=1, verbose=0)  # tracing, not timed
started = time.perf_counter()
model.fit(x, y, batch_size=params.train.batch_size, epochs=epochs, verbose=0)
fit_rate = images * epochs / (time.perf_counter() - started)
model.predict(x[:64], verbose=0)
started = time.perf_counter()
model.predict(x, batch_size=64, verbose=0)
predict_rate = images / (time.perf_counter() - started)
print(json.dumps({"onednn": bool(port.IsMklEnabled()), "fit": fit_rate, "predict": predict_rate}))
"""


def measure(setting: str, images: int, epochs: int) -> dict:
    env = os.environ | {"TF_ENABLE_ONEDNN_OPTS": setting, "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run([sys.executable, "-c", CHILD, str(images), str(epochs)], env=env,
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {"0": [], "1": []}
    for round_index in range(args.rounds):
        for setting in ("0", "1") if round_index % 2 == 0 else ("1", "0"):
            runs[setting].append(measure(setting, args.images, args.epochs))
    with open("/proc/cpuinfo") as cpuinfo:
        model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "?")
    print(f"oneDNN: {args.images} random slices, {args.epochs} epochs, median of {args.rounds} rounds, {model}")
    median = {setting: {kind: statistics.median(r[kind] for r in rows) for kind in ("fit", "predict")}
              for setting, rows in runs.items()}
    for setting, rows in runs.items():
        print(f"  TF_ENABLE_ONEDNN_OPTS={setting} (oneDNN {'on' if rows[0]['onednn'] else 'off'}): "
              f"fit {median[setting]['fit']:6.0f} img/s, predict {median[setting]['predict']:6.0f} img/s")
    print(f"  ratio on/off: fit {median['1']['fit'] / median['0']['fit']:.2f}, "
          f"predict {median['1']['predict'] / median['0']['predict']:.2f}")


if __name__ == "__main__":
    main()
