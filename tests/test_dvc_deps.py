"""dvc.yaml deps cannot drift from the code: each stage's code deps are exactly the project
modules its stage module imports, transitively (package __init__ files included)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from tasks.common.config import Params, validate

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("xmodal_runtime", "model", "tasks", "flows", "cli", "services")


def module_file(name: str) -> Path | None:
    """The project file that `import name` executes last, or None outside the project."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported_names(path: Path, module: str) -> set[str]:
    """Every module name an import statement in `path` may load (function-level ones too)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # submodules
    return names


def project_imports(module: str) -> set[Path]:
    """Files of every project module `python -m <module>` imports, transitively."""
    seen: set[Path] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        # Importing a.b.c runs a/__init__.py and a/b/__init__.py first.
        for i in range(1, len(parts) + 1):
            path = module_file(".".join(parts[:i]))
            if path is None or path in seen:
                continue
            seen.add(path)
            todo.extend(_imported_names(path, ".".join(parts[:i])))
    return seen


def dvc_stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def code_deps(stage: dict) -> set[Path]:
    """The .py files a stage's deps cover: listed files, and every .py under listed folders."""
    files: set[Path] = set()
    for dep in stage.get("deps", []):
        if "${" in dep or dep.split("/")[0] not in PACKAGES:
            continue
        path = ROOT / dep
        assert path.exists(), f"dep {dep} does not exist"
        files.update(path.rglob("*.py") if path.is_dir() else [path])
    return {f for f in files if "__pycache__" not in f.parts}


STAGES = sorted(dvc_stages())
# Code a stage ships rather than imports: register logs the whole runtime as the model's code.
SHIPPED = {"register": {"xmodal_runtime"}}


@pytest.mark.parametrize("name", STAGES)
def test_stage_deps_are_exactly_its_imports(name: str):
    stage = dvc_stages()[name]
    assert stage["cmd"] == f"python -m tasks.{name}", "a stage runs its own module"
    imported = project_imports(f"tasks.{name}")
    for folder in SHIPPED.get(name, ()):
        imported |= set((ROOT / folder).rglob("*.py"))
    listed = code_deps(stage)
    rel = lambda files: sorted(str(f.relative_to(ROOT)) for f in files)  # noqa: E731
    assert not imported - listed, (
        f"{name} imports modules missing from its deps: {rel(imported - listed)}"
    )
    assert not listed - imported, f"{name} lists deps it never imports: {rel(listed - imported)}"


def test_register_ships_the_runtime_it_lists():
    from tasks import register

    assert register.RUNTIME == ROOT / "xmodal_runtime"


def test_walker_sees_lazy_and_transitive_imports():
    """The walker would fail the test above: it finds function-level and indirect imports."""
    files = {str(f.relative_to(ROOT)) for f in project_imports("tasks.register")}
    assert "xmodal_runtime/pyfunc.py" in files  # imported by register itself
    assert "tasks/common/tracking.py" in files
    assert "tasks/train.py" not in files
    assert "model/dual_encoder.py" not in files  # register needs no torch


def test_no_stage_module_imports_another():
    modules = {f"tasks.{f.stem}" for f in (ROOT / "tasks").glob("*.py") if f.stem != "__init__"}
    for module in sorted(modules):
        others = {str(f.relative_to(ROOT)) for f in project_imports(module)} & {
            f"{m.replace('.', '/')}.py" for m in modules - {module}
        }
        assert not others, f"{module} imports stage modules {sorted(others)}"


def _keys(model: type, prefix: str = "") -> set[str]:
    out = set()
    for name, field in model.model_fields.items():
        out.add(prefix + name)
        ann = field.annotation
        if isinstance(ann, type) and hasattr(ann, "model_fields"):
            out |= _keys(ann, f"{prefix}{name}.")
    return out


def test_every_params_key_in_dvc_yaml_exists():
    known = _keys(Params)
    for name, stage in dvc_stages().items():
        for key in stage.get("params", []):
            assert key in known, f"stage {name}: params key {key} is not in the config"
    assert validate({})  # the schema itself loads
