"""Whole attention heads removed, so an attention block gets narrower inside.

Two kinds of block are handled:

- ``nn.MultiheadAttention`` (so also ``nn.TransformerEncoderLayer``/``DecoderLayer``). Its inner
  width is its ``embed_dim``, the width of the residual stream around it, so it cannot hold fewer
  heads of the same size; Torch-Pruning's head pruning (``num_heads=``, ``prune_num_heads=True``)
  acts on q/k/v ``Linear`` layers and leaves this module's heads untouched. A block that loses heads
  is therefore first replaced by :class:`SplitQKVAttention`, the same computation with separate
  q/k/v ``Linear`` layers, whose inner width may be smaller than ``embed_dim``.
- Hugging Face-style attention: a module holding q/k/v ``Linear`` layers and an attribute with the
  number of heads (``num_attention_heads``, ``num_heads``, ...), used by its forward to reshape.

Either way the heads are removed through Torch-Pruning's dependency graph: the channels of the
dropped heads are removed from the q/k/v layers and, with them, every coupled layer (the output
projection's inputs), then the block's head count is updated. Which heads go is decided by their
L2 weight magnitude (over the whole coupled group), so a plan replays exactly on a copy of the
same weights and reproduces the same shapes on a fresh instance.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..calling import call_model
from ..errors import ModelError
from .group_search import failing_members

#: Attributes that hold the number of heads of Hugging Face-style (and hand-written) attention.
HEAD_COUNT_ATTRIBUTES = ("num_attention_heads", "num_heads", "n_heads", "n_head")

#: Attributes that hold the inner width (heads x head size); updated with the head count.
INNER_WIDTH_ATTRIBUTES = ("all_head_size", "inner_dim")


class SplitQKVAttention(nn.Module):
    """``nn.MultiheadAttention`` with separate q/k/v ``Linear`` layers, whose inner width
    ``num_heads * head_dim`` may be smaller than ``embed_dim`` once heads are removed.

    Same call as ``nn.MultiheadAttention`` (positional or keyword: ``query, key, value,
    key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal``), the same masks,
    batch layouts and returned attention weights; a 3-D ``attn_mask`` (one per original head) is
    read for the heads kept (``kept_heads``). ``in_proj_weight``/``in_proj_bias`` are None and
    ``_qkv_same_embed_dim`` is False, so ``nn.TransformerEncoderLayer`` never takes its fused fast
    path, which expects packed weights.
    """

    in_proj_weight = None
    in_proj_bias = None
    bias_k = None
    bias_v = None
    add_zero_attn = False
    _qkv_same_embed_dim = False

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        head_dim: int,
        *,
        kdim: int | None = None,
        vdim: int | None = None,
        bias: bool = True,
        out_bias: bool = True,
        dropout: float = 0.0,
        batch_first: bool = False,
    ) -> None:
        super().__init__()
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.kdim, self.vdim = kdim or embed_dim, vdim or embed_dim
        self.dropout, self.batch_first = dropout, batch_first
        #: which heads of the original block these are (3-D attention masks hold one per original head)
        self.kept_heads = list(range(num_heads))
        self.original_num_heads = num_heads
        inner = num_heads * head_dim
        self.q_proj = nn.Linear(embed_dim, inner, bias=bias)
        self.k_proj = nn.Linear(self.kdim, inner, bias=bias)
        self.v_proj = nn.Linear(self.vdim, inner, bias=bias)
        self.out_proj = nn.Linear(inner, embed_dim, bias=out_bias)

    @classmethod
    def from_multihead_attention(cls, mha: nn.MultiheadAttention) -> SplitQKVAttention:
        """The same block, weights shared by value (copied), ready to lose heads."""
        ref = mha.out_proj.weight
        split = cls(
            mha.embed_dim,
            mha.num_heads,
            mha.head_dim,
            kdim=mha.kdim,
            vdim=mha.vdim,
            bias=mha.in_proj_bias is not None,
            out_bias=mha.out_proj.bias is not None,
            dropout=mha.dropout,
            batch_first=mha.batch_first,
        ).to(device=ref.device, dtype=ref.dtype)
        if mha._qkv_same_embed_dim:
            weights = mha.in_proj_weight.chunk(3)
        else:
            weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
        biases = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None, None, None)
        with torch.no_grad():
            for layer, weight, bias in zip((split.q_proj, split.k_proj, split.v_proj), weights, biases):
                layer.weight.copy_(weight)
                layer.weight.requires_grad_(weight.requires_grad)
                if bias is not None:
                    layer.bias.copy_(bias)
                    layer.bias.requires_grad_(bias.requires_grad)
            split.out_proj.weight.copy_(mha.out_proj.weight)
            split.out_proj.weight.requires_grad_(mha.out_proj.weight.requires_grad)
            if mha.out_proj.bias is not None:
                split.out_proj.bias.copy_(mha.out_proj.bias)
                split.out_proj.bias.requires_grad_(mha.out_proj.bias.requires_grad)
        split.train(mha.training)
        return split

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batched = query.dim() == 3
        if not batched:  # (L, E): a batch of one, in the sequence-first layout
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
            if attn_mask is not None and attn_mask.dim() == 3:
                attn_mask = attn_mask.unsqueeze(0).flatten(0, 1)
        elif self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        length, batch, _ = query.shape
        source = key.shape[0]

        def heads(t: torch.Tensor, n: int) -> torch.Tensor:  # (n, N, H*d) -> (N, H, n, d)
            return t.reshape(n, batch, self.num_heads, self.head_dim).permute(1, 2, 0, 3)

        q, k, v = heads(self.q_proj(query), length), heads(self.k_proj(key), source), heads(self.v_proj(value), source)
        if is_causal and attn_mask is None:
            attn_mask = torch.ones(length, source, dtype=torch.bool, device=query.device).triu(1)
        mask = self._additive_mask(attn_mask, key_padding_mask, batch, length, source, q.dtype)
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q / math.sqrt(self.head_dim)) @ k.transpose(-2, -1)
            if mask is not None:
                scores = scores + mask
            weights = torch.softmax(scores, dim=-1)
            if dropout:  # the weights returned are the ones used, after dropout, as nn.MultiheadAttention's are
                weights = F.dropout(weights, p=dropout)
            out = weights @ v
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not batched:
                weights = weights.squeeze(0)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        out = self.out_proj(out.permute(2, 0, 1, 3).reshape(length, batch, self.num_heads * self.head_dim))
        if not batched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def _additive_mask(self, attn_mask, key_padding_mask, batch, length, source, dtype) -> torch.Tensor | None:
        """``attn_mask`` and ``key_padding_mask`` as one float mask of shape (N or 1, H or 1, L, S)
        (boolean masks: True means "do not attend", as in ``nn.MultiheadAttention``)."""
        mask = None
        if attn_mask is not None:
            mask = _as_float(attn_mask, dtype)
            if mask.dim() == 2:
                mask = mask.view(1, 1, length, source)
            else:  # one per (batch, original head)
                mask = mask.view(batch, self.original_num_heads, length, source)[:, self.kept_heads]
        if key_padding_mask is not None:
            padding = _as_float(key_padding_mask, dtype).view(batch, 1, 1, source)
            mask = padding if mask is None else mask + padding
        return mask

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
            f"kept_heads={self.kept_heads}, batch_first={self.batch_first}"
        )


def _as_float(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


# -- finding the blocks, and removing heads from them ----------------------------------------------


def multihead_attention_of(model: nn.Module, key: str) -> str | None:
    """The name of the ``nn.MultiheadAttention`` (or its split form) whose ``out_proj`` is layer ``key``."""
    parent, _, leaf = key.rpartition(".")
    if leaf != "out_proj":
        return None
    try:
        block = model.get_submodule(parent)
    except AttributeError:
        return None
    return parent if isinstance(block, (nn.MultiheadAttention, SplitQKVAttention)) else None


def unsupported_multihead_attention(mha: nn.MultiheadAttention) -> str | None:
    """Why whole heads cannot be removed from ``mha``, or None when they can."""
    if mha.num_heads < 2:
        return "attention with a single head: no whole head can go"
    if mha.bias_k is not None or mha.add_zero_attn:
        return "attention with add_bias_kv or add_zero_attn: whole-head pruning does not support them; left alone"
    return None


def split_multihead_attention(model: nn.Module, name: str) -> SplitQKVAttention:
    """Replace the ``nn.MultiheadAttention`` called ``name`` by its :class:`SplitQKVAttention`."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    split = SplitQKVAttention.from_multihead_attention(getattr(parent, attr))
    setattr(parent, attr, split)
    # nn.TransformerEncoder's nested-tensor fast path reads the packed weights of its layers' attention
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoder) and any(layer.self_attn is split for layer in module.layers):
            module.use_nested_tensor = False
    return split


