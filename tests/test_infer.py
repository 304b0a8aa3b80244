"""ONNX export parity on fresh random inputs, and batch inference, on a tiny untrained model."""

import json
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from tasks.common.config import ExportParams, InferParams
from tasks.common.registry import resolve_model
from tasks.export import check_parity
from tasks.infer import infer
from xmodal_runtime.bundle import BundleError
from xmodal_runtime.retrieval import TopK

from .conftest import export_tiny_bundle


def test_topk_streaming_matches_brute_force():
    rng = np.random.default_rng(0)
    sim = rng.normal(size=(4, 23)).astype(np.float32)
    top = TopK(4, 5)
    for start in range(0, 23, 6):
        top.update(sim[:, start : start + 6], start)
    expected = np.argsort(-sim, axis=1, kind="stable")[:, :5]
    assert np.array_equal(top.ids, expected)
    assert np.allclose(top.scores, np.take_along_axis(sim, expected, 1))


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("export")
    export_tiny_bundle(root, ["int8", "fp16"])
    return root


def test_export_parity_on_random_inputs(exported: Path):
    report = json.loads((exported / "export.json").read_text())["parity"]
    assert report["passed"], report
    assert report["random_inputs"]["max_abs_diff_image"] <= 1e-4
    assert report["random_inputs"]["max_abs_diff_text"] <= 1e-4


def test_parity_check_can_fail(exported: Path):
    # A model that differs from the exported one must not pass.
    from tasks.common.checkpoint import load_checkpoint

    net, _ = load_checkpoint(exported / "train")
    with torch.no_grad():
        net.image_proj.weight.add_(0.05)
    report, _ = check_parity(net, exported / "onnx", exported / "prep", ExportParams())
    assert not report["passed"]


def test_parity_returns_the_fp32_test_embeddings_variants_are_scored_against(exported: Path):
    # build_variants scores fp32 on these instead of embedding the test split a second time.
    from tasks.common.checkpoint import load_checkpoint
    from tasks.common.data import load_split
    from tasks.common.variants import embed_with_onnx

    net, _ = load_checkpoint(exported / "train")
    _, (img, txt) = check_parity(net, exported / "onnx", exported / "prep", ExportParams())
    ref_img, ref_txt = embed_with_onnx(
        exported / "onnx", "fp32", load_split(exported / "prep", "test")
    )
    assert img.shape == ref_img.shape and txt.shape == ref_txt.shape
    assert np.allclose(img, ref_img, atol=1e-6) and np.allclose(txt, ref_txt, atol=1e-6)


def test_infer_skips_unreadable_images_and_writes_everything(exported: Path, tmp_path: Path):
    images = tmp_path / "imgs"
    images.mkdir()
    for src in sorted((exported / "raw_images").iterdir())[:9]:
        (images / src.name).write_bytes(src.read_bytes())
    (images / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    queries = ["a red circle", "two shapes on a gray background", "a small star"]
    model_dir = resolve_model(str(exported / "onnx"))
    res = infer(InferParams(top_k=4, chunk_size=4), model_dir, images, queries, tmp_path / "out")
    assert (res.images, res.texts, res.errors) == (9, 3, 1)
    errors = [json.loads(x) for x in (tmp_path / "out/errors.jsonl").read_text().splitlines()]
    assert errors[0]["path"].endswith("broken.jpg")
    emb = pq.read_table(tmp_path / "out/image_embeddings.parquet")
    assert emb.num_rows == 9 and "broken.jpg" not in emb.column("id").to_pylist()
    vecs = np.stack(emb.column("embedding").to_numpy(zero_copy_only=False))
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1, atol=1e-5)
    t2i = [json.loads(x) for x in (tmp_path / "out/text_to_image.jsonl").read_text().splitlines()]
    assert [len(r["results"]) for r in t2i] == [4, 4, 4]
    # the streamed top-k equals brute force over all image embeddings
    q = np.stack(
        pq.read_table(tmp_path / "out/text_embeddings.parquet")
        .column("embedding")
        .to_numpy(zero_copy_only=False)
    )
    ids = emb.column("id").to_pylist()
    best = np.argsort(-(q @ vecs.T), axis=1, kind="stable")[:, :4]
    assert [[h["image"] for h in r["results"]] for r in t2i] == [
        [ids[i] for i in row] for row in best
    ]


