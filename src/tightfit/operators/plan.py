"""A compression plan: layer name -> operator -> settings, as plain JSON, and how to apply it."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import ConfigError
from ..measure.analysis import tied_groups
from .base import Operator
from .compose import Compose
from .matrix import swap_in_linears

PLAN_VERSION = 1

#: Operator classes by name, so a plan can rebuild the operators it was made with.
OPERATOR_REGISTRY: dict[str, type[Operator]] = {}


def register_operator(cls: type[Operator]) -> type[Operator]:
    """Make an operator class known to plans (built-ins register themselves; so can yours)."""
    OPERATOR_REGISTRY[cls.name] = cls
    return cls


@dataclass(frozen=True)
class Plan:
    """What to do to which layer. ``operators`` records each operator's constructor arguments."""

    layers: dict[str, dict[str, dict[str, Any]]]
    operators: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"version": PLAN_VERSION, "operators": self.operators, "layers": self.layers}

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        if not isinstance(data, dict) or "layers" not in data:
            raise ConfigError("A plan must be a JSON object with a `layers` field.")
        version = data.get("version", PLAN_VERSION)
        if version != PLAN_VERSION:
            raise ConfigError(f"Plan version {version} is not supported (this tightfit reads version {PLAN_VERSION}).")
        return cls(layers=data["layers"], operators=data.get("operators", {}))

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_strategy(cls, strategy: Compose, layers: dict[str, dict[str, dict[str, Any]]]) -> Plan:
        return cls(layers=layers, operators={op.name: op.config() for op in strategy})

    def strategy(self) -> Compose:
        """The operators this plan was made with, rebuilt from their recorded arguments."""
        ops = []
        for name, config in self.operators.items():
            if name not in OPERATOR_REGISTRY:
                raise ConfigError(
                    f"Plan uses operator {name!r}, which is not registered; known: {sorted(OPERATOR_REGISTRY)}."
                )
            ops.append(OPERATOR_REGISTRY[name].from_config(config))
        return Compose(ops)


def apply_plan_inplace(
    plan: Plan, model: nn.Module, strategy: Compose | None = None, *, structure_only: bool = False
) -> nn.Module:
    """Apply ``plan`` to ``model`` itself. First the matrix layers an operator needs as ``nn.Linear``
    (:meth:`Operator.needs_linear`) are swapped for their Linear equivalent, then the structural
    operators apply, then the others, each in strategy order. ``structure_only`` stops after the
    structural ones: what a saved file's tensors rely on (loading into a fresh model). A failure
    leaves the error to the caller; the model is then unusable, so callers apply to a copy (see
    :func:`apply`)."""
    strategy = strategy or plan.strategy()
    fold_weight_norm(model)  # what the operators and a saved file's plain weights expect
    modules = dict(model.named_modules())
    unknown = sorted(set(plan.layers) - set(modules))
    if unknown:
        raise ConfigError(f"Plan names layer(s) {unknown} that the model does not have.")
    # Entries name layers, not modules: structural operators may replace modules, and each
    # operator looks its layers up afresh.
    entries = {
        op.name: {
            layer_name: op.validate_settings(layer_name, per_op[op.name])
            for layer_name, per_op in plan.layers.items()
            if op.name in per_op
        }
        for op in strategy
    }
    tied = tied_groups(model)
    _check_tied_entries(tied, strategy, entries)
    for op in strategy:
        linear = [name for name, settings in entries[op.name].items() if op.needs_linear(settings)]
        swap_in_linears(model, linear, f"Operator {op.name!r}")
    for op in strategy:
        if entries[op.name] and (op.structural or not structure_only):
            op.apply_to_model(model, entries[op.name])
            if tied and not op.structural:
                share_tied_parametrizations(model)
    return model