def head_owner(model: nn.Module, qkv: list[str]) -> tuple[str, str] | None:
    """(module name, attribute) of the head count of the attention whose q/k/v layers are ``qkv``:
    the nearest module above them all holding an int in one of :data:`HEAD_COUNT_ATTRIBUTES` that
    divides their (equal) output width. None if there is none."""
    modules = dict(model.named_modules())
    widths = {modules[n].out_features for n in qkv if isinstance(modules[n], nn.Linear)}
    if len(qkv) < 2 or len(widths) != 1:
        return None  # not q/k/v of equal width (e.g. grouped-query attention): left alone
    width = widths.pop()
    common = qkv[0].split(".")
    for name in qkv[1:]:
        parts = name.split(".")
        n = 0
        while n < min(len(common), len(parts)) and common[n] == parts[n]:
            n += 1
        common = common[:n]
    for depth in range(min(len(common), len(qkv[0].split(".")) - 1), -1, -1):
        owner = ".".join(common[:depth])
        module = modules[owner]
        for attr in HEAD_COUNT_ATTRIBUTES:
            count = getattr(module, attr, None)
            if isinstance(count, int) and not isinstance(count, bool) and count >= 2 and width % count == 0:
                return owner, attr
    return None


def _torch_pruning():
    from .structured import torch_pruning_module

    return torch_pruning_module()


