"""Tokenisation with Hugging Face `tokenizers` (no transformers, no torch).

Reads the tokenizer.json that training saved, and pads and truncates as transformers'
`tokenizer(texts, padding=..., truncation=True, max_length=...)` does: the same ids (tested).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from xmodal_runtime.bundle import TOKENIZER_FILE


def _pad_token(folder: Path) -> str:
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = folder / name
        if path.is_file():
            token = json.loads(path.read_text()).get("pad_token")
            if isinstance(token, dict):
                token = token.get("content")
            if token:
                return token
    return "[PAD]"


class TextTokenizer:
    """texts -> (input_ids, attention_mask), both (N, L) int64, L <= max_length."""

    def __init__(self, folder: Path | str, max_length: int) -> None:
        folder = Path(folder)
        self.max_length = max_length
        self._tok = Tokenizer.from_file(str(folder / TOKENIZER_FILE))
        self._tok.no_padding()
        self._tok.enable_truncation(max_length)
        pad = _pad_token(folder)
        pad_id = self._tok.token_to_id(pad)
        if pad_id is None:
            raise ValueError(f"{folder}: pad token {pad!r} is not in the vocabulary")
        self.pad_id, self.pad_token = pad_id, pad

    def __call__(
        self, texts: Sequence[str], pad_to_max_length: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Pad to the longest text, or to max_length when `pad_to_max_length` (training's)."""
        if pad_to_max_length:
            self._tok.enable_padding(
                pad_id=self.pad_id, pad_token=self.pad_token, length=self.max_length
            )
        else:
            self._tok.enable_padding(pad_id=self.pad_id, pad_token=self.pad_token)
        encs = self._tok.encode_batch([str(t) for t in texts])
        if not encs:
            return np.zeros((0, 0), np.int64), np.zeros((0, 0), np.int64)
        ids = np.array([e.ids for e in encs], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encs], dtype=np.int64)
        return ids, mask
