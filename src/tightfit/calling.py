"""How tightfit calls a model: on an example input given as a tensor, a tuple of positional
arguments or a dict of keyword arguments (:func:`call_model`), and on a data loader's batches
(:func:`split_batch` into inputs and labels, :func:`to_device`, :func:`logits` of the output).
Export, latency, the metrics and the recoveries all call models through here."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .errors import EvaluationError


def split_arguments(inputs: Any) -> tuple[tuple, dict[str, Any]]:
    """Positional and keyword arguments of ``inputs`` read as a call: a tuple/list is the positional
    arguments, a dict the keyword arguments, anything else the one argument."""
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    return (inputs,), {}


def model_arguments(model: nn.Module, inputs: Any) -> tuple[tuple, dict[str, Any]]:
    """The positional and keyword arguments ``model`` is called with for ``inputs``
    (:func:`split_arguments`), except that a dict whose keys the forward does not take as keywords
    but that fits its one positional parameter (``forward(self, batch)`` reading ``batch["image"]``)
    is passed whole, as that parameter."""
    if isinstance(inputs, Mapping) and not _binds(model, (), inputs) and _binds(model, (inputs,), {}):
        return (inputs,), {}
    return split_arguments(inputs)


def forward_takes(model: nn.Module, name: str) -> bool:
    """Whether ``model``'s forward has a parameter ``name`` (False where no signature can be read)."""
    import inspect

    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _binds(model: nn.Module, args: tuple, kwargs: Mapping[str, Any]) -> bool:
    import inspect

    try:
        inspect.signature(model.forward).bind(*args, **kwargs)
    except TypeError:
        return False
    except ValueError:  # no signature to read (a builtin): assume it takes what it is given
        return True
    return True


def call_model(model: nn.Module, example_input: Any) -> Any:
    """Run ``model`` on an example input: a tensor, a tuple of positional args, or a dict of kwargs
    (or one dict argument, see :func:`model_arguments`)."""
    args, kwargs = model_arguments(model, example_input)
    return model(*args, **kwargs)


def output_tensors(output: Any) -> list[torch.Tensor]:
    """The tensors of a model's output, in order, however it nests them (tuples, dicts, and
    Hugging Face's ``ModelOutput``)."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, Mapping):
        return [t for v in output.values() for t in output_tensors(v)]
    if isinstance(output, (tuple, list)):
        return [t for v in output for t in output_tensors(v)]
    if hasattr(output, "to_tuple"):
        return output_tensors(output.to_tuple())
    return []


LABEL_KEYS = ("labels", "label", "target", "targets", "y")


def split_batch(
    batch: Any, who: str = "Accuracy", instead: str = "evaluate=callable(model) -> float"
) -> tuple[Any, torch.Tensor]:
    """``(inputs, labels)`` of a batch; ``who`` reads it and ``instead`` is what the user can pass in
    its place, both named in the error."""
    if isinstance(batch, dict):
        for key in LABEL_KEYS:
            if key in batch:
                inputs = {k: v for k, v in batch.items() if k != key}
                return inputs, batch[key]
        raise EvaluationError(
            f"{who}: a dict batch needs a label field (labels/label/target/y); got keys {sorted(batch)}."
        )
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    size = f" of {len(batch)}" if isinstance(batch, (tuple, list)) else ""
    raise EvaluationError(
        f"{who} expects batches of (inputs, labels) or dicts with a `labels` field; "
        f"got a {type(batch).__name__}{size}. A model with several inputs takes ((x1, x2), labels). "
        f"Or pass your own {instead}."
    )


def inputs_only(batch: Any) -> Any:
    """The model inputs of a batch that may or may not carry labels (labels are not needed)."""
    if isinstance(batch, dict):
        return {k: v for k, v in batch.items() if k not in LABEL_KEYS}
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0]
    return batch


def logits(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):  # model outputs of transformers-style libraries
        return output.logits
    if isinstance(output, dict) and isinstance(output.get("logits"), torch.Tensor):  # the same as a plain dict
        return output["logits"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise EvaluationError(
        f"Cannot read class scores from a model output of type {type(output).__name__}: return a tensor, a tuple "
        "starting with one, or a dict with a `logits` tensor; or pass your own evaluate=callable(model) -> float."
    )


def compared_output(output: Any) -> torch.Tensor:
    """What a comparison of outputs reads (``Fidelity(kind="cosine")``): class scores where the
    output has them (:func:`logits`), else a Hugging Face base model's ``last_hidden_state`` (an
    encoder's, a speech model's, a sequence-to-sequence model's decoder states): such models
    return no logits, and their hidden states are what users embed or feed a head with."""
    try:
        return logits(output)
    except EvaluationError:
        hidden = (
            output.get("last_hidden_state") if isinstance(output, dict) else getattr(output, "last_hidden_state", None)
        )
        if isinstance(hidden, torch.Tensor):
            return hidden
        raise EvaluationError(
            f"Cannot read an output to compare from a model output of type {type(output).__name__}: return a "
            "tensor, a tuple starting with one, or a dict with a `logits` or `last_hidden_state` tensor; or pass "
            "your own evaluate=callable(model) -> float."
        ) from None


def to_device(inputs: Any, device: torch.device) -> Any:
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device)
    if isinstance(inputs, dict):
        return {k: to_device(v, device) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(to_device(v, device) for v in inputs)
    return inputs
