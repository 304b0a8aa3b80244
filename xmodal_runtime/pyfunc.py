"""The registered model's MLflow pyfunc: texts or images in, L2-normalised embeddings out.

Logged as "models from code" with this package as its code, so it loads wherever its own
requirements are installed, without this repository. Input: a DataFrame with a `text` column
(strings) and/or an `image` column (base64-encoded image bytes, or raw bytes); each row sets
exactly one of them. Output: (N, D) float32 embeddings, one row per input row, in order.
"""

from __future__ import annotations

import base64
import binascii

import mlflow
import numpy as np
import pandas as pd

from xmodal_runtime.bundle import Bundle
from xmodal_runtime.encoder import Encoder

BUNDLE_ARTIFACT = "bundle"
COLUMNS = ("text", "image")


def _present(value) -> bool:
    return value is not None and not (isinstance(value, float) and np.isnan(value))


def decode_image_field(value: str | bytes, row: int) -> bytes:
    """Base64 text (what JSON carries) or raw bytes -> the encoded image bytes."""
    if isinstance(value, bytes | bytearray) and not value[:1].isalnum():
        return bytes(value)  # raw image bytes: no image format starts with a base64 character
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise ValueError(f"row {row}: `image` is not base64-encoded bytes") from None


class DualEncoderPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        self.encoder = Encoder(Bundle.open(context.artifacts[BUNDLE_ARTIFACT]), provider="auto")

    def predict(self, context, model_input: pd.DataFrame, params=None) -> np.ndarray:
        if not isinstance(model_input, pd.DataFrame):
            model_input = pd.DataFrame(model_input)
        unknown = [c for c in model_input.columns if c not in COLUMNS]
        if unknown or not any(c in model_input.columns for c in COLUMNS):
            raise ValueError(f"expected a `text` and/or an `image` column, got {list(model_input)}")
        texts, images = {}, {}
        for row, rec in enumerate(model_input.to_dict("records")):
            text, image = rec.get("text"), rec.get("image")
            if _present(text) == _present(image):
                raise ValueError(f"row {row}: set exactly one of `text` and `image`")
            if _present(text):
                texts[row] = str(text)
            else:
                images[row] = decode_image_field(image, row)
        out = np.zeros((len(model_input), self.encoder.embed_dim), np.float32)
        if texts:
            out[list(texts)] = self.encoder.encode_texts(list(texts.values()))
        if images:
            out[list(images)] = self.encoder.encode_images(list(images.values()))
        return out
