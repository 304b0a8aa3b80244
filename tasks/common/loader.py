"""The training loader: batches of the prepared train split, streamed through torch.utils.data.

Every batch is a pure function of (seed, epoch, batch): the epoch's permutation of the split's
images comes from (seed, epoch), and the batch's caption draws and augmentation from
(seed, epoch, batch). Items are whole batches indexed by the run's global step, so a DataLoader
with any number of workers yields the same stream, and a run restarted at a `Position` yields
exactly what the uninterrupted run would have from there (the training issue resumes from it).

A batch reads only its own rows from the shards (`data.Rows`): memory holds the batches in
flight, not the split. Reading rows at random, rather than streaming shards through a shuffle
buffer as webdataset does, keeps the shuffle global on local prepared data: a shard of one
source's images would otherwise fill whole batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from tasks.common.augment import augment
from tasks.common.config import TrainParams
from tasks.common.data import PrefixCache, Split, to_pixels


@dataclass(frozen=True)
class Position:
    """Where the loader stands: the next batch to draw is `batch` of `epoch`."""

    epoch: int = 0
    batch: int = 0

    def step(self, per_epoch: int) -> int:
        return self.epoch * per_epoch + self.batch

    @classmethod
    def of_step(cls, step: int, per_epoch: int) -> Position:
        return cls(*divmod(step, per_epoch))


class TrainBatches(Dataset):
    """Item s: the batch of global step s, (image, text, mask) tensors. Image is pixels
    (B, 3, S, S) in [0, 1], or the cached frozen prefix; text is token ids (B, L) or the cached
    token states (B, L, H). One caption per image per step, drawn at random.

    With train.augment.hflip alone (no crops) the rows to flip are drawn here with the captions:
    cached images come from the features stage's flipped view, pixels are flipped, and the two
    paths train alike.

    Under DDP, rank r of `world` takes the r-th contiguous share of each global batch: the ranks
    together see exactly the batch one process would, and the captions and flips drawn for it.
    Random crops are drawn per rank (seeded with the rank too), so with crops on they depend on
    the number of ranks."""

    def __init__(
        self,
        data: Split,
        p: TrainParams,
        cache: PrefixCache | None = None,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        cache = cache or PrefixCache()
        for what, cached, want in (
            ("images", cache.image, len(data)),
            ("flipped images", cache.image_hflip, len(data)),
            ("captions", cache.text_offsets, len(data.input_ids) + 1),
        ):
            if cached is not None and len(cached) != want:
                raise ValueError(
                    f"the features cache does not match the prepared train {what} "
                    f"({len(cached)} rows for {want}): rerun the features stage"
                )
        self.flip_only = p.augment.hflip and p.augment.crop_scale is None
        if self.flip_only and cache.image is not None and cache.image_hflip is None:
            raise ValueError(
                "train.augment.hflip is on but the features cache has no flipped view of the "
                "train images: rerun the features stage"
            )
        self.data, self.p, self.cache = data, p, cache
        self.rank, self.share = rank, p.batch_size // world
        self.per_epoch = len(data) // p.batch_size
        if self.per_epoch == 0:
            raise ValueError(
                f"train.batch_size ({p.batch_size}) exceeds the {len(data)} train images"
            )
        self._order: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.per_epoch * self.p.epochs

    def order(self, epoch: int) -> np.ndarray:
        """The epoch's permutation of the split's image rows."""
        if self._order is None or self._order[0] != epoch:
            perm = np.random.default_rng([self.p.seed, epoch]).permutation(len(self.data))
            self._order = (epoch, perm)
        return self._order[1]

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        epoch, b = divmod(int(step), self.per_epoch)
        size = self.p.batch_size
        idx = np.sort(self.order(epoch)[b * size : (b + 1) * size])  # sorted: fewer seeks
        rng = np.random.default_rng([self.p.seed, epoch, b])
        offsets = self.data.caption_offsets
        counts = offsets[idx + 1] - offsets[idx]
        cap = offsets[idx] + (rng.random(len(idx)) * counts).astype(np.int64)
        flip = rng.random(len(idx)) < 0.5 if self.flip_only else np.zeros(len(idx), bool)
        mine = slice(self.rank * self.share, (self.rank + 1) * self.share)
        idx, cap, flip = idx[mine], cap[mine], flip[mine]
        if self.cache.image is not None:
            image = torch.from_numpy(self._cached_images(idx, flip))
        elif self.flip_only:
            image, rows = to_pixels(self.data.images[idx]), torch.from_numpy(flip)  # (B, 3, S, S)
            image[rows] = image[rows].flip(-1)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(rng.integers(2**63)) + self.rank)
                image = augment(to_pixels(self.data.images[idx]), self.p.augment)
        if self.cache.text is not None:
            text, mask = self.cache.text_batch(cap)  # the frozen blocks' token states
        else:
            text = torch.from_numpy(self.data.input_ids[cap].astype(np.int64))
            mask = torch.from_numpy(self.data.attention_mask[cap].astype(np.int64))
        return image, text, mask

    def _cached_images(self, idx: np.ndarray, flip: np.ndarray) -> np.ndarray:
        """The frozen stages' output (B, ...) of images `idx`, the flipped view where `flip`."""
        if not flip.any():
            return self.cache.image[idx]
        out = np.empty((len(idx), *self.cache.image.shape[1:]), self.cache.image.dtype)
        out[~flip] = self.cache.image[idx[~flip]]
        out[flip] = self.cache.image_hflip[idx[flip]]
        return out


def train_loader(
    batches: TrainBatches, start: int, stop: int, workers: int, pin_memory: bool
) -> DataLoader:
    """Steps start..stop-1 of the run, a batch per item, on `workers` processes (0: inline)."""
    return DataLoader(
        batches,
        batch_size=None,  # items are whole batches
        sampler=range(start, stop),
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=4 if workers else None,
        # A clean interpreter per worker: forked copies of a process running Prefect's engine
        # exited with code 1 at shutdown in 2 of 4 flow runs (with nothing on stderr).
        multiprocessing_context="spawn" if workers else None,
    )
