"""Retrieval metrics with the standard multi-caption protocol (Karpathy & Fei-Fei 2015).

caption_image[j] is the image caption j describes; an image query is correct at K if any of its
captions is in the top K. A rank is the count of candidates scoring above the positive (ties
broken by index, as a stable descending sort would), taken over image-row chunks of the
similarity, so retrieval_metrics never holds an N_img x N_cap matrix (issue 16: memory linear in
split size).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

CHUNK_FLOATS = 16_000_000  # similarity scores held at once: 64 MB of float32

Rows = Callable[[int, int], np.ndarray]  # (a, b) -> scores of images a..b-1, (b - a, N_cap)


def retrieval_metrics(
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    caption_image: np.ndarray,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int | None = None,
) -> dict[str, float]:
    """Recall@K (i2t_R1, t2i_R5, ...) and 1-based mean/median ranks of image_emb @ text_emb.T."""
    image_emb, text_emb = np.asarray(image_emb), np.asarray(text_emb)
    caption_image = np.asarray(caption_image, dtype=np.int64)
    if (
        image_emb.ndim != 2
        or text_emb.ndim != 2
        or image_emb.shape[1] != text_emb.shape[1]
        or text_emb.shape[0] != caption_image.shape[0]
    ):
        raise ValueError(
            f"image_emb must be (N_img, D) and text_emb (N_cap, D) with N_cap == "
            f"len(caption_image); got {image_emb.shape}, {text_emb.shape} and "
            f"{caption_image.shape[0]} captions"
        )
    return _metrics(
        lambda a, b: image_emb[a:b] @ text_emb.T, len(image_emb), caption_image, ks, chunk_size
    )


def retrieval_metrics_from_scores(
    sim: np.ndarray,
    caption_image: np.ndarray,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int | None = None,
) -> dict[str, float]:
    """retrieval_metrics of a score matrix the caller already holds (ITM re-ranked scores)."""
    sim = np.asarray(sim)
    caption_image = np.asarray(caption_image, dtype=np.int64)
    if sim.ndim != 2 or sim.shape[1] != caption_image.shape[0]:
        raise ValueError(
            f"sim must be (N_img, N_cap) with N_cap == len(caption_image); got {sim.shape} "
            f"and {caption_image.shape[0]} captions"
        )
    # Non-float scores compare as float64, as in the sort this replaces; a chunk at a time.
    cast = sim.dtype if sim.dtype.kind == "f" else np.float64
    return _metrics(
        lambda a, b: sim[a:b].astype(cast, copy=False), len(sim), caption_image, ks, chunk_size
    )


def _metrics(
    rows: Rows, n_img: int, caption_image: np.ndarray, ks: Sequence[int], chunk_size: int | None
) -> dict[str, float]:
    if caption_image.size and (caption_image.min() < 0 or caption_image.max() >= n_img):
        raise ValueError(f"caption_image must index images 0..{n_img - 1}")
    missing = np.setdiff1d(np.arange(n_img), caption_image)
    if missing.size:
        raise ValueError(f"images without any caption: {missing[:10].tolist()}")
    step = chunk_size or max(1, CHUNK_FLOATS // max(1, len(caption_image)))
    out: dict[str, float] = {}
    for name, ranks in zip(("i2t", "t2i"), _ranks(rows, n_img, caption_image, step), strict=True):
        for k in ks:
            out[f"{name}_R{k}"] = float(np.mean(ranks < k))
        out[f"{name}_mean_rank"] = float(np.mean(ranks + 1))
        out[f"{name}_median_rank"] = float(np.median(ranks + 1))
    return out


def _ranks(
    rows: Rows, n_img: int, caption_image: np.ndarray, step: int
) -> tuple[np.ndarray, np.ndarray]:
    """0-based i2t and t2i ranks; two passes, as t2i needs each positive before any chunk."""
    n_cap = len(caption_image)
    by_image = np.argsort(caption_image, kind="stable")  # each image's captions, index order
    bounds = np.searchsorted(caption_image[by_image], np.arange(n_img + 1))
    chunks = [(a, min(a + step, n_img)) for a in range(0, n_img, step)]
    i2t = np.empty(n_img, dtype=np.int64)
    positive = None
    for a, b in chunks:
        s = rows(a, b)
        caps = by_image[bounds[a] : bounds[b]]
        own = s[caption_image[caps] - a, caps]  # sorted by image, then caption index
        if positive is None:
            positive = np.empty(n_cap, dtype=s.dtype)
        positive[caps] = own
        i2t[a:b] = _i2t_chunk(s, own, caps, bounds[a : b + 1] - bounds[a])
    t2i = np.zeros(n_cap, dtype=np.int64)
    for a, b in chunks:
        s = rows(a, b)  # the pass-1 values again: the positive ties with itself, not above it
        t2i += np.count_nonzero(s > positive, axis=0)
        tied = (s == positive) & (np.arange(a, b)[:, None] < caption_image)  # earlier images
        t2i += np.count_nonzero(tied, axis=0)
    return i2t, t2i


def _i2t_chunk(s: np.ndarray, own: np.ndarray, caps: np.ndarray, seg: np.ndarray) -> np.ndarray:
    """Per row: captions above its best own one, or tied with it at a lower index (stable)."""
    # own[seg[r]:seg[r + 1]]: row r's own-caption scores, for captions caps[seg[r]:seg[r + 1]].
    starts = seg[:-1]
    best = np.maximum.reduceat(own, starts)
    at_best = own == np.repeat(best, np.diff(seg))
    first = np.minimum.reduceat(np.where(at_best, caps, s.shape[1]), starts)
    above = np.count_nonzero(s > best[:, None], axis=1)
    tied = (s == best[:, None]) & (np.arange(s.shape[1]) < first[:, None])
    return above + np.count_nonzero(tied, axis=1)
