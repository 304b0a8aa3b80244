"""The frozen-tower linear-probe baseline for real photos (issue 13).

Both towers of `model:` (by default mobilenet_v2 with ImageNet weights and all-MiniLM-L6-v2) are
frozen. Their pooled features are computed once, at `--image-size` px (224: what the ImageNet
weights were trained at), and two linear heads are trained with symmetric InfoNCE on the
cached features. The split is the pipeline's own: `tasks.preprocess.split_ids` over the ingested
dataset with `preprocess.val_fraction`, `test_fraction` and `seed` from params.yaml, with the
same -P/-S as `xmodal run`, so the probe and the pipeline are scored on the same test images.

    .venv/bin/python -m bench.linear_probe --raw /tmp/flickr/raw -S preprocess.test_fraction=0.2

`--raw` is an ingested dataset (what the ingest stage writes: WebDataset shards and their
manifest.json). Prints Recall@1/5/10 both ways, mean and median rank, and the time each part took;
`--out` also writes them as JSON.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import platform
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model.dual_encoder import DualEncoder
from model.image_tower import pool
from model.loss import ClipLoss
from model.metrics import retrieval_metrics, retrieval_metrics_from_scores
from model.text_tower import pool as pool_text
from tasks.common.config import load_params
from tasks.common.dataset import iter_raw
from tasks.preprocess import build_tokenizer, split_ids
from xmodal_runtime.images import load_image, to_pixels

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Features:
    image: torch.Tensor  # (N_img, C) pooled image-tower features
    text: torch.Tensor  # (N_cap, H) pooled text-tower features
    caption_image: np.ndarray  # (N_cap,) caption -> row of `image`


@torch.no_grad()
def extract(
    net: DualEncoder, tokenizer, raw: Path, records: list, size: int, max_length: int, batch: int
) -> Features:
    """Frozen pooled features of `records` (raw samples): images at `size` px, every caption."""
    images = []
    for start in range(0, len(records), batch):
        chunk = records[start : start + batch]
        pixels = torch.from_numpy(to_pixels([load_image(r.data, size) for r in chunk]))
        images.append(pool(net.image_stages(pixels)[-1]))  # (B, C)
    captions = [c for r in records for c in r.record.captions]
    caption_image = np.asarray([row for row, r in enumerate(records) for _ in r.record.captions])
    texts = []
    for start in range(0, len(captions), batch):
        tok = tokenizer(
            captions[start : start + batch],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        hidden = net.text_states(tok["input_ids"], tok["attention_mask"])  # (B, L, H)
        texts.append(pool_text(hidden, tok["attention_mask"], net.cfg.text.pooling))
    return Features(torch.cat(images), torch.cat(texts), caption_image)


class Heads(nn.Module):
    """The two linear heads and CLIP's learnable logit scale (init 1/0.07)."""

    def __init__(self, image_dim: int, text_dim: int, dim: int) -> None:
        super().__init__()
        self.image = nn.Linear(image_dim, dim, bias=False)
        self.text = nn.Linear(text_dim, dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, image: torch.Tensor, text: torch.Tensor):
        scale = self.logit_scale.clamp(max=math.log(100)).exp()
        return F.normalize(self.image(image), dim=-1), F.normalize(self.text(text), dim=-1), scale


