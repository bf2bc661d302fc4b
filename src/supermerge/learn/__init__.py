"""Data-driven merging: coefficients learned on validation data (SuperMerge, AdaMerging)
and closed-form merges from data statistics (Fisher, RegMean).

Layers inside the package: ``groups`` (merge groups) -> ``model`` (:class:`MergedModel`) ->
``data`` / ``objectives`` -> ``train`` (:func:`learn_coefficients`) -> ``hierarchical``
(the merge tree) -> ``merge`` (:func:`supermerge`, :func:`adamerging`) -> ``export``;
``fisher`` (:func:`fisher_merge`) and ``regmean`` (:func:`regmean_merge`) are the closed-form
data-informed merges, on what ``statistics`` gives them both.
Every learned method describes and registers itself in its own module
(:class:`~supermerge.learn.method.LearnedMethod`, one ``run`` signature for all);
:data:`LEARNED_METHODS` and :func:`get_learned_method` (``registry``) find them by name.
"""

from supermerge.learn.data import Task, TaskData, load_task_data
from supermerge.learn.errors import LearnError
from supermerge.learn.export import (
    coefficient_tensors,
    coefficients_csv,
    coefficients_json,
    export_learned,
    export_model,
    export_outcome,
    plot_coefficients,
)
from supermerge.learn.fisher import fisher_merge
from supermerge.learn.groups import assign_groups, block_of
from supermerge.learn.hierarchical import (
    LearnedMerge,
    MergeNode,
    cluster_experts,
    cosine_similarities,
    merge_tree,
)
from supermerge.learn.memory import PeakRSS
from supermerge.learn.merge import adamerging, model_thresholds, supermerge, ties_prepare
from supermerge.learn.method import LearnedMethod, LearnedOutcome
from supermerge.learn.model import CheckpointState, MergedModel, TaskVectors, expert_heads
from supermerge.learn.objectives import entropy_loss, supervised_loss
from supermerge.learn.params import (
    AdaMergingParams,
    FisherParams,
    RegMeanParams,
    SuperMergeParams,
)
from supermerge.learn.registry import LEARNED_METHODS, get_learned_method
from supermerge.learn.regmean import regmean_merge
from supermerge.learn.train import LearnResult, learn_coefficients

__all__ = [
    "LEARNED_METHODS",
    "AdaMergingParams",
    "CheckpointState",
    "FisherParams",
    "LearnError",
    "LearnResult",
    "LearnedMerge",
    "LearnedMethod",
    "LearnedOutcome",
    "MergeNode",
    "MergedModel",
    "PeakRSS",
    "RegMeanParams",
    "SuperMergeParams",
    "Task",
    "TaskData",
    "TaskVectors",
    "adamerging",
    "assign_groups",
    "block_of",
    "cluster_experts",
    "coefficients_csv",
    "coefficients_json",
    "cosine_similarities",
    "entropy_loss",
    "expert_heads",
    "export_learned",
    "export_model",
    "export_outcome",
    "fisher_merge",
    "get_learned_method",
    "learn_coefficients",
    "load_task_data",
    "merge_tree",
    "model_thresholds",
    "coefficient_tensors",
    "plot_coefficients",
    "regmean_merge",
    "supermerge",
    "supervised_loss",
    "ties_prepare",
]
