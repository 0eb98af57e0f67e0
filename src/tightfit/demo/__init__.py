"""Built-in data and models for `tightfit demo`, the tests and the benchmarks."""

from .data import Split, digits_split, train
from .models import LeNet5, lenet_300_100

__all__ = ["LeNet5", "Split", "digits_split", "lenet_300_100", "train"]
