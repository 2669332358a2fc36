"""The DVC stage graph, declared once.

Each stage's params, data deps, outs, metrics and plots are written here; its code deps are what its
command can import (read from the source, imports inside functions included), and the tune stage's
params are ``tuning.study.trial_inputs``. ``tumorscope dvc-yaml`` renders dvc.yaml from this, and
a test fails when the committed file is not what it renders, so no list in dvc.yaml is kept by hand.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

from tumorscope.config import Params

REPO = Path(__file__).resolve().parents[3]
PACKAGES = {"tumorscope": REPO / "src" / "tumorscope", "flows": REPO / "flows"}
HEADER = """\
# Rendered by `tumorscope dvc-yaml` from src/tumorscope/stages/graph.py: edit that file, not this one.
# Thin stages: each runs `python -m tumorscope.dvc_stage <stage>` (what `tumorscope <stage>` runs,
# without the CLI, so an edit there reruns nothing) and declares exactly the params it reads, its
# deps (data, and exactly the project modules its command can import) and outs. Outputs with
# `cache: false` are small reports kept in git; the rest are in the DVC cache (and the remote
# after `dvc push`).
"""


def kept(path: str, **options: Any) -> dict[str, dict[str, Any]]:
    """An output kept in git rather than in the DVC cache (a small report)."""
    return {path: {"cache": False, **options}}


EVALUATION_SCORING = ["evaluate.critical_class", "evaluate.bootstrap_samples", "evaluate.confidence",
                      "evaluate.calibration_bins", "evaluate.max_single_class_share"]
MODEL = ["${train.model_dir}/model.keras", "${train.model_dir}/train.json"]

# name -> (what it does, the DVC fields but its code deps). Params name whole sections where the
# stage reads all of them.
STAGES: dict[str, tuple[str, dict[str, Any]]] = {
    "phantom": ("The embedded default data: a synthetic kidney-CT phantom.", {
        "params": ["seed", "phantom"], "outs": ["${phantom.out_dir}"]}),
    "ingest": ("data.source (and labelled batches under data.added_dir) copied into data.raw_dir; the "
               "folders it may not overlap are params too (checked before anything is copied).", {
        "deps": ["${data.source}", "${data.added_dir}"],
        "params": ["data.source", "data.added_dir", "data.raw_dir", "data.report_path", "data.class_map",
                   "data.image_extensions", "preprocess.cache_dir", "train.model_dir", "evaluate.out_dir",
                   "validate.docs_dir", "tune.plots_dir"],
        "outs": ["${data.raw_dir}", kept("${data.report_path}")]}),
    "manifest": ("Every raw file hashed and measured; unreadable ones quarantined.", {
        "deps": ["${data.raw_dir}"], "params": ["data.dicom_window", "manifest"],
        "outs": ["${manifest.path}", kept("${manifest.quarantine_path}")]}),
    "validate": ("The Great Expectations suites in expectations/ on the manifest.", {
        "deps": ["${manifest.path}", "${data.report_path}", "expectations"], "params": ["validate", "data.report_path"],
        "outs": [kept("${validate.result_path}"), "${validate.docs_dir}"]}),
    "split": ("Leakage-aware stratified split: duplicate groups kept whole.", {
        "deps": ["${manifest.path}", "${validate.result_path}"], "params": ["seed", "split"],
        "outs": ["${split.path}", kept("${split.report_path}")], "metrics": [kept("${split.metrics_path}")]}),
    "preprocess": ("The memory-mapped uint8 cache training reads.", {
        "deps": ["${split.path}", "${data.raw_dir}"], "params": ["data.dicom_window", "preprocess"],
        "outs": ["${preprocess.cache_dir}", kept("${preprocess.report_path}")]}),
    "audit": ("What the data can teach before anything is trained: orientation, source and acquisition cues "
              "per class (reports/audit.md), warnings for thin cells, acquisition-only baselines on grouped folds.", {
        "deps": ["${preprocess.cache_dir}", "${split.path}"],
        "params": ["seed", "audit", "data.raw_dir", "evaluate.critical_class", "evaluate.bootstrap_samples",
                   "evaluate.confidence", "mlflow"],
        "outs": [kept("${audit.report_path}"), kept("${audit.summary_path}")], "metrics": [kept("${audit.metrics_path}")]}),
    "tune": ("The Optuna study through the Prefect tuning flow (flows/tuning.py); its params are every "
             "trial input (tumorscope.tuning.study.trial_inputs).", {
        "deps": ["${preprocess.cache_dir}", "${split.path}"],
        "outs": [kept("${tune.leaderboard_path}"), kept("reports/leaderboard.md"), kept("${tune.best_params_path}"),
                 kept("${tune.plots_dir}")]}),
    "train": ("The tuned configuration trained to train.epochs; the trust layer (conformal, ood) fitted on "
              "the validation split; preprocess is the model's input spec.", {
        "deps": ["${preprocess.cache_dir}", "${tune.best_params_path}"],
        "params": ["seed", "preprocess", "data.dicom_window", "split.phash_threshold", "train", "tune.best_params_path",
                   *EVALUATION_SCORING, "conformal", "ood", "mlflow"],
        "outs": MODEL, "plots": [{"${train.model_dir}/history.tsv": {"x": "epoch", "y": "val_macro_f1"}}]}),
    "evaluate": ("Test-split metrics, calibration, prediction sets and plots.", {
        "deps": [*MODEL, "${preprocess.cache_dir}", "${split.path}"],
        "params": ["seed", "split.path", "train.model_dir", "preprocess.cache_dir", "evaluate", "audit.thumbnail_size",
                   "mlflow"],
        "metrics": [kept("${evaluate.metrics_path}")],
        "plots": [kept("${evaluate.out_dir}/confusion_matrix.png"), kept("${evaluate.out_dir}/class_histogram.png"),
                  kept("${evaluate.out_dir}/reliability.png"),
                  kept("${evaluate.out_dir}/predictions.csv", template="confusion", x="actual", y="predicted"),
                  kept("${evaluate.out_dir}/reliability_calibrated.png"),
                  kept("${evaluate.out_dir}/risk_coverage.csv", x="coverage", y="risk")],
        "outs": [kept("${evaluate.out_dir}/report.json")]}),
    "promote": ("Registers the evaluated model (alias challenger) and moves the champion alias when it passes "
                "the promote.* gates; the report holds the decision and its evidence.", {
        "deps": [*MODEL, "${evaluate.out_dir}/report.json", "${preprocess.cache_dir}", "${split.path}"],
        "params": ["seed", "promote", "split.path", "train.model_dir", "preprocess.cache_dir", "evaluate.out_dir",
                   *EVALUATION_SCORING, "review.batch_prefix", "mlflow"],
        "outs": [kept("${promote.report_path}")], "metrics": [kept("${promote.metrics_path}")]}),
    "incoming": ("New phantom patients from another scanner (monitor.phantom_batch): the default current "
                 "window of monitor. With real new slices, point monitor.current at their folder instead.", {
        "params": ["phantom", "monitor.phantom_batch"], "outs": ["${monitor.phantom_batch.out_dir}"]}),
    "monitor": ("Drift of monitor.current against the champion's reference (Evidently): one verdict, "
                "drift.html; the scores go to the champion's MLflow run and the Evidently workspace.", {
        "deps": ["${monitor.current}", "${promote.report_path}", "${preprocess.cache_dir}", "${split.path}"],
        "params": ["monitor", "promote.registered_model", "serve.model", "serve.embedding_dims", "split.path",
                   "manifest.path", "preprocess", "data.image_extensions", "mlflow"],
        "outs": [kept("${monitor.summary_path}"), "${monitor.report_dir}"], "metrics": [kept("${monitor.metrics_path}")]}),
}
# The tune stage reads these sections whole; its other params are the trial inputs.
TUNE_SECTIONS = ["seed", "preprocess", "tune", "split.path", "mlflow"]


# --- what a stage's command can import --------------------------------------------------------

def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the project."""
    found = {}
    for package, root in PACKAGES.items():
        for path in sorted(root.rglob("*.py")):
            parts = [package, *path.relative_to(root).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The project module an import names (``from a.b import c`` may name module a.b.c)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_in(node: ast.AST, current: str, modules: dict[str, Path]) -> set[str]:
    """Project modules imported anywhere under ``node`` (relative imports resolved from ``current``)."""
    found = set()
    for child in ast.walk(node):
        names = []
        if isinstance(child, ast.Import):
            names = [alias.name for alias in child.names]
        elif isinstance(child, ast.ImportFrom):
            base = child.module or ""
            if child.level:
                package = current.split(".")[: len(current.split(".")) - child.level + (current in PACKAGES)]
                base = ".".join([*package, base] if base else package)
            names = [f"{base}.{alias.name}" for alias in child.names] + [base]
        for name in names:
            module = resolve(name, modules)
            if module and module != current:
                found.add(module)
    return found


def parsed(path: Path) -> ast.Module:
    return ast.parse(path.read_text())


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    return {module: imports_in(parsed(path), module, modules) for module, path in modules.items()}


def closure(graph: dict[str, set[str]], start: set[str], seen: set[str] | None = None) -> set[str]:
    """``start`` and every module they import, transitively (``seen`` ones are not followed)."""
    seen, todo = set(seen or ()), list(start)
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(graph[module])
    return seen


RUNNER = "tumorscope.dvc_stage"  # what every stage's cmd runs: python -m tumorscope.dvc_stage <stage>


def _function(tree: ast.Module, name: str) -> ast.FunctionDef | None:
    return next((node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == name), None)


def stage_closure(stage: str, modules: dict[str, Path], graph: dict[str, set[str]]) -> set[str]:
    """Project modules the stage's command can import: the runner (its other stages' functions
    left out), the stage's own function there or, for a data stage, ``run_<stage>`` and the top-level
    imports of ``stages/data.py``, and everything those import, anywhere in them."""
    runner = parsed(modules[RUNNER])
    shared = [node for node in runner.body
              if not (isinstance(node, ast.FunctionDef) and (node.name in STAGES or node.name == "_data_stage"))]
    start = imports_in(ast.Module(body=shared, type_ignores=[]), RUNNER, modules)
    entry = {RUNNER}
    own = _function(runner, stage)
    if own is not None:
        start |= imports_in(own, RUNNER, modules)
    else:
        data = "tumorscope.stages.data"
        tree = parsed(modules[data])
        function = _function(tree, f"run_{stage}")
        if function is None:
            raise LookupError(f"stage {stage!r}: neither {RUNNER}.{stage} nor {data}.run_{stage} exists")
        module_level = ast.Module(body=[n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))], type_ignores=[])
        start |= imports_in(function, data, modules) | imports_in(module_level, data, modules)
        entry.add(data)
    return entry | closure(graph, start - entry, seen=entry)


