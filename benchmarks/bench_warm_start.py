"""A retraining on old + new data: from scratch, or fine-tuned from the champion's weights?

Prints, measured in one run after `make run` (its champion, cache and incoming batch): the project's
data plus the labelled incoming batch (another scanner's patients, `tumorscope incoming`) through
the data stages in a temporary folder, then the champion's configuration (params.yaml's train.*
with reports/best_params.json over it) trained twice on that new split with the same seed: from
scratch, and starting from models/model.keras (train.init_weights). Both are scored on the test
slices the champion never trained on (none within split.phash_threshold of its training slices),
overall and on the new scanner's slices alone: macro-F1 with group-bootstrap intervals, the paired
difference (fine-tuned minus scratch), epochs run and fit seconds.

Usage: uv run python benchmarks/bench_warm_start.py [--epochs 60]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import yaml

from tumorscope.runtime import apply_cpu_defaults

apply_cpu_defaults()  # before TensorFlow is imported
REPO = Path(__file__).resolve().parents[1]


def new_data_project(root: Path, params) -> Path:
    """The project's data and its incoming batch as an added batch, through the data stages."""
    from tumorscope.config import load_params, merge
    from tumorscope.stages import data as stages

    shutil.copytree(REPO / "expectations", root / "expectations")
    shutil.copytree(REPO / params.monitor.phantom_batch.out_dir, root / "added" / "incoming")
    raw = merge(yaml.safe_load((REPO / "params.yaml").read_text()), {
        "data": {"source": str(REPO / params.data.source), "added_dir": "added"},
        "mlflow": {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "artifact_root": str(root / "mlartifacts")}})
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    with contextlib.chdir(root):  # the stages read and write relative to the project
        stages.run_data_stages(load_params("params.yaml"))
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=None, help="default train.epochs")
    args = parser.parse_args()

    from tumorscope.config import load_params, with_overrides
    from tumorscope.data.preprocess import load_classes, load_groups, load_split
    from tumorscope.data.split import nearest_distances, read_split_table, rows_in_cache_order
    from tumorscope.models import evaluate as ev
    from tumorscope.models.train import fit_and_score

    params = load_params(REPO / "params.yaml")
    champion_file = REPO / params.train.model_dir / "model.keras"
    best = json.loads((REPO / params.tune.best_params_path).read_text())["train"]
    if not champion_file.is_file():
        raise SystemExit("skipped: no trained model (run make run first)")
    with tempfile.TemporaryDirectory() as folder:
        root = new_data_project(Path(folder), params)
        here = os.getcwd()
        os.chdir(root)
        try:
            new = load_params("params.yaml")
            cfg = with_overrides(new, {"train": best | ({"epochs": args.epochs} if args.epochs else {})}).train
            cache = new.preprocess.cache_dir
            classes = load_classes(cache)
            train, val = load_split(cache, "train"), load_split(cache, "val")
            test_images, test_labels = load_split(cache, "test")
            test_groups = load_groups(cache, "test")
            test = rows_in_cache_order(read_split_table(new.split.path), classes, test_labels, ("test",), "split vs cache")
            champion_train = read_split_table(REPO / params.split.path)
            champion_train = champion_train.loc[champion_train["split"] == "train", "phash"].to_numpy()
            unseen = nearest_distances(test["phash"].to_numpy(), champion_train) > new.split.phash_threshold
            new_scanner = test["path"].str.contains("/added/", regex=False).to_numpy()
            runs = {}
            for name, start in (("scratch", None), ("fine-tuned", str(champion_file))):
                outcome = fit_and_score(cfg, new.preprocess.image_size, classes, new.seed, train, val,
                                        (test_images, test_labels, test_groups), new.evaluate, init_weights=start)
                runs[name] = {"probabilities": outcome.probabilities, "predicted": outcome.probabilities.argmax(axis=1),
                              "epochs": outcome.result.epochs_run, "seconds": outcome.result.fit_seconds}
        finally:
            os.chdir(here)
    print(f"new split: {len(test_labels)} test slices, {int(unseen.sum())} the champion never trained near, "
          f"{int((unseen & new_scanner).sum())} of them from the new scanner; train.* {cfg.architecture}, "
          f"up to {cfg.epochs} epochs, seed {new.seed}")
    for subset, mask in (("unseen test slices", unseen), ("unseen, new scanner", unseen & new_scanner)):
        labels, groups = test_labels[mask], test_groups[mask]
        for name, run in runs.items():
            scores = ev.score_predictions(labels, run["probabilities"][mask], groups, classes, new.evaluate, new.seed)
            ci, recall = scores["macro_f1_ci"], scores["critical_recall"]
            print(f"{subset}: {name}: macro-F1 {scores['macro_f1']:.3f} [{ci['low']:.3f}, {ci['high']:.3f}], "
                  f"{scores['critical_class']} recall {'-' if recall is None else f'{recall:.3f}'}")
        paired = ev.paired_group_bootstrap(labels, runs["fine-tuned"]["predicted"][mask], runs["scratch"]["predicted"][mask],
                                           groups, len(classes), new.evaluate.bootstrap_samples, new.evaluate.confidence,
                                           new.seed)
        print(f"{subset}: fine-tuned minus scratch {paired['macro_f1_difference']:+.3f} "
              f"[{paired['low']:+.3f}, {paired['high']:+.3f}] over {paired['n_groups']} groups")
    for name, run in runs.items():
        print(f"{name}: {run['epochs']} epochs in {run['seconds']:.0f} s")
    print(f"ratio fit time fine-tuned / scratch: {runs['fine-tuned']['seconds'] / runs['scratch']['seconds']:.2f}")


if __name__ == "__main__":
    main()
