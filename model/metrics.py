"""Retrieval metrics with the standard multi-caption protocol (Karpathy & Fei-Fei 2015)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _ranks_i2t(sim: np.ndarray, caption_image: np.ndarray) -> np.ndarray:
    # sim: (N_img, N_cap). Rank (0-based) of the best-ranked caption that belongs to the image.
    order = np.argsort(-sim, axis=1, kind="stable")  # (N_img, N_cap)
    hits = caption_image[order] == np.arange(sim.shape[0])[:, None]
    return hits.argmax(axis=1)


def _ranks_t2i(sim: np.ndarray, caption_image: np.ndarray) -> np.ndarray:
    # Rank (0-based) of each caption's own image among all images.
    order = np.argsort(-sim.T, axis=1, kind="stable")  # (N_cap, N_img)
    return (order == caption_image[:, None]).argmax(axis=1)


def retrieval_metrics(
    sim: np.ndarray, caption_image: np.ndarray, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Recall@K (keys i2t_R1, t2i_R5, ...), mean and median rank (1-based), both directions.

    sim[i, j] is the similarity of image i and caption j; caption_image[j] is the index of the
    image caption j describes. An image query counts as correct at K if any of its captions is in
    the top K.
    """
    sim = np.asarray(sim, dtype=np.float64)
    caption_image = np.asarray(caption_image, dtype=np.int64)
    if sim.ndim != 2 or sim.shape[1] != caption_image.shape[0]:
        raise ValueError(
            f"sim must be (N_img, N_cap) with N_cap == len(caption_image); got {sim.shape} "
            f"and {caption_image.shape[0]} captions"
        )
    missing = np.setdiff1d(np.arange(sim.shape[0]), caption_image)
    if missing.size:
        raise ValueError(f"images without any caption: {missing[:10].tolist()}")
    out: dict[str, float] = {}
    for name, ranks in (
        ("i2t", _ranks_i2t(sim, caption_image)),
        ("t2i", _ranks_t2i(sim, caption_image)),
    ):
        for k in ks:
            out[f"{name}_R{k}"] = float(np.mean(ranks < k))
        out[f"{name}_mean_rank"] = float(np.mean(ranks + 1))
        out[f"{name}_median_rank"] = float(np.median(ranks + 1))
    return out
