"""One compression run: checked, frozen :class:`Settings`, a :class:`Run` of small stages, and the
trial evaluators (one :class:`TrialEvaluator` contract, full and sequential implementations)."""

from .evaluator import FullEvaluator, TrialEvaluator, TrialSetup
from .oneshot import compress_once
from .runner import Run
from .sequential import SequentialEvaluator
from .settings import OBJECTIVES, PICKS, Settings

__all__ = [
    "FullEvaluator",
    "compress_once",
    "OBJECTIVES",
    "PICKS",
    "Run",
    "SequentialEvaluator",
    "Settings",
    "TrialEvaluator",
    "TrialSetup",
]
