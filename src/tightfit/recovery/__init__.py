"""Recovery: training that wins back what compression cost, with the compression held fixed."""

from .finetune import FineTune, cross_entropy_loss

__all__ = ["FineTune", "cross_entropy_loss"]
