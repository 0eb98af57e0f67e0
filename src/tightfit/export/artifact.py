"""The compressed-model file (``.tfz``): the file a user ships, and whose size tightfit reports.

A zip archive (deflated, with fixed timestamps so the same model gives the same bytes) holding
- ``manifest.json``: format version, the plan, and how each tensor is encoded;
- ``payload.bin``: every parameter and buffer, encoded by :mod:`tightfit.export.codec`;
- ``architecture.pt``: the baked module with its tensors on the ``meta`` device (structure only,
  no weights), so ``load(path)`` needs no code of the user's beyond importable classes.
"""

from __future__ import annotations

import copy
import io
import json
import os
import zipfile
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import ArtifactError
from ..operators.plan import Plan, apply_plan_inplace, fold_weight_norm
from ..operators.quantize import FakeQuantize
from . import codec

FORMAT = "tightfit-artifact"
FORMAT_VERSION = 1
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
            for tensor_name, chain in module.parametrizations.items():
                original = chain.original
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


def to_bytes(model: nn.Module, plan: Plan | None = None, extra: dict[str, Any] | None = None) -> bytes:
    """Serialize a (possibly parametrized) compressed model to the ``.tfz`` format."""
    hints = _quantization_hints(model)
    baked = bake(model)
    tensors_meta: list[dict[str, Any]] = []
    payload = io.BytesIO()
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    for name, tensor, is_param in _named_tensors(baked):
        key = (tensor.data_ptr(), tensor.storage_offset(), tuple(tensor.shape)) if tensor.numel() else None
        if key is not None and key in seen:  # tied weights are stored once
            tensors_meta.append({"name": name, "alias_of": seen[key], "parameter": is_param})
            continue
        if key is not None:
            seen[key] = name
        encoded = None
        hint = hints.get(name)
        if hint and hint[0] == "int":
            codes, scale, bits = hint[1]
            encoded = codec.encode_quantized(tensor, codes, scale, bits)
        elif hint and hint[0] == "grid":
            encoded = codec.encode_grid(tensor, hint[1])
        elif hint and hint[0] == "f16":
            encoded = codec.encode_float(tensor, half=True)
        if encoded is None:
            encoded = codec.encode_float(tensor) if tensor.dtype == torch.float32 else codec.encode_raw(tensor)
        meta, data = encoded
        meta.update(name=name, parameter=is_param, offset=payload.tell(), length=len(data),
                    requires_grad=bool(getattr(tensor, "requires_grad", False)))
        payload.write(data)
        tensors_meta.append(meta)

    architecture: bytes | None = None
    architecture_error = None
    try:
        skeleton = baked.to("meta")
        buf = io.BytesIO()
        torch.save(skeleton, buf)
        architecture = buf.getvalue()
    except Exception as exc:  # unpicklable user modules: the file still loads into a given model
        architecture_error = f"{type(exc).__name__}: {exc}"

    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "torch": torch.__version__.split("+")[0],
        "plan": plan.to_dict() if plan is not None else None,
        "tensors": tensors_meta,
        "architecture": architecture is not None,
        "architecture_error": architecture_error,
        **(extra or {}),
    }
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        _write(archive, "manifest.json", json.dumps(manifest, separators=(",", ":")).encode())
        _write(archive, "payload.bin", payload.getvalue())
        if architecture is not None:
            _write(archive, "architecture.pt", architecture)
    return out.getvalue()


def _write(archive: zipfile.ZipFile, name: str, data: bytes) -> None:
    info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
    info.compress_type = zipfile.ZIP_DEFLATED
    archive.writestr(info, data, compresslevel=9)


def size_bytes(model: nn.Module, plan: Plan | None = None) -> int:
    """Bytes of the file :func:`save` would write for ``model``."""
    return len(to_bytes(model, plan))


def save_model(model: nn.Module, path: str | os.PathLike, plan: Plan | None = None, extra: dict[str, Any] | None = None) -> int:
    """Write ``model`` to ``path`` atomically; returns the file's size in bytes."""
    from .._io import write_atomic

    data = to_bytes(model, plan, extra)
    write_atomic(path, data)
    return len(data)


PathOrBuffer = str | os.PathLike | io.BytesIO


def read_manifest(path: PathOrBuffer) -> dict[str, Any]:
    with _open(path) as archive:
        return json.loads(archive.read("manifest.json"))


