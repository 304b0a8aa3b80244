"""Ablation of the alignment options: one `dvc exp run` per variant against the defaults.

Each variant runs the pipeline up to `evaluate` as a DVC experiment (queued and run by DVC, so
`dvc exp show` lists them), logs to one MLflow experiment, and lands as a row of
docs/ablation.md: Recall@1/5 both ways, train time and parameter count.

    PATH=.venv/bin:$PATH .venv/bin/python -m bench.ablation            # all variants
    PATH=.venv/bin:$PATH .venv/bin/python -m bench.ablation --only default fusion -S train.epochs=1

`--variants real` runs the real-photo set (issue 13) instead: the same options plus projection
heads and each tower's trainable depth, against whatever params.yaml holds (there, the
real-photos preset with the Flickr photos ingested; docs/real_photos.md has the commands).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import mlflow

from tasks.common import tracking
from tasks.common.config import load_params

ROOT = Path(__file__).resolve().parents[1]

EXPERIMENT = "xmodal-ablation"
VARIANTS: dict[str, list[str]] = {
    "default": [],
    "temperature-fixed": ["train.temperature.mode=fixed"],
    "temperature-scheduled": ["train.temperature.mode=scheduled"],
    "pooling-cls": ["model.text.pooling=cls"],
    "pooling-max": ["model.text.pooling=max"],
    "fusion-itm": ["model.fusion.enabled=true"],
    "multiscale": ["model.multiscale.enabled=true"],
    "multiscale-uncertainty": ["model.multiscale.enabled=true", "train.loss.weighting=uncertainty"],
    "multiscale-schedule": ["model.multiscale.enabled=true", "train.loss.weighting=schedule"],
    "image-lr-0.0003": ["train.image.lr=0.0003"],
    "text-dropout-0": ["model.text.dropout=0.0"],
    "augment-crop": ["train.augment.crop_scale=[0.7,1.0]"],
    "augment-crop-flip": ["train.augment.crop_scale=[0.7,1.0]", "train.augment.hflip=true"],
    "normalization-imagenet": ["model.image.normalization=imagenet"],
}
# Against presets/real-photos.yaml; cheap rows (served by the features cache) first.
# "preset-2026-11-25" is the single-head preset the "Against the 2026-11-25 preset" table of
# docs/ablation.md was measured against, and "preset-2026-11-24" the one before (2 trainable
# text blocks, linear heads, 8 epochs of batch 64). The rows that need the image tower's feature
# maps, and those that recreate a single-head preset, set one head: embed_dim must divide by it.
ONE_HEAD = ["model.projection.heads=1", "model.embed_dim=256"]
NO_FLIP = ["train.augment.hflip=false"]
REAL_VARIANTS: dict[str, list[str]] = {
    "preset": [],
    "hflip-off": NO_FLIP,  # the three-head preset of 2026-11-25, before flips
    "heads-1": ONE_HEAD,
    "text-pooled-dropout-0": ["model.text.pooled_dropout=0.0"],
    "preset-2026-11-25": [*ONE_HEAD, "model.text.pooled_dropout=0.0", *NO_FLIP],
    "heads-5": ["model.projection.heads=5", "model.embed_dim=1280"],
    "image-dropout-0": ["model.image.dropout=0.0"],
    "projection-linear": ["model.projection.kind=linear"],
    "heads-linear-no-dropout": ["model.projection.kind=linear", "model.image.dropout=0.0"],
    "projection-dropout-0.7": ["model.projection.dropout=0.7"],
    "projection-mlp": ["model.projection.kind=mlp"],
    "head-dim-512": ["model.embed_dim=1536"],
    "lr-0.002": ["train.lr=0.002"],
    "epochs-120": ["train.epochs=120"],
    "temperature-fixed": ["train.temperature.mode=fixed"],
    "temperature-scheduled": ["train.temperature.mode=scheduled"],
    "pooling-cls": ["model.text.pooling=cls"],
    "pooling-max": ["model.text.pooling=max"],
    "text-blocks-2-8-epochs": [
        "train.text.trainable_blocks=2",
        "train.epochs=8",
        "train.batch_size=64",
        "model.embed_dim=384",
    ],
    "preset-2026-11-24": [
        "train.text.trainable_blocks=2",
        "train.epochs=8",
        "train.batch_size=64",
        "model.embed_dim=128",
        "model.projection.kind=linear",
        "model.projection.heads=1",
        "model.image.dropout=0.0",
        "model.text.pooled_dropout=0.0",
        *NO_FLIP,
    ],
    "image-blocks-1": ["train.image.trainable_blocks=1"],
    "multiscale-uncertainty": [
        *ONE_HEAD,
        "model.multiscale.enabled=true",
        "train.loss.weighting=uncertainty",
    ],
    "fusion-itm": ["model.fusion.enabled=true"],
    "augment-crop-flip": ["train.augment.crop_scale=[0.7,1.0]", "train.augment.hflip=true"],
}
SETS = {"builtin": VARIANTS, "real": REAL_VARIANTS}


def run_variant(name: str, sets: list[str]) -> dict:
    args = [
        "dvc",
        "exp",
        "run",
        "evaluate",
        "--name",
        f"abl-{name}",
        "-S",
        f"mlflow.experiment={EXPERIMENT}",
    ]
    for s in sets:
        args += ["-S", s]
    start = time.perf_counter()
    subprocess.run(args, cwd=ROOT, check=True)
    wall = time.perf_counter() - start
    params = load_params(ROOT / "params.yaml")
    report = json.loads((ROOT / params.paths.metrics).read_text())
    metrics, rerank = report["test"], report.get("test_rerank")
    run_id = json.loads((ROOT / params.paths.train / tracking.RUN_FILE).read_text())["run_id"]
    tracking.setup(params.mlflow, ROOT)
    run = mlflow.get_run(run_id)
    mlflow.MlflowClient().set_tag(run_id, "ablation_variant", name)
    return {
        "variant": name,
        "sets": " ".join(sets) or "(defaults)",
        "i2t_R1": metrics["i2t_R1"],
        **{
            f"{d}_R{k}": metrics.get(f"{d}_R{k}", float("nan"))
            for d in ("i2t", "t2i")
            for k in (1, 5, 10)
        },
        "train_s": run.data.metrics.get("train/seconds", float("nan")),
        "params": int(run.data.metrics.get("model/parameters", 0)),
        "wall_s": wall,
        "rerank": rerank,
        "qps": {k: v for k, v in run.data.metrics.items() if k.endswith("_qps")},
    }


def write_table(rows: list[dict], command: str, out: Path, title: str) -> None:
    lines = [
        f"# Ablation on {title}",
        "",
        f"Produced by `{command}` on {time.strftime('%Y-%m-%d')} "
        "(2-core CPU). Test split; each row is one `dvc exp run` "
        f"(`dvc exp show`), logged to the MLflow experiment `{EXPERIMENT}`.",
        "",
        "| variant | overrides | i2t R@1 / 5 / 10 | t2i R@1 / 5 / 10 | train s | wall s | params |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        i2t, t2i = ("{:.3f} / {:.3f} / {:.3f}".format(*(r[f"{d}_R{k}"] for k in (1, 5, 10)))
                    for d in ("i2t", "t2i"))  # fmt: skip
        lines.append(
            f"| {r['variant']} | `{r['sets']}` | {i2t} | {t2i} | {r['train_s']:.0f} | "
            f"{r['wall_s']:.0f} | {r['params']:,} |"
        )
    for r in rows:
        if r.get("rerank"):
            q = r["qps"]
            lines += [
                "",
                f"**{r['variant']}, ITM re-ranking of each query's top-k:** "
                f"i2t R@1 {r['rerank']['i2t_R1']:.3f}, R@5 {r['rerank']['i2t_R5']:.3f}; "
                f"t2i R@1 {r['rerank']['t2i_R1']:.3f}, R@5 {r['rerank']['t2i_R5']:.3f}. "
                f"Cost: dual encoder {q.get('test/dual_qps', float('nan')):,.0f} queries/s; "
                f"with re-ranking i2t {q.get('test/i2t_rerank_qps', float('nan')):,.0f}, "
                f"t2i {q.get('test/t2i_rerank_qps', float('nan')):,.0f} queries/s.",
            ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--variants", choices=list(SETS), default="builtin", help="which set")
    ap.add_argument("--only", nargs="*", help="variants of the set to run")
    ap.add_argument(
        "-S",
        "--set",
        dest="common",
        action="append",
        default=[],
        help="extra override applied to every variant",
    )
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "ablation.md")
    args = ap.parse_args()
    # `dvc exp run -S` leaves its overrides in params.yaml: restore it before every variant so
    # each one differs from the defaults by its own overrides only, and at the end.
    params_file = ROOT / "params.yaml"
    original = params_file.read_text()
    variants = SETS[args.variants]
    unknown = sorted(set(args.only or []) - set(variants))
    if unknown:
        ap.error(f"not in the {args.variants} set: {', '.join(unknown)}")
    title = "the built-in dataset" if args.variants == "builtin" else "real photos"
    rows = []
    try:
        for name in args.only or list(variants):
            params_file.write_text(original)
            rows.append(run_variant(name, variants[name] + args.common))
            command = "python -m bench.ablation " + " ".join(sys.argv[1:])
            write_table(rows, command, args.out, title)
    finally:
        params_file.write_text(original)
    print(args.out.read_text())


if __name__ == "__main__":
    main()
