"""Shared fixtures: tiny params (small towers, batch 8, CPU) and data the tests make themselves."""

from __future__ import annotations

import atexit
import copy
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
COCO_MINI = ROOT.parent / "shared" / "data" / "coco-mini"

os.environ.setdefault("TQDM_DISABLE", "1")
# In-process flow runs use Prefect's ephemeral API: keep its state out of the user's home, and
# give its first start (database migrations) time on a 2-core machine.
if "PREFECT_HOME" not in os.environ:
    os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="xmodal-prefect-")
    atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], ignore_errors=True)
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

TINY = {
    "ingest": {"num_images": 48, "image_size": 48, "seed": 3},
    "preprocess": {
        "image_size": 32,
        "max_length": 24,
        "vocab_size": 300,
        "shard_size": 16,
        "val_fraction": 0.125,
        "test_fraction": 0.25,
    },
    # Small towers built from scratch (the default pretrained pair has its own test).
    "model": {
        "image": {"backbone": "resnet18", "weights": "none", "normalization": "dataset"},
        "text": {
            "pretrained": None,
            "hidden_size": 32,
            "num_layers": 1,
            "num_heads": 2,
            "intermediate_size": 64,
            "max_positions": 32,
        },
        "embed_dim": 16,
    },
    "train": {
        "epochs": 1,
        "batch_size": 8,
        "max_steps": 3,
        "warmup_steps": 1,
        "device": "cpu",
        # Loader workers are spawned (seconds each); tiny runs read inline. The e2e flow and
        # tests/test_loader.py run workers.
        "workers": 0,
        "log_every": 1,
        "image": {"lr": None},
        "text": {"lr": None, "trainable_blocks": None},
    },
    "evaluate": {"batch_size": 16},
    # Tiny runs last seconds: sample system metrics often enough to see some.
    "mlflow": {"system_metrics_interval": 0.5},
    "infer": {"chunk_size": 7, "queries": ["a red circle on the left", "a small blue square"]},
}


def make_repo(repo: Path, params: dict | None = None) -> Path:
    """A throwaway git repo with the project code, DVC and Prefect config, and tiny params."""
    import shutil
    import subprocess

    for d in ("xmodal_runtime", "model", "tasks", "flows"):
        shutil.copytree(ROOT / d, repo / d, ignore=shutil.ignore_patterns("__pycache__"))
    for f in (
        "dvc.yaml",
        "prefect.yaml",
        ".dvcignore",
        ".gitignore",
        ".dvc/config",
        ".dvc/.gitignore",
    ):
        (repo / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / f, repo / f)
    params = tiny_params_dict() if params is None else params
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "init"]):
        subprocess.run([*git, *args], cwd=repo, check=True, capture_output=True)
    return repo


def deep_merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = (
            deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        )
    return out


def ingest_and_preprocess(root: Path, params) -> Path:
    """The built-in data of `params` ingested under `root` and prepared; the prepared folder."""
    from tasks.ingest import ingest
    from tasks.preprocess import preprocess

    ingest(params.ingest, root / "raw", root / "quarantine.jsonl")
    preprocess(params.preprocess, params.model.text.pretrained, root / "raw", root / "prep")
    return root / "prep"


def tiny_params_dict(**sections) -> dict:
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    return deep_merge(deep_merge(base, TINY), sections)


@contextmanager
def _mlflow_uri_kept() -> Iterator[None]:
    """Puts MLFLOW_TRACKING_URI back as it was. `mlflow.set_tracking_uri` also sets it (MLflow
    3), and the stages read it before params (tracking.tracking_uri): without this, the next
    test's stages would log into this test's store, or into a folder already removed."""
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        yield
    finally:
        if "mlflow" in sys.modules:
            sys.modules["mlflow"].set_tracking_uri(None)  # forgets it
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        if saved is not None:
            os.environ["MLFLOW_TRACKING_URI"] = saved


@pytest.fixture(scope="module", autouse=True)
def _module_isolation(request, tmp_path_factory) -> Iterator[None]:
    """Per module: the tracking URI kept, and the folders its shared fixtures made removed once
    its tests all passed, which `tmp_path_retention_policy = "failed"` (pyproject.toml) does for
    `tmp_path` but not for `tmp_path_factory.mktemp`. A full run writes about 8 GB there, and CI
    shares this disk."""
    base = tmp_path_factory.getbasetemp()
    before, failed = set(base.iterdir()), request.session.testsfailed
    with _mlflow_uri_kept():
        yield
    if request.config.getini("tmp_path_retention_policy") != "failed":
        return
    if request.session.testsfailed == failed:  # a failing module's folders stay to be read
        for path in set(base.iterdir()) - before:
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(autouse=True)
def _test_isolation() -> Iterator[None]:
    with _mlflow_uri_kept():
        yield


@pytest.fixture
def tiny_params():
    from tasks.common.config import validate

    return validate(tiny_params_dict())


@pytest.fixture
def coco_mini() -> Path:
    if not (COCO_MINI / "annotations" / "captions_val2017.json").is_file():
        pytest.skip(f"coco-mini not present at {COCO_MINI}")
    return COCO_MINI


