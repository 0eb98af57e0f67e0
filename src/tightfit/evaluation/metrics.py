"""Built-in metrics: callables ``model -> float``, higher is better.

Each is also a *per-sample statistic*: ``per_sample(model, indices=None)`` returns one value per
validation sample (in the loader's order, or for the given sample ``indices``), and the metric is
their mean. That is what lets tightfit evaluate a candidate on a subsample and know the standard
error of the result (see ``tightfit.evaluation.sequential``). A user metric does the same by
subclassing ``PerSampleMetric`` or wrapping a function with ``PerSample(fn, loader)``.
"""

from __future__ import annotations

import copy
import math
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol, cast, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from .._device import checked_device
from ..calling import call_model, compared_output, forward_takes, inputs_only, logits, split_batch, to_device
from ..errors import ConfigError, EvaluationError

if TYPE_CHECKING:
    from torch.utils.data import DataLoader


def _reference_inputs(model: nn.Module, batch: Any) -> Any:
    """What a label-free metric feeds the model: the batch without its labels, except that a dict's
    ``labels`` stay when the forward takes them (a Hugging Face sequence-to-sequence model builds
    its decoder inputs from them and fails without; other models only add a loss to the output)."""
    if isinstance(batch, dict) and "labels" in batch and forward_takes(model, "labels"):
        return batch
    return inputs_only(batch)


# --- index access to the samples of a loader -------------------------------------------------------


def _take(batch: Any, index: torch.Tensor) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch[index]
    if isinstance(batch, dict):
        return {k: _take(v, index) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_take(v, index) for v in batch)
    raise EvaluationError(
        f"Cannot select samples from a batch field of type {type(batch).__name__}; per-sample evaluation "
        "needs batches of tensors (or a torch DataLoader over a map-style dataset)."
    )


