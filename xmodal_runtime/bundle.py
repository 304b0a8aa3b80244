"""The exported bundle: its file names, the meta.json schema and variant selection.

The one place these are spelled. Export writes a bundle, and inference, promotion, the MLflow
pyfunc and the registry read it, through this module only:

    <bundle>/
      image_encoder.onnx, text_encoder.onnx           fp32 towers (always)
      image_encoder.<variant>.onnx, text_encoder.<variant>.onnx   int8 / fp16 (optional)
      tokenizer/tokenizer.json                        the text tower's tokenizer (HF `tokenizers`)
      meta.json                                       Meta below
      sha256.json                                     every other file's sha256, by path

A bundle's identity is `Bundle.digest()`: one sha256 over its files' hashes (`bundle_digest`).
Export writes sha256.json last and register copies it into the version's tags; `Bundle.open`
checks every file against it, so a file changed, added or removed after export is refused by
name before anything loads it. A bundle exported before sha256.json existed opens with a
warning (nothing to check it against).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

log = logging.getLogger("xmodal")

META_FILE = "meta.json"
MANIFEST_FILE = "sha256.json"
# A registered version's tag per bundle file: `sha256.<path>` = its hex digest.
HASH_TAG = "sha256."
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
    def open(cls, folder: Path | str, verify: bool = True) -> Bundle:
        """The bundle in `folder`, its layout checked and (`verify`) every file's sha256 checked
        against sha256.json. Export alone opens a bundle it is still writing unverified."""
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
        if verify and (root / MANIFEST_FILE).is_file():
            verify_files(root)
        elif verify:
            # Exported before file hashes were recorded: loadable, but nothing vouches for it.
            # A registered version's own hashes (its tags) are still checked by the registry.
            log.warning(
                "%s has no %s: its files cannot be verified (exported before file hashes were "
                "recorded; export it again to have them)",
                root,
                MANIFEST_FILE,
            )
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

    def file_hashes(self) -> dict[str, str]:
        """sha256 (hex) of each file of the bundle, by its relative posix path, sorted."""
        return file_hashes(self.root)

    def digest(self) -> str:
        """The bundle's sha256: see `bundle_digest`."""
        return bundle_digest(self.file_hashes())

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


def file_hashes(folder: Path | str) -> dict[str, str]:
    """sha256 (hex) of every file under `folder`, recursively, by relative posix path, sorted."""
    root = Path(folder)
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        with open(path, "rb") as f:
            out[path.relative_to(root).as_posix()] = hashlib.file_digest(f, "sha256").hexdigest()
    return dict(sorted(out.items()))


def bundle_digest(hashes: dict[str, str]) -> str:
    """One sha256 for a bundle: over its sorted `<path>  <sha256>` lines, each ending in a
    newline (`file_hashes`). Equal for an exported folder and its copy downloaded from the
    registry; any change to any file changes it."""
    lines = "".join(f"{path}  {digest}\n" for path, digest in sorted(hashes.items()))
    return hashlib.sha256(lines.encode("utf-8")).hexdigest()


def write_manifest(folder: Path | str) -> dict[str, str]:
    """Record the sha256 of every file of the bundle in sha256.json (export's last step)."""
    hashes = {k: v for k, v in file_hashes(folder).items() if k != MANIFEST_FILE}
    (Path(folder) / MANIFEST_FILE).write_text(json.dumps({"sha256": hashes}, indent=2))
    return hashes


def read_manifest(folder: Path | str) -> dict[str, str]:
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        raise BundleError(
            f"{folder} has no {MANIFEST_FILE}, so its files cannot be verified (exported before "
            "hashes were recorded?): export it again"
        )
    try:
        return dict(json.loads(path.read_text())["sha256"])
    except (ValueError, KeyError, TypeError) as err:
        raise BundleError(f"{path} is not a valid file-hash manifest: {err}") from None


def verify_files(folder: Path | str, expected: dict[str, str] | None = None) -> dict[str, str]:
    """Check every file against the manifest (or `expected`, e.g. the registry's tags); raise a
    BundleError naming the first file changed, missing or added since. Returns the hashes."""
    expected = read_manifest(folder) if expected is None else expected
    actual = {k: v for k, v in file_hashes(folder).items() if k != MANIFEST_FILE}
    for name in sorted(set(expected) | set(actual)):
        if name not in actual:
            raise BundleError(f"{Path(folder) / name} is missing: it was part of the export")
        if name not in expected:
            raise BundleError(
                f"{Path(folder) / name} was not part of the export (not in its hashes)"
            )
        if actual[name] != expected[name]:
            raise BundleError(
                f"{Path(folder) / name} changed after export: sha256 {actual[name][:16]}..., "
                f"recorded {expected[name][:16]}...; refusing to load it"
            )
    return actual
