"""export: the two towers to ONNX (dynamic batch and sequence), checked for parity with PyTorch.

Writes image_encoder.onnx, text_encoder.onnx, the tokenizer and meta.json to paths.onnx, so
inference needs neither torch nor the checkpoint. Parity (max abs embedding difference and
identical top-1 retrievals, on fresh random inputs and on the test split) goes to export.json.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from prefect import task
from prefect.cache_policies import NONE
from torch import nn
from torch.export import Dim

from model.dual_encoder import DualEncoder
from tasks.common import stage, variants
from tasks.common.checkpoint import load_checkpoint
from tasks.common.config import ExportParams, Params
from tasks.common.data import (
    META_FILE,
    TOKENIZER_DIR,
    embed_images,
    embed_texts,
    load_split,
    read_json,
    to_pixels,
)
from tasks.common.dataset import DatasetError
from xmodal_runtime import bundle
from xmodal_runtime.session import make_session, run_chunked

log = logging.getLogger("xmodal")

IMAGE_ONNX = bundle.tower_file(bundle.IMAGE_TOWER)
TEXT_ONNX = bundle.tower_file(bundle.TEXT_TOWER)
# ONNX Runtime 1.2x reads IR versions up to 10/11 reliably; the exporter may stamp a newer one.
MAX_IR_VERSION = 10


class ImageEncoder(nn.Module):
    def __init__(self, net: DualEncoder) -> None:
        super().__init__()
        self.net = net

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net.encode_image(pixels)


class TextEncoder(nn.Module):
    def __init__(self, net: DualEncoder) -> None:
        super().__init__()
        self.net = net

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.net.encode_text(input_ids, attention_mask)


@dataclass(frozen=True)
class ExportResult:
    parity: dict
    out: str


def export_module(
    module: nn.Module, args: tuple, names: list[str], shapes: dict, path: Path, opset: int
):
    module.eval()
    torch.onnx.export(
        module,
        args,
        str(path),
        input_names=names,
        output_names=[bundle.OUTPUT],
        dynamic_shapes=shapes,
        opset_version=opset,
        dynamo=True,
        external_data=False,
        verbose=False,
    )
    proto = onnx.load(str(path))
    if proto.ir_version > MAX_IR_VERSION:
        proto.ir_version = MAX_IR_VERSION
        onnx.save(proto, str(path))
    onnx.checker.check_model(str(path), full_check=True)


def export_towers(
    net: DualEncoder, image_size: int, max_length: int, out: Path, opset: int
) -> None:
    batch = Dim("batch", min=1, max=65536)
    seq = Dim("seq", min=2, max=net.text.config.max_position_embeddings)
    pixels = torch.rand(2, 3, image_size, image_size)
    export_module(
        ImageEncoder(net),
        (pixels,),
        [bundle.IMAGE_INPUT],
        {bundle.IMAGE_INPUT: {0: batch}},
        out / IMAGE_ONNX,
        opset,
    )
    ids = torch.randint(0, net.text.config.vocab_size, (2, max_length))
    mask = torch.ones(2, max_length, dtype=torch.int64)
    export_module(
        TextEncoder(net),
        (ids, mask),
        list(bundle.TEXT_INPUTS),
        {name: {0: batch, 1: seq} for name in bundle.TEXT_INPUTS},
        out / TEXT_ONNX,
        opset,
    )


def _top1_agree(a_img, a_txt, b_img, b_txt) -> bool:
    sa, sb = a_img @ a_txt.T, b_img @ b_txt.T
    return bool((sa.argmax(1) == sb.argmax(1)).all() and (sa.argmax(0) == sb.argmax(0)).all())


@torch.no_grad()
def check_parity(
    net: DualEncoder, onnx_dir: Path, prepared: Path, p: ExportParams
) -> tuple[dict, tuple[np.ndarray, np.ndarray]]:
    """Compare ONNX Runtime with PyTorch on fresh random inputs and on the whole test split.

    Returns the report and ONNX Runtime's fp32 (image, caption) embeddings of the test split,
    which the variants are scored against (embedding the split twice cost 30 s on photos)."""
    img_sess = make_session(onnx_dir / IMAGE_ONNX, "cpu")
    txt_sess = make_session(onnx_dir / TEXT_ONNX, "cpu")
    meta = bundle.Bundle.open(onnx_dir, verify=False).meta  # sha256.json comes last
    gen = torch.Generator().manual_seed(1234)
    n, size, length = p.parity_batch, meta.image_size, meta.max_length
    rand_pix = torch.rand(n, 3, size, size, generator=gen)
    # A shorter sequence than at export time exercises the dynamic sequence axis.
    rand_ids = torch.randint(0, net.text.config.vocab_size, (n, max(2, length // 2)), generator=gen)
    rand_mask = torch.ones_like(rand_ids)
    rand_mask[n // 2 :, -1] = 0

    test = load_split(prepared, "test")
    test_pix = to_pixels(test.images)
    test_ids, test_mask = (torch.from_numpy(a) for a in test.tokens())

    def both(pix, ids, mask):
        t_img, t_txt = embed_images(net, pix, 256), embed_texts(net, ids, mask, 256)
        o_img = run_chunked(img_sess, {bundle.IMAGE_INPUT: pix.numpy()}, 256)
        o_txt = run_chunked(
            txt_sess, dict(zip(bundle.TEXT_INPUTS, (ids.numpy(), mask.numpy()), strict=True)), 256
        )
        return {
            "max_abs_diff_image": float(np.abs(t_img - o_img).max()),
            "max_abs_diff_text": float(np.abs(t_txt - o_txt).max()),
            "top1_identical": _top1_agree(t_img, t_txt, o_img, o_txt),
        }, (o_img, o_txt)

    random_inputs, _ = both(rand_pix, rand_ids, rand_mask)
    test_split, onnx_test = both(test_pix, test_ids, test_mask)
    worst = max(
        random_inputs["max_abs_diff_image"],
        random_inputs["max_abs_diff_text"],
        test_split["max_abs_diff_image"],
        test_split["max_abs_diff_text"],
    )
    passed = (
        worst <= p.parity_atol and random_inputs["top1_identical"] and test_split["top1_identical"]
    )
    return {
        "passed": bool(passed),
        "atol": p.parity_atol,
        "max_abs_diff": worst,
        "random_inputs": random_inputs,
        "test_split": test_split,
        "test_images": len(test),
        "test_captions": len(test.captions),
    }, onnx_test


def _precision_check_images(prepared: Path, calibration: torch.Tensor) -> np.ndarray:
    """Validation images for choosing int8 mixed precision; the calibration images when the
    validation split is empty (preprocess.val_fraction: 0). Never the test split it is scored on."""
    try:
        return to_pixels(load_split(prepared, "val").images).numpy()
    except DatasetError:
        log.warning("no validation split: int8 mixed precision is chosen on the calibration images")
    return calibration.numpy()


def build_variants(
    p: ExportParams, out: Path, prepared: Path, reference: tuple[np.ndarray, np.ndarray]
) -> dict:
    """Build each requested variant; score it and fp32 on the test split through ONNX Runtime.

    `reference`: the fp32 towers' (image, caption) embeddings of the test split, from parity."""
    from model.metrics import retrieval_metrics

    test = load_split(prepared, "test")

    def score(img, txt):
        m = retrieval_metrics(img, txt, test.image_index, [1, 5, 10])
        return {k: round(v, 6) for k, v in m.items()}

    ref_img, ref_txt = reference
    fp32 = score(ref_img, ref_txt)
    report = {"fp32": {"metrics": fp32, "bytes": variants.file_sizes(out, "fp32")}}
    for name in p.variants:
        built: dict = {}
        try:
            if name == "int8":
                calib = to_pixels(load_split(prepared, "train").images[: p.calibration_images])
                built = variants.build_int8(
                    out, calib.numpy(), _precision_check_images(prepared, calib), p.int8
                )
            else:
                variants.build_fp16(out)
            img, txt = variants.embed_with_onnx(out, name, test)
        except Exception as err:  # noqa: BLE001 - a variant this machine cannot run is reported
            log.warning("export variant %s unavailable here: %s", name, err)
            report[name] = {"available": False, "reason": f"{type(err).__name__}: {err}"[:500]}
            continue
        m = score(img, txt)
        report[name] = {
            "available": True,
            "metrics": m,
            "delta_vs_fp32": {k: round(m[k] - fp32[k], 6) for k in m if "_R" in k},
            "max_abs_diff_vs_fp32": float(
                max(np.abs(img - ref_img).max(), np.abs(txt - ref_txt).max())
            ),
            "bytes": variants.file_sizes(out, name),
            **({"mixed_precision": built} if built else {}),
        }
    return report