def runs_code(module: str, modules: dict[str, Path], graph: dict[str, set[str]]) -> bool:
    """False for a package's __init__ that only documents (it runs nothing a stage depends on)."""
    return not (modules[module].name == "__init__.py" and not graph[module])


def code_files(selected: set[str], modules: dict[str, Path], graph: dict[str, set[str]]) -> list[str]:
    return sorted(modules[m].relative_to(REPO).as_posix() for m in selected if runs_code(m, modules, graph))


# --- dvc.yaml ---------------------------------------------------------------------------------

def tune_params(params: Params) -> list[str]:
    from tumorscope.tuning.study import trial_inputs

    inputs = [key for key in trial_inputs(params) if key.startswith(("train.", "evaluate."))]
    return [*TUNE_SECTIONS[:2], *inputs, *TUNE_SECTIONS[2:]]


def stage_specs(params: Params) -> dict[str, dict[str, Any]]:
    """Every stage as dvc.yaml holds it: the command, data and code deps, params, outs, metrics, plots."""
    modules = module_files()
    graph = import_graph(modules)
    specs = {}
    for name, (_, declared) in STAGES.items():
        deps = [*declared.get("deps", []), *code_files(stage_closure(name, modules, graph), modules, graph)]
        spec: dict[str, Any] = {"cmd": f"python -m {RUNNER} {name}", "deps": deps,
                                "params": tune_params(params) if name == "tune" else declared["params"]}
        specs[name] = spec | {key: declared[key] for key in ("outs", "metrics", "plots") if key in declared}
    return specs


def render(params: Params) -> str:
    """dvc.yaml's text: the header, then each stage with what it does as a comment."""
    import textwrap

    import yaml

    class Indented(yaml.SafeDumper):
        def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
            return super().increase_indent(flow, False)  # lists indented under their key, as dvc.yaml's style

    blocks = []
    for name, spec in stage_specs(params).items():
        about = textwrap.fill(STAGES[name][0], width=96, initial_indent="  # ", subsequent_indent="  # ")
        body = yaml.dump({name: spec}, Dumper=Indented, sort_keys=False, default_flow_style=False, width=200)
        first, rest = body.split("\n", 1)
        blocks.append(textwrap.indent(f"{first}\n{about}\n{rest}", "  "))
    return HEADER + "stages:\n" + "\n".join(blocks)
