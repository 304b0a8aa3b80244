"""infer: batch inference with ONNX Runtime from an exported folder or a registered model.

Streams images in chunks (memory stays flat as inputs grow), keeps a running top-k per query,
and writes embeddings with ids (parquet), top-k retrievals both ways (JSONL) and an errors file
listing unreadable images, which are skipped.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task
from prefect.cache_policies import NONE
from transformers import AutoTokenizer

from tasks import stage
from tasks.config import InferParams, MlflowParams, Params
from tasks.data import read_json
from tasks.ingest import DatasetError
from tasks.onnx_runtime import make_session, run_bound, run_chunked
from tasks.preprocess import load_image
from tasks.variants import variant_file

log = logging.getLogger("xmodal")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass(frozen=True)
class InferResult:
    images: int
    texts: int
    errors: int
    provider: str
    out: str
    files: dict[str, str]


def resolve_model(model: str, mlflow_p: MlflowParams | None = None, root: Path = Path(".")) -> Path:
    """The folder of ONNX towers: given directly, or fetched from `models:/<name>@<alias>`."""
    if model.startswith("models:/") or model.startswith("runs:/"):
        import mlflow

        from tasks import tracking

        tracking.setup(mlflow_p or MlflowParams(), root)
        local = Path(
            mlflow.artifacts.download_artifacts(artifact_uri=model, dst_path=tempfile.mkdtemp())
        )
        found = sorted(local.rglob("meta.json"))
        if not found:
            raise FileNotFoundError(f"{model} holds no exported ONNX towers (no meta.json)")
        return found[0].parent
    path = Path(model)
    for name in ("meta.json", "image_encoder.onnx", "text_encoder.onnx", "tokenizer"):
        if not (path / name).exists():
            raise FileNotFoundError(f"{path} is not an exported model folder: {name} is missing")
    return path


def list_images(images_dir: Path) -> list[Path]:
    if not images_dir.is_dir():
        raise DatasetError(f"images folder not found: {images_dir}")
    return sorted(p for p in images_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def read_queries(path: Path) -> list[str]:
    if not path.is_file():
        raise DatasetError(f"queries file not found: {path}")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


class TopK:
    """Running top-k over streamed candidates, per query: memory O(queries * k)."""

    def __init__(self, n_queries: int, k: int) -> None:
        self.k = k
        self.scores = np.full((n_queries, 0), -np.inf, dtype=np.float32)
        self.ids = np.zeros((n_queries, 0), dtype=np.int64)

    def update(self, sim: np.ndarray, offset: int) -> None:
        # sim: (Q, chunk) scores of candidates offset .. offset + chunk - 1
        scores = np.concatenate([self.scores, sim], axis=1)
        ids = np.concatenate(
            [self.ids, np.broadcast_to(np.arange(offset, offset + sim.shape[1]), sim.shape)], axis=1
        )
        # Stable sort on -score keeps the earlier candidate first on ties: deterministic output.
        keep = np.argsort(-scores, axis=1, kind="stable")[:, : self.k]
        self.scores = np.take_along_axis(scores, keep, 1)
        self.ids = np.take_along_axis(ids, keep, 1)


def _decoded_chunks(
    files: list[Path], size: int, chunk: int, errors: list[dict]
) -> Iterator[tuple[list[Path], np.ndarray]]:
    for start in range(0, len(files), chunk):
        ok, arrays = [], []
        for f in files[start : start + chunk]:
            try:
                arrays.append(load_image(f, size))
                ok.append(f)
            except DatasetError as err:
                errors.append({"path": str(f), "error": str(err)})
        if ok:
            pixels = np.stack(arrays).transpose(0, 3, 1, 2).astype(np.float32) / 255.0
            yield ok, pixels


def _embedding_table(ids: list[str], emb: np.ndarray, extra: dict | None = None) -> pa.Table:
    cols = {"id": pa.array(ids, pa.string())}
    cols.update(extra or {})
    cols["embedding"] = pa.FixedSizeListArray.from_arrays(
        pa.array(emb.reshape(-1), pa.float32()), emb.shape[1]
    )
    return pa.table(cols)


def infer(
    p: InferParams,
    model_dir: Path,
    images_dir: Path | None,
    queries: list[str],
    out: Path,
    files: list[Path] | None = None,
) -> InferResult:
    """Embed images and queries with the ONNX towers and write retrievals between them.

    `files` restricts the images to a subset of `images_dir` (a shard); ids stay relative to it.
    """
    meta = read_json(model_dir / "meta.json")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    img_sess = make_session(
        model_dir / variant_file("image_encoder", p.variant), p.provider, p.threads
    )
    txt_sess = make_session(
        model_dir / variant_file("text_encoder", p.variant), p.provider, p.threads
    )
    files_out = {}

    q_emb = np.zeros((0, meta["embed_dim"]), np.float32)
    if queries:
        tok = AutoTokenizer.from_pretrained(model_dir / "tokenizer")
        enc = tok(
            queries,
            padding=True,
            truncation=True,
            max_length=meta["max_length"],
            return_tensors="np",
        )
        q_emb = run_chunked(
            txt_sess,
            {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask")},
            p.chunk_size,
        )
        path = out / "text_embeddings.parquet"
        pq.write_table(
            _embedding_table(
                [str(i) for i in range(len(queries))], q_emb, {"text": pa.array(queries)}
            ),
            path,
        )
        files_out["text_embeddings"] = str(path)

    errors: list[dict] = []
    image_ids: list[str] = []
    n_images = 0
    if images_dir is not None:
        files = list_images(images_dir) if files is None else [Path(f) for f in files]
        topk = TopK(len(queries), p.top_k)
        emb_path, i2t_path = out / "image_embeddings.parquet", out / "image_to_text.jsonl"
        writer = None
        with open(i2t_path, "w") as i2t:
            bar = stage.progress(total=len(files), desc="infer: images", unit="img")
            for batch, pixels in _decoded_chunks(files, meta["image_size"], p.chunk_size, errors):
                emb = run_bound(img_sess, "pixels", pixels)  # (chunk, D), L2-normalised
                ids = [str(f.relative_to(images_dir)) for f in batch]
                table = _embedding_table(ids, emb)
                writer = writer or pq.ParquetWriter(emb_path, table.schema)
                writer.write_table(table)
                if queries:
                    sim = q_emb @ emb.T  # (Q, chunk)
                    topk.update(sim, n_images)
                    k = min(p.top_k, len(queries))
                    best = np.argsort(-sim.T, axis=1, kind="stable")[:, :k]
                    for row, img_id in enumerate(ids):
                        hits = [
                            {"text": queries[j], "score": round(float(sim[j, row]), 6)}
                            for j in best[row]
                        ]
                        i2t.write(json.dumps({"image": img_id, "results": hits}) + "\n")
                image_ids += ids
                n_images += len(ids)
                bar.update(len(ids))
            bar.update(len(files) - bar.n)
            bar.close()
        if writer is not None:
            writer.close()
            files_out["image_embeddings"] = str(emb_path)
        if queries and n_images:
            files_out["image_to_text"] = str(i2t_path)
            t2i_path = out / "text_to_image.jsonl"
            with open(t2i_path, "w") as f:
                for q, (ids_row, sc_row) in enumerate(zip(topk.ids, topk.scores, strict=True)):
                    hits = [
                        {"image": image_ids[i], "score": round(float(s), 6)}
                        for i, s in zip(ids_row, sc_row, strict=True)
                    ]
                    f.write(json.dumps({"query": queries[q], "results": hits}) + "\n")
            files_out["text_to_image"] = str(t2i_path)
    errors_path = out / "errors.jsonl"
    with open(errors_path, "w") as f:
        for e in errors:
            f.write(json.dumps(e) + "\n")
    files_out["errors"] = str(errors_path)
    if errors:
        log.warning("%d unreadable image(s) skipped; see %s", len(errors), errors_path)
    result = InferResult(
        n_images, len(queries), len(errors), img_sess.get_providers()[0], str(out), files_out
    )
    (out / "summary.json").write_text(json.dumps(asdict(result), indent=2))
    return result


def run(params: Params, root: Path) -> InferResult:
    """The pipeline's demo: the params' queries against the ingested images, via the export."""
    paths = params.paths
    return infer(
        params.infer,
        root / paths.onnx,
        root / paths.raw / "images",
        params.infer.queries,
        root / paths.infer,
    )


@task(name="infer", cache_policy=NONE, timeout_seconds=3600)
def infer_task(root: str = ".", force: bool = False) -> stage.StageOutcome:
    return stage.run_stage("infer", run, root, force)


if __name__ == "__main__":
    stage.main("infer", run)