def fit(
    train: Features,
    dim: int,
    epochs: int,
    batch: int,
    lr: float,
    seed: int,
    pairs: str = "image",
    val: Features | None = None,
) -> tuple[Heads, int]:
    """InfoNCE on cached features. An epoch visits every image once with one of its captions
    drawn at random (`image`), or every caption with its image (`caption`). With `val`, returns
    the heads of the epoch with the best mean val R@1 (early stopping), and that epoch."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the heads' initial weights
    heads = Heads(train.image.shape[1], train.text.shape[1], dim)
    opt = torch.optim.AdamW(heads.parameters(), lr=lr, weight_decay=0.1)
    loss_fn = ClipLoss()
    caption_image = torch.as_tensor(train.caption_image)
    by_image: list[list[int]] = [[] for _ in range(len(train.image))]
    for cap, img in enumerate(train.caption_image):
        by_image[img].append(cap)
    best: tuple[float, int, dict] = (-1.0, 0, {})
    for epoch in range(epochs):
        if pairs == "caption":
            caps = torch.randperm(len(caption_image), generator=gen)
        else:
            draw = [c[int(torch.randint(len(c), (1,), generator=gen))] for c in by_image]
            caps = torch.tensor(draw)[torch.randperm(len(by_image), generator=gen)]
        for start in range(0, len(caps), batch):
            rows = caps[start : start + batch]  # caption rows; their images may repeat
            loss = loss_fn(*heads(train.image[caption_image[rows]], train.text[rows]))
            opt.zero_grad()
            loss.backward()
            opt.step()
        if val is not None:
            m = score(heads, val)
            if (r1 := m["i2t_R1"] + m["t2i_R1"]) > best[0]:
                best = (r1, epoch + 1, copy.deepcopy(heads.state_dict()))
    if val is None:
        return heads, epochs
    heads.load_state_dict(best[2])
    return heads, best[1]


@torch.no_grad()
def score(heads: Heads, test: Features) -> dict[str, float]:
    image, text, _ = heads(test.image, test.text)
    return retrieval_metrics(image.numpy(), text.numpy(), test.caption_image)


@torch.no_grad()
def score_csls(heads: Heads, test: Features, bank: Features, k: int) -> dict[str, float]:
    """Recall after CSLS hubness correction (Conneau et al. 2018, "Word translation without
    parallel data"): 2 cos(q, c) minus each side's mean cosine to its k nearest `bank` items of
    the other modality. Within one query's ranking only the candidate's term varies, so a
    candidate that is close to everything (a hub) is demoted."""
    image, text, _ = heads(test.image, test.text)  # (N_img, D), (N_cap, D), L2-normalised
    bank_image, bank_text, _ = heads(bank.image, bank.text)
    sim = csls_similarity(image, text, bank_image, bank_text, k)
    return retrieval_metrics_from_scores(sim.numpy(), test.caption_image)


def csls_similarity(
    image: torch.Tensor,
    text: torch.Tensor,
    bank_image: torch.Tensor,
    bank_text: torch.Tensor,
    k: int,
) -> torch.Tensor:
    """(N_img, N_cap) CSLS scores of L2-normalised embeddings against a bank of each modality."""
    image_hub = (image @ bank_text.T).topk(k, dim=1).values.mean(1)  # (N_img,)
    text_hub = (text @ bank_image.T).topk(k, dim=1).values.mean(1)  # (N_cap,)
    return 2 * image @ text.T - image_hub[:, None] - text_hub[None, :]


def best_k(ks: list[int], on_val: Callable[[int], dict[str, float]]) -> int:
    """The k of `ks` whose val metrics have the best mean R@1 (test never chooses)."""
    scores = {k: on_val(k) for k in ks}
    return max(ks, key=lambda k: scores[k]["i2t_R1"] + scores[k]["t2i_R1"])


def csls(heads: Heads, feats: dict[str, Features], ks: list[int]) -> dict:
    """CSLS with the train split as the bank, its k chosen on val (mean R@1), scored on test."""
    best = best_k(ks, lambda k: score_csls(heads, feats["val"], feats["train"], k))
    test = score_csls(heads, feats["test"], feats["train"], best)
    return {"k": best, "test": {m: round(v, 4) for m, v in test.items()}}


def emit(result: dict, out: Path | None) -> dict:
    """Print `result` as JSON, and write it to `out` too when given."""
    print(json.dumps(result, indent=2))
    if out:
        out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def cached_extract(cache: Path | None, key: dict, *args) -> Features:
    """`extract`, memoised on disk under `cache` by a digest of everything that decides it."""
    if cache is None:
        return extract(*args)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache) / f"features-{digest}.pt"
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        return Features(saved["image"], saved["text"], saved["caption_image"].numpy())
    feats = extract(*args)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(
        {"image": feats.image, "text": feats.text,
         "caption_image": torch.as_tensor(feats.caption_image)},
        tmp,
    )  # fmt: skip
    tmp.replace(path)
    return feats


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(ln.split(":", 1)[1].strip() for ln in out.splitlines() if "Model name" in ln)
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--raw", type=Path, default=ROOT / "data" / "raw", help="ingested dataset")
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("-P", "--preset", dest="presets", action="append", default=[])
    ap.add_argument("-S", "--set", dest="overrides", action="append", default=[])
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--dim", type=int, default=256, help="shared embedding size of the heads")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument(
        "--pairs",
        choices=["caption", "image"],
        default="image",
        help="an epoch visits every image once, or every caption",
    )
    ap.add_argument(
        "--csls-k",
        type=int,
        nargs="*",
        default=[],
        help="also score with CSLS hubness correction, k chosen on val from these",
    )
    ap.add_argument("--cache", type=Path, help="keep the frozen features here between runs")
    ap.add_argument("--out", type=Path, help="also write the figures here, as JSON")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    params = load_params(args.params, args.overrides, args.presets)
    pre, cfg = params.preprocess, params.model
    if cfg.image.weights == "none" or not cfg.text.pretrained:
        raise SystemExit(
            "linear probe: both towers need pretrained weights (model.image.weights, "
            "model.text.pretrained); a frozen random tower is no baseline"
        )
    cfg = cfg.model_copy(
        update={"image": cfg.image.model_copy(update={"normalization": "imagenet"})}
    )
    torch.manual_seed(pre.seed)
    records = {s.record.image_id: s for s in iter_raw(args.raw)}
    splits = split_ids(list(records), pre.val_fraction, pre.test_fraction, pre.seed)
    net = DualEncoder(cfg).eval()
    tokenizer = build_tokenizer(pre, cfg.text.pretrained, [], cfg.allow_downloads)
    t0 = time.perf_counter()
    feats = {}
    for name in ("train", "val", "test"):
        recs = [records[i] for i in splits[name]]
        key = {
            "model": cfg.model_dump(mode="json"),
            "size": args.image_size,
            "max_length": pre.max_length,
            "images": [(r.record.source_path, r.record.sha256) for r in recs],
            "captions": [r.record.captions for r in recs],
        }
        feats[name] = cached_extract(
            args.cache, key, net, tokenizer, args.raw, recs, args.image_size, pre.max_length,
            args.batch_size,
        )  # fmt: skip
    t1 = time.perf_counter()
    heads, best_epoch = fit(
        feats["train"], args.dim, args.epochs, args.batch_size, args.lr, pre.seed, args.pairs,
        feats["val"] if len(splits["val"]) > 1 else None,
    )  # fmt: skip
    t2 = time.perf_counter()
    metrics = score(heads, feats["test"])
    result = {
        "model": {"image": cfg.image.backbone, "weights": cfg.image.weights,
                  "text": cfg.text.pretrained, "pooling": cfg.text.pooling},
        "split": {k: len(v) for k, v in splits.items()},
        "image_size": args.image_size, "dim": args.dim, "epochs": args.epochs,
        "pairs": args.pairs, "lr": args.lr, "batch_size": args.batch_size,
        "best_epoch_on_val": best_epoch,
        "seconds": {"features": round(t1 - t0, 1), "heads": round(t2 - t1, 1)},
        "cpu": cpu_name(), "torch_threads": torch.get_num_threads(),
        "test": {k: round(v, 4) for k, v in metrics.items()},
    }  # fmt: skip
    if args.csls_k:
        if len(splits["val"]) < 2:
            raise SystemExit("linear probe: --csls-k chooses k on val, and val is empty")
        result["test_csls"] = csls(heads, feats, args.csls_k)
    return emit(result, args.out)


if __name__ == "__main__":
    main()
