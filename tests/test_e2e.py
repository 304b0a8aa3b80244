"""End to end: the real flow (Prefect ephemeral API), real DVC, real MLflow sqlite store and real
ONNX Runtime, on tiny params, in a throwaway git repository."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import yaml

from .conftest import extract_raw_images, make_repo, project_env, tiny_params_dict
from .test_dvc_deps import STAGES

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
MODEL = "xmodal-dual-encoder"


def _sh(repo: Path, *args: str, timeout: int = 900, with_stderr: bool = False) -> str:
    proc = subprocess.run(
        args, cwd=repo, env=project_env(repo), capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr if with_stderr else proc.stdout


def _xmodal(repo: Path, *args: str) -> str:
    return _sh(
        repo, sys.executable, "-m", "cli", "run", "--root", str(repo), *args, with_stderr=True
    )


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    # A loader worker, as the default params run: spawned under the real flow. An untrained tiny
    # model cannot reach the default promotion floor: this repository's floor is 0.
    params = tiny_params_dict(train={"workers": 1}, promote={"min_mean_r1": 0.0})
    return make_repo(tmp_path_factory.mktemp("xmodal-e2e"), params)


@pytest.fixture(scope="module")
def first_run(repo: Path) -> str:
    return _xmodal(repo, "--promote")  # as `make run`: the first champion only through the gates


def _mlflow_client(repo: Path):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    return mlflow.MlflowClient()


def test_flow_writes_every_artifact(repo: Path, first_run: str):
    for rel in (
        "data/raw/manifest.json",
        "data/raw/shards/raw-000000.tar",
        "reports/ingest.json",
        "reports/quarantine.jsonl",
        "data/prepared/meta.json",
        "data/prepared/stats.json",
        "data/prepared/tokenizer/tokenizer.json",
        "models/train/checkpoint.pt",
        "reports/train_history.csv",
        "reports/recall_at_k.csv",
        "reports/figures/loss.png",
        "reports/figures/recall.png",
        "reports/figures/retrieval_examples.png",
        "models/onnx/tokenizer/tokenizer.json",
        "outputs/infer/image_embeddings.parquet",
        "outputs/infer/text_embeddings.parquet",
        "outputs/infer/image_to_text.jsonl",
    ):
        assert (repo / rel).is_file(), rel
    metrics = json.loads((repo / "reports/metrics.json").read_text())["test"]
    for key in (
        "i2t_R1",
        "i2t_R5",
        "i2t_R10",
        "t2i_R1",
        "t2i_R10",
        "i2t_mean_rank",
        "t2i_median_rank",
    ):
        assert 0.0 <= metrics[key] <= 48
    for name in ("image_encoder.onnx", "text_encoder.onnx"):
        proto = onnx.load(str(repo / "models/onnx" / name))
        onnx.checker.check_model(proto)
        assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 18
    parity = json.loads((repo / "reports/export.json").read_text())["parity"]
    assert parity["passed"], parity
    assert parity["max_abs_diff"] <= 1e-4
    assert parity["random_inputs"]["top1_identical"] and parity["test_split"]["top1_identical"]
    rows = [
        json.loads(x) for x in (repo / "outputs/infer/text_to_image.jsonl").read_text().splitlines()
    ]
    assert [r["query"] for r in rows] == ["a red circle on the left", "a small blue square"]
    assert all(len(r["results"]) == 5 for r in rows)
    assert "demo queries" in first_run and "outputs:" in first_run
    # the flow run is named from the key params
    assert "Beginning flow run 'resnet18-bert1x32-e1-lr0.001-seed0'" in first_run


def test_flow_report_artifact_content(repo: Path, first_run: str):
    from tasks.report import markdown_report

    md, table = markdown_report(repo)
    assert [row["K"] for row in table] == [1, 5, 10]
    assert "ONNX parity: **passed**" in md and "models:/xmodal-dual-encoder/1" in md
    assert md.count("data:image/png;base64,") == 3  # loss, recall, retrieval examples
    assert "![retrieval_examples](data:image/png;base64," in md


def test_registered_version_with_lineage(repo: Path, first_run: str):
    client = _mlflow_client(repo)
    champion = client.get_model_version_by_alias(MODEL, "champion")
    candidate = client.get_model_version_by_alias(MODEL, "candidate")
    assert str(champion.version) == str(candidate.version) == "1"
    from tasks.common.aliases import events

    moves = [(e.action, e.alias, e.from_, e.to) for e in events(client, MODEL)]
    assert moves == [
        ("register", "candidate", None, "1"),
        ("first-champion", "champion", None, "1"),
    ]
    assert client.get_model_version(MODEL, "1").tags["promotion_status"] == "promoted"
    run = client.get_run(candidate.run_id)
    head = _sh(repo, "git", "rev-parse", "HEAD").strip()
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    data_md5 = next(o["md5"] for o in lock["stages"]["ingest"]["outs"] if o["path"] == "data/raw")
    assert run.data.tags["git_commit"] == head and run.data.tags["git_dirty"] in ("true", "false")
    assert run.data.tags["prefect_flow_run_id"]  # registered from inside the flow
    assert {"torch_version", "transformers_version", "onnxruntime_version"} <= set(run.data.tags)
    assert run.inputs.dataset_inputs[0].dataset.digest == data_md5[:36]
    assert "ONNX parity: passed" in candidate.description and "int8" in candidate.description
    assert "export/int8_i2t_R1" in run.data.metrics
    import mlflow

    info = mlflow.models.get_model_info(f"models:/{MODEL}/{candidate.version}")
    assert info.signature is not None and info.saved_input_example_info is not None
    assert run.data.tags["dvc_data_version"] == data_md5 == candidate.tags["dvc_data_version"]
    assert run.data.params["train.batch_size"] == "8"
    assert "test/i2t_R1" in run.data.metrics and "train/loss" in run.data.metrics
    assert "system/cpu_utilization_percentage" in run.data.metrics  # system metrics were on
    assert run.info.run_name == "resnet18-bert1x32-e1-lr0.001-seed0"  # the Prefect run's name
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert len(history) == 3  # one point per step with log_every=1
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"checkpoint", "plots", "reports"} <= artifacts


def test_infer_cli_from_the_registry_alias(repo: Path, first_run: str, tmp_path: Path):
    queries = tmp_path / "q.txt"
    queries.write_text("a red circle on the left\n\na small blue square\n")
    photos = tmp_path / "photos"
    extract_raw_images(repo / "data" / "raw", photos)
    out = _sh(
        repo,
        sys.executable,
        "-m",
        "cli",
        "infer",
        "--model",
        f"models:/{MODEL}@champion",
        "--images",
        str(photos),
        "--texts",
        str(queries),
        "--top-k",
        "3",
        "--out",
        str(tmp_path / "out"),
        "--params",
        str(repo / "params.yaml"),
    )
    assert "48 images, 2 texts, 0 errors" in out
    rows = (tmp_path / "out/text_to_image.jsonl").read_text().splitlines()
    assert [len(json.loads(r)["results"]) for r in rows] == [3, 3]


def test_rerun_skips_everything_and_dvc_agrees(repo: Path, first_run: str):
    status = json.loads(_sh(repo, sys.executable, "-m", "dvc", "status", "--json"))
    assert status == {}, status
    second = _xmodal(repo)
    stages_line = next(line for line in second.splitlines() if line.startswith("stages:"))
    assert stages_line.count("skipped") == len(STAGES), stages_line  # every DVC stage
    out = _sh(repo, sys.executable, "-m", "dvc", "repro")
    assert "didn't change" in out or "up to date" in out, out
    assert "Running stage" not in out


def test_forced_rerun_reproduces_metrics_and_adds_a_candidate(repo: Path, first_run: str):
    before = (repo / "reports/metrics.json").read_text()
    _xmodal(repo, "--force")
    assert (repo / "reports/metrics.json").read_text() == before
    client = _mlflow_client(repo)
    assert str(client.get_model_version_by_alias(MODEL, "candidate").version) == "2"
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "1"


def test_flow_after_dvc_repro_skips(repo: Path, first_run: str):
    _sh(repo, "git", "add", "-A")  # params change below is the only difference
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["evaluate"]["ks"] = [1, 2, 5, 10]
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = _sh(repo, sys.executable, "-m", "dvc", "repro")
    assert "Running stage 'evaluate'" in out and "Running stage 'train'" not in out
    assert "i2t_R2" in (repo / "reports/metrics.json").read_text()
    again = _xmodal(repo)
    stages_line = next(line for line in again.splitlines() if line.startswith("stages:"))
    assert stages_line.count("skipped") == len(STAGES), stages_line  # every DVC stage


def test_dvc_experiment_is_named_in_mlflow_and_diffs(repo: Path, first_run: str):
    """`dvc exp run -S` shows in `dvc exp show`, names its MLflow run, and diffs against HEAD."""
    _sh(repo, "git", "add", "-A")
    _sh(repo, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "baseline")
    dvc = (sys.executable, "-m", "dvc")
    _sh(repo, *dvc, "exp", "run", "-S", "train.lr=0.002", "-n", "lr-hi")
    shown = json.loads(_sh(repo, *dvc, "exp", "show", "--json"))
    names = [e["name"] for b in shown for e in (b.get("experiments") or [])]
    assert "lr-hi" in names, names
    runs = _mlflow_client(repo).search_runs(
        [_mlflow_client(repo).get_experiment_by_name("xmodal").experiment_id],
        filter_string="tags.dvc_exp_name = 'lr-hi'",
    )
    assert len(runs) == 1 and runs[0].info.run_name == "lr-hi"
    assert runs[0].data.params["train.lr"] == "0.002"
    diff = json.loads(_sh(repo, *dvc, "metrics", "diff", "HEAD", "lr-hi", "--all", "--json"))
    assert "test.i2t_R1" in diff["reports/metrics.json"], diff
    _sh(repo, *dvc, "plots", "diff", "HEAD", "lr-hi", "-o", "plots-diff")
    html = (repo / "plots-diff" / "index.html").read_text()
    assert "lr-hi" in html and "HEAD" in html


def test_dvc_push_pull_round_trip(repo: Path, first_run: str):
    """The committed default remote works: push, lose cache and outputs, pull, all up to date."""
    _sh(repo, sys.executable, "-m", "dvc", "push")
    assert any((repo / "dvc-storage").rglob("*")), "nothing was pushed to the default remote"
    shutil.rmtree(repo / ".dvc" / "cache")
    for out in ("data/raw", "data/prepared", "models/train", "models/onnx", "outputs/infer"):
        shutil.rmtree(repo / out)
    _sh(repo, sys.executable, "-m", "dvc", "pull")
    assert (repo / "models/onnx/image_encoder.onnx").is_file()
    assert json.loads(_sh(repo, sys.executable, "-m", "dvc", "status", "--json")) == {}
    out = _sh(repo, sys.executable, "-m", "dvc", "repro")
    assert "Running stage" not in out
