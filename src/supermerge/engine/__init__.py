"""The streaming executor for data-free merges: plan from headers, then stream tensors."""

from supermerge.engine.executor import MergeResult, execute
from supermerge.engine.inspect import TensorDiff, compare_checkpoints, summarize_checkpoint
from supermerge.engine.plan import MergePlan, TensorJob, plan_merge
from supermerge.engine.spec import MergeSpec, ModelSpec, SliceSource, SliceSpec
from supermerge.engine.task_state import TaskState, load_task_state, read_task_state

__all__ = [
    "MergePlan",
    "MergeResult",
    "MergeSpec",
    "ModelSpec",
    "SliceSource",
    "SliceSpec",
    "TaskState",
    "TensorDiff",
    "TensorJob",
    "compare_checkpoints",
    "execute",
    "load_task_state",
    "plan_merge",
    "read_task_state",
    "summarize_checkpoint",
]
