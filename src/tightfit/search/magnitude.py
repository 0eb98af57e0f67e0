"""The global magnitude family: one threshold on ``|w|`` across every layer pruned by magnitude.

The knob ``u`` in [0, 1] is the share of all those layers' weights removed (up to the largest
sparsity a layer allows): the weights at or below the magnitude threshold that removes that share
are pruned, so each layer's sparsity is the share of *its* weights at or below the threshold
(clipped to the layer's own range). Every other dimension stays at its gentle end, as in the
uniform family. On fmnist-resnet (``Prune + Quantize(bits=(2, 8))``, ``MaxDrop(0.005)``, no
fine-tune) a bisection over this knob reached 5.45x where the uniform family's reached 4.66x
(docs/evidence.md, "Methods without training in the loop").

Only unstructured magnitude pruning has such a family: the calibrated methods (wanda, sparsegpt)
rank weights by more than their magnitude, an N:M pattern fixes the sparsity, and structured
pruning removes channels; for those :func:`global_magnitude_family` returns None.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..operators.prune import Prune
from .context import SearchContext
from .encoding import UnitEncoding
from .levelset import GRID
from .space import numeric_range


def prunes_by_magnitude(op: object) -> bool:
    """Unstructured pruning of the smallest weights (no calibration, no N:M pattern)."""
    return isinstance(op, Prune) and op.method == "magnitude" and op.pattern is None


def magnitude_dims(context: SearchContext, enc: UnitEncoding) -> list[int]:
    """The dimensions that set a layer's sparsity for magnitude pruning, with the layer's weights at
    hand (``SearchContext.weights``). An operator name shared by another kind of operator counts as
    not magnitude: the plan could not tell which one prunes the layer."""
    by_name: dict[str, list[object]] = {}
    for op in context.space.strategy:
        by_name.setdefault(op.name, []).append(op)
    return [
        i
        for i, dim in enumerate(enc.dims)
        if dim.hyperparameter.name == "sparsity"
        and enc.is_continuous(i)
        and all(prunes_by_magnitude(op) for op in by_name.get(dim.operator, [None]))
        and context.weights.get(dim.layer) is not None
    ]


def _sorted_magnitudes(weight: object) -> np.ndarray:
    import torch

    assert isinstance(weight, torch.Tensor)
    return np.sort(weight.detach().abs().reshape(-1).double().cpu().numpy())


def global_magnitude_family(context: SearchContext, enc: UnitEncoding) -> Callable[[float], np.ndarray] | None:
    """The family (knob -> point of the unit cube), or None with fewer than two magnitude-pruned
    layers (one layer's global family is its uniform one). The knob is rounded down to ``levelset.GRID``,
    so every knob of a grid segment is one plan and a trial's knob is found again exactly (``knob_of``)."""
    dims = magnitude_dims(context, enc)
    if len(dims) < 2:
        return None
    mags = [_sorted_magnitudes(context.weights[enc.dims[i].layer]) for i in dims]
    ranges = np.array([numeric_range(enc.dims[i].hyperparameter) for i in dims])
    every = np.sort(np.concatenate(mags))
    top = float(ranges[:, 1].max())
    gentle = enc.decode(np.zeros(enc.d))
    keys = [enc.dims[i].key for i in dims]

    def sparsities(u: float) -> np.ndarray:
        step = int(np.floor(np.clip(u, 0.0, 1.0) * (len(GRID) - 1) + 1e-9))
        removed = int(round(GRID[step] * top * len(every)))
        if removed <= 0:
            return np.clip(np.zeros(len(dims)), ranges[:, 0], ranges[:, 1])
        threshold = every[removed - 1]
        share = np.array([np.searchsorted(m, threshold, side="right") / len(m) for m in mags])
        return np.clip(share, ranges[:, 0], ranges[:, 1])

    def plan(u: float) -> np.ndarray:
        return enc.encode({**gentle, **dict(zip(keys, map(float, sparsities(u))))})

    return plan
