"""Readers for the prepared dataset written by the preprocess stage."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tasks.ingest import DatasetError


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # (N, S, S, 3) uint8
    input_ids: np.ndarray  # (C, L) int64
    attention_mask: np.ndarray  # (C, L) int64
    image_index: np.ndarray  # (C,) caption -> image row
    image_ids: list[int]
    paths: list[str]
    captions: list[str]

    def __len__(self) -> int:
        return self.images.shape[0]


def load_split(prepared: Path, name: str) -> Split:
    d = Path(prepared) / name
    shards = sorted(d.glob("images_*.npy"))
    if not shards:
        raise DatasetError(f"split {name!r} is empty or missing under {prepared}")
    caps = np.load(d / "captions.npz")
    index = json.loads((d / "index.json").read_text())
    return Split(
        images=np.concatenate([np.load(s) for s in shards]),
        input_ids=caps["input_ids"].astype(np.int64),
        attention_mask=caps["attention_mask"].astype(np.int64),
        image_index=caps["image_index"].astype(np.int64),
        image_ids=index["image_ids"],
        paths=index["paths"],
        captions=index["captions"],
    )


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """(N, S, S, 3) uint8 -> (N, 3, S, S) float in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)


@torch.no_grad()
def embed_split(net, split: Split, batch_size: int, device: torch.device | str = "cpu"):
    """L2-normalised image and caption embeddings of a split: ((N, D), (C, D)) numpy arrays."""
    net.eval()
    img = [
        net.encode_image(to_pixels(split.images[i : i + batch_size]).to(device)).float().cpu()
        for i in range(0, len(split), batch_size)
    ]
    txt = [
        net.encode_text(
            torch.from_numpy(split.input_ids[i : i + batch_size]).to(device),
            torch.from_numpy(split.attention_mask[i : i + batch_size]).to(device),
        )
        .float()
        .cpu()
        for i in range(0, split.input_ids.shape[0], batch_size)
    ]
    return torch.cat(img).numpy(), torch.cat(txt).numpy()
