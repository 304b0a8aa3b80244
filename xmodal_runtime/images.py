"""Image decoding and resizing: the one definition of the pixels a tower sees.

Preprocess (training, evaluation) and every inference path call `load_image`, so a served image
is decoded, oriented, resized and cropped exactly as the training images were.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})

ImageSource = Path | str | bytes | BinaryIO


# Pillow's own decompression-bomb threshold: a larger image is refused before it is decoded.
MAX_PIXELS = 89_478_485
# Extension of each accepted format, for storing the original bytes under their own name.
FORMAT_EXTENSIONS = {
    "JPEG": "jpg",
    "PNG": "png",
    "WEBP": "webp",
    "GIF": "gif",
    "BMP": "bmp",
    "TIFF": "tif",
    "MPO": "jpg",  # multi-picture JPEG (phone cameras); decodes as its first frame
}


class ImageError(ValueError):
    """An image could not be decoded; the message names it."""


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode as 8-bit RGB: 16/32-bit grey scaled (not clipped) to 8 bits, transparency
    composited over white (not dropped, which leaves whatever colour the hidden pixels had)."""
    if img.mode.startswith("I"):  # I;16, I;16B, I;16L, I: 16-bit grey; convert("RGB") clips at 255
        grey = np.asarray(img, dtype=np.float64).clip(0, 65535) / 257.0
        return Image.fromarray(np.rint(grey).astype(np.uint8), "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def open_rgb(source: ImageSource, max_pixels: int = MAX_PIXELS) -> tuple[Image.Image, str]:
    """Fully decode `source` (a path, the encoded bytes, or a binary file object), apply its EXIF
    orientation: (RGB image, format extension). Refuses more than `max_pixels` before decoding,
    and truncated files (a full decode, not only the header)."""
    name = str(source) if isinstance(source, Path | str) else "<bytes>"
    fp = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        with warnings.catch_warnings():
            # Pillow warns past its own threshold; the max_pixels check below decides instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(fp)
        with img:
            if img.width * img.height > max_pixels:
                raise ImageError(
                    f"image {name} has {img.width}x{img.height} pixels, over the limit of "
                    f"{max_pixels} (a decompression bomb?)"
                )
            ext = FORMAT_EXTENSIONS.get(img.format or "")
            if ext is None:
                raise ImageError(f"image {name}: unsupported format {img.format}")
            img.load()
            return to_rgb(ImageOps.exif_transpose(img)), ext
    except Image.DecompressionBombError as err:
        raise ImageError(f"image {name} refused as a decompression bomb: {err}") from None
    except UnidentifiedImageError:
        # Pillow's message holds the file object's repr (a memory address): not reproducible.
        raise ImageError(f"cannot decode image {name}: not an image format Pillow reads") from None
    except (OSError, ValueError, SyntaxError) as err:
        if isinstance(err, ImageError):
            raise
        raise ImageError(f"cannot decode image {name}: {err}") from None


def load_image(source: ImageSource, size: int, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode as `open_rgb`, resize the short side to `size`, centre-crop: (S, S, 3) uint8 RGB."""
    img, _ = open_rgb(source, max_pixels)
    img = ImageOps.fit(img, (size, size), method=Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


def to_pixels(images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """(N, S, S, 3) uint8 -> (N, 3, S, S) float32 in [0, 1]: the image tower's input."""
    return np.ascontiguousarray(np.asarray(images).transpose(0, 3, 1, 2), dtype=np.float32) / 255.0


def list_images(folder: Path) -> list[Path]:
    """Every image file under `folder`, by suffix, in sorted order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageError(f"images folder not found: {folder}")
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
