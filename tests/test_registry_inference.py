"""Inference from the MLflow registry: `models:/` resolved to a version and downloaded once into
the model cache (atomically, no temp folders left), summary.json naming the model, one-line
errors, and the batch-inference flow without Prefect's worker-thread timeout warnings.

A real sqlite registry under tmp_path holds a tiny exported model registered through
tasks.register; `xmodal infer` runs as a real subprocess (.venv/bin/xmodal)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
import yaml

from xmodal_runtime.bundle import Bundle, bundle_digest, file_hashes

from .conftest import export_tiny_bundle, register_tiny_bundle, tiny_params_dict

MODEL = "xmodal-regtest"
CANDIDATE = f"models:/{MODEL}@candidate"
XMODAL = Path(sys.executable).parent / "xmodal"
TEXTS = ["a red circle on the left", "a small blue square"]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project folder (params.yaml) beside a sqlite registry holding version 1 of MODEL
    (alias candidate), registered by tasks.register from a tiny fp32 export."""
    root = tmp_path_factory.mktemp("reginfer")
    onnx = export_tiny_bundle(root, [])
    (root / "registry").mkdir()
    result, uri = register_tiny_bundle(onnx, root / "registry", MODEL, "xmodal-reginfer-test")
    assert result.version == "1" and "candidate" in result.aliases
    proj = root / "project"
    proj.mkdir()
    (proj / "params.yaml").write_text(yaml.safe_dump(tiny_params_dict(), sort_keys=False))
    (proj / "queries.txt").write_text("\n".join(TEXTS) + "\n")
    return {
        "project": proj,
        "uri": uri,
        "onnx": onnx,
        "run_id": result.run_id,
        "images": root / "raw_images",
    }


def _env(project: dict, tmpdir: Path) -> dict[str, str]:
    """The test's environment, the registry's URI, and a temp folder of the runs' own."""
    tmpdir.mkdir(parents=True, exist_ok=True)
    return {**os.environ, "MLFLOW_TRACKING_URI": project["uri"], "TMPDIR": str(tmpdir)}


def _xmodal(project: dict, tmpdir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(XMODAL), "infer", *args],
        cwd=project["project"],
        env=_env(project, tmpdir),
        capture_output=True,
        text=True,
        timeout=300,
    )


def _model_copies(folder: Path) -> set[str]:
    """Entries of `folder` holding an exported model or an MLflow model (a leaked download)."""
    found = set()
    for entry in Path(folder).iterdir():
        try:
            if entry.is_dir() and (
                next(entry.rglob("meta.json"), None) or next(entry.rglob("MLmodel"), None)
            ):
                found.add(entry.name)
        except OSError:  # another user's folder, or one removed meanwhile
            continue
    return found


def _versions_in(folder: Path) -> list[Path]:
    """The entries of a model's cache folder but the per-version publishing locks."""
    return sorted(p for p in folder.iterdir() if not p.name.endswith(".lock"))


def _cache_of(project: dict) -> Path:
    """The model cache folder of the test registry (one tracking URI: one subfolder)."""
    [tracking_dir] = (project["project"] / ".xmodal" / "models").iterdir()
    return tracking_dir


def test_bundle_digest_is_sha256_of_sorted_path_hash_lines(tmp_path: Path):
    import hashlib

    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "b.onnx").write_bytes(b"bb")
    (tmp_path / "tokenizer" / "tokenizer.json").write_text("{}")
    hashes = file_hashes(tmp_path)
    assert list(hashes) == ["b.onnx", "tokenizer/tokenizer.json"]
    assert hashes["b.onnx"] == hashlib.sha256(b"bb").hexdigest()
    lines = "".join(f"{p}  {h}\n" for p, h in sorted(hashes.items()))
    assert bundle_digest(hashes) == hashlib.sha256(lines.encode()).hexdigest()
    before = bundle_digest(hashes)
    (tmp_path / "b.onnx").write_bytes(b"bc")
    assert bundle_digest(file_hashes(tmp_path)) != before