def _open(path: PathOrBuffer) -> zipfile.ZipFile:
    try:
        archive = zipfile.ZipFile(path)
        names = set(archive.namelist())
    except (OSError, zipfile.BadZipFile) as exc:
        raise ArtifactError(f"{path}: not a tightfit model file ({exc}).") from exc
    if not {"manifest.json", "payload.bin"} <= names:
        raise ArtifactError(f"{path}: not a tightfit model file (manifest.json or payload.bin missing).")
    return archive


def load_model(path: PathOrBuffer, model: nn.Module | None = None) -> nn.Module:
    """Read a ``.tfz`` file back into a model, in eval mode.

    Without ``model``, the architecture stored in the file is unpickled (``torch.load`` with
    ``weights_only=False``: load only files you trust, and the model's classes must be importable).
    With ``model`` (a fresh instance of the original architecture), no code is unpickled: the plan's
    structural steps are replayed on a copy of it, and the tensors are read from the payload.
    """
    with _open(path) as archive:
        manifest = json.loads(archive.read("manifest.json"))
        if manifest.get("format") != FORMAT:
            raise ArtifactError(f"{path}: not a tightfit model file (format {manifest.get('format')!r}).")
        if manifest.get("version", 0) > FORMAT_VERSION:
            raise ArtifactError(f"{path}: written by a newer tightfit (format version {manifest['version']}); upgrade tightfit.")
        payload = archive.read("payload.bin")
        if model is None:
            if not manifest.get("architecture"):
                raise ArtifactError(
                    f"{path}: the file holds no architecture ({manifest.get('architecture_error')}); "
                    "pass a fresh instance of the original model: tightfit.load(path, model=...)."
                )
            target = torch.load(io.BytesIO(archive.read("architecture.pt")), weights_only=False)
            target = target.to_empty(device="cpu")
        else:
            target = copy.deepcopy(model)
            fold_weight_norm(target)  # the file holds the plain weights weight norm computed
            plan = manifest.get("plan")
            if plan is not None:
                _replay_structure(target, Plan.from_dict(plan))
    assigned: dict[str, torch.Tensor] = {}
    for meta in manifest["tensors"]:
        if "alias_of" in meta:  # a tied tensor: the very same object again
            _assign(target, meta["name"], assigned[meta["alias_of"]], meta.get("parameter", False))
            continue
        tensor = codec.decode_tensor(meta, payload[meta["offset"] : meta["offset"] + meta["length"]])
        if meta.get("parameter", False):
            tensor = nn.Parameter(tensor, requires_grad=meta.get("requires_grad", True))
        _assign(target, meta["name"], tensor, meta.get("parameter", False))
        assigned[meta["name"]] = tensor
    for module in target.modules():
        _refresh_recurrent(module)
    return target.eval()


def _replay_structure(model: nn.Module, plan: Plan) -> None:
    """Redo what changed the modules the payload's tensors belong to: matrix layers swapped for
    Linears and the structural operators of ``plan`` (they change shapes and types)."""
    apply_plan_inplace(plan, model, structure_only=True)


def _assign(model: nn.Module, name: str, tensor: torch.Tensor, is_param: bool) -> None:
    module_name, _, attr = name.rpartition(".")
    try:
        module = model.get_submodule(module_name) if module_name else model
    except AttributeError as exc:
        raise ArtifactError(f"The model has no submodule {module_name!r} that the file stores {name!r} for.") from exc
    if is_param:
        if attr not in module._parameters:
            raise ArtifactError(f"The model has no parameter {name!r}; the file does not fit this model.")
        _check_shape(name, module._parameters[attr], tensor)
        module._parameters[attr] = tensor
    else:
        if attr not in module._buffers:
            raise ArtifactError(f"The model has no buffer {name!r}; the file does not fit this model.")
        _check_shape(name, module._buffers[attr], tensor)
        module._buffers[attr] = tensor


def _check_shape(name: str, existing: torch.Tensor | None, tensor: torch.Tensor) -> None:
    if existing is not None and tuple(existing.shape) != tuple(tensor.shape):
        raise ArtifactError(
            f"{name!r} has shape {tuple(existing.shape)} in the model but {tuple(tensor.shape)} in the file; "
            "the file was made from a different architecture."
        )
