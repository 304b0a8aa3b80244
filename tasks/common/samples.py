"""Per-sample validation for ingest: path confinement, a full decode, a pixel limit, captions.

Each source (tasks/common/sources.py) yields `Candidate`s; `check` decides each one in a worker
process and returns the original bytes to store, or the reason it is quarantined. Nothing outside
a source's root is read: names are checked lexically, then after resolving symlinks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from tasks.common import synthetic
from tasks.common.pool import ordered_map
from xmodal_runtime.images import ImageError, open_rgb


class UnsafePath(ValueError):
    """A sample's path would read outside its source root."""


@dataclass(frozen=True)
class Reject:
    """One input item refused, as given, and why: a line of the quarantine report."""

    source: str  # the file it came from, or "builtin"
    where: str  # its place there: "line 7", "images[3]", "annotations[12]"
    item: object  # the item as given
    reason: str

    def line(self) -> dict:
        return {
            "source": self.source,
            "where": self.where,
            "item": self.item,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class Builtin:
    """Generate built-in image `index` in the worker (its captions come with it)."""

    index: int
    seed: int
    size: int
    captions_per_image: int
    min_objects: int
    max_objects: int


@dataclass(frozen=True)
class Candidate:
    """A sample a source proposes: its image (a name under `root`, bytes in hand, or a built-in
    recipe), its captions, and the input items that stand or fall with it."""

    image_id: int
    name: str
    source: str  # where the items came from, for the quarantine report
    items: list[tuple[str, object]]  # (where, item as given)
    captions: list[str] = field(default_factory=list)
    root: str | None = None  # the folder `name` must stay inside
    data: bytes | Builtin | None = None


@dataclass(frozen=True)
class Accepted:
    image_id: int
    name: str
    captions: list[str]
    data: bytes  # the original encoded bytes, unchanged
    ext: str  # jpg | png | ...
    sha256: str
    items: int  # input items it accounts for


def resolve_inside(root: Path, name: str) -> Path:
    """`root / name` as a real path, refused when `name` is absolute, climbs with `..`, or
    resolves (through symlinks) outside `root`."""
    pure = PurePosixPath(name)
    if not name or pure.is_absolute() or name.startswith("\\") or ":" in pure.parts[0]:
        raise UnsafePath(f"absolute path {name!r} (names must be relative to the source root)")
    if ".." in pure.parts:
        raise UnsafePath(f"path {name!r} climbs out of the source root with '..'")
    real_root = Path(root).resolve()
    real = (real_root / pure).resolve()
    if not real.is_relative_to(real_root):
        raise UnsafePath(f"path {name!r} is a symlink resolving outside the source root: {real}")
    return real


def _read(c: Candidate) -> tuple[bytes, list[str]]:
    if isinstance(c.data, Builtin):
        b = c.data
        img, caps = synthetic.generate(
            b.index, b.seed, b.size, b.captions_per_image, b.min_objects, b.max_objects
        )
        return synthetic.png_bytes(img), caps
    if isinstance(c.data, bytes):
        return c.data, c.captions
    path = resolve_inside(Path(c.root), c.name)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {c.name}")
    return path.read_bytes(), c.captions


def check(c: Candidate, max_pixels: int) -> Accepted | str:
    """Accept `c` (original bytes, sha256, format) or say why not; runs in a worker process."""
    try:
        data, captions = _read(c)
        if not data:
            return "empty file"
        _, ext = open_rgb(data, max_pixels)
    except (UnsafePath, ImageError) as err:
        return str(err)
    except OSError as err:
        return f"cannot read {c.name}: {err.strerror or err}"
    captions = [t for t in (s.strip() for s in captions) if t]
    if not captions:
        return "no non-empty caption"
    sha = hashlib.sha256(data).hexdigest()
    return Accepted(c.image_id, c.name, captions, data, ext, sha, len(c.items))


def check_all(
    candidates: Iterable[Candidate], max_pixels: int, workers: int, dask_address: str | None = None
) -> Iterator[tuple[Candidate, Accepted | str]]:
    """Each candidate with its verdict, in input order, on `workers` processes or a Dask cluster."""
    return ordered_map(check, candidates, workers, dask_address=dask_address, max_pixels=max_pixels)