def test_resolve_model_rejects_incomplete_folders(tmp_path: Path):
    with pytest.raises(BundleError, match="meta.json"):
        resolve_model(str(tmp_path))
    (tmp_path / "meta.json").write_text(
        '{"image_size": 32, "max_length": 8, "embed_dim": 4, "opset": 18}'
    )
    with pytest.raises(BundleError, match="image_encoder.onnx"):
        resolve_model(str(tmp_path))


def test_int8_variant_is_built_scored_and_served(exported: Path, tmp_path: Path):
    variants = json.loads((exported / "export.json").read_text())["variants"]
    assert variants["int8"]["available"], variants["int8"]
    assert set(variants["int8"]["delta_vs_fp32"]) >= {"i2t_R1", "t2i_R5"}
    assert variants["int8"]["bytes"]["image_encoder"] < variants["fp32"]["bytes"]["image_encoder"]
    mixed = variants["int8"]["mixed_precision"]
    assert mixed["searched"][-1]["fp32_convs"] == mixed["image_fp32_convs"]
    # fp16 runs on this CPU's ONNX Runtime, so it is built and checked here
    assert variants["fp16"]["available"], variants["fp16"]
    assert variants["fp16"]["max_abs_diff_vs_fp32"] < 1e-2
    res = infer(
        InferParams(variant="int8"),
        exported / "onnx",
        exported / "raw_images",
        ["a red circle"],
        tmp_path,
    )
    assert res.images == 16 and res.errors == 0


def test_int8_variant_of_a_head_ensemble(tmp_path: Path):
    # Each head's output is already unit-norm; a second normalisation would put a constant
    # (all-ones) norm tensor in the graph, which the Percentile calibrator cannot bin.
    export_tiny_bundle(
        tmp_path, ["int8"], model={"embed_dim": 32, "projection": {"kind": "residual", "heads": 2}}
    )
    int8 = json.loads((tmp_path / "export.json").read_text())["variants"]["int8"]
    assert int8["available"], int8.get("reason")


@pytest.mark.slow
def test_batch_inference_flow_on_dask_matches_single_process(exported: Path, tmp_path: Path):
    from dask.distributed import LocalCluster

    from flows.batch_inference import batch_inference

    images = exported / "raw_images"
    (images.parent / "junk").mkdir(exist_ok=True)
    queries = ["a red circle", "three shapes", "a small blue square on the right"]
    kwargs = dict(model=str(exported / "onnx"), images_dir=str(images), queries=queries)
    single = infer(
        InferParams(top_k=3, chunk_size=5), exported / "onnx", images, queries, tmp_path / "one"
    )
    params = InferParams(top_k=3, chunk_size=5)
    local = batch_inference(out=str(tmp_path / "local"), shards=3, infer=params, **kwargs)
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
    ) as cluster:
        dist = batch_inference(
            dask_address=cluster.scheduler_address,
            out=str(tmp_path / "dask"),
            shards=3,
            infer=params,
            **kwargs,
        )
    assert local["shards"] == dist["shards"] == 3
    here = f"{socket.gethostname()}:{os.getpid()}"
    assert local["workers"] == [here]
    assert here not in dist["workers"] and 1 <= len(dist["workers"]) <= 2  # the cluster's workers
    assert dist["images"] == single.images == 16
    ref = pq.read_table(tmp_path / "one/image_embeddings.parquet")
    for run in ("local", "dask"):
        got = pq.read_table(tmp_path / run / "image_embeddings.parquet")
        assert got.column("id").to_pylist() == ref.column("id").to_pylist()
        assert np.array_equal(
            np.stack(got.column("embedding").to_numpy(zero_copy_only=False)),
            np.stack(ref.column("embedding").to_numpy(zero_copy_only=False)),
        )
        assert (tmp_path / run / "text_to_image.jsonl").read_text() == (
            tmp_path / "one/text_to_image.jsonl"
        ).read_text()
        assert (tmp_path / run / "image_to_text.jsonl").read_text() == (
            tmp_path / "one/image_to_text.jsonl"
        ).read_text()


