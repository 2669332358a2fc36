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
from helpers.paths import REPO
from helpers.requirements import needs_uv, uv_directory

PACKAGES = {"tumorscope": REPO / "src" / "tumorscope", "flows": REPO / "flows"}
LIBRARY_EXCLUDES = ("tumorscope.cli", "tumorscope.stages")
ENTRY_POINTS = ("tumorscope.cli", "flows")


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


MODULES = module_files()


def resolve(name: str) -> str | None:
    """The project module an import names (``from a.b import c`` may name module a.b.c)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_in(node: ast.AST, current: str) -> set[str]:
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
            module = resolve(name)
            if module and module != current:
                found.add(module)
    return found


def parsed(module: str) -> ast.Module:
    return ast.parse(MODULES[module].read_text())


GRAPH = {module: imports_in(parsed(module), module) for module in MODULES}


def closure(start: set[str], seen: set[str] | None = None) -> set[str]:
    """``start`` and every module they import, transitively (``seen`` ones are not followed)."""
    seen, todo = set(seen or ()), list(start)
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(GRAPH[module])
    return seen


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
            if target in PACKAGES or target.endswith(".stages"):  # a package's __init__ only documents
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


def command_function(stage: str) -> tuple[str, ast.FunctionDef]:
    """The function `tumorscope <stage>` runs: a data stage's run_<stage>, else the CLI command."""
    data_stage = next((node for node in parsed("tumorscope.stages.data").body
                       if isinstance(node, ast.FunctionDef) and node.name == f"run_{stage}"), None)
    if data_stage is not None:
        return "tumorscope.stages.data", data_stage
    cli = next(node for node in parsed("tumorscope.cli").body
               if isinstance(node, ast.FunctionDef) and node.name == stage.replace("-", "_"))
    return "tumorscope.cli", cli


def stage_closure(stage: str) -> set[str]:
    """Project modules the stage's command can import: the CLI and the module of the command's
    function, the imports of that function and of that module's top level, and everything those
    import, anywhere in them (other commands of the same module are not followed)."""
    module, function = command_function(stage)
    module_level = ast.Module(body=[n for n in parsed(module).body if isinstance(n, (ast.Import, ast.ImportFrom))],
                              type_ignores=[])
    entry = {"tumorscope.cli", module}
    start = {"tumorscope.config"} | imports_in(function, module) | imports_in(module_level, module)
    return entry | closure(start - entry, seen=entry)


def dvc_stages() -> dict[str, dict]:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def declared_paths(spec: dict) -> list[str]:
    return [next(iter(d)) if isinstance(d, dict) else d for d in spec.get("deps", [])]


def covers(path: str, file: str) -> bool:
    return file == path or file.startswith(path.rstrip("/") + "/")


def runs_code(module: str) -> bool:
    """False for a package's __init__ that only documents (it runs nothing a stage depends on)."""
    return not (MODULES[module].name == "__init__.py" and not GRAPH[module])


def code_files(modules: set[str]) -> set[str]:
    return {MODULES[m].relative_to(REPO).as_posix() for m in modules if runs_code(m)}


def declared_code(spec: dict) -> list[str]:
    return [p for p in declared_paths(spec) if p.startswith(("src/", "flows/"))]


def dependency_mismatch(stage: str, spec: dict) -> tuple[list[str], list[str]]:
    """(missing, extra): project files the stage's command can import but dvc.yaml does not declare,
    and declared code paths it cannot import (a folder counts only when its command imports every
    module in it: one that it does not would rerun the stage for nothing)."""
    needed = code_files(stage_closure(stage))
    declared = declared_code(spec)
    missing = sorted(f for f in needed if not any(covers(p, f) for p in declared))
    every_file = code_files(set(MODULES))
    extra = sorted(p for p in declared if not (under := {f for f in every_file if covers(p, f)}) or not under <= needed)
    return missing, extra


@pytest.mark.parametrize("stage", sorted(dvc_stages()))
def test_every_dvc_stage_declares_exactly_the_modules_its_command_imports(stage):
    spec = dvc_stages()[stage]
    assert spec["cmd"] == f"tumorscope {stage}", "a DVC stage calls only `tumorscope <stage>`"
    for path in (p for p in declared_paths(spec) if not p.startswith("$")):
        assert (REPO / path).exists(), f"{stage}: declared dependency {path} does not exist"
    missing, extra = dependency_mismatch(stage, spec)
    assert not missing, f"dvc.yaml stage {stage!r} does not declare {missing}"
    assert not extra, f"dvc.yaml stage {stage!r} declares code its command does not import: {extra}"


def test_an_unused_or_missing_dependency_is_found():
    """The check above fails on a planted extra module, a planted too-wide folder and a removed one."""
    spec = dvc_stages()["ingest"]
    assert dependency_mismatch("ingest", spec) == ([], [])
    planted = {**spec, "deps": [*spec["deps"], "src/tumorscope/models/explain.py", "src/tumorscope/monitoring"]}
    assert dependency_mismatch("ingest", planted)[1] == ["src/tumorscope/models/explain.py", "src/tumorscope/monitoring"]
    removed = {**spec, "deps": [d for d in spec["deps"] if d != "src/tumorscope/data/ingest.py"]}
    assert dependency_mismatch("ingest", removed)[0] == ["src/tumorscope/data/ingest.py"]


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
