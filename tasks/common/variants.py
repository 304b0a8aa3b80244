"""Export variants of the fp32 towers: int8 (onnxruntime.quantization) and fp16.

int8: dynamic quantisation for the text tower (weights int8, activations quantised on the fly,
the usual choice for transformers); static QDQ for the image tower, calibrated on train-split
images, with its first convolutions kept fp32 as far as the validation images need. fp16: a
float16 graph with float32 inputs/outputs, for GPU serving; built here and kept only if ONNX
Runtime on this machine can run it.
"""

from __future__ import annotations

import logging
import shutil
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

from tasks.common.config import Int8Params
from tasks.common.data import Split
from xmodal_runtime.bundle import (
    IMAGE_INPUT,
    IMAGE_TOWER,
    TEXT_INPUTS,
    TEXT_TOWER,
    TOWERS,
    tower_file,
)
from xmodal_runtime.images import to_pixels
from xmodal_runtime.session import make_session, run_chunked

log = logging.getLogger("xmodal")


class Calibration(CalibrationDataReader):
    """Feeds (N, 3, S, S) float32 pixels in [0, 1] to the calibrator, `batch` images a call.

    `__len__` and `set_range` let onnxruntime collect one batch at a time (`CalibStridedMinMax`,
    which despite its name drives any calibrator): the Percentile calibrator otherwise holds
    every intermediate tensor of every calibration image at once, 17.4 GB of peak memory for
    256 images at 224 px. Its histograms merge batch by batch instead.
    """

    def __init__(self, pixels: np.ndarray, batch: int = 32) -> None:
        self._all = [{IMAGE_INPUT: pixels[i : i + batch]} for i in range(0, len(pixels), batch)]
        self._batches = iter(self._all)

    def __len__(self) -> int:
        return len(self._all)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._batches = iter(self._all[start_index:end_index])

    def get_next(self):
        return next(self._batches, None)


def preprocessed(src: Path, tmp: Path) -> Path:
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


def conv_nodes(model: Path) -> list[str]:
    """Names of the Conv nodes in graph (topological) order."""
    return [n.name for n in onnx.load(str(model)).graph.node if n.op_type == "Conv"]


def quantize_image(
    src: Path,
    dst: Path,
    calibration: Calibration | None,
    cache: Path,
    fp32_nodes: list[str],
    percentile: float,
) -> None:
    """Static QDQ int8 of the image tower; the tensor ranges are calibrated once into `cache`.

    reduce_range (7-bit weights): x86 CPUs without VNNI (AVX2 and AVX-512 without VNNI, such as
    the 2-core AMD EPYC here) compute u8 x s8 products with vpmaddubsw, whose int16 sums saturate;
    on this machine full-range weights cost 10 points of image->text R@1 (docs/quantisation.md).
    Percentile calibration clips the rare extreme activations a MinMax range stretches to;
    `percentile` (export.int8.percentile) says where, and only matters while `cache` is written.
    """
    quantize_static(
        str(src),
        str(dst),
        calibration,
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
        reduce_range=True,
        calibrate_method=CalibrationMethod.Percentile,
        nodes_to_exclude=fp32_nodes,
        calibration_cache_path=cache,
        # CalibStridedMinMax: one batch in memory at a time (above).
        extra_options={"CalibStridedMinMax": 1, "CalibPercentile": percentile},
    )


def quantize_text(src: Path, dst: Path) -> None:
    """Dynamic int8 of the text tower: per-channel weight scales (per-tensor scales cost 1 point
    of i2t R@1 on the default model, embedding cosine 0.972 against 0.995), reduce_range for the
    same non-VNNI saturation as above."""
    quantize_dynamic(
        str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True, reduce_range=True
    )


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean row-wise cosine of two (N, D) L2-normalised embedding sets."""
    return float((a * b).sum(axis=1).mean())


def build_int8(
    onnx_dir: Path, calibration: np.ndarray, validation: np.ndarray, p: Int8Params
) -> dict:
    """int8 towers beside the fp32 ones; returns how the image tower's precision was chosen.

    Mixed precision for the image tower: its first k convolutions stay fp32, for the smallest even
    k whose int8 embeddings of the validation images reach `p.min_cosine` (mean cosine to fp32).
    The early, high-resolution layers carry most of the quantisation error (measured layer by
    layer with onnxruntime's qdq_loss_debug; docs/quantisation.md). If no k up to
    `p.max_fp32_convs` reaches the target, the best k found is kept and a warning is logged.
    """
    fp32_image = onnx_dir / tower_file(IMAGE_TOWER)
    target = onnx_dir / tower_file(IMAGE_TOWER, "int8")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        quantize_text(
            preprocessed(onnx_dir / tower_file(TEXT_TOWER), tmp),
            onnx_dir / tower_file(TEXT_TOWER, "int8"),
        )
        src, cache = preprocessed(fp32_image, tmp), tmp / "calibration.json"
        convs = conv_nodes(src)
        reference = embed_images(fp32_image, validation)
        reader: Calibration | None = Calibration(calibration.astype(np.float32))
        tried: list[dict] = []
        best: tuple[float, int, Path] | None = None
        for k in range(0, min(p.max_fp32_convs, len(convs)) + 1, 2):
            candidate = tmp / f"image_int8_k{k}.onnx"
            quantize_image(src, candidate, reader, cache, convs[:k], p.percentile)
            reader = None  # ranges are cached after the first build
            cosine = mean_cosine(embed_images(candidate, validation), reference)
            tried.append({"fp32_convs": k, "val_cosine": round(cosine, 6)})
            if best is None or cosine > best[0]:
                best = (cosine, k, candidate)
            if cosine >= p.min_cosine:
                break
        cosine, k, chosen = best
        if cosine < p.min_cosine:
            log.warning(
                "int8 image tower: mean validation cosine %.4f < export.int8.min_cosine %.4f "
                "with up to %d fp32 convs; keeping the best (%d fp32 convs)",
                cosine, p.min_cosine, p.max_fp32_convs, k,
            )  # fmt: skip
        shutil.copy(chosen, target)
    return {
        "image_fp32_convs": k,
        "image_convs": len(convs),
        "val_cosine": round(cosine, 6),
        "min_cosine": p.min_cosine,
        "percentile": p.percentile,
        "searched": tried,
    }


def embed_images(model: Path, pixels: np.ndarray, chunk: int = 128) -> np.ndarray:
    """(N, D) embeddings of float pixels through an image tower on the CPU."""
    return run_chunked(make_session(model, "cpu"), {IMAGE_INPUT: pixels}, chunk)


def build_fp16(onnx_dir: Path) -> None:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    for tower in TOWERS:
        model = onnx.load(str(onnx_dir / tower_file(tower)))
        half = convert_float_to_float16(model, keep_io_types=True)
        onnx.save(half, str(onnx_dir / tower_file(tower, "fp16")))


def file_sizes(onnx_dir: Path, variant: str) -> dict[str, int]:
    return {t: (onnx_dir / tower_file(t, variant)).stat().st_size for t in TOWERS}


def embed_with_onnx(onnx_dir: Path, variant: str, split: Split, chunk: int = 128):
    """(image embeddings, caption embeddings) of a prepared split through ONNX Runtime."""
    img = embed_images(onnx_dir / tower_file(IMAGE_TOWER, variant), to_pixels(split.images))
    txt_sess = make_session(onnx_dir / tower_file(TEXT_TOWER, variant), "cpu")
    feeds = dict(zip(TEXT_INPUTS, split.tokens(), strict=True))
    return img, run_chunked(txt_sess, feeds, chunk)
