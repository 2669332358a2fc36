"""Training and inference throughput of every architecture on this machine's device.

Prints, measured in one run, for each architecture of the zoo (built as `train.*` defaults build
it: from scratch, class-weighted batches from the training loader, which also augments them):
images/s of `model.fit` once compiled, images/s of inference (`predict_on_batch`), the one-off
start-up of the first epoch (graph tracing / XLA compilation), and each rate as a ratio to the
small CNN's. Two more small-CNN rows show where augmentation should run: in the model (Keras
layers, `train.augment_in: model`) and not at all (`train.augment_strength: 0`). With
`--precision both` every architecture is also measured in mixed_float16 and the ratio
mixed / float32 is printed (on a GPU; on a CPU half precision is slower).

Usage: uv run python benchmarks/bench_architectures.py [--size 128] [--batch 32] [--seconds 4] [--rounds 3]
         [--architectures small_cnn,mobilenet_v2] [--precision auto|float32|mixed_float16|both]
         [--json rows.json]
On the GPU machine (JAX, no TensorFlow; see README "On a GPU"):
  KERAS_BACKEND=jax python benchmarks/bench_architectures.py --batch 128 --seconds 10 --precision both
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np

from tumorscope.runtime import apply_cpu_defaults  # noqa: E402

apply_cpu_defaults()  # before TensorFlow is imported
N_CLASSES = 4


def synthetic_slices(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint8 greyscale slices and balanced labels: throughput does not depend on the content."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, size, size, 1), dtype=np.uint8), np.arange(n) % N_CLASSES


def measure(architecture: str, size: int, batch: int, seconds: float, rounds: int, policy: str,
            **train_overrides) -> dict:
    """Time training and inference once compiled. A first 2-batch epoch traces / compiles and a
    second sizes the timed ones; then ``rounds`` epochs of k batches (about ``seconds`` each) give
    the training rate as their median (single epochs on the 2-core CI-sized VM swung up to 2x), and
    one inference pass over the same images the inference rate. ``train_overrides`` change
    `train.*` defaults (e.g. where augmentation runs) and label the row."""
    import keras

    from tumorscope.config import TrainConfig, load_params
    from tumorscope.inference import predict_proba
    from tumorscope.models.devices import fresh_session
    from tumorscope.models.train import balanced_class_weights, make_batches
    from tumorscope.models.zoo import build_model, model_options

    fresh_session()
    keras.config.set_dtype_policy(policy)
    cfg = TrainConfig.model_validate(load_params("params.yaml").train.model_dump() | {"architecture": architecture} | train_overrides)
    model = build_model(architecture, size, N_CLASSES, **model_options(cfg, seed=0))
    model.compile(optimizer=keras.optimizers.Adam(cfg.lr), loss="sparse_categorical_crossentropy")

    def loader(steps: int):
        images, labels = synthetic_slices(batch * steps, size)
        return images, make_batches(images, labels, batch, shuffle=True, seed=0,
                                    class_weights=balanced_class_weights(labels, N_CLASSES),
                                    augment_strength=cfg.augment_strength_in("loader"))

    def timed_epoch(batches) -> float:
        started = time.perf_counter()
        model.fit(batches, epochs=1, verbose=0)
        return time.perf_counter() - started

    _, short = loader(2)
    first_epoch = timed_epoch(short)
    probe = timed_epoch(short)
    steps = int(min(100, max(2, seconds / (probe / 2))))
    images, batches = loader(steps)
    timings = [timed_epoch(batches) for _ in range(rounds)]
    step_seconds = float(np.median(timings)) / steps

    predict_proba(model, images[:batch], batch_size=batch)  # compile the inference function
    started = time.perf_counter()
    predict_proba(model, images, batch_size=batch)
    inference = time.perf_counter() - started
    label = ", ".join(f"{key} {value}" for key, value in train_overrides.items())
    return {"architecture": f"{architecture} ({label})" if label else architecture,
            "policy": policy, "parameters": int(model.count_params()), "timed_steps": steps,
            "train_img_s": batch / step_seconds, "predict_img_s": len(images) / inference,
            "train_rounds_img_s": [round(len(images) / elapsed, 1) for elapsed in timings],
            "startup_s": max(0.0, first_epoch - 2 * step_seconds)}


def policies_for(precision: str) -> list[str]:
    from tumorscope.models.devices import precision_policy

    return ["float32", "mixed_float16"] if precision == "both" else [precision_policy(precision)]


def print_table(rows: list[dict]) -> None:
    reference = {row["policy"]: row for row in rows if row["architecture"] == "small_cnn"}
    print(f"  {'architecture':<34} {'policy':<14} {'params':>10} {'train img/s':>12} {'x CNN':>7} "
          f"{'predict img/s':>14} {'x CNN':>7} {'start-up s':>11}")
    for row in rows:
        base = reference.get(row["policy"])
        train_ratio = f"{row['train_img_s'] / base['train_img_s']:.2f}" if base else "-"
        predict_ratio = f"{row['predict_img_s'] / base['predict_img_s']:.2f}" if base else "-"
        print(f"  {row['architecture']:<34} {row['policy']:<14} {row['parameters']:>10,} {row['train_img_s']:>12.0f} "
              f"{train_ratio:>7} {row['predict_img_s']:>14.0f} {predict_ratio:>7} {row['startup_s']:>11.1f}")
    by_key = {(row["architecture"], row["policy"]): row for row in rows}
    for row in rows:
        half = by_key.get((row["architecture"], "mixed_float16"))
        if row["policy"] == "float32" and half:
            print(f"  mixed_float16 / float32 {row['architecture']}: train {half['train_img_s'] / row['train_img_s']:.2f}x, "
                  f"predict {half['predict_img_s'] / row['predict_img_s']:.2f}x")


def main() -> None:
    from tumorscope.models.architectures import ARCHITECTURES
    from tumorscope.models.devices import accelerator

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each timed training epoch")
    parser.add_argument("--rounds", type=int, default=3, help="timed training epochs per architecture (median)")
    parser.add_argument("--architectures", default=",".join(ARCHITECTURES))
    parser.add_argument("--precision", default="auto", choices=["auto", "float32", "mixed_float16", "both"])
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args()

    import keras

    architectures = [name for name in args.architectures.split(",") if name]
    unknown = sorted(set(architectures) - set(ARCHITECTURES))
    if unknown:
        raise SystemExit(f"--architectures: unknown {', '.join(unknown)} (known: {', '.join(ARCHITECTURES)})")
    device = accelerator()
    print(f"architecture throughput: {args.size}x{args.size} greyscale, batch {args.batch}, median of {args.rounds} "
          f"timed epochs of ~{args.seconds:g} s, "
          f"from scratch; Keras {keras.__version__} on {keras.backend.backend()}, device {device}, "
          f"{os.cpu_count()} CPU cores ({platform.machine()})")
    rows = []
    for policy in policies_for(args.precision):
        for architecture in architectures:
            rows.append(measure(architecture, args.size, args.batch, args.seconds, args.rounds, policy))
            if architecture == "small_cnn":  # where augmentation runs, and what it costs
                for variant in ({"augment_in": "model"}, {"augment_strength": 0.0}):
                    rows.append(measure(architecture, args.size, args.batch, args.seconds, args.rounds, policy, **variant))
    print_table(rows)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"backend": keras.backend.backend(), "device": device, "size": args.size,
                       "batch": args.batch, "seconds": args.seconds, "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
