"""Training input pipeline: memory-mapped uint8 cache vs the same arrays already in RAM.

Prints, measured in one run: (1) images/s of the batch loader alone, (2) images/s of `model.fit`
(small CNN, the real training loop) fed from the memory-mapped cache and from in-RAM arrays, and
the ratio memmap / in-RAM (goal >= 0.9). Also times `dvc repro` on the unchanged workspace
(goal < 5 s) when the pipeline has been run here (`make run`).

Usage: uv run python benchmarks/bench_input_pipeline.py [--images 4096] [--size 64] [--epochs 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from tumorscope.runtime import apply_cpu_defaults  # noqa: E402

apply_cpu_defaults()  # before TensorFlow is imported


def loader_rate(images, labels, batch_size: int, repeats: int = 3) -> float:
    from tumorscope.models.train import make_batches

    batches = make_batches(images, labels, batch_size, shuffle=True, seed=0)
    started = time.perf_counter()
    for _ in range(repeats):
        for i in range(len(batches)):
            batches[i]
        batches.on_epoch_end()
    return repeats * len(labels) / (time.perf_counter() - started)


def fit_rate(images, labels, size: int, epochs: int, batch_size: int) -> float:
    import keras

    from tumorscope.models.train import make_batches
    from tumorscope.models.zoo import build_small_cnn

    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    model = build_small_cnn(size, 4, seed=0)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    data = make_batches(images, labels, batch_size, shuffle=True, seed=0,
                        class_weights=np.ones(4, dtype=np.float32))
    model.fit(data, epochs=1, verbose=0)  # compile/trace outside the timed epochs
    started = time.perf_counter()
    model.fit(data, epochs=epochs, verbose=0)
    return epochs * len(labels) / (time.perf_counter() - started)


def time_noop_repro() -> str:
    if not Path("dvc.lock").is_file():
        return "dvc repro (unchanged workspace): skipped, run `make run` first"
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "--quiet"], capture_output=True)
    if status.returncode != 0:
        return "dvc repro (unchanged workspace): skipped, the workspace has changes (run `dvc repro` first)"
    timings = []
    for _ in range(3):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "dvc", "repro"], check=True, capture_output=True)
        timings.append(time.perf_counter() - started)
    return f"dvc repro (unchanged workspace): median {sorted(timings)[1]:.2f} s over 3 runs (goal < 5 s)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    in_ram = rng.integers(0, 256, (args.images, args.size, args.size, 1), dtype=np.uint8)
    labels = rng.integers(0, 4, args.images).astype(np.int32)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train_x.npy"
        np.save(path, in_ram)
        mapped = np.load(path, mmap_mode="r")
        print(f"input pipeline: {args.images} images {args.size}x{args.size}, batch {args.batch_size}, "
              f"{args.epochs} timed epochs, {os.cpu_count()} CPU cores")
        loader_mm, loader_ram = loader_rate(mapped, labels, args.batch_size), loader_rate(in_ram, labels, args.batch_size)
        print(f"  loader only   memmap {loader_mm:10.0f} img/s   in-RAM {loader_ram:10.0f} img/s   ratio {loader_mm / loader_ram:.2f}")
        # Alternate the two sources over rounds so drift in machine load hits both alike.
        rates = {"memmap": [], "in-RAM": []}
        # Within a round the order flips too: the second model built in a process ran slower
        # here whichever source fed it, so a fixed order would bias the ratio.
        for round_index in range(args.rounds):
            order = [("in-RAM", in_ram), ("memmap", mapped)]
            for name, source in order if round_index % 2 == 0 else order[::-1]:
                rates[name].append(fit_rate(source, labels, args.size, args.epochs, args.batch_size))
        fit_mm, fit_ram = float(np.median(rates["memmap"])), float(np.median(rates["in-RAM"]))
        print(f"  model.fit     memmap {fit_mm:10.0f} img/s   in-RAM {fit_ram:10.0f} img/s   ratio {fit_mm / fit_ram:.2f} "
              f"(goal >= 0.9; median of {args.rounds} alternating rounds)")
        for name, values in rates.items():
            print(f"    {name:7s} rounds: " + ", ".join(f"{v:.0f}" for v in values) + " img/s")
    print(time_noop_repro())


if __name__ == "__main__":
    main()
