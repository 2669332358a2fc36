"""The review loop's costs: what queueing an answer adds to a request (the service's intake, whose
write runs on a background thread), the background write itself, and `tumorscope review harvest`
of 10,000 read items (perceptual hashes, duplicate check against a manifest of 10,000 slices, the
batch and its provenance table).

Usage: uv run python benchmarks/bench_review.py [--items 10000] [--size 256]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

CLASSES = ["Cyst", "Normal", "Stone", "Tumor"]


def answer(index: int) -> dict:
    predicted = CLASSES[index % 4]
    return {"class": predicted, "probabilities": {c: 0.7 if c == predicted else 0.1 for c in CLASSES},
            "prediction_set": [predicted], "refer": True, "refer_reason": "prediction set holds 2 classes",
            "model_version": "tumorscope-kidney-ct/1", "request_id": f"req-{index}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=256, help="slice side in pixels (a decoded upload)")
    args = parser.parse_args()
    from tumorscope.api.review_intake import ReviewIntake
    from tumorscope.config import ReviewConfig, load_params
    from tumorscope.data.manifest import phash_hex
    from tumorscope.review.harvest import harvest
    from tumorscope.review.queue import ReviewQueue

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        slices = [rng.integers(0, 256, (args.size, args.size), dtype=np.uint8) for _ in range(200)]
        intake = ReviewIntake(ReviewConfig.model_validate(
            load_params("params.yaml").review.model_dump() | {"queue_dir": str(root / "intake"), "sample_rate": 0.05}), seed=0)
        submit = []
        for index, pixels in enumerate(slices):
            started = time.perf_counter()
            intake.submit(pixels, answer(index))
            submit.append(time.perf_counter() - started)
        started = time.perf_counter()
        intake.close()  # what the writer thread still had to do
        queue = ReviewQueue(root / "direct")
        write = []
        for index, pixels in enumerate(slices):
            started = time.perf_counter()
            queue.add(pixels, answer(index), "tumorscope-kidney-ct/1", f"req-{index}", "referred")
            write.append(time.perf_counter() - started)
        print(f"queueing a referred answer: {1e6 * statistics.median(submit):.0f} us on the request's path "
              f"(median of {len(slices)}), {1e3 * statistics.median(write):.1f} ms written on the background thread "
              f"({args.size}x{args.size} slice: PNG + answer)")

        big = ReviewQueue(root / "harvest")
        small = args.size
        pool = rng.integers(0, 256, (args.items, small, small), dtype=np.uint8)
        started = time.perf_counter()
        for index in range(args.items):
            identifier = big.add(pool[index], answer(index), "tumorscope-kidney-ct/1", f"req-{index}", "referred")
            big.label(identifier, CLASSES[(index + 1) % 4], "dr-bench")
        filled = time.perf_counter() - started
        manifest = [phash_hex(p) for p in rng.integers(0, 256, (args.items, small, small), dtype=np.uint8)]
        started = time.perf_counter()
        batch, counts = harvest(big, root / "added", "reviewed-bench", manifest, 4)
        seconds = time.perf_counter() - started
        print(f"harvest of {args.items:,} read items ({small}x{small}) against {len(manifest):,} known hashes: "
              f"{seconds:.1f} s ({counts}); filling the queue took {filled:.1f} s")


if __name__ == "__main__":
    main()
