"""Run independent jobs in worker processes, one torch thread each, with live progress.

On a few shared cores one torch thread per process is several times faster than one
process with more threads (OpenMP threads spin while they wait for a core), so the
benchmark trains experts and runs merges as jobs in ``workers`` processes. Each job runs
in a fresh process (so a job's measured peak memory is its own), started with ``spawn``;
its ``progress`` calls travel back through a queue to the caller's callback.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Any, TypeVar

import torch

from supermerge.errors import SupermergeError
from supermerge.progress import Progress

T = TypeVar("T")

_QUEUE: Any = None


def run_jobs(
    function: Callable[..., T],
    jobs: Sequence[tuple[Any, ...]],
    *,
    workers: int,
    progress: Progress,
    on_done: Callable[[T], None] | None = None,
) -> list[T]:
    """Return ``[function(*job, progress=...) for job in jobs]``, computed in parallel.

    With ``workers`` <= 1 (or one job) the jobs run here, one after another. Otherwise
    ``function`` and the jobs must be picklable (a module-level function, plain data),
    and the calling program's entry point must be guarded by ``if __name__ ==
    "__main__":`` as for any spawned process. ``on_done`` sees each result as it arrives.
    A job's SupermergeError is re-raised here; any other failure of a worker becomes a
    SupermergeError. Costs a process start (about 3 s: torch's import) per job.
    """
    done = on_done or (lambda result: None)
    if workers <= 1 or len(jobs) <= 1:
        results = []
        for job in jobs:
            results.append(function(*job, progress=progress))
            done(results[-1])
        return results
    context = multiprocessing.get_context("spawn")
    queue = context.SimpleQueue()
    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=context,
                             initializer=_start_worker, initargs=(queue,),
                             max_tasks_per_child=1) as pool:
        futures = [pool.submit(_call, function, job) for job in jobs]
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            _drain(queue, progress)
            for future in finished:
                if future.exception() is None:
                    done(future.result())
        _drain(queue, progress)
        try:
            return [future.result() for future in futures]
        except SupermergeError:
            raise
        except Exception as err:
            raise SupermergeError(f"a worker process failed: {err!r}",
                                  fix="rerun with --workers 1 to see the full error") from err


def _start_worker(queue: Any) -> None:
    """Initialise a worker: the progress queue, one torch thread, no transformers bars."""
    from transformers.utils import logging as transformers_logging

    global _QUEUE
    _QUEUE = queue
    torch.set_num_threads(1)
    transformers_logging.disable_progress_bar()  # a worker has no screen of its own


def _report(stage: str, done: int, total: int, info: Any = None) -> None:
    """Send a progress event (the Progress signature, info included) to the parent."""
    _QUEUE.put((stage, done, total) if info is None else (stage, done, total, info))


def _call(function: Callable[..., T], job: tuple[Any, ...]) -> T:
    return function(*job, progress=_report)


def _drain(queue: Any, progress: Progress) -> None:
    while not queue.empty():
        progress(*queue.get())
