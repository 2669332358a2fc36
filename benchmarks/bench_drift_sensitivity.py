"""False alarms and sensitivity of the drift verdict at the thresholds in params.yaml.

New phantom patients are drawn again and again from the training scanner (no drift: every "drift"
verdict is a false alarm) and from scanners that differ in one setting at a time (noise, blur,
window, resolution, field of view) and in all of them (monitor.phantom_batch.other), and each batch
is judged against the champion's reference. Needs a champion: run `make run` first.

    uv run python benchmarks/bench_drift_sensitivity.py [--batches 10] [--size 120]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=10, help="batches per scanner")
    parser.add_argument("--size", type=int, default=120, help="slices per batch (the current window)")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    warnings.simplefilter("ignore")
    import mlflow

    from tumorscope import registry, tracking
    from tumorscope.config import ScannerConfig, WindowConfig, load_params
    from tumorscope.data.phantom import generate_batch
    from tumorscope.monitoring.drift import DriftSettings, compare
    from tumorscope.monitoring.windows import folder_window
    from tumorscope.stages.monitoring import reference_window

    params = load_params(args.params)
    tracking.configure(params.mlflow)
    try:
        champion = registry.load_model(params.promote.registered_model, params.serve.model)
    except Exception as err:
        raise SystemExit(f"skipped: no champion to monitor ({err}); run make run first") from None
    reference, _ = reference_window(params, champion, mlflow.MlflowClient())
    cfg = params.monitor
    settings = DriftSettings.of(cfg, min_window=min(cfg.min_window, args.size))
    training = ScannerConfig(noise_hu=params.phantom.noise_hu, blur_sigma=params.phantom.blur_sigma,
                             window=params.phantom.window, image_size=params.phantom.image_size, field_of_view=1.0)
    scanners = {
        "training scanner (no drift)": training,
        "noise 12 -> 20 HU": training.model_copy(update={"noise_hu": 20.0}),
        "blur 0.7 -> 1.4 px": training.model_copy(update={"blur_sigma": 1.4}),
        "window 40/400 -> 70/300": training.model_copy(update={"window": WindowConfig(level=70.0, width=300.0)}),
        "128 -> 96 px": training.model_copy(update={"image_size": 96}),
        "field of view 0.85": training.model_copy(update={"field_of_view": 0.85}),
        "all of them (phantom_batch.other)": cfg.phantom_batch.other,
    }
    print(f"reference: {len(reference)} slices of {champion.version}; {args.batches} batches of {args.size} per scanner; "
          f"drift_share {cfg.drift_share}, embedding method {cfg.embedding_method}")
    print(f"{'scanner':38s} {'drift verdicts':>15s} {'mean drifted share':>19s} {'mean embedding score':>21s}")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        for name, scanner in scanners.items():
            verdicts, shares, embedding = 0, [], []
            for batch in range(args.batches):
                out = Path(folder) / f"b{batch}"
                batch_cfg = cfg.phantom_batch.model_copy(update={"out_dir": str(out), "n_images": args.size,
                                                                 "seed": 10_000 + batch, "scanner": "other",
                                                                 "other": scanner})
                generate_batch(batch_cfg, params.phantom)
                files = sorted(out.rglob("*.png"))
                window = folder_window(files, champion, params.serve.embedding_dims, str(out))
                summary = compare(reference, window.frame, settings).summary
                verdicts += bool(summary["drift"])
                shares.append(summary["drifted_share"])
                embedding.append(summary["embedding"]["score"] if summary["embedding"] else float("nan"))
            print(f"{name:38s} {verdicts:>9d} of {args.batches:<3d} {sum(shares) / len(shares):>19.2f} "
                  f"{sum(embedding) / len(embedding):>21.2f}", flush=True)
    print(f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
