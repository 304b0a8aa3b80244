"""ITM re-ranking for evaluate: re-score each query's dual-encoder top-k with the fusion head."""

from __future__ import annotations

import time

import numpy as np
import torch

from model.dual_encoder import DualEncoder
from model.metrics import retrieval_metrics_from_scores
from tasks.common.data import Split, to_pixels


@torch.no_grad()
def _tower_states(net: DualEncoder, split: Split, batch: int):
    fmaps = torch.cat(
        [
            net.image_stages(to_pixels(split.images[i : i + batch]))[net.cfg.fusion.stage]
            for i in range(0, len(split), batch)
        ]
    )  # (N, C, h, w)
    ids, mask = (torch.from_numpy(a) for a in split.tokens())
    hidden = torch.cat(
        [
            net.text_states(ids[i : i + batch], mask[i : i + batch])
            for i in range(0, len(ids), batch)
        ]
    )  # (C, L, H)
    return fmaps, hidden, mask


@torch.no_grad()
def _rescore(net, fmaps, hidden, mask, pairs: np.ndarray, batch: int) -> np.ndarray:
    # pairs: (P, 2) of (image row, caption row) -> ITM match probability per pair
    out = []
    for i in range(0, len(pairs), batch):
        img, cap = pairs[i : i + batch, 0], pairs[i : i + batch, 1]
        out.append(net.fusion.match_prob(hidden[cap], mask[cap], fmaps[img]))
    return torch.cat(out).numpy()


def rerank_metrics(
    net: DualEncoder, split: Split, sim: np.ndarray, k: int, ks: list[int], batch: int
) -> dict[str, float]:
    """Recall@K after ITM re-ranking of each query's top-k, and the queries/s it costs."""
    net.eval()
    start = time.perf_counter()
    fmaps, hidden, mask = _tower_states(net, split, batch)
    state_seconds = time.perf_counter() - start
    out: dict[str, float] = {}
    for direction, scores in (("i2t", sim), ("t2i", sim.T)):
        t0 = time.perf_counter()
        kk = min(k, scores.shape[1])
        top = np.argsort(-scores, axis=1, kind="stable")[:, :kk]  # (Q, k)
        rows = np.repeat(np.arange(scores.shape[0]), kk)
        pairs = np.stack([rows, top.reshape(-1)], axis=1)
        if direction == "t2i":
            pairs = pairs[:, ::-1]
        prob = _rescore(net, fmaps, hidden, mask, np.ascontiguousarray(pairs), batch)
        reranked = scores - 10.0  # everything outside the top-k stays below it, in order
        np.put_along_axis(reranked, top, 10.0 + prob.reshape(-1, kk), axis=1)
        m = retrieval_metrics_from_scores(
            reranked if direction == "i2t" else reranked.T, split.image_index, ks
        )
        seconds = time.perf_counter() - t0 + state_seconds / 2
        out.update({key: v for key, v in m.items() if key.startswith(direction)})
        out[f"{direction}_rerank_qps"] = scores.shape[0] / seconds
    return out
