"""The streaming executor for data-free merges: plan from headers, then stream tensors."""

from supermerge.engine.executor import MergeResult, Progress, execute
from supermerge.engine.inspect import TensorDiff, compare_checkpoints, summarize_checkpoint
from supermerge.engine.plan import MergePlan, TensorJob, plan_merge
from supermerge.engine.spec import MergeSpec, ModelSpec

__all__ = [
    "MergePlan",
    "MergeResult",
    "MergeSpec",
    "ModelSpec",
    "Progress",
    "TensorDiff",
    "TensorJob",
    "compare_checkpoints",
    "execute",
    "plan_merge",
    "summarize_checkpoint",
]
