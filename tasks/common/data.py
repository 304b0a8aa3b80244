"""The prepared dataset written by preprocess: its layout, readers, and chunked embedding.

Layout (one folder, versioned by DVC), written shard by shard as preprocess streams:
  <split>/images_000.npy ...          uint8 (n, S, S, 3), decoded once: no JPEG work in training
  <split>/input_ids_000.npy ...       int32 (c, L): the shard's captions, tokenised
  <split>/attention_mask_000.npy ...  int8 (c, L)
  <split>/caption_image_000.npy ...   int32 (c,): each caption's image row in the split
  <split>/index.jsonl                 a line per image: id, source path, caption texts
  tokenizer/                          the text tower's tokenizer
  stats.json                          per-channel mean/std of the training images, in [0, 1]
  meta.json                           image size, max length, vocabulary size, counts
(<split>: train, val, test.)

A split's arrays are `Rows`: read from disk on access, so memory holds what is indexed, never
the split (COCO at 224 px is 18 GB of uint8).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from model.config import ModelConfig
from tasks.common.dataset import DatasetError

SPLITS = ("train", "val", "test")
TOKENIZER_DIR = "tokenizer"
STATS_FILE = "stats.json"
META_FILE = "meta.json"
INDEX_FILE = "index.jsonl"
FEATURES_META = "meta.json"  # in paths.features, written by the features stage


def shard_file(split_dir: Path, array: str, shard: int) -> Path:
    return Path(split_dir) / f"{array}_{shard:03d}.npy"


class Rows:
    """The rows of one or more .npy files, concatenated along axis 0 and read on access.

    Each access maps the files it touches and unmaps them before returning, so the resident
    memory is the rows returned, not the pages read so far (a long-lived memmap keeps every
    page it ever touched in RSS)."""

    def __init__(self, files: Sequence[Path]):
        if not files:
            raise DatasetError("no array files to read")
        self.files = [Path(f) for f in files]
        heads = [_npy_header(f) for f in self.files]
        self.starts = np.cumsum([0] + [shape[0] for shape, _ in heads])
        self.shape = (int(self.starts[-1]), *heads[0][0][1:])
        self.dtype = heads[0][1]

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, slice):
            a, b, step = key.indices(len(self))
            if step == 1:
                return self._range(a, max(a, b))
            key = np.arange(a, b, step)
        idx = np.asarray(key, dtype=np.int64)
        if idx.ndim == 0:
            return self[idx[None]][0]
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"row index out of range for {len(self)} rows")
        out = np.empty((len(idx), *self.shape[1:]), self.dtype)
        shard = np.searchsorted(self.starts, idx, side="right") - 1
        for k in np.unique(shard):
            sel = shard == k
            m = np.load(self.files[k], mmap_mode="r")
            out[sel] = m[idx[sel] - self.starts[k]]
            del m
        return out

    def _range(self, a: int, b: int) -> np.ndarray:
        out = np.empty((b - a, *self.shape[1:]), self.dtype)
        for k, f in enumerate(self.files):
            lo, hi = max(a, self.starts[k]), min(b, self.starts[k + 1])
            if lo < hi:
                m = np.load(f, mmap_mode="r")
                out[lo - a : hi - a] = m[lo - self.starts[k] : hi - self.starts[k]]
                del m
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self._range(0, len(self))
        return whole if dtype is None else whole.astype(dtype)

    def chunks(self, size: int) -> Iterator[np.ndarray]:
        for a in range(0, len(self), size):
            yield self._range(a, min(a + size, len(self)))


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    with open(path, "rb") as f:
        fmt = np.lib.format
        major, _ = fmt.read_magic(f)
        read = fmt.read_array_header_1_0 if major == 1 else fmt.read_array_header_2_0
        shape, _, dtype = read(f)
    return shape, dtype


class NpyWriter:
    """A .npy file of `rows` rows written a chunk at a time: the header (shape from the first
    chunk) then the raw rows, so nothing but the chunk is ever in memory. numpy's `np.save`
    needs the whole array, and `open_memmap` keeps every written page resident."""

    def __init__(self, path: Path, rows: int):
        self.path, self.rows, self.written, self.f = Path(path), rows, 0, None

    def write(self, chunk: np.ndarray) -> None:
        chunk = np.ascontiguousarray(chunk)
        if self.f is None:
            self.f = open(self.path, "wb")  # noqa: SIM115 - open across write() calls
            header = {"descr": np.lib.format.dtype_to_descr(chunk.dtype), "fortran_order": False,
                      "shape": (self.rows, *chunk.shape[1:])}  # fmt: skip
            np.lib.format.write_array_header_1_0(self.f, header)
        self.f.write(chunk.tobytes())
        self.written += len(chunk)

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
        if self.written != self.rows:
            raise RuntimeError(f"{self.path}: wrote {self.written} rows of {self.rows}")


class Split:
    """A prepared split, read lazily: arrays are `Rows`; ids, paths and texts load on first use."""

    def __init__(self, split_dir: Path, images: bool = True):
        self.d = Path(split_dir)
        shards = sorted(self.d.glob("images_*.npy"))
        if not shards:
            raise DatasetError(f"split {self.d.name!r} is empty or missing under {self.d.parent}")
        n, image_rows = range(len(shards)), Rows(shards)
        self.images = image_rows if images else None  # (N, S, S, 3) uint8
        self.input_ids = Rows([shard_file(self.d, "input_ids", k) for k in n])  # (C, L) int32
        self.attention_mask = Rows([shard_file(self.d, "attention_mask", k) for k in n])
        # (C,) caption -> image row; a split's captions are grouped by image, in image order.
        self.image_index = np.asarray(
            Rows([shard_file(self.d, "caption_image", k) for k in n]), np.int64
        )
        self.num_images = len(image_rows)
        # Image i's captions are rows caption_offsets[i]:caption_offsets[i + 1].
        self.caption_offsets = np.searchsorted(self.image_index, np.arange(self.num_images + 1))

    def __len__(self) -> int:
        return self.num_images

    def tokens(self) -> tuple[np.ndarray, np.ndarray]:
        """Every caption's (C, L) token ids and attention mask, int64 (the towers' input type)."""
        return np.asarray(self.input_ids, np.int64), np.asarray(self.attention_mask, np.int64)

    @cached_property
    def _index(self) -> list[dict]:
        with open(self.d / INDEX_FILE) as f:
            return [json.loads(line) for line in f]

    @property
    def image_ids(self) -> list[int]:
        return [r["image_id"] for r in self._index]

    @property
    def paths(self) -> list[str]:
        return [r["source_path"] for r in self._index]

    @property
    def captions(self) -> list[str]:
        return [c for r in self._index for c in r["captions"]]


def load_split(prepared: Path, name: str, images: bool = True) -> Split:
    """A prepared split; `images=False` never opens the image shards (cached features)."""
    return Split(Path(prepared) / name, images)


def split_index(prepared: Path, name: str) -> dict:
    """A split's image ids, source paths, caption texts and each caption's image row."""
    s = load_split(prepared, name, images=False)
    return {
        "image_ids": s.image_ids,
        "paths": s.paths,
        "captions": s.captions,
        "image_index": s.image_index.tolist(),
    }


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
    """(C, D) L2-normalised embeddings of (C, L) token ids and masks (arrays or `Rows`)."""
    net.eval()
    out = []
    for i in range(0, len(input_ids), batch):
        ids = torch.from_numpy(np.asarray(input_ids[i : i + batch], np.int64))
        mask = torch.from_numpy(np.asarray(attention_mask[i : i + batch], np.int64))
        out.append(net.encode_text(ids.to(device), mask.to(device)).float().cpu())
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
    image: Rows | None = None  # (N, ...) DualEncoder.image_prefix of every image
    text_cut: int = 0
    text: Rows | None = None  # (T, H) every caption's real-token states, concatenated
    text_offsets: np.ndarray | None = None  # (C + 1,) caption c's rows: offsets[c]:offsets[c+1]
    image_hflip: Rows | None = None  # (N, ...) like `image`, of every image flipped left to right

    def text_batch(self, captions: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Token states (B, L, H) of `captions`, padded to the longest, and their mask (B, L)."""
        starts, stops = self.text_offsets[captions], self.text_offsets[captions + 1]
        lengths = stops - starts
        which = np.concatenate([np.arange(a, b) for a, b in zip(starts, stops, strict=True)])
        rows = self.text[which]  # (sum of lengths, H)
        hidden = np.zeros((len(captions), int(lengths.max()), rows.shape[1]), np.float32)
        mask = np.zeros(hidden.shape[:2], np.int64)
        at = 0
        for row, n in enumerate(lengths):
            hidden[row, :n], mask[row, :n] = rows[at : at + n], 1
            at += n
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
    flipped = d / f"image_{split}_hflip.npy"
    return PrefixCache(
        image_cut=image_cut,
        image=Rows([d / f"image_{split}.npy"]) if image_cut else None,
        image_hflip=Rows([flipped]) if image_cut and flipped.is_file() else None,
        text_cut=text_cut,
        text=Rows([d / f"text_{split}.npy"]) if text_cut else None,
        text_offsets=np.load(d / f"text_{split}_offsets.npy") if text_cut else None,
    )