@pytest.mark.slow
def test_two_infer_runs_download_once_and_leave_no_temp_folders(project, tmp_path: Path):
    proj, run_tmp = project["project"], tmp_path / "run-tmp"
    system_tmp = Path(tempfile.gettempdir())
    copies_before = _model_copies(system_tmp)
    outs, tmp_entries = [], []
    for i in range(2):
        out = tmp_path / f"out{i}"
        res = _xmodal(
            project,
            run_tmp,
            *("--model", CANDIDATE, "--images", str(project["images"])),
            *("--texts", "queries.txt", "--out", str(out), "--provider", "cpu"),
        )
        assert res.returncode == 0, res.stderr
        assert "16 images, 2 texts, 0 errors" in res.stdout
        outs.append(out)
        tmp_entries.append(sorted(os.listdir(run_tmp)))
        if i == 0:  # the downloaded version, marked: a second download would replace it
            [version_dir] = _versions_in(_cache_of(project) / MODEL)
            (version_dir / "first-download").write_text("")
            inode = (version_dir / "first-download").stat().st_ino

    cache = _cache_of(project)
    assert [p.name for p in _versions_in(cache / MODEL)] == [version_dir.name]
    assert version_dir.name == f"v1-{project['run_id'][:8]}"
    assert (version_dir / "first-download").stat().st_ino == inode  # reused, not re-downloaded
    assert not [p for p in cache.rglob("*") if p.name.startswith(".tmp-")]
    # Nothing left in the runs' temp folder (tempfile.gettempdir() in the subprocesses) but ONNX
    # Runtime's session-id file `.ses` (one small file, reused by every process), the same after
    # either run; and no model copy appeared in the system's (other users' entries don't count).
    assert tmp_entries[0] == tmp_entries[1] and set(tmp_entries[1]) <= {".ses"}, tmp_entries
    assert not [p for p in run_tmp.iterdir() if p.is_dir()]
    assert _model_copies(system_tmp) - copies_before == set()

    [bundle_dir] = {p.parent for p in version_dir.rglob("meta.json")}
    digest = Bundle.open(bundle_dir).digest()
    assert digest == Bundle.open(project["onnx"]).digest()  # the registry copy is the export
    expected = {
        "uri": CANDIDATE,
        "name": MODEL,
        "version": "1",
        "run_id": project["run_id"],
        "bundle_sha256": digest,
    }
    for out in outs:
        assert json.loads((out / "summary.json").read_text())["model"] == expected
    assert (proj / ".xmodal").is_dir()


@pytest.mark.slow
def test_folder_model_is_recorded_by_its_path(project, tmp_path: Path):
    res = _xmodal(
        project,
        tmp_path / "run-tmp",
        *("--model", str(project["onnx"]), "--texts", "queries.txt", "--out", str(tmp_path)),
    )
    assert res.returncode == 0, res.stderr
    model = json.loads((tmp_path / "summary.json").read_text())["model"]
    assert model == {
        "uri": str(project["onnx"].resolve()),
        "name": None,
        "version": None,
        "run_id": None,
        "bundle_sha256": Bundle.open(project["onnx"]).digest(),
    }


def _error_cases(tmp: Path) -> dict[str, tuple[list[str], list[str]]]:
    """case: (arguments, strings the one error line must hold)."""
    (tmp / "empty").mkdir(exist_ok=True)
    (tmp / "a-file").write_text("")
    q = ["--texts", "queries.txt"]
    return {
        "unknown model name": (
            ["--model", "models:/no-such-model@candidate", *q],
            ["'no-such-model'", "sqlite:///", MODEL],
        ),
        "unknown alias": (
            ["--model", f"models:/{MODEL}@unknown-alias", *q],
            ["'unknown-alias'", repr(MODEL), "sqlite:///", "aliases: @candidate (v1)"],
        ),
        "unknown version": (
            ["--model", f"models:/{MODEL}/99", *q],
            ["version 99", repr(MODEL), "sqlite:///", "versions: 1"],
        ),
        "missing model folder": (
            ["--model", str(tmp / "not-a-model"), *q],
            ["does not exist", str(tmp / "not-a-model")],
        ),
        "folder that is not a bundle": (
            ["--model", str(tmp / "empty"), *q],
            [str(tmp / "empty"), "not an exported model folder", "meta.json"],
        ),
        "chunk size 0": (["--model", str(tmp / "empty"), *q, "--chunk-size", "0"], ["chunk_size"]),
        "missing images folder": (
            ["--model", str(tmp / "empty"), "--images", str(tmp / "no-images")],
            ["--images", "does not exist", str(tmp / "no-images")],
        ),
        "unwritable out": (
            ["--model", str(tmp / "empty"), *q, "--out", str(tmp / "a-file" / "out")],
            ["--out", "not writable", str(tmp / "a-file")],
        ),
    }


