"""The training checkpoint: a self-describing file (weights, model config, params hash, MLflow
run id) that evaluate, export and register rebuild the model from."""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import numpy as np
import torch

from model.config import ModelConfig
from model.dual_encoder import DualEncoder
from tasks.common.data import META_FILE, STATS_FILE, read_json

CHECKPOINT = "checkpoint.pt"


def build_model(cfg: ModelConfig, prepared: Path) -> DualEncoder:
    """The configured model, completed with what preprocess decided (vocabulary, pixel stats)."""
    meta = read_json(prepared / META_FILE)
    if cfg.text.pretrained is None:
        if cfg.text.vocab_size not in (None, meta["vocab_size"]):
            raise ValueError(
                f"model.text.vocab_size ({cfg.text.vocab_size}) does not match the tokenizer "
                f"({meta['vocab_size']}); leave it unset, preprocess decides it"
            )
        text = cfg.text.model_copy(
            update={
                "vocab_size": meta["vocab_size"],
                "max_positions": max(cfg.text.max_positions, meta["max_length"]),
            }
        )
        cfg = cfg.model_copy(update={"text": text})
    stats = read_json(prepared / STATS_FILE)
    return DualEncoder(cfg, pixel_stats=(stats["mean"], stats["std"]))


def load_checkpoint(train_dir: Path) -> tuple[DualEncoder, dict]:
    path = Path(train_dir) / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: run the train stage first")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    net = DualEncoder.from_checkpoint(ckpt)
    net.eval()
    return net, ckpt


# Resumable training state -------------------------------------------------------------------
# Files step-<step>.pt under paths.train_state, each written whole (temp file, fsync, rename),
# so the newest one that loads is complete. They hold plain tensors and containers only, and load
# with weights_only=True.

STATE_PREFIX = "step-"
KEEP_STATES = 2  # the newest and the one before it


def state_path(folder: Path, step: int) -> Path:
    return Path(folder) / f"{STATE_PREFIX}{step:09d}.pt"


def save_atomic(obj: dict, path: Path) -> int:
    """torch.save to a temp file, fsync, then rename over `path`: a crash leaves the old file or
    the new one, never a torn one. Returns the bytes written."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power cut
    finally:
        os.close(dir_fd)
    return path.stat().st_size


def save_state(folder: Path, step: int, state: dict) -> int:
    """Write the state of `step`, drop all but the KEEP_STATES newest; return its bytes."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    size = save_atomic(state, state_path(folder, step))
    for old in sorted(folder.glob(f"{STATE_PREFIX}*.pt"))[:-KEEP_STATES]:
        old.unlink()
    return size


def latest_state(folder: Path, resume_key: str) -> tuple[dict | None, list[str]]:
    """The newest state written under `resume_key`, and why newer files were passed over."""
    passed: list[str] = []
    for path in sorted(Path(folder).glob(f"{STATE_PREFIX}*.pt"), reverse=True):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unreadable file is skipped, and said
            passed.append(f"{path.name}: unreadable ({type(err).__name__})")
            continue
        if state.get("resume_key") != resume_key:
            passed.append(f"{path.name}: other params or data")
            continue
        return state, passed
    return None, passed


def clear_states(folder: Path) -> None:
    for path in Path(folder).glob(f"{STATE_PREFIX}*.pt*"):
        path.unlink()


def rng_state() -> dict:
    """Every RNG this process draws from, as tensors and plain containers."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def data_version(prepared: Path) -> str:
    """sha256 of what identifies the prepared data: its meta, pixel stats and split indexes."""
    digest = hashlib.sha256()
    files = [prepared / META_FILE, prepared / STATS_FILE, *sorted(prepared.glob("*/index.jsonl"))]
    for path in files:
        digest.update(path.relative_to(prepared).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()
