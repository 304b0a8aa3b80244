"""Inference throughput of one exported model: PyTorch eager vs ONNX Runtime fp32 vs int8.

Images/s and texts/s at batch 1, 32 and 128, and test-split Recall@1 for each engine, written to
bench/results.md with the machine described. Needs a finished pipeline run (checkpoint, ONNX
export with the int8 variant, prepared test split).

    .venv/bin/python -m bench.benchmark [--params params.yaml] [--seconds 2] [--rounds 5]
        [--resolutions 128 224]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from model.metrics import retrieval_metrics
from tasks.common.checkpoint import load_checkpoint
from tasks.common.config import load_params
from tasks.common.data import embed_split, load_split, read_json, to_pixels
from tasks.common.variants import embed_with_onnx
from xmodal_runtime.bundle import IMAGE_TOWER, TEXT_TOWER, tower_file
from xmodal_runtime.session import make_session

ROOT = Path(__file__).resolve().parents[1]

BATCHES = (1, 32, 128)


def calls_per_second(fn, seconds: float) -> float:
    """Calls/s of fn over at least `seconds` and 3 calls."""
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or calls < 3:
        fn()
        calls += 1
    return calls / (time.perf_counter() - start)


def measure(fns: dict[str, Callable[[], object]], n_items: int, seconds: float, rounds: int):
    """Items/s of each engine: (median, min, max) over `rounds` timings of `seconds` each.

    Every engine warms up first (PyTorch eager on this CPU keeps speeding up over its first
    seconds at a new shape). Then the engines are timed in interleaved rounds, in rotating
    order, so that drift in the shared machine's speed (seen here: 1.5x over minutes) falls on
    all of them alike instead of on whichever ran last.
    """
    for fn in fns.values():
        calls_per_second(fn, seconds)
    names, rates = list(fns), {name: [] for name in fns}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            rates[name].append(calls_per_second(fns[name], seconds) * n_items)
    return {k: (float(np.median(v)), min(v), max(v)) for k, v in rates.items()}


def image_flops(net, size: int) -> float:
    """FLOPs (2 per multiply-add) of one image through the image tower."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        net.encode_image(torch.rand(1, 3, size, size))
    return float(counter.get_total_flops())


