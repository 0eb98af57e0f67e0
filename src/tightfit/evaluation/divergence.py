"""How far a compressed model's outputs moved from the original's on calibration inputs, with no
labels and no validation data: the cheap per-plan signal the metric search's warm start ranks
layer settings by (``tightfit.search.warm_metric``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..calling import call_model, output_tensors

#: samples of the calibration batches a divergence reads (enough to rank layer settings; each probe
#: is one forward pass of these)
DIVERGENCE_SAMPLES = 64


def _batch_len(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return len(batch)
    if isinstance(batch, dict):
        return min(_batch_len(v) for v in batch.values() if isinstance(v, (torch.Tensor, dict, list, tuple)))
    if isinstance(batch, (list, tuple)):
        return _batch_len(batch[0])
    raise TypeError(f"a calibration batch of tensors, but got {type(batch).__name__}")


def _head(batch: Any, n: int) -> Any:
    """The first ``n`` samples of a batch (a tensor, a dict or a tuple of them)."""
    if isinstance(batch, torch.Tensor):
        return batch[:n]
    if isinstance(batch, dict):
        return {k: _head(v, n) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_head(v, n) for v in batch)
    return batch


def first_samples(batches: list[Any], samples: int) -> list[Any]:
    """The batches holding the first ``samples`` samples (the last one cut)."""
    out, seen = [], 0
    for batch in batches:
        if seen >= samples:
            break
        take = min(_batch_len(batch), samples - seen)
        out.append(_head(batch, take))
        seen += take
    return out


class OutputDivergence:
    """``model -> divergence`` from ``original`` on the first ``samples`` calibration samples: the
    KL divergence KL(original || model) of the softmax over the last axis of the first output tensor
    (logits; mean over samples and positions), or the mean squared error for an output with one
    value per position. ``calls`` counts the forward passes made (one per call)."""

    def __init__(self, original: nn.Module, batches: list[Any], samples: int = DIVERGENCE_SAMPLES) -> None:
        self.batches = first_samples(batches, samples)
        self.samples = sum(_batch_len(b) for b in self.batches)
        self.calls = 0
        self.reference = [self._output(original, b) for b in self.batches]

    @staticmethod
    def _output(model: nn.Module, batch: Any) -> torch.Tensor:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                return output_tensors(call_model(model, batch))[0].float()
        finally:
            model.train(was_training)

    def __call__(self, model: nn.Module) -> float:
        self.calls += 1
        total, count = 0.0, 0
        for batch, ref in zip(self.batches, self.reference):
            out = self._output(model, batch)
            if ref.dim() == 0 or ref.shape[-1] == 1:
                total += float(((out - ref) ** 2).sum())
                count += ref.numel()
                continue
            p_log = torch.log_softmax(ref, dim=-1)
            q_log = torch.log_softmax(out, dim=-1)
            total += float((p_log.exp() * (p_log - q_log)).sum())
            count += ref.numel() // ref.shape[-1]
        return total / max(count, 1)
