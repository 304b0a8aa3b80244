"""Export variants of the fp32 towers: int8 (onnxruntime.quantization) and fp16.

int8: dynamic quantisation for the text tower (weights int8, activations quantised on the fly,
the usual choice for transformers), static QDQ for the image tower calibrated on train-split
images. fp16: a float16 graph with float32 inputs/outputs, for GPU serving; built here and kept
only if ONNX Runtime on this machine can run it.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_dynamic,
    quantize_static,
)

log = logging.getLogger("xmodal")

TOWERS = ("image_encoder", "text_encoder")


def variant_file(tower: str, variant: str) -> str:
    """image_encoder.onnx for fp32, image_encoder.int8.onnx for int8, and so on."""
    return f"{tower}.onnx" if variant == "fp32" else f"{tower}.{variant}.onnx"


class _Calibration(CalibrationDataReader):
    def __init__(self, pixels: np.ndarray, batch: int) -> None:
        # pixels: (N, 3, S, S) float32 in [0, 1]
        self._batches = iter(
            [{"pixels": pixels[i : i + batch]} for i in range(0, len(pixels), batch)]
        )

    def get_next(self):
        return next(self._batches, None)


def _preprocessed(src: Path, tmp: Path) -> Path:
    """Shape inference + graph cleanup recommended before quantisation.

    The dynamo exporter's recorded intermediate shapes can disagree with ONNX's strict shape
    inference (which the quantiser runs), so they are dropped and inferred afresh.
    """
    model = onnx.load(str(src))
    del model.graph.value_info[:]
    clean = tmp / f"clean_{src.name}"
    onnx.save(model, str(clean))
    out = tmp / f"pre_{src.name}"
    try:
        quant_pre_process(str(clean), str(out), skip_symbolic_shape=True)
        return out
    except Exception as err:  # noqa: BLE001 - pre-processing is an optimisation, not required
        log.warning("quant_pre_process failed for %s (%s); quantising without it", src.name, err)
        return clean


def build_int8(onnx_dir: Path, calibration: np.ndarray) -> None:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        quantize_static(
            str(_preprocessed(onnx_dir / "image_encoder.onnx", tmp)),
            str(onnx_dir / variant_file("image_encoder", "int8")),
            _Calibration(calibration.astype(np.float32), 32),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            calibrate_method=CalibrationMethod.MinMax,
        )
        quantize_dynamic(
            str(_preprocessed(onnx_dir / "text_encoder.onnx", tmp)),
            str(onnx_dir / variant_file("text_encoder", "int8")),
            weight_type=QuantType.QInt8,
        )


def build_fp16(onnx_dir: Path) -> None:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    for tower in TOWERS:
        model = onnx.load(str(onnx_dir / f"{tower}.onnx"))
        half = convert_float_to_float16(model, keep_io_types=True)
        onnx.save(half, str(onnx_dir / variant_file(tower, "fp16")))


def file_sizes(onnx_dir: Path, variant: str) -> dict[str, int]:
    return {t: (onnx_dir / variant_file(t, variant)).stat().st_size for t in TOWERS}


def embed_with_onnx(onnx_dir: Path, variant: str, split, chunk: int = 128):
    """(image embeddings, caption embeddings) of a prepared split through ONNX Runtime."""
    from tasks.data import to_pixels
    from tasks.onnx_runtime import make_session, run_chunked

    img_sess = make_session(onnx_dir / variant_file("image_encoder", variant), "cpu")
    txt_sess = make_session(onnx_dir / variant_file("text_encoder", variant), "cpu")
    img = run_chunked(img_sess, {"pixels": to_pixels(split.images).numpy()}, chunk)
    txt = run_chunked(
        txt_sess, {"input_ids": split.input_ids, "attention_mask": split.attention_mask}, chunk
    )
    return img, txt


def onnx_retrieval(onnx_dir: Path, variant: str, split, ks: list[int]) -> dict[str, float]:
    """Recall@K and ranks of one exported variant, computed through ONNX Runtime."""
    from model import retrieval_metrics

    img, txt = embed_with_onnx(onnx_dir, variant, split)
    m = retrieval_metrics(img @ txt.T, split.image_index, ks)
    return {k: round(v, 6) for k, v in m.items()}
