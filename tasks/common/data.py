"""The prepared dataset written by preprocess: its layout, readers, and chunked embedding.

Layout (one folder, versioned by DVC):
  {train,val,test}/images_000.npy ...  uint8 (N, S, S, 3), decoded once; no JPEG work in training
  {train,val,test}/captions.npz        input_ids, attention_mask (C, L), image_index (C,)
  {train,val,test}/index.json          image ids, paths and caption texts of the split
  tokenizer/                           the text tower's tokenizer
  stats.json                           per-channel mean/std of the training images, in [0, 1]
  meta.json                            image size, max length, vocabulary size, counts
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from model.config import ModelConfig
from tasks.common.dataset import DatasetError

SPLITS = ("train", "val", "test")
TOKENIZER_DIR = "tokenizer"
STATS_FILE = "stats.json"
META_FILE = "meta.json"
FEATURES_META = "meta.json"  # in paths.features, written by the features stage


@dataclass(frozen=True)
class Split:
    images: np.ndarray | None  # (N, S, S, 3) uint8; None when loaded without images
    input_ids: np.ndarray  # (C, L) int64
    attention_mask: np.ndarray  # (C, L) int64
    image_index: np.ndarray  # (C,) caption -> image row
    image_ids: list[int]
    paths: list[str]
    captions: list[str]

    def __len__(self) -> int:
        return len(self.image_ids)


def load_split(prepared: Path, name: str, images: bool = True) -> Split:
    """A prepared split; `images=False` skips reading the image shards (cached features)."""
    d = Path(prepared) / name
    shards = sorted(d.glob("images_*.npy"))
    if not shards:
        raise DatasetError(f"split {name!r} is empty or missing under {prepared}")
    caps = np.load(d / "captions.npz")
    index = json.loads((d / "index.json").read_text())
    return Split(
        images=np.concatenate([np.load(s) for s in shards]) if images else None,
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
def embed_images(net, images: np.ndarray | torch.Tensor, batch: int, device="cpu") -> np.ndarray:
    """(N, D) L2-normalised embeddings of uint8 (N, S, S, 3) images or float (N, 3, S, S) pixels."""
    net.eval()
    out = []
    for i in range(0, len(images), batch):
        chunk = images[i : i + batch]
        pixels = to_pixels(chunk) if isinstance(chunk, np.ndarray) else chunk
        out.append(net.encode_image(pixels.to(device)).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, net.cfg.embed_dim), np.float32)


@torch.no_grad()
def embed_texts(net, input_ids, attention_mask, batch: int, device="cpu") -> np.ndarray:
    """(C, D) L2-normalised embeddings of (C, L) token ids and masks (numpy or torch)."""
    net.eval()
    ids, mask = torch.as_tensor(input_ids), torch.as_tensor(attention_mask)
    out = [
        net.encode_text(ids[i : i + batch].to(device), mask[i : i + batch].to(device)).float().cpu()
        for i in range(0, len(ids), batch)
    ]
    return torch.cat(out).numpy() if out else np.zeros((0, net.cfg.embed_dim), np.float32)


def embed_split(net, split: Split, batch_size: int, device: torch.device | str = "cpu"):
    """L2-normalised image and caption embeddings of a split: ((N, D), (C, D)) numpy arrays."""
    return (
        embed_images(net, split.images, batch_size, device),
        embed_texts(net, split.input_ids, split.attention_mask, batch_size, device),
    )


@dataclass(frozen=True)
class PrefixCache:
    """A split's cached frozen prefixes (the features stage). A cut of 0 means that tower is not
    cached and runs whole; otherwise its first `cut` blocks' output is here."""

    image_cut: int = 0
    image: np.ndarray | None = None  # (N, ...) DualEncoder.image_prefix of every image
    text_cut: int = 0
    text: np.ndarray | None = None  # (T, H) every caption's real-token states, concatenated
    text_offsets: np.ndarray | None = None  # (C + 1,) caption c's rows: offsets[c]:offsets[c+1]

    def text_batch(self, captions: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Token states (B, L, H) of `captions`, padded to the longest, and their mask (B, L)."""
        starts, stops = self.text_offsets[captions], self.text_offsets[captions + 1]
        length = int((stops - starts).max())
        hidden = np.zeros((len(captions), length, self.text.shape[1]), np.float32)
        mask = np.zeros((len(captions), length), np.int64)
        for row, (a, b) in enumerate(zip(starts, stops, strict=True)):
            hidden[row, : b - a] = self.text[a:b]
            mask[row, : b - a] = 1
        return torch.from_numpy(hidden), torch.from_numpy(mask)


def cache_identity(cfg: ModelConfig) -> dict:
    """What a cached prefix was computed by; the features stage records it in its meta.json."""
    image, text = cfg.image, cfg.text
    return {
        "backbone": image.backbone,
        "weights": image.weights,
        "normalization": image.normalization,
        "text_pretrained": text.pretrained,
    }


def load_features(
    features_dir: Path | None, split: str, cfg: ModelConfig, cuts: tuple[int, int]
) -> PrefixCache:
    """The cached prefixes of `split` that the features stage wrote for this model, where they
    apply. `cuts`: the (image, text) frozen block counts train uses; a cache built for other
    counts or another tower is refused, not silently used."""
    if features_dir is None or not (Path(features_dir) / FEATURES_META).is_file():
        return PrefixCache()
    meta = read_json(Path(features_dir) / FEATURES_META)
    built = {k: meta.get(k) for k in cache_identity(cfg)}
    built_cuts = (meta["image"]["cut"], meta["text"]["cut"])
    stale = [
        f"{tower} prefix of {have} blocks, train freezes {want}"
        for tower, have, want in zip(("image", "text"), built_cuts, cuts, strict=True)
        if have and have != want
    ]
    if any(built_cuts) and built != cache_identity(cfg):
        stale.append(f"towers {built}, the model is {cache_identity(cfg)}")
    if stale:
        raise ValueError(
            f"{features_dir} holds a stale cache ({'; '.join(stale)}): rerun the features stage"
        )
    d = Path(features_dir)
    image_cut, text_cut = built_cuts
    return PrefixCache(
        image_cut=image_cut,
        image=np.load(d / f"image_{split}.npy") if image_cut else None,
        text_cut=text_cut,
        text=np.load(d / f"text_{split}.npy") if text_cut else None,
        text_offsets=np.load(d / f"text_{split}_offsets.npy") if text_cut else None,
    )
