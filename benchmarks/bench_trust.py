"""What the trust layer costs per image, and the prediction-set trade-off behind its defaults.

Needs a trained model and its cache (after `make run`). Prints, measured in one run:
1. per-image time of the model's forward pass alone (`predict_on_batch`, as `classify` without the
   trust layer) and of the forward pass with the embedding plus calibration, prediction set and
   out-of-distribution check (`LoadedModel.answers`), for single images and batches of 32, and
   their ratio (the goal: <= 1.05);
2. on the test split, for each conformal score (LAC, APS), marginal and per class (thresholds fitted
   on the validation split after temperature scaling): coverage overall and of the critical class,
   mean set size, share of sets of exactly one class, and accuracy on those.

Usage: uv run python benchmarks/bench_trust.py [--model-dir models] [--rounds 5]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from tumorscope.runtime import apply_cpu_defaults  # noqa: E402

apply_cpu_defaults()  # before TensorFlow is imported


def per_image_seconds(call, images: np.ndarray, batch: int, rounds: int) -> float:
    """Best of ``rounds`` passes over ``images`` in batches of ``batch``, per image."""
    call(images[:batch])  # trace once
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for start in range(0, len(images), batch):
            call(images[start:start + batch])
        best = min(best, (time.perf_counter() - started) / len(images))
    return best


def variant_rows(loaded, params) -> list[str]:
    from tumorscope.data.preprocess import load_groups, load_split
    from tumorscope.monitoring.features import model_outputs
    from tumorscope.trust import conformal
    from tumorscope.trust.calibration import apply_temperature

    cache, dims = params.preprocess.cache_dir, loaded.trust["ood"]["embedding_dims"]
    val_x, val_y = load_split(cache, "val")
    test_x, test_y = load_split(cache, "test")
    temperature = loaded.trust["temperature"]
    val_p = apply_temperature(model_outputs(loaded.model, val_x, dims)[0], temperature)
    test_p = apply_temperature(model_outputs(loaded.model, test_x, dims)[0], temperature)
    critical = loaded.classes.index(params.evaluate.critical_class)
    rows = ["| score | per class | coverage | coverage " + params.evaluate.critical_class
            + " | mean set size | sets of one | accuracy on sets of one |", "|---|---|---:|---:|---:|---:|---:|"]
    for score in conformal.SCORES:
        for per_class in (False, True):
            thresholds = conformal.calibrate(val_p, val_y, load_groups(cache, "val"), params.conformal.alpha, score,
                                             per_class)
            sets = conformal.prediction_sets(test_p, thresholds, score)
            one = sets.sum(axis=1) == 1
            correct = test_p.argmax(axis=1) == test_y
            rows.append(f"| {score} | {'yes' if per_class else 'no'} | {conformal.coverage(sets, test_y):.3f} | "
                        f"{conformal.coverage(sets[test_y == critical], test_y[test_y == critical]):.3f} | "
                        f"{sets.sum(axis=1).mean():.2f} | {one.mean():.3f} | "
                        f"{correct[one].mean() if one.any() else float('nan'):.3f} |")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default="models")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if not (Path(args.model_dir) / "train.json").is_file():
        print(f"bench_trust: no trained model in {args.model_dir}/ (run `make run` first); nothing measured")
        return 0
    from tumorscope.config import load_params
    from tumorscope.data.preprocess import load_split
    from tumorscope.inference import load_model_dir

    params = load_params("params.yaml")
    loaded = load_model_dir(args.model_dir)
    if loaded.trust is None:
        print("bench_trust: this model has no trust state (retrain it with `tumorscope train`)")
        return 1
    images = np.asarray(load_split(params.preprocess.cache_dir, "test")[0][:128])
    print(f"bench_trust: {loaded.version}, {len(images)} test slices of {loaded.image_size} px, best of {args.rounds}")
    print("| batch | forward pass ms/image | with trust ms/image | ratio |")
    print("|---:|---:|---:|---:|")
    for batch in (1, 32):
        plain = per_image_seconds(lambda x: loaded.model.predict_on_batch(x), images, batch, args.rounds)
        trusted = per_image_seconds(loaded.answers, images, batch, args.rounds)
        print(f"| {batch} | {plain * 1e3:.2f} | {trusted * 1e3:.2f} | {trusted / plain:.2f} |")
    print()
    print("\n".join(variant_rows(loaded, params)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
