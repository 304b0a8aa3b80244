"""Preprocess's per-image work, in a module of its own: decoding processes import only this,
not the stage with its Prefect and transformers imports."""

from __future__ import annotations

import numpy as np

from tasks.common.dataset import DatasetError, RawSample
from xmodal_runtime.images import ImageError, load_image


def decode_sample(sample: RawSample, size: int) -> np.ndarray:
    """The sample's image as the towers see it: (S, S, 3) uint8."""
    try:
        return load_image(sample.data, size)
    except ImageError as err:
        raise DatasetError(f"sample {sample.record.image_id}: {err}") from None
