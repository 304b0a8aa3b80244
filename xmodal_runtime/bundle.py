"""The exported bundle: its file names, the meta.json schema and variant selection.

The one place these are spelled. Export writes a bundle, and inference, promotion, the MLflow
pyfunc and the registry read it, through this module only:

    <bundle>/
      image_encoder.onnx, text_encoder.onnx           fp32 towers (always)
      image_encoder.<variant>.onnx, text_encoder.<variant>.onnx   int8 / fp16 (optional)
      tokenizer/tokenizer.json                        the text tower's tokenizer (HF `tokenizers`)
      meta.json                                       Meta below
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

META_FILE = "meta.json"
TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILE = "tokenizer.json"
IMAGE_TOWER = "image_encoder"
TEXT_TOWER = "text_encoder"
TOWERS = (IMAGE_TOWER, TEXT_TOWER)
VARIANTS = ("fp32", "int8", "fp16")
# Graph input and output names, fixed at export.
IMAGE_INPUT = "pixels"
TEXT_INPUTS = ("input_ids", "attention_mask")
OUTPUT = "embeddings"
SCHEMA_VERSION = 1


class BundleError(ValueError):
    """A folder is not a usable bundle; the message names the missing or malformed part."""


def tower_file(tower: str, variant: str = "fp32") -> str:
    """image_encoder.onnx for fp32, image_encoder.int8.onnx for int8, and so on."""
    if tower not in TOWERS:
        raise BundleError(f"unknown tower {tower!r}; expected one of {TOWERS}")
    if variant not in VARIANTS:
        raise BundleError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    return f"{tower}.onnx" if variant == "fp32" else f"{tower}.{variant}.onnx"


@dataclass(frozen=True)
class Meta:
    """meta.json: what a consumer needs to feed the towers, and where the model came from."""

    image_size: int  # pixels: float32 (B, 3, S, S) RGB in [0, 1]; normalisation is in the graph
    max_length: int  # tokens per text, special tokens included
    embed_dim: int  # output: (B, embed_dim), L2-normalised
    opset: int
    params_hash: str | None = None  # the training params hash (see README, "Params hash")
    model_config: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = META_FILE) -> Meta:
        known = {f.name for f in fields(cls)}
        missing = [k for k in ("image_size", "max_length", "embed_dim", "opset") if k not in data]
        if missing:
            raise BundleError(f"{source}: missing {', '.join(missing)}")
        version = data.get("schema_version", SCHEMA_VERSION)
        if version > SCHEMA_VERSION:
            raise BundleError(
                f"{source}: schema_version {version} is newer than this runtime reads "
                f"({SCHEMA_VERSION}); upgrade xmodal"
            )
        meta = cls(**{k: v for k, v in data.items() if k in known})
        for name in ("image_size", "max_length", "embed_dim"):
            value = getattr(meta, name)
            if not isinstance(value, int) or value < 1:
                raise BundleError(f"{source}: {name} must be a positive integer (got {value!r})")
        return meta

    def write(self, folder: Path) -> Path:
        path = Path(folder) / META_FILE
        path.write_text(json.dumps(asdict(self), indent=2))
        return path


@dataclass(frozen=True)
class Bundle:
    """An exported model folder, checked on open."""

    root: Path
    meta: Meta

    @classmethod
    def open(cls, folder: Path | str) -> Bundle:
        root = Path(folder)
        if not root.is_dir():
            raise BundleError(f"model folder not found: {root}")
        meta_path = root / META_FILE
        if not meta_path.is_file():
            raise BundleError(f"{root} is not an exported model folder: {META_FILE} is missing")
        try:
            data = json.loads(meta_path.read_text())
        except json.JSONDecodeError as err:
            raise BundleError(f"{meta_path} is not valid JSON: {err}") from None
        bundle = cls(root, Meta.from_dict(data, str(meta_path)))
        for tower in TOWERS:
            bundle.tower(tower, "fp32")
        if not bundle.tokenizer_file.is_file():
            raise BundleError(f"{root} is not an exported model folder: {bundle.tokenizer_file} "
                              "is missing")  # fmt: skip
        return bundle

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / TOKENIZER_DIR

    @property
    def tokenizer_file(self) -> Path:
        return self.tokenizer_dir / TOKENIZER_FILE

    def variants(self) -> list[str]:
        """The variants whose two towers are both present."""
        return [
            v for v in VARIANTS if all((self.root / tower_file(t, v)).is_file() for t in TOWERS)
        ]

    def tower(self, tower: str, variant: str = "fp32") -> Path:
        path = self.root / tower_file(tower, variant)
        if not path.is_file():
            raise BundleError(
                f"{self.root} has no {variant} {tower} ({path.name}); "
                f"variants present: {', '.join(self.variants()) or 'none'}"
            )
        return path


def find_bundle(folder: Path | str) -> Path:
    """The bundle inside a downloaded artifact tree (the folder holding meta.json)."""
    found = sorted(Path(folder).rglob(META_FILE))
    if not found:
        raise BundleError(f"{folder} holds no exported model ({META_FILE} not found)")
    return found[0].parent
