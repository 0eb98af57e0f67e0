"""A fine-tune under the run's seed gives the same weights whatever ran before it in the process,
also when the user's DataLoader shuffles with its own generator."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset

import tightfit
from tightfit.run.evaluator import recover_seeded


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(64, 4, generator=g), torch.randint(0, 3, (64,), generator=g))


def _weights_after(tune: tightfit.FineTune, seed: int) -> torch.Tensor:
    torch.manual_seed(123)  # the same start for every call
    model = nn.Linear(4, 3)
    recover_seeded(tune, model, seed)
    return model.weight.detach().clone()


def _loaders() -> list[DataLoader]:
    data = _data()
    sampler = RandomSampler(data, generator=torch.Generator().manual_seed(5))
    return [
        DataLoader(data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(5)),
        DataLoader(data, batch_sampler=BatchSampler(sampler, batch_size=8, drop_last=False)),
    ]


def test_the_same_seed_gives_the_same_weights_after_other_fine_tunes():
    for loader in _loaders():
        tune = tightfit.FineTune(loader, epochs=1, lr=0.1, optimizer="sgd")
        first = _weights_after(tune, seed=7)
        _weights_after(tune, seed=3)  # another trial's fine-tune in between
        list(loader)  # and the user's own pass over the loader
        assert torch.equal(_weights_after(tune, seed=7), first)
        assert not torch.equal(_weights_after(tune, seed=3), first)  # the seed does set the order


def test_the_loader_s_generator_is_left_where_it_was():
    loader = _loaders()[0]
    tune = tightfit.FineTune(loader, epochs=2, lr=0.1, max_steps=3)  # its checks read the loader once
    before = loader.generator.get_state()
    _weights_after(tune, seed=1)
    assert torch.equal(loader.generator.get_state(), before)
