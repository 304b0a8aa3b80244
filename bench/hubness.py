"""CSLS hubness correction on a trained pipeline's checkpoint (issue 13): Recall@K of the test
split as evaluate scores it, and again after CSLS (bench/linear_probe.py, `csls_similarity`) with
the train split's embeddings as the bank and k chosen on val. It measures a retrieval-time lever
before evaluate and the serving runtime have it.

    .venv/bin/python -m bench.hubness --train-dir models/train --prepared data/prepared

Embeds the train split's images too (the bank), so it costs about one pass of the image tower
over train, val and test.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from bench.linear_probe import best_k, cpu_name, csls_similarity, emit
from model.metrics import retrieval_metrics, retrieval_metrics_from_scores
from tasks.common.checkpoint import load_checkpoint
from tasks.common.data import embed_split, load_split


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train-dir", type=Path, default=Path("models/train"))
    ap.add_argument("--prepared", type=Path, default=Path("data/prepared"))
    ap.add_argument("--ks", type=int, nargs="+", default=[5, 10, 20, 50])
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--out", type=Path, help="also write the figures here, as JSON")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    net, _ = load_checkpoint(args.train_dir)
    emb, caption_image = {}, {}
    for name in ("train", "val", "test"):
        split = load_split(args.prepared, name)
        image, text = embed_split(net, split, args.batch_size)
        emb[name] = (torch.from_numpy(image), torch.from_numpy(text))
        caption_image[name] = split.image_index

    def csls(name: str, k: int) -> dict[str, float]:
        sim = csls_similarity(*emb[name], *emb["train"], k)
        return retrieval_metrics_from_scores(sim.numpy(), caption_image[name])

    best = best_k(args.ks, lambda k: csls("val", k))
    plain = retrieval_metrics(*(e.numpy() for e in emb["test"]), caption_image["test"])
    result = {
        "train_dir": str(args.train_dir),
        "split": {name: len(caption_image[name]) for name in emb},
        "k_on_val": best,
        "test": {k: round(v, 4) for k, v in plain.items()},
        "test_csls": {k: round(v, 4) for k, v in csls("test", best).items()},
        "seconds": round(time.perf_counter() - start, 1),
        "cpu": cpu_name(),
    }
    return emit(result, args.out)


if __name__ == "__main__":
    main()
