"""Small helpers of the stage entries that run many short jobs (the research and utility graphs):
a process pool whose workers load their data once, and JSON files written strictly.

The pool: on a small CPU two single-threaded processes get more done than one process with two
threads. Each worker runs ``init(needs, threads)`` once (a module-level function that loads what
the jobs need and sets torch's thread count), then its jobs; results come back in job order.
"""
from __future__ import annotations

import json
import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence


def pool_map(fn: Callable[[Any], Any], jobs: Sequence[Any], needs: Sequence[str], workers: int,
             threads: int, init: Callable[[Sequence[str], int], None]) -> list[Any]:
    """``[fn(job) for job in jobs]`` over ``workers`` spawned processes of ``threads`` torch threads
    each; in this process (with ``workers * threads`` threads) when one worker suffices."""
    n = max(1, min(int(workers), len(jobs)))
    if n == 1:  # the stage's whole share of cores to the one process
        init(needs, int(threads) * max(1, int(workers)))
        return [fn(j) for j in jobs]
    ex = ProcessPoolExecutor(n, mp_context=mp.get_context("spawn"), initializer=init,
                             initargs=(tuple(needs), threads))
    with ex:
        futures = [ex.submit(fn, j) for j in jobs]
        return [f.result() for f in futures]


def read_json(file: Path) -> Any:
    return json.loads(Path(file).read_text())


def _plain(x: Any) -> Any:
    """numpy scalars / arrays -> Python numbers / lists (for ``json.dumps``)."""
    if hasattr(x, "tolist"):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def write_json(file: Path, obj: Any) -> None:
    """``obj`` as indented JSON (NaN and infinities refused), parent folders created."""
    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(obj, indent=1, default=_plain, allow_nan=False) + "\n")


def log(msg: str) -> None:
    print(msg, flush=True)