def free_port() -> int:
    """A port on 127.0.0.1 the kernel says is free now."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def extract_raw_images(raw: Path, folder: Path) -> list[Path]:
    """The ingested samples' images as loose files in `folder` (a folder to run inference on)."""
    from tasks.common.dataset import iter_raw

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for s in iter_raw(raw):
        out.append(folder / f"{s.record.image_id:06d}.{s.ext}")
        out[-1].write_bytes(s.data)
    return out


def export_tiny_bundle(root: Path, variants: list[str], **sections) -> Path:
    """Ingest, preprocess, an untrained tiny model (seed 0, `sections` merged into its params)
    and its export under `root`: raw/, raw_images/ (raw's images as files), prep/, train/, onnx/
    (the bundle, returned) and export.json."""
    import torch

    from tasks.common.checkpoint import CHECKPOINT, build_model
    from tasks.common.config import ExportParams, IngestParams, PreprocessParams, validate
    from tasks.export import export
    from tasks.ingest import ingest
    from tasks.preprocess import preprocess

    params = validate(tiny_params_dict(**sections))
    ingest(IngestParams(num_images=16, image_size=40), root / "raw", root / "quarantine.jsonl")
    extract_raw_images(root / "raw", root / "raw_images")
    preprocess(
        PreprocessParams(image_size=32, max_length=16, test_fraction=0.25),
        None,
        root / "raw",
        root / "prep",
    )
    torch.manual_seed(0)
    net = build_model(params.model, root / "prep")
    (root / "train").mkdir()
    torch.save(net.checkpoint(params_hash="test"), root / "train" / CHECKPOINT)
    export(
        ExportParams(variants=variants),
        root / "train",
        root / "prep",
        root / "onnx",
        root / "export.json",
    )
    return root / "onnx"


# Tiny from-scratch towers for model-level tests (the defaults are the pretrained pair, which has
# its own tests).
SCRATCH_IMAGE = {"backbone": "resnet18", "weights": "none", "normalization": "dataset"}


def scratch_text(num_layers: int = 1):
    from model.config import TextTowerConfig

    return TextTowerConfig(
        pretrained=None,
        vocab_size=50,
        hidden_size=32,
        num_layers=num_layers,
        num_heads=2,
        intermediate_size=64,
        max_positions=16,
        pooling="cls",
    )


def clean_env() -> dict[str, str]:
    """This environment without the test session's Prefect and MLflow settings, the venv's
    scripts first on PATH: what a real process started by a test gets."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def project_env(repo: Path) -> dict[str, str]:
    """clean_env() for a run in `repo`: its own Prefect home (ephemeral API), no progress bars."""
    env = clean_env()
    env.pop("XMODAL_RUN_TOKEN", None)  # a real second process, not a child of a test's run
    env.update(
        PREFECT_HOME=str(repo / ".prefect"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        TQDM_DISABLE="1",
    )
    return env


@contextmanager
def running_stack(s) -> Iterator:
    """The real services `s` started (with clean_env: the servers must not inherit the test
    session's Prefect), and stopped after, whatever happens."""
    from services.manager import start, stop

    old, clean = dict(os.environ), clean_env()  # computed before the environment is cleared
    os.environ.clear()
    os.environ.update(clean)
    try:
        start(s, echo=print)
        yield s
    finally:
        os.environ.clear()
        os.environ.update(old)
        stop(s, echo=print)


def register_tiny_bundle(onnx: Path, store: Path, model: str, experiment: str):
    """Register the exported bundle `onnx` as `model` through tasks.register.register, in a
    fresh sqlite store under `store`, from a logged training run with test metrics and passed
    parity; returns (RegisterResult, the store's tracking URI). MLFLOW_TRACKING_URI is the
    store's only while registering."""
    import json

    import mlflow

    from tasks.common import tracking
    from tasks.common.config import MlflowParams, RegisterParams
    from tasks.register import register

    uri = f"sqlite:///{store / 'mlflow.db'}"
    train = onnx.parent / "train"
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        mlflow_p = MlflowParams(tracking_uri=uri, experiment=experiment)
        tracking.setup(mlflow_p, store)
        with mlflow.start_run() as run:
            mlflow.log_params({"ingest.source": "synthetic", "train.epochs": 1})
        (train / tracking.RUN_FILE).write_text(json.dumps({"run_id": run.info.run_id}))
        (store / "metrics.json").write_text(json.dumps({"test": {"i2t_R1": 0.5, "t2i_R1": 0.25}}))
        parity = {"passed": True, "max_abs_diff": 0, "atol": 1e-4}
        (store / "export_report.json").write_text(json.dumps({"parity": parity, "variants": {}}))
        result = register(
            RegisterParams(model_name=model),
            mlflow_p,
            train,
            onnx,
            store / "metrics.json",
            store / "export_report.json",
            store / "register.json",
            store,
            {"git_commit": "test", "dvc_data_version": "0" * 32, "params_hash": "test"},
            onnx.parent / "raw",
        )
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved
    return result, uri