def _cat(batches: list[Any]) -> Any:
    first = batches[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(batches)
    if isinstance(first, dict):
        return {k: _cat([b[k] for b in batches]) for k in first}
    if isinstance(first, (tuple, list)):
        return type(first)(_cat([b[i] for b in batches]) for i in range(len(first)))
    return _take(first, torch.zeros(0, dtype=torch.long))  # raises the clear error


def _batch_len(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, dict):
        return _batch_len(next(iter(batch.values())))
    return _batch_len(batch[0])


class SampleView:
    """The samples of a loader by index, in the loader's order (the dataset's order for a
    DataLoader, so a shuffling loader still gives fixed indices).

    A ``DataLoader`` over a map-style dataset is indexed through the dataset (nothing is held in
    memory); any other iterable of tensor batches is read once and kept.
    """

    def __init__(self, loader: Iterable, batch_size: int | None = None) -> None:
        from torch.utils.data import DataLoader, IterableDataset, TensorDataset

        self.loader = loader
        self._dataset = None
        self._tensors: tuple[torch.Tensor, ...] | None = None
        self._stacked: Any = None
        self._n: int | None = None
        self.batch_size = batch_size
        if (
            isinstance(loader, DataLoader)
            and not isinstance(loader.dataset, IterableDataset)
            and hasattr(loader.dataset, "__len__")
        ):
            self._dataset = loader.dataset
            self._n = len(loader.dataset)
            self.batch_size = batch_size or loader.batch_size or 256
            if isinstance(loader.dataset, TensorDataset):
                self._tensors = loader.dataset.tensors

    def _materialize(self) -> None:
        if self._stacked is None:
            batches = list(self.loader)
            if not batches:
                raise EvaluationError("the evaluation loader yielded no batches.")
            self._stacked = _cat(batches)
            self._n = _batch_len(self._stacked)
            self.batch_size = self.batch_size or _batch_len(batches[0])

    def __len__(self) -> int:
        if self._n is None:
            self._materialize()
        assert self._n is not None  # _materialize sets it
        return int(self._n)

    def batches(self, indices: Sequence[int] | torch.Tensor | None = None) -> Iterator[tuple[Any, torch.Tensor]]:
        """Yield ``(batch, sample_indices)`` covering ``indices`` (all samples when None), in order."""
        n = len(self)
        idx = torch.arange(n) if indices is None else torch.as_tensor(indices, dtype=torch.long)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
            raise EvaluationError(f"sample indices must lie in [0, {n}), but got {int(idx.min())}..{int(idx.max())}.")
        size = self.batch_size or 256
        for start in range(0, int(idx.numel()), size):
            chunk = idx[start : start + size]
            if self._tensors is not None:
                yield list(t[chunk] for t in self._tensors), chunk
            elif self._dataset is not None:
                # a dataset is held only for a DataLoader (__init__)
                yield cast("DataLoader", self.loader).collate_fn([self._dataset[int(i)] for i in chunk]), chunk
            else:
                yield _take(self._stacked, chunk), chunk


# --- the per-sample metric protocol and base class ------------------------------------------------


@runtime_checkable
class SampleMetric(Protocol):
    """What sequential evaluation needs of a metric: ``num_samples`` and ``per_sample(model,
    indices)`` returning one value per requested sample (the metric is their mean, higher is
    better). ``samples_evaluated`` counts the forward passes made so far, for accounting."""

    num_samples: int
    samples_evaluated: int

    def per_sample(self, model: nn.Module, indices: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor: ...


class PerSampleMetric:
    """Base of metrics that are the mean of a per-sample value. Subclasses implement
    ``score(model, batch, indices) -> Tensor[batch]``; ``value_range`` bounds a single value when
    known (it makes the standard error of a tiny subsample conservative, and the certificate's bound
    valid for any distribution on that range); ``binary`` says every value is 0 or 1 (the
    certificate's bound is then exact)."""

    value_range: tuple[float, float] | None = None
    binary: bool = False

    def __init__(self, loader: Iterable, *, batch_size: int | None = None, device: str | torch.device = "cpu") -> None:
        if loader is None or not hasattr(loader, "__iter__"):
            raise ConfigError(f"{type(self).__name__}: `loader` must be an iterable of batches, but got {loader!r}.")
        self.loader = loader
        self.device = checked_device(type(self).__name__, device)
        self.samples = SampleView(loader, batch_size)
        self.samples_evaluated = 0

    def score(self, model: nn.Module, batch: Any, indices: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def num_samples(self) -> int:
        return len(self.samples)

    def per_sample(self, model: nn.Module, indices: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
        was_training = model.training
        model.eval()
        values: list[torch.Tensor] = []
        try:
            with torch.no_grad():
                for batch, idx in self.samples.batches(indices):
                    v = torch.as_tensor(self.score(model, batch, idx)).detach().to(torch.float64).cpu().flatten()
                    if v.numel() != idx.numel():
                        raise EvaluationError(
                            f"{type(self).__name__}: score returned {v.numel()} values for a batch of {idx.numel()} samples; "
                            "it must return one value per sample."
                        )
                    values.append(v)
                    self.samples_evaluated += int(idx.numel())
        finally:
            model.train(was_training)
        if not values:
            if indices is not None:
                return torch.zeros(0, dtype=torch.float64)
            raise EvaluationError(f"{type(self).__name__}: the evaluation loader yielded no batches.")
        out = torch.cat(values)
        if not torch.isfinite(out).all():
            raise EvaluationError(f"{type(self).__name__}: some per-sample values are not finite.")
        return out

    def __call__(self, model: nn.Module) -> float:
        return float(self.per_sample(model).mean())


class PerSample(PerSampleMetric):
    """A user metric from a function ``fn(model, batch) -> Tensor[batch]`` of per-sample values
    (higher is better); the metric is their mean over ``loader``'s samples. ``value_range``: the
    bounds of one value, if known; ``binary=True``: every value is 0 or 1 (e.g. a per-sample hit)."""

    def __init__(
        self,
        fn: Callable[[nn.Module, Any], torch.Tensor],
        loader: Iterable,
        *,
        value_range: tuple[float, float] | None = None,
        binary: bool = False,
        batch_size: int | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        if not callable(fn):
            raise ConfigError(f"PerSample: `fn` must be a callable(model, batch) -> per-sample tensor, but got {fn!r}.")
        if value_range is not None and not (
            isinstance(value_range, (tuple, list))
            and len(value_range) == 2
            and float(value_range[0]) < float(value_range[1])
        ):
            raise ConfigError(
                f"PerSample: `value_range` must be a pair (low, high) with low < high, or None, but got {value_range!r}."
            )
        if not isinstance(binary, bool):
            raise ConfigError(f"PerSample: `binary` must be True or False, but got {binary!r}.")
        super().__init__(loader, batch_size=batch_size, device=device)
        self.fn = fn
        self.binary = binary
        self.value_range = (0.0, 1.0) if binary and value_range is None else value_range

    def score(self, model: nn.Module, batch: Any, indices: torch.Tensor) -> torch.Tensor:
        return self.fn(model, to_device(batch, self.device))

    def __repr__(self) -> str:
        return f"PerSample({getattr(self.fn, '__name__', 'fn')})"


_ONE_PER_SAMPLE = (
    "{name} compares one top-1 prediction per sample, but the model's outputs have shape {shape} (several "
    "predictions per sample, e.g. per token or pixel). Use tightfit.Fidelity(loader) (cosine), or "
    "tightfit.PerSample(fn, loader) with your own per-sample value (e.g. a sequence's mean token accuracy)."
)


def _check_threshold(name: str, threshold: float | None) -> float | None:
    if threshold is not None and (
        isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold)
    ):
        raise ConfigError(
            f"{name}: `threshold` must be a number (0.0 for a logit, 0.5 for a probability) or None, "
            f"but got {threshold!r}."
        )
    return None if threshold is None else float(threshold)


def _predictions(scores: torch.Tensor, threshold: float | None, name: str) -> torch.Tensor:
    """One class per sample: the top-1 class, or for a binary model with one score per sample
    (shape ``(batch,)`` or ``(batch, 1)``) whether the score exceeds ``threshold``."""
    if scores.dim() > 2:  # argmax would give one prediction per token / pixel, not per sample
        raise EvaluationError(_ONE_PER_SAMPLE.format(name=name, shape=tuple(scores.shape)))
    if scores.dim() == 1 or scores.shape[1] == 1:
        if threshold is None:  # argmax over one column is always class 0: a silently wrong metric
            raise EvaluationError(
                f"{name}: the model gives one score per sample (output shape {tuple(scores.shape)}), so there is no "
                f"top-1 class to take. For a binary classifier pass {name}(loader, threshold=0.0) when the score is a "
                "logit, or threshold=0.5 when it is a probability."
            )
        return (scores.reshape(len(scores)) > threshold).long()
    return scores.argmax(dim=-1)


class Accuracy(PerSampleMetric):
    """Top-1 accuracy over ``loader`` (any iterable of ``(inputs, labels)`` batches).

    ``per_sample(model)`` gives the 0/1 correctness of each sample, the statistic the mean is made of.
    A binary classifier with one score per sample needs ``threshold``: class 1 where the score is
    above it (0.0 for a logit, 0.5 for a probability).
    """

    value_range = (0.0, 1.0)
    binary = True

    def __init__(self, loader: Iterable, *, threshold: float | None = None, device: str | torch.device = "cpu") -> None:
        if loader is None or not hasattr(loader, "__iter__"):
            raise ConfigError(
                f"Accuracy: `loader` must be an iterable of (inputs, labels) batches, but got {loader!r}."
            )
        super().__init__(loader, device=device)
        self.threshold = _check_threshold("Accuracy", threshold)

    def score(self, model: nn.Module, batch: Any, indices: torch.Tensor) -> torch.Tensor:
        inputs, labels = split_batch(batch)
        predicted = _predictions(
            logits(call_model(model, to_device(inputs, self.device))), self.threshold, "Accuracy"
        ).cpu()
        labels = labels.cpu()
        if labels.numel() == len(predicted):  # (batch, 1) float targets of a binary loss too
            labels = labels.reshape(len(predicted))
        return predicted == labels

    def __repr__(self) -> str:
        return f"Accuracy({type(self.loader).__name__})"


class _ReferenceMetric(PerSampleMetric):
    """A metric comparing a model's outputs with the original model's, sample by sample. The
    original's outputs are computed once (on first use) and cached. ``tightfit.compress`` sets the
    reference to the model being compressed when none was given."""

    needs_reference = True

    def __init__(
        self, loader: Iterable, reference: nn.Module | None = None, *, device: str | torch.device = "cpu"
    ) -> None:
        super().__init__(loader, device=device)
        if reference is not None and not isinstance(reference, nn.Module):
            raise ConfigError(
                f"{type(self).__name__}: `reference` must be the original torch.nn.Module, but got {reference!r}."
            )
        self.reference = reference
        self._reference_outputs: torch.Tensor | None = None

    def with_reference(self, reference: nn.Module) -> _ReferenceMetric:
        bound = copy.copy(self)
        bound.reference = reference
        bound._reference_outputs = None
        return bound

    def reference_outputs(self, indices: torch.Tensor) -> torch.Tensor:
        if self.reference is None:
            raise ConfigError(
                f"{type(self).__name__} compares with the original model's outputs: pass reference=original_model "
                "(tightfit.compress sets it for you)."
            )
        if self._reference_outputs is None:
            was_training = self.reference.training
            self.reference.eval()
            outs = []
            try:
                with torch.no_grad():
                    for batch, idx in self.samples.batches():
                        inputs = _reference_inputs(self.reference, batch)
                        outs.append(
                            self._read(call_model(self.reference, to_device(inputs, self.device))).detach().cpu()
                        )
                        self.samples_evaluated += int(idx.numel())
            finally:
                self.reference.train(was_training)
            self._reference_outputs = torch.cat(outs)
        return self._reference_outputs[indices]

    def _outputs(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return self._read(call_model(model, to_device(_reference_inputs(model, batch), self.device))).cpu()

    def _read(self, output: Any) -> torch.Tensor:
        """The tensor of a model's output this metric compares: its class scores."""
        return logits(output)


class Agreement(_ReferenceMetric):
    """Fraction of samples on which the model's top-1 prediction equals the original model's.
    Needs no labels: batches may be inputs alone or ``(inputs, labels)``. A binary classifier with
    one score per sample needs ``threshold``, as :class:`Accuracy` does."""

    value_range = (0.0, 1.0)
    binary = True

    def __init__(
        self,
        loader: Iterable,
        reference: nn.Module | None = None,
        *,
        threshold: float | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__(loader, reference, device=device)
        self.threshold = _check_threshold("Agreement", threshold)

    def score(self, model: nn.Module, batch: Any, indices: torch.Tensor) -> torch.Tensor:
        ours = _predictions(self._outputs(model, batch), self.threshold, "Agreement")
        return ours == _predictions(self.reference_outputs(indices), self.threshold, "Agreement")

    def __repr__(self) -> str:
        return "Agreement()"


FIDELITY_KINDS = ("cosine", "kl")


class Fidelity(_ReferenceMetric):
    """How closely the model's outputs follow the original's, per sample, as in distillation.

    ``kind="cosine"``: cosine similarity of the two output vectors (in [-1, 1], 1 = same direction).
    ``kind="kl"``: minus the KL divergence ``KL(p_original || p_model)`` of the softmax outputs at
    ``temperature`` (<= 0, 0 = identical), so higher is better either way. Needs no labels.
    The softmax runs over ``class_dim``, PyTorch's class axis of a ``(batch, classes, ...)`` output
    by default; a language model's ``(batch, tokens, vocabulary)`` logits need ``class_dim=-1``.
    Where the output has positions besides (tokens, pixels), a sample's value is the mean of its
    positions' divergences, as in per-token distillation.
    """

    def __init__(
        self,
        loader: Iterable,
        reference: nn.Module | None = None,
        *,
        kind: str = "cosine",
        temperature: float = 1.0,
        class_dim: int = 1,
        device: str | torch.device = "cpu",
    ) -> None:
        if kind not in FIDELITY_KINDS:
            raise ConfigError(f"Fidelity: `kind` must be one of {FIDELITY_KINDS}, but got {kind!r}.")
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
            raise ConfigError(f"Fidelity: `temperature` must be a number > 0, but got {temperature!r}.")
        super().__init__(loader, reference, device=device)
        if isinstance(class_dim, bool) or not isinstance(class_dim, int) or class_dim == 0:
            raise ConfigError(
                f"Fidelity: `class_dim` must be the class axis of the model's output (an int, not 0: "
                f"that is the batch), but got {class_dim!r}."
            )
        self.kind = kind
        self.temperature = float(temperature)
        self.class_dim = class_dim
        self.value_range = (-1.0, 1.0) if kind == "cosine" else None

    def _read(self, output: Any) -> torch.Tensor:
        """Cosine also compares a base model's hidden states (no logits); KL needs class scores."""
        return compared_output(output) if self.kind == "cosine" else logits(output)

    def score(self, model: nn.Module, batch: Any, indices: torch.Tensor) -> torch.Tensor:
        out = self._outputs(model, batch).to(torch.float64)
        ref = self.reference_outputs(indices).to(torch.float64)
        if self.kind == "cosine":
            return F.cosine_similarity(out.flatten(1), ref.flatten(1), dim=1)
        if out.dim() < 2 or not -out.dim() < self.class_dim < out.dim() or self.class_dim % out.dim() == 0:
            raise ConfigError(
                f"Fidelity: `class_dim` {self.class_dim} is not a class axis of the model's output of "
                f"shape {tuple(out.shape)} (axis 0 is the batch); pass the axis its classes are on."
            )
        log_p = F.log_softmax(ref / self.temperature, dim=self.class_dim)
        log_q = F.log_softmax(out / self.temperature, dim=self.class_dim)
        divergence = (log_p.exp() * (log_p - log_q)).sum(dim=self.class_dim)  # (batch, positions...)
        return -divergence.reshape(len(divergence), -1).mean(dim=1)

    def __repr__(self) -> str:
        return (
            f"Fidelity(kind={self.kind!r})"
            if self.kind == "cosine" or self.class_dim == 1
            else f"Fidelity(kind={self.kind!r}, class_dim={self.class_dim})"
        )


def bind_reference(evaluate: Any, original: nn.Module) -> Any:
    """Give a metric that compares with the original model (Agreement, Fidelity) the original,
    unless the user already set one."""
    if getattr(evaluate, "needs_reference", False) and getattr(evaluate, "reference", None) is None:
        return evaluate.with_reference(original)
    return evaluate


def evaluate_metric(evaluate: Callable[[nn.Module], Any], model: nn.Module) -> float:
    """Call the user's metric and insist on a finite number."""
    value = evaluate(model)
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise EvaluationError(
                f"evaluate returned a tensor of shape {tuple(value.shape)}; it must return one number."
            )
        value = value.item()
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise EvaluationError(f"evaluate returned {value!r}; it must return one number (higher is better).") from None
    if not math.isfinite(value):
        raise EvaluationError(f"evaluate returned {value}; it must return a finite number.")
    return value


def evaluate_original(evaluate: Callable[[nn.Module], Any], model: nn.Module) -> float:
    """:func:`evaluate_metric` on the original model, the first call of the user's ``evaluate``: an
    exception it raises becomes an :class:`EvaluationError` that says so (with where it was
    raised), instead of a traceback from inside tightfit."""
    try:
        return evaluate_metric(evaluate, model)
    except EvaluationError:
        raise
    except Exception as exc:
        frames = traceback.extract_tb(exc.__traceback__)
        where = f" (at {frames[-1].filename}:{frames[-1].lineno}, in {frames[-1].name})" if frames else ""
        raise EvaluationError(
            f"`evaluate` raised {type(exc).__name__}: {exc}{where} when evaluating the original, uncompressed model "
            "(its metric is the baseline every plan is compared with). Nothing was compressed; fix `evaluate` and "
            "run again."
        ) from exc
