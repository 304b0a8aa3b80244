"""Streaming top-k retrieval: memory O(queries * k) however many candidates stream past."""

from __future__ import annotations

import numpy as np


class TopK:
    """Running top-k over streamed candidate chunks, per query."""

    def __init__(self, n_queries: int, k: int) -> None:
        self.k = k
        self.scores = np.full((n_queries, 0), -np.inf, dtype=np.float32)
        self.ids = np.zeros((n_queries, 0), dtype=np.int64)

    def update(self, sim: np.ndarray, offset: int) -> None:
        """sim: (Q, chunk) scores of candidates offset .. offset + chunk - 1."""
        scores = np.concatenate([self.scores, sim], axis=1)
        ids = np.concatenate(
            [self.ids, np.broadcast_to(np.arange(offset, offset + sim.shape[1]), sim.shape)], axis=1
        )
        # Stable sort on -score keeps the earlier candidate first on ties: deterministic output.
        keep = np.argsort(-scores, axis=1, kind="stable")[:, : self.k]
        self.scores = np.take_along_axis(scores, keep, 1)
        self.ids = np.take_along_axis(ids, keep, 1)


def top_k(sim: np.ndarray, k: int) -> np.ndarray:
    """(Q, N) scores -> (Q, min(k, N)) candidate indices, best first, ties to the earlier."""
    return np.argsort(-sim, axis=1, kind="stable")[:, : min(k, sim.shape[1])]
