"""Checkpoints in and out: lazy readers for Hugging Face directories, safetensors and torch
state dicts, and an atomic, sharded safetensors writer.

This layer imports nothing from supermerge except :mod:`supermerge.errors`.
"""

from supermerge.io.checkpoint import Checkpoint, TensorInfo, open_checkpoint, tied_aliases
from supermerge.io.writer import CheckpointWriter

__all__ = ["Checkpoint", "CheckpointWriter", "TensorInfo", "open_checkpoint", "tied_aliases"]
