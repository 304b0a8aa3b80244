"""An ordered, bounded process-pool map, shared by ingest (validation) and preprocess (decoding)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from itertools import islice
from multiprocessing import get_context
from typing import Any


def workers_for(n: int) -> int:
    """`n` worker processes, 0 meaning every core this process may use."""
    return n or len(os.sched_getaffinity(0))


def ordered_map(
    fn: Callable[..., Any], items: Iterable, workers: int, block: int = 1024, **kwargs
) -> Iterator[tuple[Any, Any]]:
    """(item, fn(item, **kwargs)) in input order, on `workers` processes (0: every core; 1: in
    this process). Items are submitted a block at a time, so at most `block` are in flight
    whatever the input's length."""
    call = partial(fn, **kwargs)
    n = workers_for(workers)
    if n == 1:
        for item in items:
            yield item, call(item)
        return
    # spawn, not fork: the parent may hold Prefect/MLflow threads, which fork would copy mid-lock.
    with ProcessPoolExecutor(n, mp_context=get_context("spawn")) as pool:
        it = iter(items)
        while chunk := list(islice(it, block)):
            yield from zip(chunk, pool.map(call, chunk, chunksize=32), strict=True)
