"""Training loader: augmented batches per second against the number of loader threads.

The loader (`tumorscope.models.train.make_batches`, the one `train` uses) reads each batch from a
memory-mapped uint8 cache and warps it on the host (`train.augment_strength`: flip, rotation, shift,
zoom), optionally with intensity augmentation (`train.intensity_augment`). One core warps about
570 slices/s at 224 px, while a GPU trains MobileNetV2 at about 2,000: `train.loader_workers`
threads split each batch. Prints, measured in one run, images/s for 1, 2, ... threads and the
ratio to one thread (goal >= 1.8 at 2 threads on 2 cores), with and without intensity
augmentation. Rounds alternate the thread counts so drift in machine load hits all alike; the
median round is reported. Also checks that every thread count gave the same pixels.

Usage: uv run python benchmarks/bench_loader_workers.py [--images 1024] [--size 224] [--workers 1 2 4] [--rounds 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def epoch_rate(batches) -> float:
    """Images per second of reading every batch of one epoch."""
    started = time.perf_counter()
    count = sum(len(batches[index][1]) for index in range(len(batches)))
    return count / (time.perf_counter() - started)


def main() -> None:
    from tumorscope.data.augment import usable_cores
    from tumorscope.models.train import make_batches

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--strength", type=float, default=0.1, help="train.augment_strength (the default 0.1)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.images, args.size, args.size, 1), dtype=np.uint8)
    labels = rng.integers(0, 4, args.images).astype(np.int32)
    cores = usable_cores()
    print(f"loader threads: {args.images} images {args.size}x{args.size}, batch {args.batch_size}, "
          f"augment_strength {args.strength}, {cores} CPU cores, median of {args.rounds} rounds")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train_x.npy"
        np.save(path, images)
        mapped = np.load(path, mmap_mode="r")
        for intensity in (0.0, 0.2):
            def loader(workers: int, intensity: float = intensity):
                return make_batches(mapped, labels, args.batch_size, shuffle=True, seed=0,
                                    augment_strength=args.strength, intensity_strength=intensity, workers=workers)

            first = [loader(workers)[0][0] for workers in args.workers]
            same = all(np.array_equal(first[0], other) for other in first[1:])
            rates: dict[int, list[float]] = {workers: [] for workers in args.workers}
            for round_index in range(args.rounds):
                order = args.workers if round_index % 2 == 0 else args.workers[::-1]
                for workers in order:
                    rates[workers].append(epoch_rate(loader(workers)))
            median = {workers: float(np.median(values)) for workers, values in rates.items()}
            base = median[args.workers[0]]
            print(f"  intensity_augment {intensity}: same pixels for every thread count: {same}")
            for workers in args.workers:
                print(f"    {workers} thread(s) {median[workers]:8.0f} img/s   ratio {median[workers] / base:.2f}   "
                      f"rounds: " + ", ".join(f"{value:.0f}" for value in rates[workers]))


if __name__ == "__main__":
    main()
