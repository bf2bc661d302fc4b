"""supermerge: merge fine-tuned checkpoints of one pretrained model into one multi-task model.

Python API::

    import supermerge
    supermerge.merge("recipe.yaml", "out/")           # a streamed data-free merge
    supermerge.merge_learned("learn.yaml", "out/")    # SuperMerge / AdaMerging on data
    from supermerge.methods import ties
    merged = ties(base, [a, b], density=0.2)          # a method on tensors
"""

import logging

from supermerge.api import merge, merge_learned
from supermerge.engine import load_task_model
from supermerge.errors import SupermergeError

logging.getLogger(__name__).addHandler(logging.NullHandler())

__version__ = "0.1.0"
__all__ = ["SupermergeError", "load_task_model", "merge", "merge_learned"]
