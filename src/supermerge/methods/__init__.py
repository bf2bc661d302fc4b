"""Data-free merge methods: pure per-tensor functions behind one registry.

Importing this package registers every method. Call one on tensors directly::

    from supermerge.methods import ties
    merged = ties(base, [a, b], density=0.2)

or look one up by name with :func:`get_method`. Each method lives in its own
``<name>_method`` module (whose docstring gives the formula, the paper and the
differences from mergekit); the shared math is in :mod:`supermerge.methods.primitives`.
The modules carry a ``_method`` suffix so that ``supermerge.methods.ties`` can be the
method object without shadowing a submodule.
"""

from supermerge.methods.arcee_fusion_method import arcee_fusion
from supermerge.methods.breadcrumbs_method import breadcrumbs
from supermerge.methods.breadcrumbs_ties_method import breadcrumbs_ties
from supermerge.methods.consensus_method import consensus
from supermerge.methods.dare_linear_method import dare_linear
from supermerge.methods.dare_ties_method import dare_ties
from supermerge.methods.della_linear_method import della_linear
from supermerge.methods.della_method import della
from supermerge.methods.doge_method import doge
from supermerge.methods.emr_method import emr
from supermerge.methods.iso_c_method import iso_c
from supermerge.methods.iso_cts_method import iso_cts
from supermerge.methods.karcher_method import karcher
from supermerge.methods.linear_method import linear
from supermerge.methods.lines_method import lines
from supermerge.methods.magmax_method import magmax
from supermerge.methods.model_stock_method import model_stock
from supermerge.methods.multislerp_method import multislerp
from supermerge.methods.nearswap_method import nearswap
from supermerge.methods.nuslerp_method import nuslerp
from supermerge.methods.opcm_method import opcm
from supermerge.methods.passthrough_method import passthrough
from supermerge.methods.pcb_method import pcb
from supermerge.methods.ram_method import ram
from supermerge.methods.ramplus_tl_method import ramplus_tl
from supermerge.methods.registry import (
    Method,
    ModelParams,
    Params,
    TaskSpecific,
    TensorContext,
    available_methods,
    get_method,
    register,
)
from supermerge.methods.sce_method import sce
from supermerge.methods.slerp_method import slerp
from supermerge.methods.tall_masks_method import tall_masks
from supermerge.methods.task_arithmetic_method import task_arithmetic
from supermerge.methods.ties_method import ties
from supermerge.methods.tsv_method import tsv
from supermerge.methods.widen_method import widen
from supermerge.methods.wudi_method import wudi

__all__ = [
    "Method",
    "ModelParams",
    "Params",
    "TaskSpecific",
    "TensorContext",
    "arcee_fusion",
    "available_methods",
    "breadcrumbs",
    "breadcrumbs_ties",
    "consensus",
    "dare_linear",
    "dare_ties",
    "della",
    "della_linear",
    "doge",
    "emr",
    "get_method",
    "iso_c",
    "iso_cts",
    "karcher",
    "linear",
    "lines",
    "magmax",
    "model_stock",
    "multislerp",
    "nearswap",
    "nuslerp",
    "opcm",
    "passthrough",
    "pcb",
    "ram",
    "ramplus_tl",
    "register",
    "sce",
    "slerp",
    "tall_masks",
    "task_arithmetic",
    "ties",
    "tsv",
    "widen",
    "wudi",
]
