"""evaluate: image<->text Recall@K and ranks on the test split; metrics.json and plots (loss,
Recall@K, and a grid of retrieval examples), logged to MLflow and listed as DVC plots.

Multi-caption protocol: an image query is correct at K if any of its captions is in the top K.
"""

from __future__ import annotations

import csv
import json
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import numpy as np  # noqa: E402
from prefect import task  # noqa: E402
from prefect.cache_policies import NONE  # noqa: E402

from model.metrics import retrieval_metrics  # noqa: E402
from tasks.common import stage, tracking  # noqa: E402
from tasks.common.checkpoint import load_checkpoint  # noqa: E402
from tasks.common.config import EvaluateParams, MlflowParams, Params  # noqa: E402
from tasks.common.data import Split, embed_split, load_split  # noqa: E402
from tasks.common.rerank import rerank_metrics  # noqa: E402


@dataclass(frozen=True)
class EvaluateResult:
    metrics: dict[str, float]
    figures: list[str]


def read_history(path: Path) -> tuple[list[int], list[float]]:
    steps, losses = [], []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            steps.append(int(row["step"]))
            losses.append(float(row["loss"]))
    return steps, losses


def plot_loss(history_csv: Path, out: Path) -> Path:
    steps, losses = read_history(history_csv)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, losses, lw=1)
    ax.set(xlabel="step", ylabel="InfoNCE loss", title="Training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_recall(metrics: dict[str, float], ks: list[int], out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    width = 0.38
    xs = range(len(ks))
    for shift, name, label in ((-width / 2, "i2t", "image→text"), (width / 2, "t2i", "text→image")):
        vals = [metrics[f"{name}_R{k}"] for k in ks]
        bars = ax.bar([x + shift for x in xs], vals, width, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(list(xs), [f"R@{k}" for k in ks])
    ax.set(ylim=(0, 1.05), ylabel="recall", title="Test retrieval")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


HIT, MISS = "#1a9641", "#d7191c"  # green: a correct match; red: not


Examples = list[tuple[int, list[tuple[int, bool]]]]  # (query, [(result, correct), ...])


def retrieval_examples(
    image_emb: np.ndarray, text_emb: np.ndarray, image_index: np.ndarray, queries: int, k: int
) -> tuple[Examples, Examples]:
    """Top-k results of `queries` caption queries (images) and `queries` image queries
    (captions), each marked correct or not. Embeddings: (N_images, D) and (N_captions, D); only
    the queried columns and rows of the similarity are computed. Queries are evenly spaced over
    the split, so the same model and data give the same examples."""
    k = min(k, len(image_emb), len(text_emb))
    texts = np.linspace(0, len(text_emb) - 1, queries).round().astype(int)
    images = np.linspace(0, len(image_emb) - 1, queries).round().astype(int)
    caption_scores = image_emb @ text_emb[texts].T  # (N_images, queries)
    image_scores = image_emb[images] @ text_emb.T  # (queries, N_captions)
    by_text = [
        (
            int(c),
            [
                (int(i), bool(i == image_index[c]))
                for i in np.argsort(-caption_scores[:, q], kind="stable")[:k]
            ],
        )
        for q, c in enumerate(texts)
    ]
    by_image = [
        (
            int(i),
            [
                (int(c), bool(image_index[c] == i))
                for c in np.argsort(-image_scores[q], kind="stable")[:k]
            ],
        )
        for q, i in enumerate(images)
    ]
    return by_text, by_image


def plot_retrieval_examples(
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    test: Split,
    out: Path,
    queries: int = 3,
    k: int = 5,
) -> Path:
    """A grid a person can judge: captions with their top-k images, and images with their
    top-k captions, correct matches in green."""
    by_text, by_image = retrieval_examples(image_emb, text_emb, test.image_index, queries, k)
    k = len(by_text[0][1])
    fig = plt.figure(figsize=(2.0 * (k + 1), 2.2 * 2 * queries))
    grid = fig.add_gridspec(2 * queries, k + 1)
    for row, (c, found) in enumerate(by_text):
        ax = fig.add_subplot(grid[row, 0])
        ax.text(0, 0.5, textwrap.fill(test.captions[c], 24), va="center", fontsize=8)
        ax.set_title("text query", fontsize=8, loc="left")
        ax.axis("off")
        for rank, (i, hit) in enumerate(found):
            _thumb(fig.add_subplot(grid[row, rank + 1]), test.images[i], hit)
    for row, (i, found) in enumerate(by_image, start=queries):
        _thumb(fig.add_subplot(grid[row, 0]), test.images[i], None)
        ax = fig.add_subplot(grid[row, 1:])
        ax.set_title("image query: top captions", fontsize=8, loc="left")
        for rank, (c, hit) in enumerate(found):
            line = f"{rank + 1}. {'✓' if hit else '✗'} {textwrap.shorten(test.captions[c], 110)}"
            ax.text(
                0, 1 - (rank + 0.5) / k, line, va="center", fontsize=8, color=HIT if hit else MISS
            )
        ax.axis("off")
    fig.suptitle(f"Retrieval examples, test split (top {k}; green = correct)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def _thumb(ax, image: np.ndarray, hit: bool | None) -> None:
    ax.imshow(image)
    ax.set_xticks([]), ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(hit is not None)
        spine.set_color(HIT if hit else MISS)
        spine.set_linewidth(4)


def evaluate(
    p: EvaluateParams,
    train_dir: Path,
    prepared: Path,
    history_csv: Path,
    metrics_json: Path,
    recall_csv: Path,
    figures: Path,
    mlflow_p: MlflowParams,
    root: Path,
) -> EvaluateResult:
    """Score the trained checkpoint on the test split and write metrics and plots."""
    net, _ = load_checkpoint(train_dir)
    test = load_split(prepared, "test")
    start = time.perf_counter()
    img, txt = embed_split(net, test, p.batch_size)
    m = retrieval_metrics(img, txt, test.image_index, ks=p.ks)
    # Queries/s go to MLflow only: metrics.json holds deterministic figures, so that a rerun
    # with the same code, params and data reproduces it byte for byte.
    timing = {"dual_qps": (len(img) + len(txt)) / (time.perf_counter() - start)}
    m = {k: round(v, 6) for k, v in m.items()}
    report = {"test": m, "test_size": {"images": len(test), "captions": len(test.captions)}}
    if net.fusion is not None:
        # Only re-ranking needs the whole (N_images, N_captions) similarity: each query's top-k.
        rr = rerank_metrics(net, test, img @ txt.T, p.rerank_k, p.ks, p.batch_size)
        timing.update({k: rr.pop(k) for k in list(rr) if k.endswith("_qps")})
        report["test_rerank"] = {k: round(v, 6) for k, v in rr.items()}
    metrics_json.parent.mkdir(parents=True, exist_ok=True)
    metrics_json.write_text(json.dumps(report, indent=2))
    recall_csv.parent.mkdir(parents=True, exist_ok=True)
    with open(recall_csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["k", "i2t", "t2i"])
        for k in p.ks:
            w.writerow([k, m[f"i2t_R{k}"], m[f"t2i_R{k}"]])
    figures.mkdir(parents=True, exist_ok=True)
    figs = [
        plot_loss(history_csv, figures / "loss.png"),
        plot_recall(m, p.ks, figures / "recall.png"),
        plot_retrieval_examples(img, txt, test, figures / "retrieval_examples.png"),
    ]
    with tracking.resume_run(mlflow_p, root, train_dir / tracking.RUN_FILE):
        mlflow.log_metrics({f"test/{k}": v for k, v in m.items()})
        for k, v in report.get("test_rerank", {}).items():
            mlflow.log_metric(f"test_rerank/{k}", v)
        mlflow.log_metrics({f"test/{k}": v for k, v in timing.items()})
        for fig in figs:
            mlflow.log_artifact(str(fig), artifact_path="plots")
        mlflow.log_artifact(str(metrics_json), artifact_path="reports")
    return EvaluateResult(m, [str(f) for f in figs])


def run(params: Params, root: Path) -> EvaluateResult:
    paths = params.paths
    return evaluate(
        params.evaluate,
        root / paths.train,
        root / paths.prepared,
        root / paths.train_history,
        root / paths.metrics,
        root / paths.recall_plot,
        root / paths.figures,
        params.mlflow,
        root,
    )


@task(name="evaluate", cache_policy=NONE, timeout_seconds=3600)
def evaluate_task(root: str = ".", force: bool = False) -> stage.StageOutcome:
    return stage.run_stage("evaluate", run, root, force)


if __name__ == "__main__":
    stage.main("evaluate", run)
