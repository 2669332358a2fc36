"""The data stages: one function each (params in, the stage's files out), calling the library.

The CLI (and so DVC) and the Prefect flows call these, never the library's internals, so there is
one code path. Each returns a short human summary; a user mistake raises UserError (one line).
"""

from __future__ import annotations

from pathlib import Path

from tumorscope.config import Params
from tumorscope.errors import UserError
from tumorscope.reports import read_json, write_json

DATA_STAGES = ("phantom", "ingest", "manifest", "validate", "split", "preprocess")


def run_phantom(params: Params) -> str:
    from tumorscope.data.phantom import generate_phantom

    index = generate_phantom(params.phantom, params.seed)
    counts = index["Class"].value_counts().sort_index().to_dict()
    return f"phantom: wrote {len(index)} slices to {params.phantom.out_dir} {counts}"


def run_ingest(params: Params) -> str:
    from tumorscope.data.ingest import ingest

    report = ingest(params.data, output_dirs=output_dirs(params))
    Path(params.data.report_path).parent.mkdir(parents=True, exist_ok=True)
    Path(params.data.report_path).write_text(report.to_json() + "\n")
    excluded = f", excluded folders {report.excluded_folders}" if report.excluded_folders else ""
    hidden = f", {len(report.skipped_hidden_files)} hidden files listed in {params.data.report_path}" if report.skipped_hidden_files else ""
    added = (f", incl. {sum(sum(c.values()) for c in report.added_batches.values())} from {len(report.added_batches)} "
             f"added batch(es) in {params.data.added_dir}") if report.added_batches else ""
    return (f"ingest: {sum(report.files_per_label.values())} files {report.files_per_label} -> "
            f"{params.data.raw_dir}{added}{excluded}{hidden}")


def output_dirs(params: Params) -> dict[str, str]:
    """The folders the pipeline rebuilds, by params key: data.source may not be, hold or sit in any."""
    return {"data.raw_dir": params.data.raw_dir, "preprocess.cache_dir": params.preprocess.cache_dir,
            "train.model_dir": params.train.model_dir, "evaluate.out_dir": params.evaluate.out_dir,
            "validate.docs_dir": params.validate_.docs_dir, "tune.plots_dir": params.tune.plots_dir}


def expected_classes(report_path: str) -> list[str]:
    if not Path(report_path).is_file():
        raise UserError(f"{report_path} not found (run the ingest stage first)")
    return sorted(read_json(report_path)["files_per_label"])


def run_manifest(params: Params) -> str:
    from tumorscope.data.manifest import build_manifest, check_every_class_readable, quarantine_table

    manifest = build_manifest(Path(params.data.raw_dir), params.data.dicom_window)
    Path(params.manifest.path).parent.mkdir(parents=True, exist_ok=True)
    manifest.to_csv(params.manifest.path, index=False)
    quarantined = quarantine_table(manifest)
    Path(params.manifest.quarantine_path).parent.mkdir(parents=True, exist_ok=True)
    quarantined.to_csv(params.manifest.quarantine_path, index=False)
    check_every_class_readable(manifest)  # after writing, so the quarantine report explains it
    note = f"; {len(quarantined)} unreadable file(s) quarantined, see {params.manifest.quarantine_path}" if len(quarantined) else ""
    return f"manifest: {len(manifest)} files, {int(manifest['readable'].sum())} readable{note}"


def run_validate(params: Params) -> str:
    from tumorscope.data.manifest import load_manifest
    from tumorscope.data.validate import validate_manifest

    outcome = validate_manifest(load_manifest(params.manifest.path), expected_classes(params.data.report_path), params.validate_)
    if not outcome.success:
        raise UserError(f"{outcome.summary()} (details: {outcome.result_path})")
    return outcome.summary()


def run_split(params: Params) -> str:
    from tumorscope.data.manifest import load_manifest
    from tumorscope.data.split import make_split, split_report

    cfg = params.split
    fractions = {"train": cfg.train, "val": cfg.val, "test": cfg.test}
    manifest = load_manifest(params.manifest.path)
    table = make_split(manifest[manifest["readable"]], fractions, cfg.phash_threshold, params.seed)
    report = split_report(table, fractions, cfg.phash_threshold, cfg.tolerance)
    Path(cfg.path).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(cfg.path, index=False)
    write_json(cfg.report_path, report)
    write_json(cfg.metrics_path, {k: report[k] for k in ("n_images", "n_groups", "largest_group", "cross_split_leaks")}
               | {"groups_spanning_classes": len(report["groups_spanning_classes"]), "unmet_targets": len(report["unmet_targets"])})
    if report["cross_split_leaks"]:
        raise UserError(f"split: {report['cross_split_leaks']} duplicate pairs straddle splits (bug); see {cfg.report_path}")
    sizes = {s: sum(c.values()) for s, c in report["counts"].items()}
    unmet = f"; WARNING {len(report['unmet_targets'])} unmet target(s): {report['unmet_targets'][0]}" if report["unmet_targets"] else ""
    return (f"split: {sizes}, {report['n_groups']} duplicate groups (largest {report['largest_group']}), "
            f"{report['cross_split_leaks']} leaks{unmet}")


def run_preprocess(params: Params) -> str:
    from tumorscope.data.preprocess import build_cache
    from tumorscope.data.split import read_split_table

    table = read_split_table(params.split.path)
    report = build_cache(table, sorted(table["label"].unique()), params.preprocess, params.data.dicom_window)
    write_json(params.preprocess.report_path, report)
    return f"preprocess: cache {report['counts']} at {params.preprocess.image_size}px in {params.preprocess.cache_dir}"


def uses_phantom(params: Params) -> bool:
    """Whether data.source is the embedded phantom's folder (so the phantom stage must run)."""
    return Path(params.data.source).resolve() == Path(params.phantom.out_dir).resolve()


def run_data_stages(params: Params) -> list[str]:
    """Every data stage in order, as `dvc repro` runs them (phantom only when data.source is its
    folder), in the working directory, without DVC: for tests and benchmarks."""
    return [globals()[f"run_{stage}"](params) for stage in DATA_STAGES if stage != "phantom" or uses_phantom(params)]


def run_incoming(params: Params) -> str:
    """A labelled batch of new phantom patients (monitor.phantom_batch), from the training phantom's
    scanner or another one: the monitor stage's default current window."""
    from tumorscope.data.phantom import generate_batch

    cfg = params.monitor.phantom_batch
    counts = generate_batch(cfg, params.phantom)
    scanner = "the training phantom's scanner" if cfg.scanner == "same" else "another scanner (monitor.phantom_batch.other)"
    return f"incoming: {sum(counts.values())} new phantom slices from {scanner} in {cfg.out_dir}: {counts}"
