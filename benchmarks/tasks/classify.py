"""Training and scoring loops shared by the Fashion-MNIST classifiers."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

Prep = Callable[[torch.Tensor], torch.Tensor]


def train_classifier(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    prep: Prep,
    *,
    epochs: float,
    batch: int,
    lr: float,
    weight_decay: float,
    seed: int,
    log: Callable[[str], None] = print,
    on_epoch: Callable[[int], None] | None = None,
) -> float:
    """AdamW with a OneCycle schedule over ``epochs`` (may be fractional) of shuffled batches;
    ``prep`` turns a uint8 batch into the model's input. Returns the wall time in seconds."""
    g = torch.Generator().manual_seed(seed)
    steps_per_epoch = len(x) // batch
    total = max(1, round(epochs * steps_per_epoch))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.25)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    start, step, epoch = time.time(), 0, 0
    model.train()
    while step < total:
        perm = torch.randperm(len(x), generator=g)
        for b in range(steps_per_epoch):
            if step >= total:
                break
            idx = perm[b * batch : (b + 1) * batch]
            loss = nn.functional.cross_entropy(model(prep(xt[idx])), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % 50 == 0:
                log(f"step {step}/{total} loss {loss.item():.4f} elapsed {time.time() - start:.0f}s")
        epoch += 1
        if on_epoch is not None:
            on_epoch(epoch)
    model.eval()
    return time.time() - start


@torch.no_grad()
def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray, prep: Prep, batch: int = 500) -> float:
    model.eval()
    hits = 0
    for i in range(0, len(x), batch):
        hits += int(
            (model(prep(torch.from_numpy(x[i : i + batch]))).argmax(-1) == torch.from_numpy(y[i : i + batch])).sum()
        )
    return hits / len(x)
