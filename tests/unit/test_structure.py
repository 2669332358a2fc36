"""The shape of the code: calls go one way (entry points -> stages -> library), no import cycle,
every DVC stage declares each project module its command can import, and the Bento's requirements
are the ones uv.lock pins.

Imports are read from the source (AST), including the ones inside functions, where this project
keeps its heavy imports: nothing is imported to find them.
"""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest
import yaml

from helpers import bento
from helpers.params import defaults
from helpers.paths import REPO
from helpers.requirements import needs_uv, uv_directory
from tumorscope.stages import graph

LIBRARY_EXCLUDES = ("tumorscope.cli", "tumorscope.dvc_stage", "tumorscope.stages")
ENTRY_POINTS = ("tumorscope.cli", "tumorscope.dvc_stage", "flows")
MODULES = graph.module_files()
GRAPH = graph.import_graph(MODULES)


def is_library(module: str) -> bool:
    return module.startswith("tumorscope") and not module.startswith(LIBRARY_EXCLUDES)


def test_the_library_imports_no_stage_cli_or_flow():
    for module in filter(is_library, MODULES):
        wrong = sorted(m for m in GRAPH[module] if not is_library(m))
        assert not wrong, f"{module} (library) imports {wrong}: calls must go entry point -> stages -> library"


def test_stages_import_no_entry_point():
    for module in (m for m in MODULES if m.startswith("tumorscope.stages")):
        wrong = sorted(m for m in GRAPH[module] if m.startswith(ENTRY_POINTS))
        assert not wrong, f"{module} imports entry points {wrong}"


def test_flows_do_not_import_the_cli():
    for module in (m for m in MODULES if m.startswith("flows")):
        assert "tumorscope.cli" not in GRAPH[module], f"{module} imports the CLI"


def find_cycle() -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the path, 2 done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in sorted(GRAPH[module]):
            if target in graph.PACKAGES or target.endswith(".stages"):  # a package's __init__ only documents
                continue
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(MODULES):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_no_import_cycle():
    assert find_cycle() is None, f"import cycle: {' -> '.join(find_cycle())}"


def test_the_cycle_finder_finds_a_cycle():
    GRAPH["tumorscope.errors"].add("tumorscope.config")  # config imports errors: a cycle
    try:
        assert find_cycle() is not None
    finally:
        GRAPH["tumorscope.errors"].discard("tumorscope.config")


# ---------------------------------------------------------------------------------------------
# DVC stages declare what their command can run


def stage_closure(stage: str) -> set[str]:
    return graph.stage_closure(stage, MODULES, GRAPH)


def test_dvc_yaml_is_rendered_from_the_stage_graph():
    """No list in dvc.yaml is kept by hand: a stage whose imports, params or outs changed without
    `tumorscope dvc-yaml` fails here."""
    assert (REPO / "dvc.yaml").read_text() == graph.render(defaults()), "run `tumorscope dvc-yaml` (make dvc-yaml)"


@pytest.mark.parametrize("stage", sorted(graph.STAGES))
def test_every_stage_depends_on_the_code_its_command_runs_and_its_data(stage):
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]
    assert spec["cmd"] == f"python -m tumorscope.dvc_stage {stage}", "a DVC stage runs only its own function"
    deps = spec.get("deps", [])
    for path in (p for p in deps if not p.startswith("$")):
        assert (REPO / path).exists(), f"{stage}: declared dependency {path} does not exist"
    assert {"src/tumorscope/dvc_stage.py", "src/tumorscope/config.py"} <= set(deps)
    # The CLI's help strings and other commands cannot change a stage's outputs.
    assert "src/tumorscope/cli.py" not in deps


def test_every_declared_stage_has_a_runner_and_the_cli_runs_the_same():
    from tumorscope import dvc_stage

    assert set(dvc_stage.STAGES) == set(graph.STAGES)
    cli_calls = {node.attr for node in ast.walk(ast.parse((REPO / "src" / "tumorscope" / "cli.py").read_text()))
                 if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "dvc_stage"}
    assert {"run_stage", "run_reported"} <= cli_calls, "tumorscope <stage> must run what dvc.yaml runs"


def test_a_module_a_command_imports_becomes_a_dependency_of_that_stage_only():
    """A stage's code deps follow its command's imports, not the package a module sits in."""
    planted = {module: set(found) for module, found in GRAPH.items()}
    planted["tumorscope.data.ingest"].add("tumorscope.models.explain")

    def deps(stage: str, imports: dict[str, set[str]]) -> list[str]:
        return graph.code_files(graph.stage_closure(stage, MODULES, imports), MODULES, imports)

    explain = "src/tumorscope/models/explain.py"
    assert explain not in deps("ingest", GRAPH)
    assert explain in deps("ingest", planted) and explain not in deps("phantom", planted)


def test_closure_follows_imports_inside_functions():
    """evaluate's scoring is imported inside run_evaluate: the closure must still see it."""
    assert "tumorscope.models.evaluate" in stage_closure("evaluate")
    assert "tumorscope.tuning.study" in stage_closure("tune")
    assert "tumorscope.data.phantom" in stage_closure("phantom")
    assert "tumorscope.models.zoo" not in stage_closure("ingest")


@needs_uv
def test_the_bento_requirements_are_uv_lock_exported(tmp_path):
    """serving/requirements.txt (the Bento's packages) is what `make serving-lock` exports from
    uv.lock now: a dependency changed in uv.lock without re-exporting it fails here."""
    exported = tmp_path / "requirements.txt"
    uv = str(Path(uv_directory()) / "uv")
    subprocess.run([uv, "export", "--frozen", "--only-group", "serving", "--no-hashes", "--no-emit-project", "-o",
                    str(exported)], cwd=REPO, check=True, capture_output=True, timeout=120)
    committed = (REPO / "serving" / "requirements.txt").read_text()
    assert bento.requirement_pins(committed) == bento.requirement_pins(exported.read_text()), "run `make serving-lock`"
    assert all("==" in pin for pin in bento.requirement_pins(committed))
    bentofile = yaml.safe_load((REPO / "serving" / "bentofile.yaml").read_text())
    assert bentofile["python"]["requirements_txt"] == "./serving/requirements.txt"
    assert not bentofile["python"]["lock_packages"] and "packages" not in bentofile["python"]
