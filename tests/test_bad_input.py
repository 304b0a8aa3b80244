"""Bad params and CLI input: one `error:` line naming the key or argument, before any work.

Each case runs the real `xmodal` command (typer's test runner, in-process) in a fresh project
folder and checks: a non-zero exit, exactly one line on stderr, no traceback, the named key or
argument in it, and nothing written into the project (no data, outputs or models).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cli import app

from .conftest import tiny_params_dict

EMPTY_STORE = "sqlite:///{root}/mlflow.db"

CASES = {
    "unknown key": (["run", "-S", "train.epoch=3"], "train.epoch: unknown key"),
    "wrong type": (["run", "-S", "train.epochs=many"], "train.epochs must be a valid integer"),
    "batch size 0": (["run", "-S", "train.batch_size=0"], "train.batch_size must be greater"),
    "negative lr": (["run", "-S", "train.lr=-0.1"], "train.lr must be greater than 0"),
    "missing dataset path": (
        [
            "run",
            "-S",
            "ingest.source=csv",
            "-S",
            "ingest.csv.path=photos/captions.csv",
            "-S",
            "ingest.csv.image_root=photos",
        ],
        "ingest.csv.path: photos/captions.csv does not exist",
    ),  # fmt: skip
    "unknown backbone": (
        ["run", "-S", "model.image.backbone=resnet9000"],
        "model.image.backbone: unknown torchvision classification model 'resnet9000'",
    ),
    "unknown pooling": (["run", "-S", "model.text.pooling=median"], "model.text.pooling must be"),
    "missing preset": (["run", "-P", "presets/nope.yaml"], "preset file not found:"),
    "unknown registered model": (
        ["infer", "--model", "models:/no-such-model@champion", "--texts", "q.txt"],
        "no MLflow store at sqlite:///",
    ),
    "chunk size 0": (
        ["infer", "--model", "bundle", "--texts", "q.txt", "--chunk-size", "0"],
        "infer.chunk_size must be greater than or equal to 1",
    ),
    "unwritable out": (
        ["infer", "--model", "bundle", "--texts", "q.txt", "--out", "q.txt/out"],
        "--out q.txt/out is not writable",
    ),
    "neither images nor texts": (["infer", "--model", "bundle"], "give --images, --texts or both"),
}


@pytest.fixture
def project(tmp_path: Path, monkeypatch) -> Path:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params_dict()))
    (tmp_path / "q.txt").write_text("a red circle\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", EMPTY_STORE.format(root=tmp_path))
    return tmp_path


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_naming_it_before_any_work(project: Path, case: str):
    args, named = CASES[case]
    args = [*args, "--root", str(project)] if args[0] == "run" else args
    before = sorted(p.name for p in project.iterdir())
    result = CliRunner().invoke(app, args)
    assert result.exit_code in (1, 2), (result.exit_code, result.output, result.exception)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and named in lines[0], lines[0]
    assert "Traceback" not in result.output
    # No work: nothing new in the project (not even an empty MLflow store).
    after = sorted(p.name for p in project.iterdir() if p.name != ".xmodal")
    assert after == before


def test_verbose_shows_the_traceback(project: Path):
    result = CliRunner().invoke(
        app, ["run", "--root", str(project), "-S", "train.lr=-1", "--verbose"]
    )
    assert result.exit_code != 0
    assert type(result.exception).__name__ == "ConfigError"
