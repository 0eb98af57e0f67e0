"""Built-in metrics: callables ``model -> float``, higher is better."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, EvaluationError
from ..measure.analysis import call_model


def _split_batch(batch: Any) -> tuple[Any, torch.Tensor]:
    if isinstance(batch, dict):
        for key in ("labels", "label", "target", "targets", "y"):
            if key in batch:
                inputs = {k: v for k, v in batch.items() if k != key}
                return inputs, batch[key]
        raise EvaluationError(f"A dict batch needs a label field (labels/label/target/y); got keys {sorted(batch)}.")
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise EvaluationError(
        "Accuracy expects batches of (inputs, labels) or dicts with a `labels` field; "
        f"got a {type(batch).__name__}. Pass your own evaluate=callable(model) -> float instead."
    )


def _logits(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):  # model outputs of transformers-style libraries
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise EvaluationError(f"Cannot read class scores from a model output of type {type(output).__name__}.")


class Accuracy:
    """Top-1 accuracy over ``loader`` (any iterable of ``(inputs, labels)`` batches).

    ``per_sample(model)`` gives the 0/1 correctness of each sample, the statistic the mean is made of.
    """

    def __init__(self, loader: Iterable, *, device: str | torch.device = "cpu") -> None:
        if loader is None or not hasattr(loader, "__iter__"):
            raise ConfigError(f"Accuracy: `loader` must be an iterable of (inputs, labels) batches, but got {loader!r}.")
        self.loader = loader
        self.device = torch.device(device)

    def per_sample(self, model: nn.Module) -> torch.Tensor:
        was_training = model.training
        model.eval()
        correct: list[torch.Tensor] = []
        try:
            with torch.no_grad():
                for batch in self.loader:
                    inputs, labels = _split_batch(batch)
                    logits = _logits(call_model(model, _to(inputs, self.device)))
                    correct.append((logits.argmax(dim=-1).cpu() == labels.cpu()).to(torch.float64))
        finally:
            model.train(was_training)
        if not correct:
            raise EvaluationError("Accuracy: the evaluation loader yielded no batches.")
        return torch.cat(correct)

    def __call__(self, model: nn.Module) -> float:
        return float(self.per_sample(model).mean())

    def __repr__(self) -> str:
        return f"Accuracy({type(self.loader).__name__})"


def _to(inputs: Any, device: torch.device) -> Any:
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device)
    if isinstance(inputs, dict):
        return {k: _to(v, device) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_to(v, device) for v in inputs)
    return inputs


def evaluate_metric(evaluate: Callable[[nn.Module], Any], model: nn.Module) -> float:
    """Call the user's metric and insist on a finite number."""
    value = evaluate(model)
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise EvaluationError(f"evaluate returned a tensor of shape {tuple(value.shape)}; it must return one number.")
        value = value.item()
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise EvaluationError(f"evaluate returned {value!r}; it must return one number (higher is better).") from None
    if not math.isfinite(value):
        raise EvaluationError(f"evaluate returned {value}; it must return a finite number.")
    return value
