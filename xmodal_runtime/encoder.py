"""`Encoder`: an exported bundle in, L2-normalised embeddings out, through ONNX Runtime."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from xmodal_runtime.bundle import IMAGE_INPUT, IMAGE_TOWER, TEXT_INPUTS, TEXT_TOWER, Bundle
from xmodal_runtime.images import ImageSource, load_image, to_pixels
from xmodal_runtime.session import make_session, run_chunked
from xmodal_runtime.text import TextTokenizer


class Encoder:
    """Both towers of one bundle variant. Sessions are created on first use."""

    def __init__(
        self,
        bundle: Bundle | Path | str,
        variant: str = "fp32",
        provider: str = "auto",
        threads: int = 0,
        chunk_size: int = 256,
    ) -> None:
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
        self.variant, self.provider_request, self.threads = variant, provider, threads
        self.chunk_size = chunk_size
        self._image_path = self.bundle.tower(IMAGE_TOWER, variant)
        self._text_path = self.bundle.tower(TEXT_TOWER, variant)
        self._image: ort.InferenceSession | None = None
        self._text: ort.InferenceSession | None = None
        self._tokenizer: TextTokenizer | None = None

    @property
    def image_size(self) -> int:
        return self.bundle.meta.image_size

    @property
    def embed_dim(self) -> int:
        return self.bundle.meta.embed_dim

    @property
    def image_session(self) -> ort.InferenceSession:
        if self._image is None:
            self._image = make_session(self._image_path, self.provider_request, self.threads)
        return self._image

    @property
    def text_session(self) -> ort.InferenceSession:
        if self._text is None:
            self._text = make_session(self._text_path, self.provider_request, self.threads)
        return self._text

    @property
    def tokenizer(self) -> TextTokenizer:
        if self._tokenizer is None:
            self._tokenizer = TextTokenizer(self.bundle.tokenizer_dir, self.bundle.meta.max_length)
        return self._tokenizer

    @property
    def provider(self) -> str:
        """The provider the image tower runs on (created if needed)."""
        return self.image_session.get_providers()[0]

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """(N, 3, S, S) float32 in [0, 1] -> (N, D), L2-normalised."""
        if len(pixels) == 0:
            return np.zeros((0, self.embed_dim), np.float32)
        return run_chunked(self.image_session, {IMAGE_INPUT: pixels}, self.chunk_size)

    def encode_images(self, images: Sequence[ImageSource | np.ndarray]) -> np.ndarray:
        """Paths, encoded bytes or decoded (S, S, 3) uint8 arrays -> (N, D), L2-normalised."""
        arrays = [
            im if isinstance(im, np.ndarray) else load_image(im, self.image_size) for im in images
        ]
        if not arrays:
            return np.zeros((0, self.embed_dim), np.float32)
        return self.encode_pixels(to_pixels(np.stack(arrays)))

    def encode_tokens(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """(N, L) int64 token ids and mask -> (N, D), L2-normalised."""
        if len(input_ids) == 0:
            return np.zeros((0, self.embed_dim), np.float32)
        feeds = dict(zip(TEXT_INPUTS, (input_ids, attention_mask), strict=True))
        return run_chunked(self.text_session, feeds, self.chunk_size)

    def encode_texts(self, texts: Sequence[str], pad_to_max_length: bool = False) -> np.ndarray:
        """Texts -> (N, D), L2-normalised."""
        if not texts:
            return np.zeros((0, self.embed_dim), np.float32)
        return self.encode_tokens(*self.tokenizer(texts, pad_to_max_length))
