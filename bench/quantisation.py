"""int8 configurations of the exported towers, each scored on the test split: the evidence behind
`tasks/common/variants.py::build_int8`. Prints markdown tables (docs/quantisation.md holds a run).

Text rows: `quantize_dynamic` options, image tower fp32. Image rows: `quantize_static` options,
text tower fp32, so each row shows one tower's loss; images/s is the image tower at batch 32.
`--layers` adds the accumulated error (SQNR against fp32, in dB) after every conv of the
all-int8 image tower, from onnxruntime's qdq_loss_debug.

    .venv/bin/python -m bench.quantisation [--params params.yaml] [--layers]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)

from bench.benchmark import measure
from model.metrics import retrieval_metrics
from tasks.common import variants
from tasks.common.config import load_params
from tasks.common.data import load_split, to_pixels
from xmodal_runtime.bundle import IMAGE_TOWER, TEXT_TOWER, tower_file
from xmodal_runtime.session import make_session, run_chunked

ROOT = Path(__file__).resolve().parents[1]

TEXT = {
    "defaults (per-tensor weights)": {},
    "per_channel": {"per_channel": True},
    "per_channel, reduce_range (chosen)": {"per_channel": True, "reduce_range": True},
}
U8, S8 = QuantType.QUInt8, QuantType.QInt8
MINMAX, PERCENTILE = CalibrationMethod.MinMax, CalibrationMethod.Percentile
IMAGE = {
    "u8 activations, s8 weights, MinMax (full-range weights)": (U8, S8, MINMAX, False),
    "s8 activations, s8 weights, MinMax": (S8, S8, MINMAX, False),
    "u8 activations, u8 weights, MinMax": (U8, U8, MINMAX, False),
    "u8/s8, MinMax, reduce_range": (U8, S8, MINMAX, True),
    "u8/s8, Percentile, reduce_range": (U8, S8, PERCENTILE, True),
}


def throughput(path: Path, pixels: np.ndarray) -> float:
    """Median images/s of one image tower at batch 32 (bench/benchmark.py's timer)."""
    sess, feed = make_session(path, "cpu"), {"pixels": pixels[:32]}
    return measure({"onnx": lambda: sess.run(None, feed)}, 32, 1.5, 3)["onnx"][0]


def layer_errors(float_model: Path, int8_model: Path, pixels: np.ndarray, tmp: Path) -> list[str]:
    """Accumulated SQNR (dB) of each conv output of the int8 model against the fp32 model."""
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations,
        compute_activation_error,
        create_activation_matching,
        modify_model_output_intermediate_tensors,
    )

    acts = {}
    for tag, model in (("fp32", float_model), ("int8", int8_model)):
        augmented = tmp / f"augmented_{tag}.onnx"
        modify_model_output_intermediate_tensors(str(model), str(augmented))
        acts[tag] = collect_activations(str(augmented), variants.Calibration(pixels))
    errors = compute_activation_error(create_activation_matching(acts["int8"], acts["fp32"]))
    nodes = onnx.load(str(float_model)).graph.node
    clip_of = {n.input[0]: n.output[0] for n in nodes if n.op_type == "Clip"}
    rows = [
        "| conv | output (after its ReLU6, if any) | SQNR vs fp32 (dB) |",
        "| --- | --- | --- |",
    ]
    for i, node in enumerate(n for n in nodes if n.op_type == "Conv"):
        # The quantised graph folds ReLU6 (Clip) into the conv's output range: compare there.
        name = clip_of.get(node.output[0], node.output[0])
        err = errors.get(name, {}).get("xmodel_err")
        if err is not None:
            rows.append(f"| {i} | `{name}` | {err:.1f} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--layers", action="store_true", help="per-conv error of the all-int8 tower")
    args = ap.parse_args()
    params = load_params(args.params)
    root = args.params.resolve().parent
    onnx_dir, prepared = root / params.paths.onnx, root / params.paths.prepared
    test = load_split(prepared, "test")
    calib = to_pixels(load_split(prepared, "train").images[: params.export.calibration_images])
    calib = calib.numpy()
    val = to_pixels(load_split(prepared, "val").images).numpy()
    pixels = to_pixels(test.images).numpy()
    texts = dict(zip(("input_ids", "attention_mask"), test.tokens(), strict=True))
    fp32_image = onnx_dir / tower_file(IMAGE_TOWER)
    img32 = variants.embed_images(fp32_image, pixels)
    val32 = variants.embed_images(fp32_image, val)
    txt32 = run_chunked(make_session(onnx_dir / tower_file(TEXT_TOWER), "cpu"), texts, 128)

    def r1(img: np.ndarray, txt: np.ndarray) -> str:
        m = retrieval_metrics(img, txt, test.image_index, [1])
        return f"{m['i2t_R1']:.3f} | {m['t2i_R1']:.3f}"

    def image_row(name: str, path: Path) -> str:
        emb = variants.embed_images(path, pixels)
        cos = (emb * img32).sum(axis=1)
        val_cos = variants.mean_cosine(variants.embed_images(path, val), val32)
        return (
            f"| {name} | {r1(emb, txt32)} | {cos.mean():.4f} | {cos.min():.3f} | {val_cos:.4f} "
            f"| {throughput(path, pixels):,.0f} |"
        )

    out = [
        f"fp32 (ONNX Runtime): {r1(img32, txt32)} (i2t | t2i R@1); image tower "
        f"{throughput(fp32_image, pixels):,.0f} images/s at batch 32",
        "",
        "| text: `quantize_dynamic` options | i2t R@1 | t2i R@1 | mean cosine to fp32 |",
        "| --- | --- | --- | --- |",
    ]
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        pre_text = variants.preprocessed(onnx_dir / tower_file(TEXT_TOWER), tmp)
        for i, (name, kw) in enumerate(TEXT.items()):
            path = tmp / f"text_{i}.onnx"
            quantize_dynamic(str(pre_text), str(path), weight_type=QuantType.QInt8, **kw)
            emb = run_chunked(make_session(path, "cpu"), texts, 128)
            out.append(f"| {name} | {r1(img32, emb)} | {variants.mean_cosine(emb, txt32):.4f} |")
        out += [
            "",
            "| image: `quantize_static` (QDQ, per-channel weights) | i2t R@1 | t2i R@1 "
            "| test cosine mean | test cosine min | val cosine | images/s |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        pre_image = variants.preprocessed(fp32_image, tmp)
        for i, (name, (act, weight, method, reduce)) in enumerate(IMAGE.items()):
            path = tmp / f"image_{i}.onnx"
            quantize_static(
                str(pre_image),
                str(path),
                variants.Calibration(calib),
                quant_format=QuantFormat.QDQ,
                activation_type=act,
                weight_type=weight,
                per_channel=True,
                reduce_range=reduce,
                calibrate_method=method,
            )
            out.append(image_row(name, path))
        # The build's own quantiser, with the first k convs kept fp32 (ranges calibrated once).
        convs, cache = variants.conv_nodes(pre_image), tmp / "calibration.json"
        for k in range(2, 13, 2):
            path = tmp / f"image_k{k}.onnx"
            reader = variants.Calibration(calib) if not cache.exists() else None
            variants.quantize_image(
                pre_image, path, reader, cache, convs[:k], params.export.int8.percentile
            )
            out.append(image_row(f"Percentile, reduce_range, first {k} convs fp32", path))
        if args.layers:
            all_int8 = tmp / "image_all_int8.onnx"
            variants.quantize_image(
                pre_image, all_int8, None, cache, [], params.export.int8.percentile
            )
            out += ["", *layer_errors(pre_image, all_int8, pixels[:64], tmp)]
    print("\n".join(out))


if __name__ == "__main__":
    main()