def export(
    p: ExportParams, train_dir: Path, prepared: Path, out: Path, report: Path
) -> ExportResult:
    """Export both towers, copy the tokenizer beside them, and record parity figures."""
    net, ckpt = load_checkpoint(train_dir)
    meta_in = read_json(prepared / META_FILE)
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    export_towers(net, meta_in["image_size"], meta_in["max_length"], out, p.opset)
    shutil.copytree(prepared / TOKENIZER_DIR, out / bundle.TOKENIZER_DIR)
    bundle.Meta(
        image_size=meta_in["image_size"],
        max_length=meta_in["max_length"],
        embed_dim=net.cfg.embed_dim,
        opset=p.opset,
        params_hash=ckpt.get("params_hash"),
        model_config=ckpt["model_config"],
    ).write(out)
    parity, onnx_test = check_parity(net, out, prepared, p)
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(
        json.dumps(
            {"parity": parity, "variants": build_variants(p, out, prepared, onnx_test)}, indent=2
        )
    )
    if not parity["passed"]:
        log.warning("ONNX parity FAILED: %s", json.dumps(parity))
    bundle.write_manifest(out)  # last: every file of the bundle is final
    return ExportResult(parity, str(out))


def run(params: Params, root: Path) -> ExportResult:
    paths = params.paths
    return export(
        params.export,
        root / paths.train,
        root / paths.prepared,
        root / paths.onnx,
        root / paths.export_report,
    )


@task(name="export", cache_policy=NONE, timeout_seconds=3600)
def export_task(root: str = ".", force: bool = False) -> stage.StageOutcome:
    return stage.run_stage("export", run, root, force)


if __name__ == "__main__":
    stage.main("export", run)
