"""Batch inference over a folder of images and a list of texts, streaming.

Images are decoded and embedded in chunks with a running top-k per query, so memory stays flat as
the folder grows. Writes, under `out`: embeddings with ids (parquet), top-k retrievals both ways
(JSONL), unreadable images (errors.jsonl; they are skipped, never silently) and summary.json,
whose `model` object (`model_record`) says which model wrote them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from xmodal_runtime.encoder import Encoder
from xmodal_runtime.images import ImageError, ImageSource, list_images, load_image, to_pixels
from xmodal_runtime.retrieval import TopK, top_k

log = logging.getLogger("xmodal")

IMAGE_EMBEDDINGS = "image_embeddings.parquet"
TEXT_EMBEDDINGS = "text_embeddings.parquet"
IMAGE_TO_TEXT = "image_to_text.jsonl"
TEXT_TO_IMAGE = "text_to_image.jsonl"
ERRORS = "errors.jsonl"
SUMMARY = "summary.json"


@dataclass(frozen=True)
class BatchResult:
    images: int
    texts: int
    errors: int
    provider: str
    out: str
    files: dict[str, str]
    model: dict[str, Any] | None = None  # model_record()


def model_record(
    uri: str,
    name: str | None = None,
    version: str | None = None,
    run_id: str | None = None,
    bundle_sha256: str | None = None,
) -> dict[str, Any]:
    """summary.json's `model`: the model as given (a registry URI, or the folder's path), the
    registered name and version it resolved to and the run that logged it (None for a folder),
    and the bundle's digest (`Bundle.digest()`)."""
    return {
        "uri": uri,
        "name": name,
        "version": version,
        "run_id": run_id,
        "bundle_sha256": bundle_sha256,
    }


def embedding_table(ids: list[str], emb: np.ndarray, extra: dict | None = None) -> pa.Table:
    cols = {"id": pa.array(ids, pa.string()), **(extra or {})}
    cols["embedding"] = pa.FixedSizeListArray.from_arrays(
        pa.array(emb.reshape(-1), pa.float32()), emb.shape[1]
    )
    return pa.table(cols)


def _decoded_chunks(
    images: Iterable[tuple[str, ImageSource]], size: int, chunk: int, errors: list[dict]
) -> Iterator[tuple[int, list[str], np.ndarray | None]]:
    """(images tried, ids decoded, their pixels or None) per chunk; failures go to `errors`."""
    it = iter(images)
    while tried := list(islice(it, chunk)):
        ok, arrays = [], []
        for image_id, source in tried:
            try:
                arrays.append(load_image(source, size))
                ok.append(image_id)
            except ImageError as err:
                errors.append({"path": image_id, "error": str(err)})
        yield len(tried), ok, (to_pixels(np.stack(arrays)) if ok else None)


def _write_lines(path: Path, rows: list[dict]) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def _embed_texts(enc: Encoder, queries: list[str], out: Path, files: dict) -> np.ndarray:
    q_emb = enc.encode_texts(queries)
    if queries:
        table = embedding_table(
            [str(i) for i in range(len(queries))], q_emb, {"text": pa.array(queries)}
        )
        pq.write_table(table, out / TEXT_EMBEDDINGS)
        files["text_embeddings"] = str(out / TEXT_EMBEDDINGS)
    return q_emb


def _i2t_rows(ids: list[str], sim: np.ndarray, queries: list[str], k: int) -> list[dict]:
    best = top_k(sim.T, k)  # (chunk, k) query indices
    return [
        {
            "image": img_id,
            "results": [
                {"text": queries[j], "score": round(float(sim[j, row]), 6)} for j in best[row]
            ],
        }
        for row, img_id in enumerate(ids)
    ]


def embed_folder(
    enc: Encoder,
    images_dir: Path | None,
    queries: list[str],
    out: Path,
    top: int = 5,
    files: list[Path] | None = None,
    progress: Callable[[int], None] | None = None,
    model: dict[str, Any] | None = None,
) -> BatchResult:
    """Embed `queries` and the images of `images_dir` (or only `files` under it, a shard; ids
    stay relative to `images_dir`) and write retrievals between them under `out`. `model` is
    summary.json's record of the model (default: the encoder's bundle folder)."""
    images = None
    if images_dir is not None:
        files = list_images(images_dir) if files is None else [Path(f) for f in files]
        images = ((str(f.relative_to(images_dir)), f) for f in files)
    return embed_images(enc, images, queries, out, top, progress, model)


def embed_images(
    enc: Encoder,
    images: Iterable[tuple[str, ImageSource]] | None,
    queries: list[str],
    out: Path,
    top: int = 5,
    progress: Callable[[int], None] | None = None,
    model: dict[str, Any] | None = None,
) -> BatchResult:
    """Embed `queries` and `images` ((id, path or encoded bytes) pairs, streamed) and write
    retrievals between them under `out` (`model`: as in `embed_folder`)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, str] = {}
    q_emb = _embed_texts(enc, queries, out, written)
    errors: list[dict] = []
    image_ids: list[str] = []
    if images is not None:
        topk = TopK(len(queries), top)
        writer = None
        with open(out / IMAGE_TO_TEXT, "w") as i2t:
            chunks = _decoded_chunks(images, enc.image_size, enc.chunk_size, errors)
            for tried, ids, pixels in chunks:
                if progress:
                    progress(tried)
                if pixels is None:
                    continue
                emb = enc.encode_pixels(pixels)  # (chunk, D), L2-normalised
                table = embedding_table(ids, emb)
                writer = writer or pq.ParquetWriter(out / IMAGE_EMBEDDINGS, table.schema)
                writer.write_table(table)
                if queries:
                    sim = q_emb @ emb.T  # (Q, chunk)
                    topk.update(sim, len(image_ids))
                    for row in _i2t_rows(ids, sim, queries, top):
                        i2t.write(json.dumps(row) + "\n")
                image_ids += ids
        if writer is not None:
            writer.close()
            written["image_embeddings"] = str(out / IMAGE_EMBEDDINGS)
        if queries and image_ids:
            written["image_to_text"] = str(out / IMAGE_TO_TEXT)
            rows = [
                {
                    "query": queries[q],
                    "results": [
                        {"image": image_ids[i], "score": round(float(s), 6)}
                        for i, s in zip(ids_row, sc_row, strict=True)
                    ],
                }
                for q, (ids_row, sc_row) in enumerate(zip(topk.ids, topk.scores, strict=True))
            ]
            _write_lines(out / TEXT_TO_IMAGE, rows)
            written["text_to_image"] = str(out / TEXT_TO_IMAGE)
    _write_lines(out / ERRORS, errors)
    written["errors"] = str(out / ERRORS)
    if errors:
        log.warning("%d unreadable image(s) skipped; see %s", len(errors), out / ERRORS)
    provider = enc.provider if image_ids else enc.text_session.get_providers()[0]
    if model is None:
        root = enc.bundle.root.resolve()
        model = model_record(str(root), bundle_sha256=enc.bundle.digest())
    result = BatchResult(
        len(image_ids), len(queries), len(errors), provider, str(out), written, model
    )
    (out / SUMMARY).write_text(json.dumps(asdict(result), indent=2))
    return result
