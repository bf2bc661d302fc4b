"""Data-parallel learned merging: 2 gloo processes learn the coefficients one process learns."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from supermerge.learn import Task as LearnTask
from supermerge.learn import TaskData, adamerging, supermerge
from supermerge.learn.distributed import TorchDataParallel, init_from_env, learn_data_parallel
from supermerge.learn.errors import LearnError
from supermerge.search.toy import toy_problem

# uneven shards (batch 7 -> 4 + 3 examples), held-out selection, a hierarchical tree,
# task vectors streamed from a file with the blocks built as they run
RUNS = {
    "supermerge": {"steps": 12, "batch_size": 7, "eval_every": 4, "lr": 0.05,
                   "hierarchical": True, "fan_in": 2},
    "adamerging": {"steps": 12, "batch_size": 7, "eval_every": 4, "lr": 0.05,
                   "memory": "stream"},
}


def problem():
    module, experts, tasks = toy_problem(3, seed=2, examples=40)
    return module, experts, [LearnTask(t.name, TaskData(t.data.inputs, t.data.labels))
                             for t in tasks]


def coefficients(merge) -> dict[str, torch.Tensor]:
    return {node: fit.raw for node, fit in merge.fits.items()}


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        parallel = TorchDataParallel()
        results = {}
        for method, params in RUNS.items():
            module, experts, tasks = problem()
            merge = learn_data_parallel(method, module, module.state_dict(), experts, tasks,
                                        parallel=parallel, **params)
            results[method] = coefficients(merge)
        torch.save(results, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_processes_learn_the_coefficients_of_one(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "w")), nprocs=2)
    ranks = [torch.load(tmp_path / f"w.{r}") for r in range(2)]
    single = {}
    for method, run in (("supermerge", supermerge), ("adamerging", adamerging)):
        module, experts, tasks = problem()
        single[method] = coefficients(run(module, module.state_dict(), experts, tasks,
                                          **RUNS[method]))
    for method, nodes in single.items():
        assert set(ranks[0][method]) == set(nodes) == set(ranks[1][method])
        for node, w in nodes.items():
            assert torch.equal(ranks[0][method][node], ranks[1][method][node])
            torch.testing.assert_close(ranks[0][method][node], w, rtol=0, atol=1e-5)
            assert not torch.allclose(w, torch.full_like(w, w.flatten()[0]))  # it learned


def test_without_torchrun_the_errors_say_how_to_start(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(LearnError, match="torchrun"):
        init_from_env()
    with pytest.raises(LearnError, match="not initialised"):
        TorchDataParallel()
