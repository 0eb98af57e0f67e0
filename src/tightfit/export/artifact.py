"""The compressed-model file (``.tfz``): the file a user ships, and whose size tightfit reports.

A zip archive (deflated, with fixed timestamps so the same model gives the same bytes) holding
- ``manifest.json``: format version, the plan, and how each tensor is encoded;
- ``payload.bin``: every parameter and buffer, encoded by :mod:`tightfit.export.codec`;
- ``architecture.json``: the module tree as data (:mod:`tightfit.export.architecture`), when every
  module in it is a ``torch.nn`` layer or container; otherwise absent, with the reason in the
  manifest, and the file loads into a model the caller gives (``model=`` / ``factory=``).

Nothing in a file is unpickled: format 1's ``architecture.pt`` (a pickled module) is never read;
such a file loads into a model the caller gives. The weights are tightfit's own codec rather than safetensors: a quantized or
pruned tensor is stored as k-bit codes and sparse indices (a 4-bit weight takes half a byte, a
pruned one less), which safetensors' dense dtypes cannot hold; the codec's decoder checks every
size against the manifest first (:func:`tightfit.export.codec.check_meta`).
"""

from __future__ import annotations

import copy
import importlib
import io
import json
import os
import zipfile
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import ArtifactError, ConfigError
from ..operators.plan import Plan, apply_plan_inplace, fold_weight_norm
from ..operators.quantize import FakeQuantize
from . import architecture, codec, reading
from .reading import ARCHITECTURE, FORMAT, FORMAT_VERSION, MANIFEST, PAYLOAD, PICKLED_ARCHITECTURE, PathOrBuffer

_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


def _quantization_hints(model: nn.Module) -> dict[str, tuple[str, Any]]:
    """For each parametrized tensor whose last step is FakeQuantize: how to store it compactly."""
    hints: dict[str, tuple[str, Any]] = {}
    for module_name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for tensor_name, chain in module.parametrizations.items():
            steps = list(chain)
            if not steps or not isinstance(steps[-1], FakeQuantize):
                continue
            last: FakeQuantize = steps[-1]
            key = f"{module_name}.{tensor_name}" if module_name else tensor_name
            if last.bits == 16:
                hints[key] = ("f16", None)
            elif last.bits < 16:
                with torch.no_grad():
                    x = chain.original
                    for step in steps[:-1]:
                        x = step(x)
                    if last.per_channel:
                        codes, scale = last.quantize(x)
                        hints[key] = ("int", (codes, scale, last.bits))
                    else:  # group-wise scales, zero points, a column scale: see operators.grid
                        hints[key] = ("grid", last.grid(x))
    return hints


