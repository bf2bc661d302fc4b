"""Hierarchical merging: the tree, equality with flat SuperMerge, measured memory."""

from __future__ import annotations

from functools import cache

import pytest
import torch

from supermerge.learn import (
    LearnError,
    PeakRSS,
    cluster_experts,
    supermerge,
)
from test_learn_toys import (
    make_toy,
    one_thread,  # noqa: F401  (autouse fixture)
    projection,
    two_task_toy,
)

OPTIONS = {"head_prefix": "head.", "steps": 20, "eval_every": 5}


@cache
def four_task_toy():
    """a1/a2 and b1/b2 are related tasks (close labellings, same head initialisation)."""
    return make_toy(
        {"a1": projection(1), "b1": projection(2), "a2": projection(1, 5), "b2": projection(2, 6)},
        steps=60, val_size=32, head_seeds=[1, 2, 1, 2],
    )


def test_fan_in_at_least_k_equals_flat_supermerge() -> None:
    toy = two_task_toy()
    flat_merge = supermerge(toy.module, toy.base_state, toy.experts, toy.tasks(), **OPTIONS)
    flat, flat_fit = flat_merge.model, flat_merge.fits["root"]
    for fan_in in (2, 3):
        tree = supermerge(toy.module, toy.base_state, toy.experts, toy.tasks(), hierarchical=True,
                          fan_in=fan_in, **OPTIONS)
        assert [c.name for c in tree.tree.children] == ["a", "b"]
        torch.testing.assert_close(tree.fits["root"].raw, flat_fit.raw, rtol=0, atol=0)
        merged, expected = tree.model.merged_state_dict(), flat.merged_state_dict()
        for name in flat.names:
            torch.testing.assert_close(merged[name], expected[name], rtol=0, atol=0)


def test_tree_for_four_experts_and_fan_in_two_pairs_the_similar_ones() -> None:
    toy = four_task_toy()
    progress = []
    result = supermerge(toy.module, toy.base_state, toy.experts, toy.tasks(), hierarchical=True,
                        fan_in=2, progress=lambda *a: progress.append(a), **OPTIONS)
    root = result.tree
    assert root.name == "root" and root.level == 2
    pairs = [[leaf.name for leaf in child.children] for child in root.children]
    assert pairs == [["a1", "a2"], ["b1", "b2"]]
    assert [c.tasks for c in root.children] == [["a1", "a2"], ["b1", "b2"]]
    assert root.tasks == ["a1", "b1", "a2", "b2"]
    assert list(result.fits) == ["level1.0", "level1.1", "root"]
    assert result.fits["root"].expert_names == ["level1.0", "level1.1"]
    assert set(result.model.tasks) == {"a1", "b1", "a2", "b2"}
    assert progress[-1][:3] == ("learn", 60, 60)  # three nodes of 20 steps, planned level by level
    assert result.peak_rss >= max(result.level_peaks().values()) >= 0
    assert "level1.0 (level 1" in root.render()


def test_clustering_respects_the_fan_in_and_orders_groups() -> None:
    similarity = torch.tensor([[1.0, 0.9, 0.1, 0.8, 0.0],
                               [0.9, 1.0, 0.2, 0.7, 0.0],
                               [0.1, 0.2, 1.0, 0.1, 0.6],
                               [0.8, 0.7, 0.1, 1.0, 0.0],
                               [0.0, 0.0, 0.6, 0.0, 1.0]])
    assert cluster_experts(similarity, 2) == [[0, 1], [2, 4], [3]]
    assert cluster_experts(similarity, 3) == [[0, 1, 3], [2, 4]]
    assert cluster_experts(similarity, 5) == [[0, 1, 2, 3, 4]]


def test_hierarchical_needs_every_task_named_like_its_expert() -> None:
    toy = four_task_toy()
    with pytest.raises(LearnError, match=r"expert\(s\) \['b2'\] have no task"):
        supermerge(toy.module, toy.base_state, toy.experts, toy.tasks(["a1", "b1", "a2"]),
                   hierarchical=True, **OPTIONS)


def test_peak_rss_sees_a_large_allocation() -> None:
    with PeakRSS() as memory:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del block
    assert memory.peak >= 48 * 2**20
