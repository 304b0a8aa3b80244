"""The registered model outside this repository: logged and registered through the real
`register`, loaded in a fresh virtualenv holding only the model's own requirements, and served by
`mlflow models serve`; its embeddings equal the in-repo runtime's and `xmodal infer`'s."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from .conftest import register_tiny_bundle
from .test_runtime import build_bundle, png_b64, write_pngs

MODEL = "xmodal-dual-encoder"
# Registration sets `candidate` only; `champion` moves through the promotion gates alone.
CANDIDATE = f"models:/{MODEL}@candidate"
TEXTS = ["a large red circle on the left", "a small blue square"]


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A tiny bundle registered through tasks.register.register in a fresh sqlite store."""
    import mlflow

    root = tmp_path_factory.mktemp("serving")
    onnx = build_bundle(root)
    result, uri = register_tiny_bundle(onnx, root, MODEL, "xmodal-serving-test")
    assert result.aliases == ["candidate"]
    client = mlflow.MlflowClient(tracking_uri=uri)
    mv = client.get_model_version_by_alias(MODEL, "candidate")
    assert "## ONNX parity: passed" in mv.description
    assert "| i2t_R1 | 0.5000 |" in mv.description
    model_dir = Path(
        mlflow.artifacts.download_artifacts(
            CANDIDATE, dst_path=str(root / "downloaded"), tracking_uri=uri
        )
    )
    images = write_pngs(root / "images", 1)
    return {"root": root, "onnx": onnx, "uri": uri, "model_dir": model_dir, "images": images}


@pytest.fixture(scope="module")
def fresh_venv(registered, tmp_path_factory) -> Path:
    """A virtualenv with only the registered model's requirements.txt, cached across runs (keyed
    by the requirements) beside pytest's numbered temp folders."""
    reqs = registered["model_dir"] / "requirements.txt"
    assert reqs.is_file()
    key = hashlib.sha256(reqs.read_bytes() + sys.version.encode()).hexdigest()[:12]
    venv = tmp_path_factory.getbasetemp().parent / f"xmodal-serving-venv-{key}"
    python = venv / "bin" / "python"
    if (venv / ".complete").is_file():
        return venv
    shutil.rmtree(venv, ignore_errors=True)
    start = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--timeout", "180", "-r", str(reqs)],
        check=True,
        timeout=1800,
        cwd=venv,
    )
    (venv / ".complete").write_text(f"pip install took {time.monotonic() - start:.0f}s\n")
    print(f"fresh venv: {(venv / '.complete').read_text().strip()}")
    return venv


def _clean_env(uri: str, venv: Path) -> dict[str, str]:
    """The fresh venv as if activated (the server runs its `uvicorn` from PATH), no repo paths."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME")}
    path = [p for p in env.get("PATH", "").split(os.pathsep) if ".venv" not in p]
    env.update(
        PATH=os.pathsep.join([str(venv / "bin"), *path]),
        VIRTUAL_ENV=str(venv),
        PYTHONPATH="",
        MLFLOW_TRACKING_URI=uri,
        PYTHONNOUSERSITE="1",
    )
    return env


def _encoder_reference(registered) -> np.ndarray:
    from xmodal_runtime.encoder import Encoder

    enc = Encoder(registered["onnx"], provider="cpu")
    return np.concatenate([enc.encode_texts(TEXTS), enc.encode_images(registered["images"])])


LOAD_AND_PREDICT = textwrap.dedent(
    """
    import importlib.util, sys
    from pathlib import Path
    import numpy as np, pandas as pd, mlflow.pyfunc
    for name in ("tasks", "torch", "prefect", "transformers"):
        assert importlib.util.find_spec(name) is None, f"{name} is importable here"
    try:
        import tasks  # noqa: F401
    except ImportError:
        pass
    else:
        raise AssertionError("the repository's `tasks` package is importable")
    model = mlflow.pyfunc.load_model(sys.argv[1])
    import xmodal_runtime
    print("RUNTIME", xmodal_runtime.__file__)
    df = pd.DataFrame({"text": [sys.argv[3], sys.argv[4], None],
                       "image": [None, None, Path(sys.argv[5]).read_text()]})
    np.save(sys.argv[2], np.asarray(model.predict(df)))
    """
)


@pytest.mark.slow
def test_registered_model_loads_and_predicts_in_a_fresh_venv(registered, fresh_venv, tmp_path):
    work = tmp_path / "elsewhere"
    work.mkdir()
    (work / "image.b64").write_text(png_b64(registered["images"][0]))
    script = work / "predict.py"
    script.write_text(LOAD_AND_PREDICT)
    out = work / "pred.npy"
    proc = subprocess.run(
        [
            str(fresh_venv / "bin" / "python"),
            str(script),
            CANDIDATE,
            str(out),
            *TEXTS,
            str(work / "image.b64"),
        ],  # fmt: skip
        cwd=work,
        env=_clean_env(registered["uri"], fresh_venv),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    runtime = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RUNTIME "))
    assert str(Path(__file__).resolve().parents[1]) not in runtime, runtime
    pred = np.load(out)
    assert pred.shape == (3, 16) and pred.dtype == np.float32
    np.testing.assert_allclose(pred, _encoder_reference(registered), atol=1e-5)


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


@pytest.mark.slow
@pytest.mark.services
def test_mlflow_models_serve_matches_batch_inference(registered, fresh_venv, tmp_path):
    import pyarrow.parquet as pq

    from tasks.common.config import InferParams
    from tasks.infer import infer

    from .conftest import free_port

    # What `xmodal infer` writes for the same inputs.
    images_dir = registered["images"][0].parent
    res = infer(InferParams(provider="cpu"), registered["onnx"], images_dir, TEXTS, tmp_path / "b")
    text_emb = np.array(
        pq.read_table(res.files["text_embeddings"])["embedding"].to_pylist(), dtype=np.float32
    )
    image_emb = np.array(
        pq.read_table(res.files["image_embeddings"])["embedding"].to_pylist(), dtype=np.float32
    )

    port = free_port()
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 - closed in finally
    server = subprocess.Popen(
        [
            str(fresh_venv / "bin" / "mlflow"),
            "models",
            "serve",
            "-m",
            CANDIDATE,
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],  # fmt: skip
        cwd=tmp_path,
        env=_clean_env(registered["uri"], fresh_venv),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(1)
        records = [{"text": t} for t in TEXTS]
        records.insert(1, {"image": png_b64(registered["images"][0])})
        got = np.asarray(
            _post(f"{base}/invocations", {"dataframe_records": records})["predictions"]
        )
        assert got.shape == (3, text_emb.shape[1])
        np.testing.assert_allclose(got[[0, 2]], text_emb, atol=1e-5)
        np.testing.assert_allclose(got[[1]], image_emb, atol=1e-5)
        # A bad row is a client error, not a crash.
        with pytest.raises(urllib.error.HTTPError) as err:
            _post(f"{base}/invocations", {"dataframe_records": [{"image": "not base64!"}]})
        assert err.value.code in (400, 422, 500)
    finally:
        _stop(server)
        log.close()


def _stop(server: subprocess.Popen) -> None:
    """SIGTERM the server's process group (its workers too), SIGKILL if it lingers."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, sig)
        try:
            server.wait(timeout=wait)
            # The leader is gone; make sure no worker of its group is left either.
            os.killpg(server.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue
