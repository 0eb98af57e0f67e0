"""What every recovery shares: a training loop over ``loader`` for ``epochs``, the loss, the step
count, and the tunable hyperparameters a search may set per trial (see :mod:`.tuned`)."""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from .._device import checked_device
from ..calling import call_model, forward_takes, split_batch, to_device
from ..calling import logits as output_logits
from ..errors import ConfigError
from ..operators.base import Hyperparameter, Projection

LossFn = Callable[[nn.Module, Any], torch.Tensor]

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


def _own_loss(output: Any) -> torch.Tensor | None:
    """The scalar loss a model returned (a Hugging Face output's ``loss``), or None."""
    loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
    return loss if isinstance(loss, torch.Tensor) and loss.dim() == 0 else None


def loader_is_empty(loader: Iterable) -> bool:
    """True when ``loader`` yields no batch: ``len(loader) == 0``, or (unsized) its first ``next``
    comes back empty. A loader that cannot even be iterated counts as not empty (training says why)."""
    try:
        return len(loader) == 0  # type: ignore[arg-type]
    except TypeError:
        pass
    try:
        return next(iter(loader), _NOTHING) is _NOTHING
    except Exception:
        return False


_NOTHING = object()


def recovery_notes(recovery: Any) -> list[str]:
    """What a result should say about its recovery: that it trained nothing, when its loader was empty."""
    inner = getattr(recovery, "recovery", recovery)  # Tuned wraps the recovery it tunes
    if getattr(inner, "empty_loader", False) and getattr(inner, "epochs", 0):
        name = type(inner).__name__
        return [
            f"{name}'s training loader held no batch: no trial was fine-tuned (the metric is the untrained "
            "compressed model's). Pass a loader with data, or finetune=None."
        ]
    return []


def cross_entropy_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """Default loss: cross-entropy of the model's class scores on ``(inputs, labels)`` batches.

    A dict batch whose ``labels`` the model's forward takes (Hugging Face models) trains on the loss
    the model computes from them, when it returns one: a causal LM shifts its labels, a
    sequence-to-sequence model builds its decoder inputs from them."""
    inputs, labels = split_batch(batch, "The default fine-tuning loss", "loss=callable(model, batch) -> scalar tensor")
    if isinstance(batch, dict) and "labels" in batch and forward_takes(model, "labels"):
        output = model(**batch)
        if (own := _own_loss(output)) is not None:
            return own
    else:
        output = call_model(model, inputs)
    logits = output_logits(output)
    if logits.dim() == 2 and logits.shape[1] == 1:  # F.cross_entropy: "Target 1 is out of bounds"
        raise ConfigError(
            "The default fine-tuning loss is cross-entropy over one score per class, but the model gives one score "
            f"per sample (shape {tuple(logits.shape)}), as a binary classifier trained with BCEWithLogitsLoss does. "
            "Give `loss=lambda model, batch: F.binary_cross_entropy_with_logits(model(batch[0]).squeeze(1), "
            'batch[1].float())` (or your own loss), in a config file [finetune] options = { loss = "my_module:my_loss" }.'
        )
    # F.cross_entropy also accepts one unbatched row of scores, or float targets as class
    # probabilities: a regression model's (batch,) output and float targets would train, on nonsense
    soft = labels.is_floating_point() and labels.shape == logits.shape
    if logits.dim() < 2 or not (soft or (not labels.is_floating_point() and labels.shape == logits.shape[:1])):
        raise ConfigError(
            "The default fine-tuning loss is cross-entropy on (inputs, class labels) batches, but the model returned "
            f"scores of shape {tuple(logits.shape)} for labels of shape {tuple(labels.shape)} ({labels.dtype}). For "
            "another task give `loss=callable(model, batch) -> scalar tensor` (e.g. mean squared error), in a config "
            'file [finetune] options = { loss = "my_module:my_loss" }.'
        )
    return F.cross_entropy(logits, labels)


def loader_generators(loader: Any) -> list[torch.Generator]:
    """The ``torch.Generator`` objects that order a DataLoader's batches (its own, its sampler's, its
    batch sampler's sampler's), each once."""
    found: list[torch.Generator] = []
    sampler = getattr(loader, "sampler", None)
    inner = getattr(getattr(loader, "batch_sampler", None), "sampler", None)
    for owner in (loader, sampler, inner):
        g = getattr(owner, "generator", None)
        if isinstance(g, torch.Generator) and all(g is not f for f in found):
            found.append(g)
    return found


@contextlib.contextmanager
def seeded_shuffle(loader: Any) -> Iterator[None]:
    """Within: the loader's own generators seeded from the global RNG (which the run seeds per
    fine-tune), their states restored afterwards. A DataLoader built with ``generator=g`` otherwise
    shuffles from wherever ``g`` stands, i.e. from how many fine-tunes ran before in the process: on
    fmnist-resnet the same plan recovered with the same seed in two runs scored 0.9281 and 0.9303
    (docs/calibration.md), and a worker's trial would differ from the same trial run in order."""
    generators = loader_generators(loader)
    states = [g.get_state() for g in generators]
    for g in generators:
        g.manual_seed(int(torch.randint(0, 2**62, ())))
    try:
        yield
    finally:
        for g, state in zip(generators, states):
            g.set_state(state)


class Recovery:
    """Base of the recoveries in this package: ``recovery(model)`` trains a compressed model in place.

    Subclasses implement :meth:`__call__` with :meth:`batches` and declare :meth:`tunable` (the
    default search ranges of their own hyperparameters, for :class:`~tightfit.recovery.Tuned`).
    """

    name = "recovery"

    def __init__(
        self,
        loader: Iterable,
        *,
        epochs: int,
        lr: float,
        loss: LossFn | None = None,
        max_steps: int | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        cls = type(self).__name__
        if loader is None or not hasattr(loader, "__iter__"):
            raise ConfigError(f"{cls}: `loader` must be an iterable of training batches, but got {loader!r}.")
        if iter(loader) is loader:  # an iterator: the second epoch, and every later trial, would get no batch
            raise ConfigError(
                f"{cls}: `loader` is an iterator ({type(loader).__name__}), which can be read only once; training reads "
                "it every epoch of every trial. Pass a list of batches or a torch.utils.data.DataLoader."
            )
        if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 0:
            raise ConfigError(f"{cls}: `epochs` must be a whole number >= 0, but got {epochs!r}.")
        if not (isinstance(lr, (int, float)) and lr > 0):
            raise ConfigError(f"{cls}: `lr` must be > 0, but got {lr!r}.")
        if max_steps is not None and max_steps < 0:
            raise ConfigError(f"{cls}: `max_steps` must be >= 0 or None, but got {max_steps!r}.")
        self.loader = loader
        self.empty_loader = loader_is_empty(loader)
        if self.empty_loader and epochs > 0:
            warnings.warn(
                f"{cls}: `loader` holds no batch, so {cls} trains nothing (an empty dataset, or "
                "drop_last with fewer samples than a batch).",
                RuntimeWarning,
                stacklevel=3,
            )
        self.epochs = epochs
        self.lr = float(lr)
        self.loss = loss or cross_entropy_loss
        self.max_steps = max_steps
        self.device = checked_device(cls, device)
        self.steps_taken = 0

    # ------------------------------------------------------------------ tuning
    def tunable(self) -> dict[str, Hyperparameter]:
        """Default search ranges of this recovery's own hyperparameters (learning rate, epochs...)."""
        return {
            "lr": Hyperparameter("lr", low=self.lr / 10, high=self.lr * 10, log=True),
            "epochs": Hyperparameter(
                "epochs", low=max(1, self.epochs // 2), high=max(1, self.epochs * 2), integer=True
            ),
        }

    def with_settings(self, **settings: Any) -> Recovery:
        """A copy with some hyperparameters replaced (the search's per-trial configuration)."""
        return with_settings(self, settings)

    # ------------------------------------------------------------------ training
    def steps_per_epoch(self) -> int:
        try:
            return max(1, len(self.loader))  # type: ignore[arg-type]
        except TypeError:
            return 1

    def total_steps(self) -> int:
        total = self.epochs * self.steps_per_epoch()
        return min(total, self.max_steps) if self.max_steps is not None else total

    def batches(self) -> Iterator[tuple[int, bool, Any]]:
        """Yields ``(epoch, last_of_epoch, batch)`` and counts ``steps_taken``."""
        self.steps_taken = 0
        with seeded_shuffle(self.loader):
            yield from self._epochs()

    def _epochs(self) -> Iterator[tuple[int, bool, Any]]:
        for epoch in range(self.epochs):
            iterator = iter(self.loader)
            batch = next(iterator, None)
            while batch is not None:
                if self.max_steps is not None and self.steps_taken >= self.max_steps:
                    return
                upcoming = next(iterator, None)
                self.steps_taken += 1
                last = upcoming is None or (self.max_steps is not None and self.steps_taken >= self.max_steps)
                yield epoch, last, to_device(batch, self.device)
                batch = upcoming

    def fit(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        before: Callable[[int], None] | None = None,
        after: Callable[[int], None] | None = None,
    ) -> None:
        """The training loop the recoveries share: one optimizer step on ``self.loss`` per batch,
        ``before(step)`` / ``after(step)`` around it (step counts from 0), the model in train mode
        meanwhile and back in its own mode afterwards, even on error."""
        was_training = model.training
        model.train()
        try:
            for _, _, batch in self.batches():
                step = self.steps_taken - 1  # batches() has counted this one already
                if before is not None:
                    before(step)
                optimizer.zero_grad(set_to_none=True)
                self.loss(model, batch).backward()
                optimizer.step()
                if after is not None:
                    after(step)
        finally:
            model.train(was_training)

    def _repr_args(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "lr": self.lr}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._repr_args().items())
        return f"{type(self).__name__}({args})"


def with_settings(recovery: Any, settings: dict[str, Any]) -> Any:
    """A shallow copy of ``recovery`` with attributes replaced; refuses names it does not have."""
    unknown = sorted(k for k in settings if not hasattr(recovery, k))
    if unknown:
        raise ConfigError(f"{type(recovery).__name__} has no hyperparameter(s) {unknown} to set.")
    clone = copy.copy(recovery)
    for key, value in settings.items():
        current = getattr(recovery, key)
        if isinstance(current, bool) or not isinstance(current, (int, float)) or isinstance(value, str):
            setattr(clone, key, value)
        else:  # keep ints ints (epochs) and floats floats, whatever the sampler returned
            setattr(clone, key, type(current)(value))
    if hasattr(clone, "steps_taken"):
        clone.steps_taken = 0
    return clone


def check_optimizer(name: str, owner: str | None = None) -> str:
    """``name`` if it is a known optimizer; a ConfigError naming ``owner`` otherwise (recoveries call
    this when built, so a misspelt name fails before the search, not in its first trial)."""
    if name not in OPTIMIZERS:
        prefix = f"{owner}: " if owner else ""
        raise ConfigError(f"{prefix}`optimizer` must be one of {sorted(OPTIMIZERS)}, but got {name!r}.")
    return name


def make_optimizer(
    name: str, params: list, lr: float, *, momentum: float = 0.9, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    check_optimizer(name)
    kwargs: dict[str, Any] = {"lr": lr, "weight_decay": weight_decay}
    if name == "sgd":
        kwargs["momentum"] = momentum
    return OPTIMIZERS[name](params, **kwargs)


# ---------------------------------------------------------------------- parametrization sites
@dataclass
class Site:
    """One parametrized tensor of the compressed model: ``module.<tensor>`` computed by ``chain``
    (a ``ParametrizationList``) from ``chain.original``, the uncompressed weight underneath."""

    name: str
    module: nn.Module
    tensor: str
    chain: nn.ModuleList
    #: The chains of the other modules that compute with the same original (tied weights): they hold
    #: the very steps ``chain`` holds, so a step swapped for training is swapped in them too.
    tied_chains: list[nn.ModuleList] = field(default_factory=list)

    @property
    def original(self) -> torch.Tensor:
        # a ParametrizationList attribute: nn.Module.__getattr__ is typed Tensor | Module
        return cast(torch.Tensor, self.chain.original)

    def steps(self) -> list[nn.Module]:
        return list(self.chain)

    def swap(self, index: int, new: nn.Module) -> list[tuple[nn.ModuleList, int, nn.Module]]:
        """Entries for :class:`swapped_steps` that replace step ``index`` by ``new`` in every module
        computing with this tensor."""
        return [(chain, index, new) for chain in (self.chain, *self.tied_chains)]


def sites(model: nn.Module, where: Callable[[Site], bool] | None = None) -> list[Site]:
    """Every parametrized tensor of ``model`` (optionally filtered); a tied weight once, at the first
    module that computes with it (the others share its original and its steps)."""
    by_original: dict[int, Site] = {}
    for module_name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for tensor_name, chain in module.parametrizations.items():
            if id(chain.original) in by_original:
                by_original[id(chain.original)].tied_chains.append(chain)
                continue
            by_original[id(chain.original)] = Site(
                f"{module_name}.{tensor_name}" if module_name else tensor_name, module, tensor_name, chain
            )
    return [site for site in by_original.values() if where is None or where(site)]


def projectable(site: Site) -> bool:
    """Every step of the chain can project (so the whole compression can be re-fitted)."""
    return all(isinstance(step, Projection) for step in site.chain)


class swapped_steps:
    """Context manager: replace some parametrization steps by others while training, and put the
    originals back afterwards (even on error). ``swaps`` = [(chain, index, replacement)]."""

    def __init__(self, swaps: list[tuple[nn.ModuleList, int, nn.Module]]) -> None:
        self.swaps = swaps
        self.saved: list[nn.Module] = []

    def __enter__(self) -> swapped_steps:
        self.saved = [chain[i] for chain, i, _ in self.swaps]
        for chain, i, new in self.swaps:
            chain[i] = new
        return self

    def __exit__(self, *exc: Any) -> None:
        for (chain, i, _), old in zip(self.swaps, self.saved):
            chain[i] = old
