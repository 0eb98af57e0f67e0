"""Recovery: training that wins back what compression cost.

Each recovery is a ``callable(model)`` usable as ``compress(finetune=...)`` or on its own:
- :class:`FineTune`: masked fine-tuning, the compression held fixed (the simplest).
- :class:`LearningCompression`: Condensa's L-C, the compression re-fitted by projection.
- :class:`PruneSplice`: dynamic network surgery (masks pruned and spliced with hysteresis).
- :class:`GradualPrune`: the plan's sparsities reached gradually while training (cubic schedule).
- :class:`SparseTraining`: OBProx-SG / HSPG / proximal SG (also usable as plain optimizers).
- :class:`ProxConnect`: proximal quantization (binary, ternary, k-bit; STE as a special case).
- :class:`Tuned`: lets the search tune a recovery's own hyperparameters with the plan.
"""

from ._base import Recovery, Site, check_optimizer, make_optimizer, recovery_notes, sites
from .finetune import FineTune, cross_entropy_loss
from .gradual import GradualPrune
from .lc import LearningCompression
from .proxconnect import ProxConnect, grid_project
from .proximal import HSPG, OBProxSG, ProxSG, l1_groups, neuron_groups, sparsity_report
from .sparse import SparseTraining, remove_zero_neurons
from .splice import PruneSplice
from .tuned import Tuned

__all__ = [
    "HSPG",
    "FineTune",
    "GradualPrune",
    "LearningCompression",
    "OBProxSG",
    "ProxConnect",
    "ProxSG",
    "PruneSplice",
    "Recovery",
    "Site",
    "SparseTraining",
    "Tuned",
    "check_optimizer",
    "cross_entropy_loss",
    "grid_project",
    "l1_groups",
    "make_optimizer",
    "neuron_groups",
    "recovery_notes",
    "remove_zero_neurons",
    "sites",
    "sparsity_report",
]