def _head_groups(model: nn.Module, dg, keys: list[str]) -> dict[str, tuple[nn.Module, Any, list[str], str, str]]:
    """For each key: (leader layer, its full channel group, the q/k/v layers, head-count owner, attribute)."""
    tp = _torch_pruning()
    modules = dict(model.named_modules())
    names = {m: n for n, m in modules.items()}
    found = {}
    for key in keys:
        mha = multihead_attention_of(model, key)
        leader = modules[mha].v_proj if mha is not None else modules[key]
        pruner = dg.get_pruner_of_module(leader)
        group = dg.get_pruning_group(leader, pruner.prune_out_channels, list(range(pruner.get_out_channels(leader))))
        qkv: list[str] = []
        for item in group:
            module = item.dep.target.module
            if (
                isinstance(module, tp.ops.TORCH_LINEAR)
                and dg.is_out_channel_pruning_fn(item.dep.handler)
                and module in names
                and names[module] not in qkv
            ):
                qkv.append(names[module])
        owner = (mha, "num_heads") if mha is not None else head_owner(model, qkv)
        if owner is None:
            raise ModelError(f"StructuredPrune: layer {key!r} leads no attention block whose heads can be removed.")
        found[key] = (leader, group, qkv, *owner)
    return found


@dataclass(frozen=True)
class RemovedHeads:
    """Which heads of a block went: their indices before pruning, their size, and the q/k/v layers."""

    heads: list[int]
    size: int
    layers: list[str]


def remove_heads(model: nn.Module, ratios: dict[str, float], example_input: Any) -> dict[str, RemovedHeads]:
    """Remove the fraction ``ratios[key]`` of the heads (rounded down, one head always kept) of the
    attention block recorded on layer ``key`` (an ``nn.MultiheadAttention``'s ``out_proj``, or the
    q/k/v group leader of a Hugging Face-style block), in place. The heads with the lowest mean L2
    weight magnitude over their coupled channels go (ties: lower index first)."""
    from .structured import dependency_graph, kept_channels

    tp = _torch_pruning()
    todo = {key: ratio for key, ratio in ratios.items() if ratio > 0.0}
    for key, ratio in list(todo.items()):
        mha = multihead_attention_of(model, key)
        block = model.get_submodule(mha) if mha is not None else None
        if isinstance(block, nn.MultiheadAttention):
            if kept_channels(block.num_heads, ratio, None) == block.num_heads:
                del todo[key]  # nothing to remove: the block stays as it is
            else:
                split_multihead_attention(model, mha)
    if not todo:
        return {}
    dg = dependency_graph(model, example_input)
    importance = tp.importance.GroupMagnitudeImportance(p=2, normalizer=None)
    removed: dict[str, RemovedHeads] = {}
    for key, (leader, group, qkv, owner_name, attr) in _head_groups(model, dg, list(todo)).items():
        owner = model.get_submodule(owner_name) if owner_name else model
        heads, width = getattr(owner, attr), leader.out_features
        n_drop = heads - kept_channels(heads, todo[key], None)
        if n_drop == 0:
            continue
        size = width // heads
        with torch.no_grad():
            scores = importance(group)
        if scores is None or len(scores) != width:
            raise ModelError(f"StructuredPrune: could not score the heads of {key!r}.")
        per_head = scores.view(heads, size).mean(1)
        drop = sorted(sorted(range(heads), key=lambda h: (float(per_head[h]), h))[:n_drop])
        channels = [h * size + i for h in drop for i in range(size)]
        pruning = dg.get_pruning_group(leader, dg.get_pruner_of_module(leader).prune_out_channels, channels)
        if not dg.check_pruning_group(pruning):
            raise ModelError(f"StructuredPrune: Torch-Pruning refused to remove heads {drop} of {key!r}.")
        pruning.prune()
        kept = heads - len(drop)
        setattr(owner, attr, kept)
        for inner in INNER_WIDTH_ATTRIBUTES:
            if getattr(owner, inner, None) == width:
                setattr(owner, inner, kept * size)
        if isinstance(owner, SplitQKVAttention):
            owner.kept_heads = [h for i, h in enumerate(owner.kept_heads) if i not in drop]
        modules = dict(model.named_modules())
        if any(modules[name].out_features != kept * size for name in qkv):
            raise ModelError(
                f"StructuredPrune: removing heads of {key!r} left its q/k/v layers {qkv} of unequal widths."
            )
        removed[key] = RemovedHeads(drop, size, qkv)
    return removed