def _check_tied_entries(
    tied: dict[str, list[str]], strategy: Compose, entries: dict[str, dict[str, dict[str, Any]]]
) -> None:
    """A tied weight is compressed once, through its leader's entry, by operators that keep it tied."""
    leader_of = {follower: leader for leader, followers in tied.items() for follower in followers}
    for op in strategy:
        for layer_name, settings in entries[op.name].items():
            if layer_name in leader_of:
                raise ConfigError(
                    f"Plan entry {layer_name!r} -> {op.name!r}: {layer_name!r} shares its weight with "
                    f"{leader_of[layer_name]!r} (tied weights), whose entry compresses it for both; move the "
                    f"settings to {leader_of[layer_name]!r}."
                )
            if layer_name in tied and not op.compresses_tied and settings != op.identity():
                raise ConfigError(f"Plan entry {layer_name!r} -> {op.name!r}: {op.why_not_tied(tied[layer_name])}.")


def share_tied_parametrizations(model: nn.Module) -> None:
    """Give every follower of a tied weight (:func:`~tightfit.measure.analysis.tied_groups`) the
    parametrizations its leader has: the same step modules (one mask, one grid) registered on the
    follower, whose ``original`` is then the very Parameter the leader's is. Both compute with the
    compressed tensor, fine-tuning's gradients from both reach the one original, and saving stores
    it once."""
    for leader_name, followers in tied_groups(model).items():
        leader = model.get_submodule(leader_name)
        steps = list(leader.parametrizations.weight) if parametrize.is_parametrized(leader, "weight") else []
        for follower_name in followers:
            follower = model.get_submodule(follower_name)
            own = list(follower.parametrizations.weight) if parametrize.is_parametrized(follower, "weight") else []
            if len(own) > len(steps) or any(a is not b for a, b in zip(own, steps)):
                raise ConfigError(
                    f"{follower_name!r} shares its weight with {leader_name!r} (tied weights) but was compressed "
                    f"on its own; compress the tied weight through {leader_name!r} only."
                )
            for step in steps[len(own) :]:
                parametrize.register_parametrization(follower, "weight", step)


def apply(plan: Plan | dict | str, model: nn.Module) -> nn.Module:
    """Return a compressed copy of ``model`` made by ``plan`` (a Plan, its dict, or its JSON).

    ``model`` itself is not changed. The copy keeps its compression as parametrizations, so it can
    be fine-tuned with masks and quantization grids held; ``tightfit.save`` bakes it.
    """
    if isinstance(plan, str):
        plan = Plan.from_json(plan)
    elif isinstance(plan, dict):
        plan = Plan.from_dict(plan)
    compressed = copy.deepcopy(model)
    return apply_plan_inplace(plan, compressed)


def fold_weight_norm(model: nn.Module) -> list[str]:
    """Replace every weight-normalized weight (``torch.nn.utils.parametrizations.weight_norm``)
    by the plain weight it computes, in place, and return those layers' names. Weight norm is a
    reparametrization for training; the layer computes the same with the folded weight, as models
    are deployed (an audio vocoder's ``remove_weight_norm``), and the operators can then compress it.

    Not by ``parametrize.remove_parametrizations``: it deletes the tensor's property from the
    parametrized class, which a deep copy shares with the model it was copied from, and so would
    break the user's model."""
    from torch.nn.utils.parametrizations import _WeightNorm

    folded = []
    for name, module in list(model.named_modules()):
        if not parametrize.is_parametrized(module) or not all(
            len(chain) == 1 and isinstance(chain[0], _WeightNorm) for chain in module.parametrizations.values()
        ):
            continue
        with torch.no_grad():
            values = {
                tensor_name: getattr(module, tensor_name).detach().clone() for tensor_name in module.parametrizations
            }
        del module._modules["parametrizations"]
        module.__class__ = type(module).__bases__[0]  # parametrize's per-module class derives from the module's own
        for tensor_name, value in values.items():
            module.register_parameter(tensor_name, nn.Parameter(value))
        # weight_norm's hook reading old weight_g/weight_v checkpoints: moot now, and unpicklable
        hooks = module._load_state_dict_pre_hooks
        for key in [
            k for k, h in hooks.items() if "_weight_norm_compat_hook" in getattr(getattr(h, "hook", h), "__name__", "")
        ]:
            del hooks[key]
        folded.append(name)
    return folded
