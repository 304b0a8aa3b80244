"""The layout rules the README states, checked: short functions, no tests in production code,
and each layer importing only downward."""

from __future__ import annotations

import ast
import re

import pytest

from .test_dvc_deps import ROOT, project_imports

MAX_FUNCTION_LINES = 80


def _functions(folder: str):
    for path in sorted((ROOT / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                yield path.relative_to(ROOT), node


@pytest.mark.parametrize("folder", ["model", "tasks", "xmodal_runtime"])
def test_no_function_is_longer_than_80_lines(folder: str):
    long = [
        f"{path}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path, node in _functions(folder)
        if node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, long


@pytest.mark.parametrize("folder", ["model", "tasks", "xmodal_runtime", "cli", "services"])
def test_production_code_holds_no_test_helpers(folder: str):
    for path in (ROOT / folder).rglob("*.py"):
        text = path.read_text()
        assert "import pytest" not in text and "(for tests)" not in text, path


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [
        ("model.dual_encoder", ("tasks", "flows", "cli", "services", "xmodal_runtime")),
        ("xmodal_runtime.pyfunc", ("tasks", "flows", "cli", "services", "model")),
        ("xmodal_runtime.batch", ("tasks", "flows", "cli", "services", "model")),
        ("tasks.train", ("flows", "cli", "services")),
        ("services.manager", ("tasks", "flows", "cli", "model")),
    ],
)
def test_imports_only_go_downward(module: str, forbidden: tuple[str, ...]):
    bad = sorted(
        str(f.relative_to(ROOT))
        for f in project_imports(module)
        if f.relative_to(ROOT).parts[0] in forbidden
    )
    assert not bad, f"{module} imports {bad}"


def test_model_imports_no_pipeline_tools():
    for path in (ROOT / "model").rglob("*.py"):
        tree = ast.parse(path.read_text())
        names = {
            a.name.split(".")[0]
            for n in ast.walk(tree)
            if isinstance(n, ast.Import)
            for a in n.names
        }
        names |= {
            (n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
        }
        assert not names & {"prefect", "dvc", "mlflow"}, path


BUNDLE_NAME = re.compile(r"^(image|text)_encoder(\.(int8|fp16))?(\.onnx)?$")


def test_bundle_file_names_are_spelled_only_in_the_bundle_module():
    spelled = []
    for folder in ("model", "tasks", "xmodal_runtime", "cli", "flows", "services", "bench"):
        for path in (ROOT / folder).rglob("*.py"):
            if path == ROOT / "xmodal_runtime" / "bundle.py":
                continue
            spelled += [
                f"{path.relative_to(ROOT)}:{node.lineno} {node.value!r}"
                for node in ast.walk(ast.parse(path.read_text()))
                if isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and BUNDLE_NAME.match(node.value)
            ]
    assert not spelled, spelled


def test_no_pickle_on_any_load_path():
    """Checkpoints load with weights_only=True and nothing unpickles: a tampered file can at
    worst fail to load, never run code. The pyfunc is logged as code, not as a pickle."""
    offenders = []
    for folder in ("model", "tasks", "xmodal_runtime", "cli", "flows", "services", "bench"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, ast.Call):
                    continue
                name = ast.unparse(node.func)
                where = f"{path.relative_to(ROOT)}:{node.lineno} {name}"
                if name.endswith("torch.load"):
                    kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
                    if kw.get("weights_only") != "True":
                        offenders.append(where)
                if re.match(r"(c?pickle|cloudpickle|joblib|dill)\.loads?$", name):
                    offenders.append(where)
    assert not offenders, offenders
    register = (ROOT / "tasks" / "register.py").read_text()
    assert 'python_model=str(RUNTIME / "mlflow_model.py")' in register  # models from code