def mask_heads(model: nn.Module, removed: dict[str, RemovedHeads]) -> None:
    """Zero the q/k/v rows of the given heads in a copy that was not pruned. A head whose values
    are zero adds nothing to its block's output, so this copy must compute what the pruned one does."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for key, gone in removed.items():
            mha = multihead_attention_of(model, key)
            block = modules[mha] if mha is not None else None
            if isinstance(block, nn.MultiheadAttention):
                weights = (
                    block.in_proj_weight.chunk(3)
                    if block._qkv_same_embed_dim
                    else (block.q_proj_weight, block.k_proj_weight, block.v_proj_weight)
                )
                biases = block.in_proj_bias.chunk(3) if block.in_proj_bias is not None else ()
                tensors = [*weights, *biases]
            else:
                tensors = [
                    t for name in gone.layers for t in (modules[name].weight, modules[name].bias) if t is not None
                ]
            for tensor in tensors:
                for h in gone.heads:
                    tensor[h * gone.size : (h + 1) * gone.size] = 0


def prunable_head_blocks(model: nn.Module, example_input: Any, candidates: list[str]) -> dict[str, str]:
    """Which attention blocks of ``model`` can lose whole heads. ``candidates`` are the leaders of
    channel groups that break the forward pass (Hugging Face-style attention among them); every
    ``nn.MultiheadAttention`` is tried as well. Returns {key layer: "" if it can, else why not}.

    A block can when removing heads gives exactly what zeroing those heads' values gives, on
    ``example_input``: tried on all blocks at once, then on halves of a failing set.
    """
    verdict: dict[str, str] = {}
    keys: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention) and name:  # (a model that is one attention block stays whole)
            why = unsupported_multihead_attention(module)
            if why:
                verdict[f"{name}.out_proj"] = why
            else:
                keys.append(f"{name}.out_proj")
    keys += [c for c in candidates if c not in keys]

    from .structured import TraceTimeout

    def works(subset: list[str]) -> bool:
        pruned, masked = copy.deepcopy(model).eval(), copy.deepcopy(model).eval()
        try:
            removed = remove_heads(pruned, {key: 0.5 for key in subset}, example_input)  # >= 1 head each
            if set(removed) != set(subset):
                return False
            mask_heads(masked, removed)
            with torch.no_grad(), _without_fast_paths():
                return outputs_close(call_model(pruned, example_input), call_model(masked, example_input))
        except TraceTimeout:
            raise
        except Exception:  # any failure of the pruned model counts as "cannot"
            return False

    failing = set(failing_members(keys, works))
    for key in keys:
        verdict[key] = BREAKS_HEADS if key in failing else ""
    return verdict


BREAKS_HEADS = (
    "attention whose heads cannot be removed safely (removing one changed its result, or no attribute "
    f"holds its number of heads: {', '.join(HEAD_COUNT_ATTRIBUTES)}); left alone by structured pruning"
)


@contextmanager
def _without_fast_paths() -> Iterator[None]:
    """PyTorch's fused attention paths (taken by unsplit blocks only) give zeros, not values, at
    padded positions; the comparison runs both models on the plain path."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


def outputs_close(a: Any, b: Any) -> bool:
    """Same nested structure, same shapes, floating-point tensors equal up to rounding."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape:
            return False
        return not a.is_floating_point() or bool(torch.allclose(a, b, rtol=1e-4, atol=1e-5, equal_nan=True))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(outputs_close(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(outputs_close(x, y) for x, y in zip(a, b))
    return type(a) is type(b)
