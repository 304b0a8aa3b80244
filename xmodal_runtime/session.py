"""ONNX Runtime sessions that use CUDA only when it actually initialises, without error spam."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort

log = logging.getLogger("xmodal")

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
PROVIDERS = ("auto", "cpu", "cuda")
_WARNING, _FATAL = 2, 4


def _options(threads: int, severity: int) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.log_severity_level = severity
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
    return so


def make_session(
    path: Path | str, provider: str = "auto", threads: int = 0
) -> ort.InferenceSession:
    """A session on CUDA when asked for (or 'auto') and it initialises, else on the CPU.

    onnxruntime-gpu lists CUDAExecutionProvider even without libcuda; the only reliable test is to
    create a session and see which providers it kept. The probe runs with logging silenced.
    """
    if provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {PROVIDERS}, not {provider!r}")
    path = str(path)
    if provider in ("auto", "cuda") and CUDA in ort.get_available_providers():
        ort.set_default_logger_severity(_FATAL)
        try:
            sess = ort.InferenceSession(path, _options(threads, _FATAL), providers=[CUDA, CPU])
        except Exception:  # noqa: BLE001 - any failure to initialise CUDA means "use the CPU"
            sess = None
        finally:
            ort.set_default_logger_severity(_WARNING)
        if sess is not None and sess.get_providers()[0] == CUDA:
            return sess
        if provider == "cuda":
            raise RuntimeError("provider is 'cuda' but CUDAExecutionProvider did not initialise")
        log.info("ONNX Runtime: CUDA unavailable, using the CPU")
    return ort.InferenceSession(path, _options(threads, _WARNING), providers=[CPU])


def run_chunked(sess: ort.InferenceSession, feeds: dict[str, np.ndarray], chunk: int) -> np.ndarray:
    """Run a session over the first axis of the feeds in chunks; concatenate the first output."""
    n = next(iter(feeds.values())).shape[0]
    if len(feeds) == 1:
        (name, array), = feeds.items()  # fmt: skip
        outs = [run_bound(sess, name, array[i : i + chunk]) for i in range(0, n, chunk)]
    else:
        outs = [
            sess.run(None, {k: v[i : i + chunk] for k, v in feeds.items()})[0]
            for i in range(0, n, chunk)
        ]
    if outs:
        return np.concatenate(outs)
    return np.zeros((0, sess.get_outputs()[0].shape[-1]), np.float32)


def run_bound(sess: ort.InferenceSession, name: str, array: np.ndarray) -> np.ndarray:
    """One input, first output; on CUDA through I/O binding (one host-to-device copy, no
    per-call allocation of the output by Python), elsewhere a plain run."""
    if sess.get_providers()[0] != CUDA:
        return sess.run(None, {name: array})[0]
    binding = sess.io_binding()
    binding.bind_cpu_input(name, np.ascontiguousarray(array))
    binding.bind_output(sess.get_outputs()[0].name)
    sess.run_with_iobinding(binding)
    return binding.copy_outputs_to_cpu()[0]
