"""Calibrated compression of one weight matrix from its layer's input statistics.

Every function works on a batch of independent problems: ``weight`` is ``(G, rows, columns)``
(G > 1: a grouped convolution, each group with its own inputs) and ``hessian`` is
``(G, columns, columns)``, the layer's ``2 X^T X / n`` over the calibration inputs ``X``.

- :func:`gptq`: quantization column by column, each column's rounding error spread over the
  columns not yet quantized through the inverse Hessian (Frantar et al., GPTQ, 2022), in lazy
  blocks; optional activation order (largest ``diag(H)`` first) with the group scales fixed before
  the pass so that groups stay contiguous in the file.
- :func:`sparsegpt`: the same machinery for pruning (Frantar & Alistarh, SparseGPT, 2023): the mask
  chosen per block by ``w^2 / [H^-1]_jj^2``, the remaining weights updated to compensate.
- :func:`wanda_mask`: ``|w| * ||x_j||_2`` compared within each output row (Sun et al., Wanda, 2023).
- :func:`nm_mask`: keep the N largest scores of every M consecutive inputs of a row.
- :func:`awq_column_scale`: activation-aware scaling (Lin et al., AWQ, 2023): ``s = mean|x|^alpha``,
  alpha from a small grid minimising the layer's output error ``tr(D H D^T)``.
Written from the papers' descriptions; no code was copied.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .grid import code_range, dequantize, group_scales, per_column, round_codes

#: Columns updated lazily together (GPTQ's block size; 128 in the paper, kept).
BLOCK = 128


class SingularHessian(ConfigError):
    """No damping made a layer's input Hessian positive definite (non-finite inputs, say): the
    layer is compressed without calibration instead (``operators.calibrated``)."""


def _dead_inputs(gram: torch.Tensor) -> torch.Tensor:
    """``(G, columns)``: the inputs whose diagonal entry is below float32's smallest normal number
    (never nonzero in the calibration inputs, or too small to carry precision); see
    :func:`inverse_hessian_factor`."""
    return torch.diagonal(gram, dim1=-2, dim2=-1) < torch.finfo(torch.float32).tiny


def _cut_dead(matrix: torch.Tensor, dead: torch.Tensor) -> None:
    """Zero, in place, the rows and columns of ``(G, C, C)`` ``matrix`` that belong to dead inputs."""
    matrix.masked_fill_(dead[..., :, None] | dead[..., None, :], 0.0)


def inverse_hessian_factor(hessian: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor of ``(H + damp I)^-1`` per problem, and which columns are dead (never
    nonzero in the calibration inputs). GPTQ's reference zeroes such weights; here they are kept
    (rounded on their own, no error spread from them): an input that is always zero in a few
    hundred samples (a border pixel) may still be nonzero later. A diagonal entry below float32's
    smallest normal number counts as dead too: such an input carries no usable precision (a
    randomly initialised MobileViT's blocks read inputs of ~1e-23, whose Hessian no damping
    relative to its own mean could factor)."""
    h = hessian.clone()
    dead = _dead_inputs(h)
    _cut_dead(h, dead)
    diag = torch.diagonal(h, dim1=-2, dim2=-1)
    diag[dead] = 1.0
    damp = percdamp * diag.mean(dim=-1, keepdim=True)
    for attempt in range(6):  # a nearly singular H (few samples, collinear inputs): damp harder
        try:
            factor = torch.linalg.cholesky(h + torch.diag_embed(damp.expand_as(diag) * 10.0**attempt))
            inverse = torch.cholesky_inverse(factor)
            return torch.linalg.cholesky(inverse, upper=True), dead
        except torch.linalg.LinAlgError:
            continue
    raise SingularHessian(
        "its input Hessian is not positive definite even with 1e5 x `percdamp` damping "
        "(non-finite or degenerate calibration inputs)"
    )


