"""Great Expectations (1.x) validation of the image manifest.

Two Expectation Suites, kept only as Great Expectations' own JSON in ``expectations/`` (edit them
there; a suite with an expectation GE cannot read is refused, never run in part):

* ``manifest.json`` runs on the whole manifest. Per-image checks (phash, size, intensity stats)
  carry a ``row_condition`` so they look at readable rows only; the ``readable`` check uses
  ``mostly`` to bound the quarantined share.
* ``class_counts.json`` runs on :func:`class_count_table` (one row per class present).

Thresholds are not in the JSON: expectations say ``{"$PARAMETER": "min_side"}`` and the values come
from ``ValidateConfig`` at run time (``expectation_parameters`` of ``ValidationDefinition.run``).

Great Expectations is imported inside the functions: it is slow to import, and a CLI ``--help``
must stay fast. Its context is ephemeral (in memory); only the Data Docs site and the JSON result
are written, both under ``project_root``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from tumorscope.config import ValidateConfig
from tumorscope.reports import jsonable

MANIFEST_SUITE = "manifest"
CLASS_COUNTS_SUITE = "class_counts"
SUITE_NAMES = (MANIFEST_SUITE, CLASS_COUNTS_SUITE)
DOCS_SITE = "tumorscope"
CLASS_COUNT_COLUMNS = ["label", "count", "share", "ratio_to_smallest"]
_NOISY_RESULT_KEYS = {"partial_unexpected_index_list", "partial_unexpected_counts",
                      "unexpected_percent_total", "unexpected_percent_nonmissing"}
# Files Data Docs writes into its site folder; removed before a build so no stale page survives.
_DOCS_ENTRIES = ("index.html", "static", "expectations", "validations")


@dataclass(frozen=True)
class ValidationOutcome:
    success: bool
    failed: list[str]  # e.g. "manifest: expect_column_values_to_be_in_set(label)"
    result_path: Path
    docs_index: Path | None
    evaluated: int = 0

    def summary(self) -> str:
        if self.success:
            return f"validation passed: {self.evaluated} expectations"
        noun = "expectation" if len(self.failed) == 1 else "expectations"
        return f"validation failed: {len(self.failed)} {noun}: " + "; ".join(self.failed)


def class_count_table(manifest: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    """One row per expected class that has readable images: label, count, share, ratio_to_smallest.

    Rows follow ``classes`` order. Only classes actually present get a row: an absent class is
    caught by the suite's "contains set" expectation, not by a zero count. Unexpected labels are
    left out (the manifest suite names them). ``share`` is the class's share of the readable images
    of expected classes; ``ratio_to_smallest`` is count / smallest count, so its maximum is the
    imbalance max(count) / min(count).
    """
    if "readable" in manifest.columns:
        readable = manifest["readable"].fillna(False).astype(bool)
    else:
        readable = pd.Series(True, index=manifest.index)
    if "label" in manifest.columns:
        labels = manifest.loc[readable, "label"]
    else:
        labels = pd.Series(dtype=object)
    counts = labels.astype(str).value_counts()
    order = [c for c in classes if c in counts.index]
    counts = counts.reindex(order)
    total = int(counts.sum())
    smallest = int(counts.min()) if len(counts) else 0
    table = pd.DataFrame({
        "label": pd.Series(order, dtype=object),
        "count": counts.to_numpy(dtype="int64"),
    })
    table["share"] = table["count"] / total if total else 0.0
    table["ratio_to_smallest"] = table["count"] / smallest if smallest else 0.0
    return table[CLASS_COUNT_COLUMNS]


def suite_parameters(classes: list[str], cfg: ValidateConfig) -> dict[str, Any]:
    """Values for the ``$PARAMETER`` names the suites use."""
    return {
        "classes": list(classes),
        "min_side": cfg.min_side,
        "max_side": cfg.max_side,
        "min_intensity_std": cfg.min_intensity_std,
        "min_readable_fraction": 1.0 - cfg.max_quarantined_fraction,
        "min_images_per_class": cfg.min_images_per_class,
        "max_class_imbalance": cfg.max_class_imbalance,
    }


# ---------------------------------------------------------------------------------------------
# Running.


def _import_gx():
    # No network: GE must not send usage statistics.
    os.environ["GX_ANALYTICS_ENABLED"] = "false"
    import great_expectations as gx

    return gx


def _ephemeral_context(gx, docs_dir: Path | None):
    """In-memory context: no gx/ folder, no temp docs site; one Data Docs site at docs_dir."""
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    sites = {}
    if docs_dir is not None:
        sites[DOCS_SITE] = {
            "class_name": "SiteBuilder",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend",
                              "base_directory": str(docs_dir)},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        }
    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        data_docs_sites=sites,
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
    )
    return gx.get_context(project_config=config, mode="ephemeral")


def _resolve(project_root: Path, path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else project_root / p


def _load_suite(gx, path: Path):
    from tumorscope.errors import UserError

    if not path.is_file():
        raise UserError(f"expectation suite not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"expectation suite {path} is not valid JSON: {err}") from None
    data.pop("id", None)
    expected = len(data.get("expectations", []))
    for exp in data.get("expectations", []):
        exp.pop("id", None)
    suite = gx.ExpectationSuite(**data)
    # GE logs and drops an invalid expectation instead of raising: refuse a partial suite.
    if len(suite.expectations) != expected:
        raise UserError(f"expectation suite {path}: {expected - len(suite.expectations)} "
                        "expectation(s) are invalid (see the log)")
    return suite


def _describe(kind: str, kwargs: dict) -> str:
    if "column" in kwargs:
        target = str(kwargs["column"])
    elif "column_A" in kwargs:
        target = f"{kwargs['column_A']}, {kwargs['column_B']}"
    else:
        return kind
    return f"{kind}({target})"


def _failure_record(suite: str, result) -> dict[str, Any]:
    config = result.expectation_config
    kwargs = {k: v for k, v in config.kwargs.items() if k != "batch_id"}
    res = result.result or {}
    # Keep what GE observed, less its noisier derived keys. (Some expectations report observed_value
    # None and put the evidence elsewhere, e.g. contain_set's partial_missing_list.)
    observed = {k: v for k, v in res.items() if k not in _NOISY_RESULT_KEYS and v is not None}
    record = {
        "suite": suite,
        "expectation": config.type,
        "description": _describe(config.type, kwargs),
        "kwargs": kwargs,
        "observed": observed,
        "notes": (config.meta or {}).get("notes"),
    }
    exc = result.exception_info or {}
    if exc.get("raised_exception"):
        record["exception"] = str(exc.get("exception_message"))
    return record


def _clean_docs_dir(docs_dir: Path) -> None:
    for name in _DOCS_ENTRIES:
        entry = docs_dir / name
        if entry.is_dir():
            shutil.rmtree(entry)
        elif entry.exists():
            entry.unlink()


REMOTE_LOGO = re.compile(r"https://great-expectations-web-assets\.s3\.us-east-2\.amazonaws\.com/logo-long\.png\?[^\"']*")
LOCAL_LOGO = "static/images/logo-long-vector.svg"


LOAD_TIME = re.compile(r"(>ge_load_time</span>.*?<span[^>]*>)\d{8}T\d{6}\.\d{6}Z", re.DOTALL)
COLLAPSE_ID = re.compile(r"collapse-body-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def number_collapse_ids(html: str) -> str:
    """Each distinct random collapse id -> collapse-body-<n>, n in order of first appearance."""
    numbered: dict[str, str] = {}
    return COLLAPSE_ID.sub(lambda m: numbered.setdefault(m.group(0), f"collapse-body-{len(numbered)}"), html)


def make_pages_reproducible(docs_dir: Path) -> None:
    """Make GE's rendered pages depend on the data alone (they are a DVC output):
    - the logo points at the copy GE ships in the docs folder; GE links a remote image with the
      render time (and the context id) in its query string, a timestamp here and a request to a
      third party whenever someone opens the pages;
    - the batch's load time (GE's "ge_load_time" marker) reads "not recorded";
    - the random ids of collapsible blocks become numbered in page order (same links, same ids)."""
    for page in docs_dir.rglob("*.html"):
        local = Path(os.path.relpath(docs_dir / LOCAL_LOGO, page.parent)).as_posix()
        html = page.read_text()
        fixed = number_collapse_ids(LOAD_TIME.sub(r"\1not recorded", REMOTE_LOGO.sub(local, html)))
        if fixed != html:
            page.write_text(fixed)


def reproducible_run_id(manifest: pd.DataFrame):
    """A Great Expectations run id that depends on the data alone: the Data Docs are a DVC output,
    and GE's default (the wall-clock time, in page paths and tables) would make every run differ.
    The run is named by the manifest's fingerprint; its time is fixed at the Unix epoch (when a
    validation ran is in the git and DVC history, not in the pages)."""
    import hashlib
    from datetime import UTC, datetime

    from great_expectations.core.run_identifier import RunIdentifier

    digest = hashlib.sha256(pd.util.hash_pandas_object(manifest, index=False).values.tobytes()).hexdigest()[:12]
    return RunIdentifier(run_name=f"manifest-{digest}", run_time=datetime(1970, 1, 1, tzinfo=UTC))


def validate_manifest(manifest: pd.DataFrame, classes: list[str], cfg: ValidateConfig,
                      project_root: Path = Path(".")) -> ValidationOutcome:
    """Run both suites; write the JSON result and Data Docs. A failed validation does not raise."""
    project_root = Path(project_root)
    suite_dir = _resolve(project_root, cfg.suite_dir)
    docs_dir = _resolve(project_root, cfg.docs_dir).resolve()
    result_path = _resolve(project_root, cfg.result_path)

    gx = _import_gx()
    suites = {name: _load_suite(gx, suite_dir / f"{name}.json") for name in SUITE_NAMES}
    tables = {MANIFEST_SUITE: manifest.reset_index(drop=True),
              CLASS_COUNTS_SUITE: class_count_table(manifest, classes)}
    params = suite_parameters(classes, cfg)

    docs_dir.mkdir(parents=True, exist_ok=True)
    _clean_docs_dir(docs_dir)
    context = _ephemeral_context(gx, docs_dir)
    source = context.data_sources.add_pandas("tumorscope")

    per_suite: dict[str, dict[str, Any]] = {}
    failures: list[dict[str, Any]] = []
    evaluated = successful = 0
    for name in SUITE_NAMES:
        suite = context.suites.add(suites[name])
        batch = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe("all")
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(name=f"{name}_validation", data=batch, suite=suite))
        result = definition.run(batch_parameters={"dataframe": tables[name]},
                                expectation_parameters=params,
                                result_format={"result_format": "SUMMARY"},
                                run_id=reproducible_run_id(tables[MANIFEST_SUITE]))
        stats = dict(result.statistics)
        per_suite[name] = {"success": bool(result.success), "statistics": stats}
        evaluated += int(stats.get("evaluated_expectations", 0))
        successful += int(stats.get("successful_expectations", 0))
        # Report failures in suite order (GE orders results by how it resolved the metrics).
        position = {exp.id: i for i, exp in enumerate(suite.expectations)}
        failed = [r for r in result.results if not r.success]
        failed.sort(key=lambda r: position.get(r.expectation_config.id, len(position)))
        failures += [_failure_record(name, r) for r in failed]

    context.build_data_docs(site_names=[DOCS_SITE])
    make_pages_reproducible(docs_dir)
    index_file = docs_dir / "index.html"
    docs_index = index_file if index_file.is_file() else None

    success = all(s["success"] for s in per_suite.values())
    report = {
        "success": success,
        "suites": per_suite,
        "statistics": {
            "evaluated_expectations": evaluated,
            "successful_expectations": successful,
            "unsuccessful_expectations": evaluated - successful,
        },
        "parameters": params,
        "failed": failures,
        "class_counts": class_count_table(manifest, classes).to_dict(orient="records"),
        # Relative to the project (as params name it): an absolute path would differ on every
        # clone, and DVC would rerun every stage downstream of this file there.
        "docs_index": (Path(cfg.docs_dir) / "index.html").as_posix() if docs_index else None,
    }
    result_path.parent.mkdir(parents=True, exist_ok=True)
    result_path.write_text(json.dumps(jsonable(report), indent=2) + "\n")
    return ValidationOutcome(
        success=success,
        failed=[f"{f['suite']}: {f['description']}" for f in failures],
        result_path=result_path,
        docs_index=docs_index,
        evaluated=evaluated,
    )