def bake(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every parametrization made permanent (plain tensors again).

    Not ``parametrize.remove_parametrizations`` on a deepcopy: the copy shares the dynamically
    made ``Parametrized*`` class with the original, and removal edits that class, which would break
    the original model.
    """
    baked = copy.deepcopy(model)
    # Modules that share one original (tied weights) get one baked tensor, so they stay tied.
    # (The original is kept in the entry so that its id is not reused once its module lets go of it.)
    baked_by_original: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for module in baked.modules():
        if not parametrize.is_parametrized(module):
            continue
        values = {}
        with torch.no_grad():
            # parametrize's ModuleDict and ParametrizationList: Module.__getattr__ says Tensor | Module
            for tensor_name, chain in cast(nn.ModuleDict, module.parametrizations).items():
                original = cast(torch.Tensor, chain.original)
                if id(original) not in baked_by_original:
                    value = getattr(module, tensor_name).detach().clone()
                    if isinstance(original, nn.Parameter):
                        value = nn.Parameter(value, requires_grad=original.requires_grad)
                    baked_by_original[id(original)] = (original, value)
                values[tensor_name] = baked_by_original[id(original)][1]
        del module._modules["parametrizations"]
        module.__class__ = module.__class__.__bases__[0]
        for tensor_name, value in values.items():
            if isinstance(value, nn.Parameter):
                module._parameters[tensor_name] = value
            else:
                module._buffers[tensor_name] = value
        _refresh_recurrent(module)
    return baked


def _refresh_recurrent(module: nn.Module) -> None:
    """A recurrent layer computes with its list ``_flat_weights``; after its tensors were put in
    place directly (not by attribute assignment, which would update the list), read them again.
    Its forward would notice too (torch's ``_update_flat_weights``); this keeps the layer right for
    whatever reads the list first (tracing, ``flatten_parameters``)."""
    if isinstance(module, nn.RNNBase):
        module._init_flat_weights()


def _named_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor, bool]]:
    """Every parameter and buffer (persistent or not) by qualified name; bool: is a parameter."""
    out: list[tuple[str, torch.Tensor, bool]] = []
    for name, param in model.named_parameters(remove_duplicate=False):
        out.append((name, param, True))
    for name, buf in model.named_buffers(remove_duplicate=False):
        out.append((name, buf, False))
    return out


def _encode(tensor: torch.Tensor, hint: tuple[str, Any] | None) -> tuple[dict[str, Any], bytes]:
    encoded = None
    if hint and hint[0] == "int":
        codes, scale, bits = hint[1]
        encoded = codec.encode_quantized(tensor, codes, scale, bits)
    elif hint and hint[0] == "grid":  # group-wise scales, zero points, column factors (calibrated operators)
        encoded = codec.encode_grid(tensor, hint[1])
    elif hint and hint[0] == "f16":
        encoded = codec.encode_float(tensor, half=True)
    if encoded is None:
        floating = tensor.dtype in (torch.float32, torch.float16, torch.bfloat16)
        encoded = codec.encode_float(tensor) if floating else codec.encode_raw(tensor)
    return encoded


def to_bytes(model: nn.Module, plan: Plan | None = None, extra: dict[str, Any] | None = None) -> bytes:
    """Serialize a (possibly parametrized) compressed model to the ``.tfz`` format."""
    hints = _quantization_hints(model)
    baked = bake(model)
    tensors_meta: list[dict[str, Any]] = []
    payload = io.BytesIO()
    seen: dict[tuple[int, int | torch.SymInt, tuple[int, ...]], str] = {}
    for name, tensor, is_param in _named_tensors(baked):
        key = (tensor.data_ptr(), tensor.storage_offset(), tuple(tensor.shape)) if tensor.numel() else None
        if key is not None and key in seen:  # tied weights are stored once
            tensors_meta.append({"name": name, "alias_of": seen[key], "parameter": is_param})
            continue
        if key is not None:
            seen[key] = name
        meta, data = _encode(tensor, hints.get(name))
        meta.update(
            name=name,
            parameter=is_param,
            offset=payload.tell(),
            length=len(data),
            requires_grad=bool(getattr(tensor, "requires_grad", False)),
        )
        payload.write(data)
        tensors_meta.append(meta)

    tree: bytes | None = None
    architecture_error = None
    try:
        tree = json.dumps(architecture.describe(baked), separators=(",", ":")).encode()
    except architecture.NotExpressible as exc:  # a user's class: the file loads into a given model
        architecture_error = str(exc)
    except Exception as exc:  # describing is best effort: saving never fails for it
        architecture_error = f"the module tree could not be described ({type(exc).__name__}: {exc})"

    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "torch": torch.__version__.split("+")[0],
        "plan": plan.to_dict() if plan is not None else None,
        "tensors": tensors_meta,
        "payload_bytes": payload.tell(),
        "architecture": ARCHITECTURE if tree is not None else None,
        "architecture_error": architecture_error,
        **(extra or {}),
    }
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        _write(archive, MANIFEST, json.dumps(manifest, separators=(",", ":")).encode())
        _write(archive, PAYLOAD, payload.getvalue())
        if tree is not None:
            _write(archive, ARCHITECTURE, tree)
    return out.getvalue()


def _write(archive: zipfile.ZipFile, name: str, data: bytes) -> None:
    info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
    info.compress_type = zipfile.ZIP_DEFLATED
    archive.writestr(info, data, compresslevel=9)


def size_bytes(model: nn.Module, plan: Plan | None = None) -> int:
    """Bytes of the file :func:`save` would write for ``model``."""
    return len(to_bytes(model, plan))


def save_model(
    model: nn.Module, path: str | os.PathLike, plan: Plan | None = None, extra: dict[str, Any] | None = None
) -> int:
    """Write ``model`` to ``path`` atomically; returns the file's size in bytes."""
    from .._io import write_atomic

    data = to_bytes(model, plan, extra)
    write_atomic(path, data)
    return len(data)


def read_manifest(path: PathOrBuffer) -> dict[str, Any]:
    """The file's manifest, checked (format, version, every tensor entry)."""
    with reading.open_archive(path) as archive:
        manifest = reading.read_json(archive, MANIFEST)
        reading.check_tensors(manifest, reading.check_manifest(manifest, path))
        return manifest


Factory = Callable[[], nn.Module] | str


def load_model(path: PathOrBuffer, model: nn.Module | None = None, *, factory: Factory | None = None) -> nn.Module:
    """Read a ``.tfz`` file back into a model, in eval mode, its tensors in the dtypes they were saved in.

    Nothing is unpickled. Without ``model``/``factory`` the file's ``architecture.json`` is
    rebuilt: it is there when the saved model was made of ``torch.nn`` layers and containers only.
    A model of your own classes needs ``model=`` (a fresh instance of the original architecture, not
    modified: a copy is loaded) or ``factory=`` (a zero-argument callable, or a ``"module:function"``
    path, that builds one); the plan's structural steps (structured pruning, low rank) are replayed
    on it and the tensors read from the payload. A format-1 file's pickled ``architecture.pt`` is
    never read: such a file needs ``model=`` or ``factory=``.
    A damaged or crafted file raises ArtifactError naming the part at fault, before the sizes it
    declares are allocated.
    """
    given = _given_model(model, factory)
    with reading.open_archive(path) as archive:
        manifest = reading.read_json(archive, MANIFEST)
        version = reading.check_manifest(manifest, path)
        entries, shapes, payload_len = reading.check_tensors(manifest, version)
        if given is not None:
            target = _prepare_given(given, manifest.get("plan"), path)
        else:
            target = _stored_architecture(archive, manifest, version, path, len(entries))
        _check_fits(target, shapes, entries, exhaustive=given is None and version >= 2)
        payload = reading.read_member(archive, PAYLOAD, payload_len, exact=True)
    _fill(target, entries, payload)
    for module in target.modules():
        _refresh_recurrent(module)
    return target.eval()


def _given_model(model: nn.Module | None, factory: Factory | None) -> nn.Module | None:
    if model is not None and factory is not None:
        raise ConfigError("tightfit.load: pass `model=` or `factory=`, not both.")
    if factory is None:
        if model is not None and not isinstance(model, nn.Module):
            raise ConfigError(f"tightfit.load: `model` must be an nn.Module, but got {type(model).__name__}.")
        return model
    if isinstance(factory, str):
        module_name, _, attr = factory.partition(":")
        if not module_name or not attr:
            raise ConfigError(f"tightfit.load: `factory` must be a callable or 'module:function', but got {factory!r}.")
        try:
            target: Any = importlib.import_module(module_name)
            for part in attr.split("."):
                target = getattr(target, part)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(
                f"tightfit.load: `factory` {factory!r} cannot be found ({type(exc).__name__}: {exc})."
            ) from exc
        factory = target
    if not callable(factory):
        raise ConfigError(f"tightfit.load: `factory` must be a callable or 'module:function', but got {factory!r}.")
    built = factory()
    if not isinstance(built, nn.Module):
        raise ConfigError(f"tightfit.load: `factory` must return an nn.Module, but it returned {type(built).__name__}.")
    return built


def _prepare_given(model: nn.Module, plan: dict[str, Any] | None, path: PathOrBuffer) -> nn.Module:
    target = copy.deepcopy(model)
    fold_weight_norm(target)  # the file holds the plain weights weight norm computed
    if plan is not None:
        try:
            _replay_structure(target, Plan.from_dict(plan))
        except Exception as exc:  # a plan from the file: whatever it names, the refusal is the file's
            raise ArtifactError(
                f"{path}: the plan in {MANIFEST} does not apply to the given model "
                f"({type(exc).__name__}: {exc}); the file was made from another architecture."
            ) from exc
    return target


def _stored_architecture(
    archive: zipfile.ZipFile, manifest: dict[str, Any], version: int, path: PathOrBuffer, tensor_count: int
) -> nn.Module:
    """The module tree the file describes: format 2's architecture.json. Format 1's pickle is never
    read (unpickling can run any code)."""
    names = set(archive.namelist())
    if version >= 2 and manifest.get("architecture") == ARCHITECTURE and ARCHITECTURE in names:
        return architecture.build(reading.read_json(archive, ARCHITECTURE), max_tensors=tensor_count)
    if version == 1 and PICKLED_ARCHITECTURE in names:
        raise ArtifactError(
            f"{path}: a format-1 tightfit file, whose architecture is a pickle ({PICKLED_ARCHITECTURE}) that can run "
            "any code when loaded; tightfit never unpickles it. Pass the model: tightfit.load(path, model=<a fresh "
            "instance of the original architecture>) or factory=<a callable, or 'module:function', that builds one>."
        )
    reason = manifest.get("architecture_error")
    reason = f" ({str(reason)[:300]})" if reason else ""
    raise ArtifactError(
        f"{path}: the file holds no architecture as data{reason}. Pass the model: tightfit.load(path, model=<a fresh "
        "instance of the original architecture>) or tightfit.load(path, factory=<a callable, or 'module:function', "
        "that builds one>)."
    )


def _replay_structure(model: nn.Module, plan: Plan) -> None:
    """Redo what changed the modules the payload's tensors belong to: matrix layers swapped for
    Linears and the structural operators of ``plan`` (they change shapes and types)."""
    apply_plan_inplace(plan, model, structure_only=True)


def _slot(model: nn.Module, name: str, is_param: bool) -> tuple[nn.Module, str]:
    module_name, _, attr = name.rpartition(".")
    try:
        module = model.get_submodule(module_name) if module_name else model
    except Exception as exc:  # AttributeError; or whatever a model's own property raises when looked up
        raise ArtifactError(
            f"The model has no submodule {module_name[:200]!r} that the file stores {name[:200]!r} for; "
            "the file does not fit this model."
        ) from exc
    slots = module._parameters if is_param else module._buffers
    if attr not in slots:
        kind = "parameter" if is_param else "buffer"
        raise ArtifactError(f"The model has no {kind} {name[:200]!r}; the file does not fit this model.")
    return module, attr


def _check_fits(
    model: nn.Module, shapes: dict[str, tuple[int, ...]], entries: list[dict[str, Any]], exhaustive: bool
) -> None:
    """Every tensor the file stores has its slot in ``model``, of the declared shape (checked
    before any is decoded); ``exhaustive``: and every tensor of ``model`` is in the file (a tree
    built from the file's architecture has no values of its own)."""
    for meta in entries:
        name = meta["name"]
        module, attr = _slot(model, name, meta.get("parameter", False))
        existing = (module._parameters if meta.get("parameter", False) else module._buffers)[attr]
        if existing is None and exhaustive:
            raise ArtifactError(
                f"The file stores {name[:200]!r}, which its architecture does not have; the file is damaged."
            )
        if existing is not None and tuple(existing.shape) != shapes[name]:
            raise ArtifactError(
                f"{name[:200]!r} has shape {tuple(existing.shape)} in the model but {list(shapes[name])} in the file; "
                "the file was made from a different architecture."
            )
    if exhaustive:
        held = {n for n, _ in model.named_parameters(remove_duplicate=False)}
        held |= {n for n, _ in model.named_buffers(remove_duplicate=False)}
        missing = sorted(held - set(shapes))
        if missing:
            raise ArtifactError(
                f"The file's architecture has tensors the file does not store ({missing[:5]}); the file is damaged."
            )


def _fill(model: nn.Module, entries: list[dict[str, Any]], payload: bytes) -> None:
    """Decode each tensor into its slot (aliases: the very same tensor object again)."""
    assigned: dict[str, torch.Tensor] = {}
    for meta in entries:
        name, is_param = meta["name"], meta.get("parameter", False)
        module, attr = _slot(model, name, is_param)
        if "alias_of" in meta:
            tensor = assigned[meta["alias_of"]]
        else:
            try:
                tensor = codec.decode_tensor(meta, payload[meta["offset"] : meta["offset"] + meta["length"]])
            except ArtifactError as exc:
                raise ArtifactError(f"{MANIFEST} tensor {name[:200]!r}: {exc}") from exc
            except (ValueError, RuntimeError, IndexError, MemoryError) as exc:
                raise ArtifactError(
                    f"{MANIFEST} tensor {name[:200]!r} cannot be decoded ({type(exc).__name__}: {exc})."
                ) from exc
            if is_param:
                tensor = nn.Parameter(
                    tensor, requires_grad=meta.get("requires_grad", True) and tensor.is_floating_point()
                )
            assigned[name] = tensor
        if is_param:
            if not isinstance(tensor, nn.Parameter):
                raise ArtifactError(
                    f"{MANIFEST} tensor {name[:200]!r} is a parameter aliasing a buffer; the file is damaged."
                )
            module._parameters[attr] = tensor
        else:
            module._buffers[attr] = tensor