def gemm_ceiling(n: int = 512, seconds: float = 2.0) -> tuple[float, float]:
    """(fp32 GFLOP/s, u8 x s8 GOP/s) of one ONNX Runtime MatMul / QLinearMatMul: the most a
    network's int8 kernels can gain over fp32 on this CPU (no VNNI: u8 x s8 goes through
    vpmaddubsw)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def session(node, x_type, y_type, inits):
        graph = helper.make_graph(
            [node],
            "gemm",
            [helper.make_tensor_value_info("x", x_type, [n, n])],
            [helper.make_tensor_value_info("y", y_type, [n, n])],
            [numpy_helper.from_array(a, name) for name, a in inits.items()],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
        model.ir_version = 10
        return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])

    fp32 = session(
        helper.make_node("MatMul", ["x", "w"], ["y"]),
        TensorProto.FLOAT,
        TensorProto.FLOAT,
        {"w": rng.standard_normal((n, n), dtype=np.float32)},
    )
    scale, u8_zero, s8_zero = np.float32(0.01), np.uint8(128), np.int8(0)
    int8 = session(
        helper.make_node("QLinearMatMul", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["y"]),
        TensorProto.UINT8,
        TensorProto.UINT8,
        {
            "w": rng.integers(-64, 64, (n, n), dtype=np.int8),
            **{"xs": np.array(scale), "ws": np.array(scale), "ys": np.array(scale * 5)},
            **{"xz": np.array(u8_zero), "wz": np.array(s8_zero), "yz": np.array(u8_zero)},
        },
    )
    x32 = rng.standard_normal((n, n), dtype=np.float32)
    x8 = rng.integers(0, 255, (n, n), dtype=np.uint8)
    rates = measure(
        {
            "fp32": lambda: fp32.run(None, {"x": x32}),
            "int8": lambda: int8.run(None, {"x": x8}),
        },
        2 * n**3,
        seconds,
        3,
    )
    return rates["fp32"][0] / 1e9, rates["int8"][0] / 1e9


def other_resolutions(net, sizes: list[int], timing: tuple[float, int]) -> list[str]:
    """The same image-tower weights exported at other input sizes: PyTorch (NCHW) vs ONNX
    Runtime fp32 at batch 32, interleaved. Shows how the ratio grows with the resolution."""
    import tempfile

    from torch.export import Dim

    from tasks.export import ImageEncoder, export_module

    rows = [
        "| input | PyTorch images/s | ONNX fp32 images/s | ratio |",
        "| --- | --- | --- | --- |",
    ]
    with tempfile.TemporaryDirectory() as d:
        for size in sizes:
            path = Path(d) / f"image_{size}.onnx"
            batch = {"pixels": {0: Dim("batch", min=1, max=1024)}}
            example = (torch.rand(2, 3, size, size),)
            export_module(ImageEncoder(net), example, ["pixels"], batch, path, 18)
            sess, pix = make_session(path, "cpu"), torch.rand(32, 3, size, size)
            pix_np = pix.numpy()
            fns = {
                "pytorch": lambda x=pix: net.encode_image(x),
                "onnx": lambda s=sess, x=pix_np: s.run(None, {"pixels": x}),
            }
            with torch.inference_mode():
                r = measure(fns, 32, *timing)
            ratio = r["onnx"][0] / r["pytorch"][0]
            rows.append(
                f"| {size}x{size} | {r['pytorch'][0]:,.0f} | {r['onnx'][0]:,.0f} | {ratio:.2f}x |"
            )
    return rows


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
    ap.add_argument("--seconds", type=float, default=2.0, help="length of one timing")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timings per engine")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results.md")
    ap.add_argument(
        "--resolutions",
        type=int,
        nargs="*",
        default=[],
        help="also time the image tower's weights exported at these sizes, e.g. 128 224",
    )
    args = ap.parse_args()
    params = load_params(args.params)
    timing = (args.seconds, args.rounds)
    root = args.params.resolve().parent
    onnx_dir, prepared = root / params.paths.onnx, root / params.paths.prepared
    net, _ = load_checkpoint(root / params.paths.train)
    test = load_split(prepared, "test")
    size, length = test.images.shape[1], test.input_ids.shape[1]

    recall = {}
    img_e, txt_e = embed_split(net, test, 128)
    recall["pytorch"] = retrieval_metrics(img_e, txt_e, test.image_index, (1,))
    for variant in ("fp32", "int8"):
        i, t = embed_with_onnx(onnx_dir, variant, test)
        recall[f"onnx-{variant}"] = retrieval_metrics(i, t, test.image_index, (1,))

    sessions = {
        v: (
            make_session(onnx_dir / tower_file(IMAGE_TOWER, v), "cpu"),
            make_session(onnx_dir / tower_file(TEXT_TOWER, v), "cpu"),
        )
        for v in ("fp32", "int8")
    }
    images: dict[tuple[str, int], tuple] = {}
    texts: dict[tuple[str, int], tuple] = {}
    for b in BATCHES:
        # Contiguous NCHW, PyTorch's default layout, and channels_last, the layout to_pixels
        # produces from the NHWC shards (oneDNN's depthwise convs are much faster on it).
        pix = to_pixels(test.images[np.arange(b) % len(test)]).contiguous()
        pix_cl = pix.to(memory_format=torch.channels_last)
        rows = np.arange(b) % len(test.input_ids)
        ids = torch.from_numpy(test.input_ids[rows].astype(np.int64))
        mask = torch.from_numpy(test.attention_mask[rows].astype(np.int64))
        feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
        pix_np = pix.numpy()
        image_fns = {
            "pytorch": lambda x=pix: net.encode_image(x),
            "pytorch channels_last": lambda x=pix_cl: net.encode_image(x),
        }
        text_fns = {"pytorch": lambda i=ids, m=mask: net.encode_text(i, m)}
        for v, (si, st) in sessions.items():
            image_fns[f"onnx-{v}"] = lambda s=si, x=pix_np: s.run(None, {"pixels": x})
            text_fns[f"onnx-{v}"] = lambda s=st, f=feeds: s.run(None, f)
        with torch.inference_mode():
            images.update({(e, b): r for e, r in measure(image_fns, b, *timing).items()})
            texts.update({(e, b): r for e, r in measure(text_fns, b, *timing).items()})
    fp32_gemm, int8_gemm = gemm_ceiling()
    resolutions = "".join(f" {r}" for r in args.resolutions)
    resolutions = f" --resolutions{resolutions}" if resolutions else ""
    mixed = read_json(root / params.paths.export_report)["variants"]["int8"].get("mixed_precision")
    flops = image_flops(net, size)

    def cell(r: tuple[float, float, float] | None) -> str:
        return f"{r[0]:,.0f} ({r[1]:,.0f}–{r[2]:,.0f})" if r else "–"

    def ratio(table: dict, a: str, b: str) -> str:
        return f"{table[(a, 32)][0] / table[(b, 32)][0]:.2f}x"

    def delta(key: str) -> str:
        return f"{100 * (recall['onnx-int8'][key] - recall['onnx-fp32'][key]):+.1f} points"

    def gflops(engine: str) -> str:
        return f"{images[(engine, 32)][0] * flops / 1e9:.0f} GFLOP/s"

    lines = [
        "# Inference benchmark",
        "",
        f"Machine: {machine()}.",
        f"Model: `{params.model.image.backbone}` + {params.model.text.num_layers}-layer BERT "
        f"(hidden {params.model.text.hidden_size}), {size}x{size} images "
        f"({flops / 1e6:.0f} MFLOP an image), {length} tokens.",
        *(
            [
                f"int8 image tower: first {mixed['image_fp32_convs']} of {mixed['image_convs']} "
                "convs fp32 (export.int8 mixed precision)."
            ]
            if mixed
            else []
        ),
        f"Produced by `python bench/benchmark.py --seconds {args.seconds:g} --rounds "
        f"{args.rounds}{resolutions}` on {time.strftime('%Y-%m-%d')}: median (min–max) of "
        f"{args.rounds} interleaved timings per engine.",
        "",
        "| engine | batch | images/s | texts/s |",
        "| --- | --- | --- | --- |",
        *(f"| {e} | {b} | {cell(r)} | {cell(texts.get((e, b)))} |" for (e, b), r in images.items()),
        "",
        "| engine | i2t R@1 | t2i R@1 |",
        "| --- | --- | --- |",
        *(f"| {e} | {m['i2t_R1']:.3f} | {m['t2i_R1']:.3f} |" for e, m in recall.items()),
        "",
        "Ratios of medians at batch 32 (targets: ONNX fp32 image >= 3x PyTorch; int8 >= 1.7x "
        "fp32 with at most 1 point of R@1 lost):",
        f"- ONNX fp32 / PyTorch, images: {ratio(images, 'onnx-fp32', 'pytorch')} "
        f"(against channels_last: {ratio(images, 'onnx-fp32', 'pytorch channels_last')}); "
        f"texts: {ratio(texts, 'onnx-fp32', 'pytorch')}",
        f"- ONNX int8 / fp32, images: {ratio(images, 'onnx-int8', 'onnx-fp32')}; "
        f"texts: {ratio(texts, 'onnx-int8', 'onnx-fp32')}",
        f"- Recall@1 change int8 vs fp32: i2t {delta('i2t_R1')}, t2i {delta('t2i_R1')}",
        "",
        "What this CPU allows, at batch 32:",
        f"- image tower compute: ONNX fp32 {gflops('onnx-fp32')}, PyTorch "
        f"{gflops('pytorch')}, PyTorch channels_last {gflops('pytorch channels_last')}",
        f"- ONNX Runtime 512x512x512 GEMM: fp32 {fp32_gemm:.0f} GFLOP/s, u8 x s8 {int8_gemm:.0f} "
        f"GOP/s ({int8_gemm / fp32_gemm:.2f}x): the ceiling of any int8 speed-up here",
    ]
    if args.resolutions:
        lines += [
            "",
            "The same image-tower weights exported at other input sizes, batch 32 "
            "(`--resolutions`):",
            "",
            *other_resolutions(net, args.resolutions, timing),
        ]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
