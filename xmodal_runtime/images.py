"""Image decoding and resizing: the one definition of the pixels a tower sees.

Preprocess (training, evaluation) and every inference path call `load_image`, so a served image
is decoded, oriented, resized and cropped exactly as the training images were.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})

ImageSource = Path | str | bytes | BinaryIO


class ImageError(ValueError):
    """An image could not be decoded; the message names it."""


def load_image(source: ImageSource, size: int) -> np.ndarray:
    """Decode, apply EXIF orientation, resize the short side to `size`, centre-crop: (S, S, 3)
    uint8 RGB. `source` is a path, the encoded bytes, or a binary file object."""
    name = str(source) if isinstance(source, Path | str) else "<bytes>"
    fp = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        with Image.open(fp) as img:
            img = ImageOps.exif_transpose(img).convert("RGB")
            img = ImageOps.fit(img, (size, size), method=Image.Resampling.BICUBIC)
            return np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ImageError(f"cannot decode image {name}: {err}") from None


def to_pixels(images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """(N, S, S, 3) uint8 -> (N, 3, S, S) float32 in [0, 1]: the image tower's input."""
    return np.ascontiguousarray(np.asarray(images).transpose(0, 3, 1, 2), dtype=np.float32) / 255.0


def list_images(folder: Path) -> list[Path]:
    """Every image file under `folder`, by suffix, in sorted order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageError(f"images folder not found: {folder}")
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
