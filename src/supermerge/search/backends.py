"""Where candidates are scored: this process, a pool of local processes, or Ray actors.

Every backend builds its scorers once from a :data:`~supermerge.search.evaluator.
ScorerFactory` and keeps them (and so the base and the task vectors) resident; a
candidate travels as a few numbers and a score comes back. Results always come back in
the order of the candidates, so a search makes the same decisions on every backend.

Memory: each worker holds one scorer: for an :class:`~supermerge.search.Evaluator` the
base, K task vectors and one merged copy, i.e. about (K + 2) x the model's size.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Protocol

from supermerge.errors import SupermergeError
from supermerge.search.errors import SearchError
from supermerge.search.evaluator import Scorer, ScorerFactory, Scores
from supermerge.search.space import Candidate

log = logging.getLogger(__name__)


class Backend(Protocol):
    """Scores batches of candidates; ``close`` frees its workers."""

    def map(self, candidates: Sequence[Candidate]) -> list[Scores]:
        """Return the scores of ``candidates``, in their order."""
        ...

    def close(self) -> None:
        """Release the workers (a closed backend cannot score again)."""
        ...


class LocalBackend:
    """Scores in this process (``workers=0``) or in ``workers`` spawned processes.

    In-process, the scorer is built on the first :meth:`map`. A pool builds one scorer per
    process (the factory must pickle, e.g. a ``functools.partial`` of a module-level
    function) and gives each process ``threads`` torch threads (default: the CPUs divided
    among the workers). A script using a pool must guard its entry point with
    ``if __name__ == "__main__":``.
    """

    def __init__(self, factory: ScorerFactory, *, workers: int = 0,
                 threads: int | None = None) -> None:
        self.factory, self.workers = factory, workers
        self._scorer: Scorer | None = None
        self._pool: ProcessPoolExecutor | None = None
        if workers > 0:
            threads = threads or max(1, (os.cpu_count() or 1) // workers)
            self._pool = ProcessPoolExecutor(
                workers, mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_worker, initargs=(factory, threads))

    def map(self, candidates: Sequence[Candidate]) -> list[Scores]:
        """Return the scores of ``candidates`` in order; costs one score per candidate."""
        if self._pool is None:
            if self._scorer is None:
                self._scorer = self.factory()
            return [self._scorer.score(c) for c in candidates]
        try:
            return list(self._pool.map(_score_in_worker, candidates))
        except SupermergeError:
            raise
        except Exception as err:  # a worker died or its factory failed
            raise SearchError(f"scoring failed in a worker process: {err!r}",
                              fix="run with workers=0 (--workers 0) to see the full error"
                              ) from err

    def close(self) -> None:
        """Shut the pool down (no-op in-process)."""
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None
        self._scorer = None

    def __enter__(self) -> LocalBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_WORKER_SCORER: Scorer | None = None


def _start_worker(factory: ScorerFactory, threads: int) -> None:
    import torch

    global _WORKER_SCORER
    torch.set_num_threads(threads)
    _WORKER_SCORER = factory()


def _score_in_worker(candidate: Candidate) -> Scores:
    assert _WORKER_SCORER is not None, "worker started without its scorer"
    return _WORKER_SCORER.score(candidate)


class _ScorerActor:
    """A Ray actor holding one scorer (and so the resident weights) for its lifetime."""

    def __init__(self, factory: ScorerFactory, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        self.scorer = factory()

    def score(self, candidate: Candidate) -> Scores:
        return self.scorer.score(candidate)


class RayBackend:
    """Scores on ``actors`` Ray actors, each holding its own scorer built by ``factory``.

    Connects to the cluster at ``address`` (``"auto"``: the one this node belongs to; a
    ``ray://host:10001`` client address; None: the running Ray, or a new local one) unless
    Ray is already initialised. Each actor reserves ``cpus_per_actor`` CPUs (and as many
    torch threads) and ``gpus_per_actor`` GPUs. The factory is pickled to every actor, so
    the paths it names must exist on every node. Costs one scorer build per actor (in
    parallel) before the first :meth:`map`.
    """

    def __init__(self, factory: ScorerFactory, *, actors: int = 2, cpus_per_actor: int = 1,
                 gpus_per_actor: float = 0, address: str | None = None,
                 init_options: dict[str, Any] | None = None) -> None:
        try:
            import ray
        except ImportError:
            raise SearchError("the Ray backend needs ray",
                              fix="pip install 'supermerge[ray]', or use the local backend"
                              ) from None
        self._ray = ray
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            ray.init(address=address, **(init_options or {}))
        actor = ray.remote(num_cpus=cpus_per_actor, num_gpus=gpus_per_actor)(_ScorerActor)
        self._actors = [actor.remote(factory, cpus_per_actor) for _ in range(actors)]
        self._pool = ray.util.ActorPool(self._actors)

    def map(self, candidates: Sequence[Candidate]) -> list[Scores]:
        """Return the scores of ``candidates`` in order; candidates go to idle actors."""
        try:
            return list(self._pool.map(lambda actor, c: actor.score.remote(c), candidates))
        except self._ray.exceptions.RayTaskError as err:
            if isinstance(err.cause, SupermergeError):
                raise err.cause from None
            raise SearchError(f"scoring failed on a Ray actor: {err.cause!r}",
                              fix="run with the local backend to see the full error") from err
        except self._ray.exceptions.RayActorError as err:
            raise SearchError(f"a Ray actor died: {err}",
                              fix="check the actors' memory: each holds the base and the "
                              "task vectors") from err

    def close(self) -> None:
        """Kill the actors; shut Ray down if this backend started it."""
        for actor in self._actors:
            self._ray.kill(actor)
        self._actors = []
        if self._owns_ray:
            self._ray.shutdown()

    def __enter__(self) -> RayBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_backend(kind: str, factory: ScorerFactory, *, workers: int = 0,
                 address: str | None = None, cpus_per_actor: int = 1) -> Backend:
    """Return a backend by name: ``local`` (``workers`` processes, 0: in-process) or ``ray``
    (``workers`` actors, at least 1). Raises SearchError for another name."""
    if kind == "local":
        return LocalBackend(factory, workers=workers)
    if kind == "ray":
        return RayBackend(factory, actors=max(1, workers), address=address,
                          cpus_per_actor=cpus_per_actor)
    raise SearchError(f"unknown backend {kind!r}", fix="use local or ray")
