"""supermerge: merge fine-tuned checkpoints of one pretrained model into one multi-task model.

Python API::

    import supermerge
    supermerge.merge("recipe.yaml", "out/")           # a streamed data-free merge
    supermerge.merge_learned("learn.yaml", "out/")    # SuperMerge / AdaMerging on data
    model = supermerge.load_task_model("out/", "spam") # a task's transformers model
    supermerge.extract("base/", "tuned/", "lora/", rank=16)  # a LoRA adapter from a fine-tune
    from supermerge.methods import ties
    merged = ties(base, [a, b], density=0.2)          # a method on tensors
"""

import logging
from typing import TYPE_CHECKING, Any

from supermerge.errors import SupermergeError

if TYPE_CHECKING:
    from supermerge.api import extract, merge, merge_learned
    from supermerge.eval.task_model import load_task_model

logging.getLogger(__name__).addHandler(logging.NullHandler())

__version__ = "0.1.0"
__all__ = ["SupermergeError", "extract", "load_task_model", "merge", "merge_learned"]

# The API imports torch (seconds): loaded on first use, so that `supermerge --help` and
# `import supermerge.errors` stay fast.
_LAZY = {"merge": "supermerge.api", "merge_learned": "supermerge.api", "extract": "supermerge.api",
         "load_task_model": "supermerge.eval.task_model"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'supermerge' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
