"""Inference throughput of one exported model: PyTorch eager vs ONNX Runtime fp32 vs int8.

Images/s and texts/s at batch 1, 32 and 128, and test-split Recall@1 for each engine, written to
bench/results.md with the machine described. Needs a finished pipeline run (checkpoint, ONNX
export with the int8 variant, prepared test split).

    .venv/bin/python bench/benchmark.py [--params params.yaml] [--seconds 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model import retrieval_metrics  # noqa: E402
from tasks.config import load_params  # noqa: E402
from tasks.data import embed_split, load_split, to_pixels  # noqa: E402
from tasks.onnx_runtime import make_session  # noqa: E402
from tasks.train import load_checkpoint  # noqa: E402
from tasks.variants import embed_with_onnx, variant_file  # noqa: E402

BATCHES = (1, 32, 128)


def rate(fn, n_items: int, seconds: float) -> float:
    """Items per second of fn over at least `seconds` (after one warm-up call)."""
    fn()
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or calls < 3:
        fn()
        calls += 1
    return calls * n_items / (time.perf_counter() - start)


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} logical cores, {platform.system()} {platform.machine()}; "
        f"Python {platform.python_version()}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), onnxruntime {ort.__version__}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results.md")
    args = ap.parse_args()
    params = load_params(args.params)
    root = args.params.resolve().parent
    onnx_dir, prepared = root / params.paths.onnx, root / params.paths.prepared
    net, _ = load_checkpoint(root / params.paths.train)
    test = load_split(prepared, "test")
    size, length = test.images.shape[1], test.input_ids.shape[1]

    rows, recall = [], {}
    img_e, txt_e = embed_split(net, test, 128)
    recall["pytorch"] = retrieval_metrics(img_e @ txt_e.T, test.image_index, (1,))
    for variant in ("fp32", "int8"):
        i, t = embed_with_onnx(onnx_dir, variant, test)
        recall[f"onnx-{variant}"] = retrieval_metrics(i @ t.T, test.image_index, (1,))

    sessions = {
        v: (
            make_session(onnx_dir / variant_file("image_encoder", v), "cpu"),
            make_session(onnx_dir / variant_file("text_encoder", v), "cpu"),
        )
        for v in ("fp32", "int8")
    }
    for b in BATCHES:
        pix = to_pixels(test.images[np.arange(b) % len(test)])
        ids = torch.from_numpy(test.input_ids[np.arange(b) % len(test.input_ids)])
        mask = torch.from_numpy(test.attention_mask[np.arange(b) % len(test.input_ids)])
        with torch.inference_mode():
            r_img = rate(lambda x=pix: net.encode_image(x), b, args.seconds)
            r_txt = rate(lambda i=ids, m=mask: net.encode_text(i, m), b, args.seconds)
        rows.append(("pytorch", b, r_img, r_txt))
        pix_np = pix.numpy()
        for v, (si, st) in sessions.items():
            feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
            r_img = rate(lambda s=si, x=pix_np: s.run(None, {"pixels": x}), b, args.seconds)
            r_txt = rate(lambda s=st, f=feeds: s.run(None, f), b, args.seconds)
            rows.append((f"onnx-{v}", b, r_img, r_txt))

    by = {(e, b): (ri, rt) for e, b, ri, rt in rows}
    lines = [
        "# Inference benchmark",
        "",
        f"Machine: {machine()}.",
        f"Model: `{params.model.image.backbone}` + {params.model.text.num_layers}-layer BERT "
        f"(hidden {params.model.text.hidden_size}), {size}x{size} images, {length} tokens.",
        f"Produced by `python bench/benchmark.py --seconds {args.seconds:g}` on "
        f"{time.strftime('%Y-%m-%d')}.",
        "",
        "| engine | batch | images/s | texts/s |",
        "| --- | --- | --- | --- |",
        *(f"| {e} | {b} | {ri:,.0f} | {rt:,.0f} |" for e, b, ri, rt in rows),
        "",
        "| engine | i2t R@1 | t2i R@1 |",
        "| --- | --- | --- |",
        *(f"| {e} | {m['i2t_R1']:.3f} | {m['t2i_R1']:.3f} |" for e, m in recall.items()),
        "",
        "Ratios at batch 32 (targets: ONNX fp32 image >= 3x PyTorch; int8 >= 1.7x fp32):",
        f"- ONNX fp32 / PyTorch, images: {by[('onnx-fp32', 32)][0] / by[('pytorch', 32)][0]:.2f}x;"
        f" texts: {by[('onnx-fp32', 32)][1] / by[('pytorch', 32)][1]:.2f}x",
        f"- ONNX int8 / fp32, images: {by[('onnx-int8', 32)][0] / by[('onnx-fp32', 32)][0]:.2f}x;"
        f" texts: {by[('onnx-int8', 32)][1] / by[('onnx-fp32', 32)][1]:.2f}x",
        "- Recall@1 change int8 vs fp32: "
        f"i2t {100 * (recall['onnx-int8']['i2t_R1'] - recall['onnx-fp32']['i2t_R1']):+.1f} points, "
        f"t2i {100 * (recall['onnx-int8']['t2i_R1'] - recall['onnx-fp32']['t2i_R1']):+.1f} points",
    ]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