def _fp32_convs(model: Path) -> list[bool]:
    """For each Conv in graph order: does it read a float initializer (not a dequantized one)?"""
    import onnx

    graph = onnx.load(str(model)).graph
    floats = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    return [n.input[1] in floats for n in graph.node if n.op_type == "Conv"]


def test_int8_mixed_precision_stops_at_the_first_k_reaching_the_target(exported, tmp_path):
    from tasks.common.config import Int8Params
    from tasks.common.data import load_split, to_pixels
    from tasks.common.variants import build_int8

    onnx_dir = tmp_path / "onnx"
    shutil.copytree(exported / "onnx", onnx_dir)
    calib = to_pixels(load_split(exported / "prep", "train").images).numpy()
    check = to_pixels(load_split(exported / "prep", "test").images).numpy()

    easy = build_int8(onnx_dir, calib, check, Int8Params(min_cosine=0.01, max_fp32_convs=6))
    assert easy["image_fp32_convs"] == 0 and len(easy["searched"]) == 1
    assert _fp32_convs(onnx_dir / "image_encoder.int8.onnx") == [False] * easy["image_convs"]

    # Unreachable: every even k up to the bound is tried and the best one kept.
    hard = build_int8(onnx_dir, calib, check, Int8Params(min_cosine=1.0, max_fp32_convs=6))
    assert [t["fp32_convs"] for t in hard["searched"]] == [0, 2, 4, 6]
    cosines = {t["fp32_convs"]: t["val_cosine"] for t in hard["searched"]}
    k = hard["image_fp32_convs"]
    assert cosines[k] == max(cosines.values()) == hard["val_cosine"]
    assert _fp32_convs(onnx_dir / "image_encoder.int8.onnx")[: k + 1] == [True] * k + [False]


def test_calibration_is_collected_one_batch_at_a_time(exported, tmp_path):
    """The Percentile calibrator sees one batch per collect (bounded memory: 17.4 GB -> 3.4 GB
    peak for 256 images at 224 px), and every calibration image exactly once."""
    from tasks.common.data import load_split, to_pixels
    from tasks.common.variants import Calibration, preprocessed, quantize_image

    class Counting(Calibration):
        ranges: list[tuple[int, int]] = []
        fed = 0

        def set_range(self, start_index: int, end_index: int) -> None:
            self.ranges.append((start_index, end_index))
            super().set_range(start_index, end_index)

        def get_next(self):
            batch = super().get_next()
            self.fed += 0 if batch is None else len(next(iter(batch.values())))
            return batch

    pixels = to_pixels(load_split(exported / "prep", "train").images).numpy()
    reader = Counting(pixels, batch=4)
    src = preprocessed(exported / "onnx" / "image_encoder.onnx", tmp_path)
    quantize_image(src, tmp_path / "q.onnx", reader, tmp_path / "cache.json", [], 99.999)
    n = len(reader)
    assert n == -(-len(pixels) // 4) > 1
    assert reader.ranges == [(i, i + 1) for i in range(n)] and reader.fed == len(pixels)


def test_int8_percentile_sets_the_calibrated_ranges(exported: Path, tmp_path: Path):
    # export.int8.percentile reaches the calibrator: a lower percentile clips the ranges.
    from onnxruntime.quantization.calibrate import load_tensors_data

    from tasks.common.data import load_split, to_pixels
    from tasks.common.variants import Calibration, preprocessed, quantize_image

    pixels = to_pixels(load_split(exported / "prep", "train").images).numpy()
    src = preprocessed(exported / "onnx" / "image_encoder.onnx", tmp_path)
    widths = {}
    for pct in (90.0, 100.0):
        cache = tmp_path / f"cache{pct}.json"
        quantize_image(src, tmp_path / f"q{pct}.onnx", Calibration(pixels, 4), cache, [], pct)
        ranges = load_tensors_data(cache).data
        widths[pct] = {k: float(np.max(r.highest - r.lowest)) for k, r in ranges.items()}
    assert widths[90.0].keys() == widths[100.0].keys()
    assert all(widths[90.0][k] <= widths[100.0][k] + 1e-6 for k in widths[90.0])
    assert sum(widths[90.0].values()) < 0.9 * sum(widths[100.0].values())