CASES = [
    "unknown model name",
    "unknown alias",
    "unknown version",
    "missing model folder",
    "folder that is not a bundle",
    "chunk size 0",
    "missing images folder",
    "unwritable out",
]


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_expected_errors_are_one_line(project, tmp_path: Path, case: str):
    cases = _error_cases(tmp_path)
    assert sorted(cases) == sorted(CASES)
    args, needles = cases[case]
    res = _xmodal(project, tmp_path / "run-tmp", *args)
    assert res.returncode != 0, (res.stdout, res.stderr)  # 2 for bad params, else 1 (cli/errors)
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in res.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    if case == "missing model folder":
        assert "meta.json" not in lines[0]


@pytest.mark.slow
def test_verbose_shows_the_traceback(project, tmp_path: Path):
    res = _xmodal(
        project,
        tmp_path / "run-tmp",
        *("--model", f"models:/{MODEL}@unknown-alias", "--texts", "queries.txt", "--verbose"),
    )
    assert res.returncode != 0
    assert "Traceback" in res.stderr and "unknown-alias" in res.stderr


@pytest.mark.slow
def test_interrupted_and_concurrent_downloads_never_count_as_cached(project, tmp_path, monkeypatch):
    """A temp folder left by a killed download and a half folder under the final name are not
    taken for the model; two concurrent resolutions publish one complete folder."""
    from tasks.common.registry import TMP_PREFIX, resolve

    monkeypatch.setenv("MLFLOW_TRACKING_URI", project["uri"])
    first = resolve(CANDIDATE, root=tmp_path, cache="cache")
    [version_dir] = _versions_in(next((tmp_path / "cache").iterdir()) / MODEL)
    assert first.path.is_relative_to(version_dir)
    # A killed download's leftovers: a partial temp sibling, and a half folder in place.
    leftover = version_dir.parent / f"{TMP_PREFIX}{version_dir.name}-killed"
    leftover.mkdir()
    (leftover / "meta.json").write_text("{}")
    (first.path / "text_encoder.onnx").unlink()
    again = resolve(CANDIDATE, root=tmp_path, cache="cache")
    assert again.path == first.path and again.bundle_sha256 == first.bundle_sha256
    assert (again.path / "text_encoder.onnx").is_file()
    assert leftover.is_dir()  # a recent temp folder may be a live download elsewhere: kept
    # ... until it is a day old; the next download removes it.
    os.utime(leftover, (0, 0))
    (again.path / "meta.json").unlink()
    assert resolve(CANDIDATE, root=tmp_path, cache="cache").bundle_sha256 == first.bundle_sha256
    assert [p.name for p in _versions_in(version_dir.parent)] == [version_dir.name]

    # Concurrent: two threads resolve into an empty cache; one folder, complete, no temp left.
    cache2 = tmp_path / "cache2"
    results, errors = [], []

    def go():
        try:
            results.append(resolve(f"models:/{MODEL}/1", root=tmp_path, cache="cache2"))
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=go) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert {r.path for r in results} == {results[0].path}
    assert {r.bundle_sha256 for r in results} == {first.bundle_sha256}
    [tracking_dir] = cache2.iterdir()
    assert [p.name for p in _versions_in(tracking_dir / MODEL)] == [version_dir.name]


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if not any(r is record for r in self.records):  # seen once per logger it propagates to
            self.records.append(record)


def _capture_prefect_logs() -> tuple[_Records, list[logging.Logger]]:
    handler = _Records()
    loggers = [logging.getLogger(n) for n in ("prefect", "prefect.task_runs", "prefect.flow_runs")]
    for lg in loggers:
        lg.addHandler(handler)
    return handler, loggers


TIMEOUT_WARNING = "running in a worker thread"