def _block_size(step: int) -> int:
    return max(step, BLOCK // step * step) if step > 0 else BLOCK


def _scales_for(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool):
    """``(G, rows, groups)`` scales and zero points of ``(G, rows, columns)`` weights."""
    g, rows, columns = weight.shape
    scale, zero = group_scales(weight.reshape(g * rows, columns), bits, group_size, symmetric)
    return scale.reshape(g, rows, -1), None if zero is None else zero.reshape(g, rows, -1)


def column_order(hessian: torch.Tensor, group_size: int, act_order: bool | str) -> torch.Tensor | None:
    """``(G, columns)`` order GPTQ takes the columns in, or None (their own order).

    ``True``: largest ``diag(H)`` first (GPTQ's act order). ``"groups"``: whole groups of
    ``group_size`` columns, the group holding the largest ``diag(H)`` first, each group's columns
    largest first: the large inputs still come early, yet each group stays contiguous in the pass,
    so its scale can be set when it starts, from the weights as updated so far (a partial last
    group goes last, so every group starts at a multiple of ``group_size``)."""
    if not act_order:
        return None
    diag = torch.diagonal(hessian, dim1=-2, dim2=-1)
    order = torch.argsort(diag, dim=-1, descending=True, stable=True)
    if act_order is True or group_size <= 0:
        return order
    columns = diag.shape[-1]
    group = (torch.arange(columns, device=diag.device) // group_size).expand_as(diag)
    peak = torch.zeros(diag.shape[0], -(-columns // group_size), device=diag.device, dtype=diag.dtype)
    peak = peak.scatter_reduce(1, group, diag, "amax", include_self=False)
    if columns % group_size:
        peak[:, -1] = -1.0  # below every diagonal entry (>= 0)
    position = torch.argsort(torch.argsort(peak, dim=1, descending=True, stable=True), dim=1)
    return order.gather(1, torch.argsort(position.gather(1, group).gather(1, order), dim=1, stable=True))


def gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    *,
    group_size: int = 0,
    symmetric: bool = True,
    act_order: bool | str = False,
    percdamp: float = 0.01,
    keep: torch.Tensor | None = None,
):
    """Quantized weights ``(G, rows, columns)`` with their grid ``(scale, zero)`` of shape
    ``(G, rows, groups)`` (zero None when symmetric). ``act_order``: :func:`column_order` (with
    ``True`` the group scales are fixed before the pass, from the original weights). ``keep`` (bool,
    weight's shape): entries that may be nonzero (a mask pruning applied before): the others are
    quantized to exactly zero."""
    w = weight.detach().to(torch.float32).clone()
    g, rows, columns = w.shape
    static = group_size == 0 or act_order is True  # grid fixed before the pass
    scale, zero = _scales_for(w, bits, group_size, symmetric) if static else (None, None)
    perm = column_order(hessian, group_size, act_order)
    h = hessian
    if perm is not None:
        w = torch.gather(w, 2, perm[:, None, :].expand_as(w))
        keep = None if keep is None else torch.gather(keep, 2, perm[:, None, :].expand_as(keep))
        h = torch.gather(torch.gather(h, 1, perm[:, :, None].expand_as(h)), 2, perm[:, None, :].expand_as(h))
    upper, _ = inverse_hessian_factor(h.to(torch.float32), percdamp)
    order = perm if perm is not None else torch.arange(columns, device=w.device).expand(g, columns)
    if not static:
        scale = torch.empty(g, rows, -(-columns // group_size), device=w.device, dtype=w.dtype)
        zero = None if symmetric else torch.empty_like(scale)
    low, high = code_range(bits, symmetric)
    block = _block_size(group_size)
    out = torch.zeros_like(w)
    for i1 in range(0, columns, block):
        i2 = min(i1 + block, columns)
        w1 = w[..., i1:i2].clone()
        err1, hinv1 = torch.zeros_like(w1), upper[:, i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            group = (order[:, col] // group_size) if group_size else torch.zeros(g, dtype=torch.long, device=w.device)
            at = group[:, None, None].expand(g, rows, 1)
            if not static and col % group_size == 0:
                # the group's range as it stands after the earlier blocks' updates, not this block's
                # (as GPTQ's reference does): measured on correlated inputs at 3 bits, group 32, the
                # in-block values gave an output error of 18.3 against 12.0 (round-to-nearest: 18.6)
                s, z = _scales_for(w[..., col : col + group_size], bits, 0, symmetric)
                scale.scatter_(2, at, s)
                if zero is not None:
                    zero.scatter_(2, at, z)
            s = torch.gather(scale, 2, at)[..., 0]
            z = None if zero is None else torch.gather(zero, 2, at)[..., 0]
            col_w = w1[..., i]
            codes = torch.round(col_w / s) + (z if z is not None else 0)
            q = dequantize(torch.clamp(codes, low, high), s, z)
            if keep is not None:
                q = q * keep[..., col]
            out[..., col] = q
            d = hinv1[:, i, i][:, None]
            e = (col_w - q) / d
            w1[..., i:] -= e[..., None] * hinv1[:, i, i:][:, None, :]
            err1[..., i] = e
        w[..., i2:] -= err1 @ upper[:, i1:i2, i2:]
    if perm is not None:
        out = torch.empty_like(out).scatter_(2, perm[:, None, :].expand_as(out), out)
    return out, scale, zero


def sparsegpt(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    *,
    pattern: tuple[int, int] | None = None,
    percdamp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pruned and compensated weights ``(G, rows, columns)`` and their 0/1 mask: ``sparsity`` of each
    block's entries removed (or, with ``pattern`` (N, M), all but N of every M consecutive inputs of
    a row)."""
    w = weight.detach().to(torch.float32).clone()
    upper, _ = inverse_hessian_factor(hessian.to(torch.float32), percdamp)
    g, rows, columns = w.shape
    block = _block_size(pattern[1] if pattern else 0)
    keep = torch.ones_like(w)
    for i1 in range(0, columns, block):
        i2 = min(i1 + block, columns)
        w1 = w[..., i1:i2].clone()
        err1, hinv1 = torch.zeros_like(w1), upper[:, i1:i2, i1:i2]
        saliency_denominator = torch.diagonal(hinv1, dim1=-2, dim2=-1)[:, None, :] ** 2
        pruned = torch.zeros_like(w1, dtype=torch.bool)
        if pattern is None:
            score = (w1**2 / saliency_denominator).reshape(g, -1)
            n_pruned = int(round(sparsity * score.shape[1]))
            if n_pruned:
                idx = torch.topk(score, n_pruned, dim=1, largest=False).indices
                pruned.view(g, -1).scatter_(1, idx, True)
        for i in range(i2 - i1):
            if pattern is not None and i % pattern[1] == 0:
                n, m = pattern
                score = w1[..., i : i + m] ** 2 / saliency_denominator[..., i : i + m]
                idx = torch.topk(score, m - n, dim=2, largest=False).indices
                pruned[..., i : i + m].scatter_(2, idx, True)
            col_w = w1[..., i]
            q = col_w.masked_fill(pruned[..., i], 0.0)
            e = (col_w - q) / hinv1[:, i, i][:, None]
            w1[..., i:] -= e[..., None] * hinv1[:, i, i:][:, None, :]
            w1[..., i] = q
            err1[..., i] = e
        w[..., i1:i2] = w1.masked_fill(pruned, 0.0)
        keep[..., i1:i2] = (~pruned).to(w.dtype)
        w[..., i2:] -= err1 @ upper[:, i1:i2, i2:]
    return w, keep


def original_target(weight: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor, damp: float) -> torch.Tensor:
    """The dense weights ``(G, rows, columns)`` whose outputs on the compressed model's inputs
    ``X_c`` come closest to the original layer's outputs on the original model's inputs ``X_o``:
    ``argmin ||W' X_c - W X_o||^2 + lam ||W' - W||^2 = W (A + lam I) (X_c^T X_c + lam I)^-1`` with
    ``A = X_o^T X_c`` (``cross``) and ``lam = damp x`` the mean diagonal of ``gram = X_c^T X_c``.
    The ridge pulls the directions the calibration inputs never span back to ``W``, not to zero;
    where ``X_c == X_o`` the answer is ``W`` itself. Compressing ``W'`` with the Hessian of ``X_c``
    then minimises the error against the original outputs, not the compressed model's own
    (GPTAQ, Li et al. 2025, "asymmetric calibration")."""
    w = weight.to(torch.float32)
    gram, cross = gram.to(torch.float32).clone(), cross.to(torch.float32).clone()
    dead = _dead_inputs(gram)  # no usable input: its column of W is kept
    _cut_dead(gram, dead)
    _cut_dead(cross, dead)
    lam = damp * torch.diagonal(gram, dim1=-2, dim2=-1).sum(-1) / (~dead).sum(-1).clamp(min=1)
    lam = torch.where(lam > 0, lam, torch.ones_like(lam))[:, None, None]
    eye = torch.eye(gram.shape[-1], device=gram.device, dtype=torch.float32)
    try:
        target = torch.linalg.solve(gram + lam * eye, (cross.transpose(-1, -2) + lam * eye) @ w.transpose(-1, -2))
    except torch.linalg.LinAlgError:
        return w
    target = target.transpose(-1, -2)
    return target if bool(torch.isfinite(target).all()) else w


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """0/1 mask keeping the ``n`` largest scores of every ``m`` consecutive columns of a row
    (``score`` is ``(..., columns)`` with columns a multiple of ``m``)."""
    grouped = score.reshape(*score.shape[:-1], -1, m)
    idx = torch.topk(grouped, n, dim=-1).indices
    return torch.zeros_like(grouped).scatter_(-1, idx, 1.0).reshape(score.shape)


def wanda_mask(
    weight: torch.Tensor, input_sq_norm: torch.Tensor, sparsity: float, pattern: tuple[int, int] | None = None
) -> torch.Tensor:
    """0/1 mask ``(G, rows, columns)`` from ``|w| * ||x_j||``, compared within each row (or by
    ``pattern`` (N, M)). ``input_sq_norm`` is ``(G, columns)``: the summed squares of each input."""
    score = weight.detach().abs() * input_sq_norm.sqrt()[:, None, :]
    if pattern is not None:
        return nm_mask(score, *pattern)
    columns = score.shape[-1]
    n_pruned = int(round(sparsity * columns))
    mask = torch.ones_like(score)
    if n_pruned:
        idx = torch.topk(score, n_pruned, dim=-1, largest=False).indices
        mask.scatter_(-1, idx, 0.0)
    return mask


def output_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> float:
    """``sum tr(D H D^T)`` with ``D = weight - approx``: the layer's squared output error on the
    calibration inputs (times 2/n), without keeping the inputs."""
    d = (weight - approx).to(torch.float32)
    return float(torch.einsum("grc,gcd,grd->", d, hessian.to(torch.float32), d))


#: AWQ's grid of exponents (the paper searches 20 points in [0, 1)); alpha 0 is plain rounding,
#: so the chosen scale is never worse than round-to-nearest on the calibration inputs.
AWQ_ALPHAS = tuple(i / 20 for i in range(20))


def awq_column_scale(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    input_abs_mean: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
) -> torch.Tensor:
    """Per-input-column scale ``s`` ``(columns,)`` (one problem, G == 1) minimising the output error
    of ``Q(W * s) / s`` over :data:`AWQ_ALPHAS`."""
    w = weight[0].detach().to(torch.float32)
    best, best_error = torch.ones(w.shape[1], device=w.device), None
    for alpha in AWQ_ALPHAS:
        s = input_abs_mean[0].clamp(min=1e-4) ** alpha
        s = s / (s.max() * s.min()).sqrt()
        scaled = w * s
        scale, zero = group_scales(scaled, bits, group_size, symmetric)
        sc = per_column(scale, group_size, w.shape[1])
        zc = None if zero is None else per_column(zero, group_size, w.shape[1])
        approx = dequantize(round_codes(scaled, sc, zc, bits), sc, zc) * (1.0 / s)
        error = output_error(w[None], approx[None], hessian)
        if best_error is None or error < best_error:
            best, best_error = s, error
    return best