@pytest.mark.slow
def test_batch_flow_records_the_model_without_timeout_warnings(project, tmp_path, monkeypatch):
    import time

    from prefect import flow, task
    from prefect.task_engine import TaskRunTimeoutError

    from flows.batch_inference import batch_inference
    from tasks.batch import infer_shard_task, resolve_model_task
    from tasks.common.config import InferParams

    # resolve-model keeps its timeout: it runs in the flow's own thread, where Prefect's timeout
    # is an alarm that interrupts a blocking call (shown here); the mapped shards have none.
    assert resolve_model_task.timeout_seconds and infer_shard_task.timeout_seconds is None

    @task(timeout_seconds=1)
    def stalled() -> None:
        time.sleep(30)

    @flow
    def in_flow_thread() -> float:
        start = time.monotonic()
        with pytest.raises(TaskRunTimeoutError):
            stalled()
        return time.monotonic() - start

    assert in_flow_thread() < 10

    monkeypatch.setenv("MLFLOW_TRACKING_URI", project["uri"])
    monkeypatch.chdir(tmp_path)  # the flow's model cache: ./.xmodal/models
    handler, loggers = _capture_prefect_logs()
    try:
        # The capture sees the warning when a mapped task has a timeout (the old infer-shard) ...
        @task(timeout_seconds=3600)
        def with_timeout(x: int) -> int:
            return x

        @flow
        def control() -> list[int]:
            return [f.result() for f in with_timeout.map([1, 2])]

        assert control() == [1, 2]
        control_warnings = [r for r in handler.records if TIMEOUT_WARNING in r.getMessage()]
        assert len(control_warnings) == 2
        handler.records.clear()

        # ... and none in a real batch-inference run of four shards.
        summary = batch_inference(
            model=CANDIDATE,
            images_dir=str(project["images"]),
            out=str(tmp_path / "out"),
            queries=TEXTS,
            shards=4,
            infer=InferParams(provider="cpu", chunk_size=3),
        )
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
    messages = [r.getMessage() for r in handler.records]
    assert any("Finished in state Completed" in m for m in messages)  # task-run logs seen
    assert not [m for m in messages if TIMEOUT_WARNING in m or "Timeout of" in m]
    assert not [r for r in handler.records if r.levelno >= logging.WARNING], messages

    [version_dir] = _versions_in(next((tmp_path / ".xmodal" / "models").iterdir()) / MODEL)
    [bundle_dir] = {p.parent for p in version_dir.rglob("meta.json")}
    expected = {
        "uri": CANDIDATE,
        "name": MODEL,
        "version": "1",
        "run_id": project["run_id"],
        "bundle_sha256": Bundle.open(bundle_dir).digest(),
    }
    assert summary["shards"] == 4 and summary["images"] == 16
    assert summary["model"] == expected
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["model"] == expected
    shard = json.loads((tmp_path / "out" / "shard_0000" / "summary.json").read_text())
    assert shard["model"] == expected


@pytest.mark.slow
def test_registered_files_changed_after_registration_are_refused(project, tmp_path: Path):
    """A changed file in the download is refused against the version's sha256 tags, even with
    its manifest rewritten to match; a merely damaged cache is downloaded again."""
    args = ("--model", CANDIDATE, "--texts", "queries.txt", "--out", str(tmp_path / "o"))
    assert _xmodal(project, tmp_path / "t", *args).returncode == 0  # cached now
    [bundle_dir] = {p.parent for p in _cache_of(project).rglob("meta.json")}
    tokenizer = bundle_dir / "tokenizer" / "tokenizer.json"
    tokenizer.write_text(tokenizer.read_text().replace('"[UNK]"', '"[UNKNOWN]"', 1))
    damaged = _xmodal(project, tmp_path / "t", *args)  # manifest disagrees: fetched again
    assert damaged.returncode == 0, damaged.stderr
    assert "tokenizer/tokenizer.json changed after export" in damaged.stderr  # the warning
    assert Bundle.open(bundle_dir).digest() == Bundle.open(project["onnx"]).digest()

    from xmodal_runtime.bundle import write_manifest

    tokenizer.write_text(tokenizer.read_text().replace('"[UNK]"', '"[UNKNOWN]"', 1))
    write_manifest(bundle_dir)  # a consistent forgery: only the registry's tags can tell
    forged = _xmodal(project, tmp_path / "t", *args)
    assert forged.returncode == 1
    (line,) = forged.stderr.splitlines()
    assert "tokenizer/tokenizer.json changed after export" in line
    assert f"registered {MODEL} v1 recorded its files' sha256" in line


@pytest.mark.slow
def test_the_pyfunc_refuses_a_changed_bundle_file(project, tmp_path: Path, monkeypatch):
    """The registered MLflow model (what `mlflow models serve` loads) verifies its bundle on
    load: one changed ONNX file and it refuses, naming the file."""
    import mlflow

    from xmodal_runtime.bundle import BundleError

    monkeypatch.setenv("MLFLOW_TRACKING_URI", project["uri"])
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{MODEL}/1", dst_path=str(tmp_path)))
    assert mlflow.pyfunc.load_model(str(local)) is not None  # as registered: loads
    [onnx] = [p for p in local.rglob("text_encoder.onnx")]
    with open(onnx, "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match="text_encoder.onnx changed after export"):
        mlflow.pyfunc.load_model(str(local))
