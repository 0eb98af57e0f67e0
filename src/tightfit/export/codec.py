"""Byte encodings of tensors: what compression removed is stored as removed.

Values are float32, float16, bfloat16 (its bits), or k-bit integer codes with one float32 scale per
output channel, or per group of input columns with optional k-bit zero points and per-column factors
(:func:`encode_grid`). Their layout is dense, a bitmask of nonzeros, or relative indices of the nonzeros in
k-bit gaps (as in Deep Compression, with zero "filler" entries where a gap overflows), whichever is
smallest.

Decoding trusts nothing: :func:`check_meta` checks every field of a tensor's entry against its shape
and its byte length before anything is allocated, so a file's tensors decode to a bounded multiple
of its payload's bytes (a dense or bitmask layout holds at least one bit per element; a gap layout
of format 2 ends with fillers, so each of its entries stands for at most ``2**gap_bits`` elements).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ..errors import ArtifactError

GAP_BITS = (2, 3, 4, 5, 6, 8)
INT_BITS = (2, 3, 4, 5, 6, 7, 8)
#: The dtypes a file may hold (never ``getattr(torch, name)`` on a file's string).
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_RAW_NUMPY = {
    "float32": "<f4",
    "float16": "<f2",
    "bfloat16": "<i2",
    "float64": "<f8",
    "int64": "<i8",
    "int32": "<i4",
    "int16": "<i2",
    "int8": "i1",
    "uint8": "u1",
    "bool": "u1",
}
_FLOATS = {"float32", "float16", "bfloat16", "float64"}
#: bits per stored value of each kind ("int": the entry's own ``bits``)
_KIND_BITS = {"f32": 32, "f16": 16, "bf16": 16}
_LAYOUTS = ("dense", "bitmask", "gap")


def pack_uint(values: np.ndarray, bits: int) -> bytes:
    """Pack non-negative integers < 2**bits into a bit stream (big-endian within each value)."""
    values = np.asarray(values, dtype=np.uint32)
    if values.size == 0:
        return b""
    if bits == 8:
        return values.astype(np.uint8).tobytes()
    shifts = np.arange(bits - 1, -1, -1, dtype=np.uint32)
    bit_matrix = ((values[:, None] >> shifts) & 1).astype(np.uint8)
    return np.packbits(bit_matrix.reshape(-1)).tobytes()


def unpack_uint(data: bytes, bits: int, count: int) -> np.ndarray:
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    if bits == 8:
        return np.frombuffer(data, dtype=np.uint8, count=count).astype(np.int64)
    # One bit per byte, then accumulated column by column: about (bits + 16) bytes per value at the
    # peak, rather than the int64 bit matrix's 8 * bits.
    flat = np.unpackbits(np.frombuffer(data, dtype=np.uint8, count=_packed_len(count, bits)))[: count * bits]
    flat = flat.reshape(count, bits)
    out = np.zeros(count, dtype=np.int64)
    for column in range(bits):
        out <<= 1
        out |= flat[:, column]
    return out


def _packed_len(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


def _value_bytes(values: np.ndarray, kind: str, bits: int) -> bytes:
    if kind == "f32":
        return values.astype("<f4").tobytes()
    if kind in ("f16", "bf16"):  # bf16: the values are the bfloat16 bit patterns, as int16
        return values.astype("<f2" if kind == "f16" else "<i2").tobytes()
    # Integer codes in [-qmax, qmax], stored offset by 2**(bits-1).
    return pack_uint(values.astype(np.int64) + (1 << (bits - 1)), bits)


def _value_bits(kind: str, bits: int) -> int:
    return _KIND_BITS.get(kind, bits)


def _gap_entries(positions: np.ndarray, gap_bits: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Gaps between nonzero positions, split with fillers so each fits in ``gap_bits``, and
    trailing fillers so that fewer than ``2**gap_bits`` elements follow the last entry (what bounds
    a file's decoded size by its length).

    Returns (gaps, index of the real entry for each nonzero) over all entries.
    """
    limit = (1 << gap_bits) - 1
    gaps = np.diff(positions, prepend=-1) - 1
    fillers = gaps // (limit + 1)
    counts = fillers + 1
    last = np.cumsum(counts) - 1
    trailing = (n - 1 - int(positions[-1])) // (limit + 1)
    out = np.full(int(counts.sum()) + trailing, limit, dtype=np.int64)
    out[last] = gaps - fillers * (limit + 1)
    return out, last


def encode(values: np.ndarray, kind: str, bits: int = 32) -> tuple[dict[str, Any], bytes]:
    """Encode a flat array of values (floats, int16 bfloat16 bits for "bf16", or integer codes for
    kind "int") in its smallest layout."""
    n = values.size
    vbits = _value_bits(kind, bits)
    positions = np.flatnonzero(values)
    nnz = positions.size
    candidates: dict[str, int] = {"dense": _packed_len(n, vbits)}
    candidates["bitmask"] = _packed_len(n, 1) + _packed_len(nnz, vbits)
    gap_plans: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    if nnz:
        for gb in GAP_BITS:
            gaps, last = _gap_entries(positions, gb, n)
            gap_plans[gb] = (gaps, last)
            candidates[f"gap{gb}"] = _packed_len(gaps.size, gb) + _packed_len(gaps.size, vbits)
    layout = min(candidates, key=lambda k: candidates[k])
    meta: dict[str, Any] = {"kind": kind, "bits": bits, "layout": layout, "numel": int(n)}
    if layout == "dense":
        return meta, _value_bytes(values, kind, bits)
    if layout == "bitmask":
        mask = np.packbits((values != 0).astype(np.uint8)).tobytes()
        vals = _value_bytes(values[positions], kind, bits)
        meta.update(nnz=int(nnz), mask_len=len(mask))
        return meta, mask + vals
    gap_bits = int(layout[3:])
    gaps, last = gap_plans[gap_bits]
    entry_values = np.zeros(gaps.size, dtype=values.dtype)
    entry_values[last] = values[positions]
    gap_bytes = pack_uint(gaps, gap_bits)
    meta.update(layout="gap", gap_bits=gap_bits, entries=int(gaps.size), gap_len=len(gap_bytes))
    return meta, gap_bytes + _value_bytes(entry_values, kind, bits)


def _decode_values(data: bytes, kind: str, bits: int, count: int) -> np.ndarray:
    if kind == "f32":
        return np.frombuffer(data, dtype="<f4", count=count).astype(np.float32)
    if kind == "f16":
        return np.frombuffer(data, dtype="<f2", count=count).astype(np.float16)
    if kind == "bf16":
        return np.frombuffer(data, dtype="<i2", count=count).astype(np.int16)
    return unpack_uint(data, bits, count) - (1 << (bits - 1))


def decode(meta: dict[str, Any], data: bytes) -> np.ndarray:
    """Inverse of :func:`encode`: the flat array of values (float32/float16, int16 bfloat16 bits,
    or int64 codes). ``meta`` is checked by :func:`check_meta` first when it comes from a file;
    what only the data can tell (a mask's count, a gap past the end) is checked here."""
    kind, bits, n = meta["kind"], meta["bits"], meta["numel"]
    layout = meta["layout"]
    if layout == "dense":
        return _decode_values(data, kind, bits, n)
    if layout == "bitmask":
        mask = np.unpackbits(np.frombuffer(data[: meta["mask_len"]], dtype=np.uint8))[:n].astype(bool)
        if int(mask.sum()) != meta["nnz"]:
            raise ArtifactError(f"nnz is {meta['nnz']} but the mask holds {int(mask.sum())} nonzeros.")
        vals = _decode_values(data[meta["mask_len"] :], kind, bits, meta["nnz"])
        out = np.zeros(n, dtype=vals.dtype)
        out[mask] = vals
        return out
    if layout == "gap":
        entries = meta["entries"]
        gaps = unpack_uint(data[: meta["gap_len"]], meta["gap_bits"], entries)
        positions = np.cumsum(gaps + 1) - 1
        if entries and int(positions[-1]) >= n:
            raise ArtifactError(f"the gaps reach position {int(positions[-1])} of a tensor of numel {n}.")
        vals = _decode_values(data[meta["gap_len"] :], kind, bits, entries)
        out = np.zeros(n, dtype=vals.dtype)
        out[positions] = vals
        return out
    raise ArtifactError(f"unknown tensor layout {layout!r}")


def encode_float(tensor: torch.Tensor, half: bool = False) -> tuple[dict[str, Any], bytes]:
    """A floating tensor as float32 values, as float16 (``half``, or a float16 tensor), or as its
    bfloat16 bits (a bfloat16 tensor); a float64 tensor is stored raw (:func:`encode_raw`)."""
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16 and not half:
        flat, kind, bits = tensor.contiguous().view(torch.int16).numpy().reshape(-1), "bf16", 16
    elif half or tensor.dtype == torch.float16:
        flat, kind, bits = tensor.to(torch.float16).numpy().reshape(-1), "f16", 16
    else:
        flat, kind, bits = tensor.to(torch.float32).numpy().reshape(-1), "f32", 32
    meta, data = encode(flat, kind, bits)
    meta.update(shape=list(tensor.shape), dtype=str(tensor.dtype).removeprefix("torch."))
    return meta, data


def encode_quantized(
    tensor: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bits: int
) -> tuple[dict[str, Any], bytes] | None:
    """Encode a weight as integer codes and per-channel float32 scales, if ``codes * scale`` (in
    float32, then rounded to the weight's dtype, as :func:`decode_tensor` computes it) reproduces it
    exactly (it does for weights made by FakeQuantize, in float32, float16 or bfloat16); otherwise None."""
    codes = codes.detach().to(torch.float32)
    scale = scale.detach().to(torch.float32)
    if not torch.equal((codes * scale).to(tensor.dtype), tensor.detach()):
        return None
    flat = codes.cpu().numpy().reshape(-1).astype(np.int64)
    meta, data = encode(flat, "int", bits)
    scale_bytes = scale.cpu().numpy().astype("<f4").tobytes()
    meta.update(
        shape=list(tensor.shape),
        dtype=str(tensor.dtype).removeprefix("torch."),
        scale_shape=list(scale.shape),
        scale_len=len(scale_bytes),
    )
    return meta, scale_bytes + data


def encode_grid(tensor: torch.Tensor, grid: Any) -> tuple[dict[str, Any], bytes] | None:
    """Encode a weight as k-bit codes with ``(rows, groups)`` scales (float16 when they all are
    float16 values, as tightfit's grids make them; else float32), optional k-bit zero
    points and an optional float32 factor per input column (``tightfit.operators.grid.Grid``), if
    they reproduce it exactly; otherwise None. Payload: scales, zero points, column factors, codes."""
    codes = grid.codes.detach().to(torch.float32)
    scale = grid.scale.detach().to(torch.float32)
    zero = None if grid.zero is None else grid.zero.detach().to(torch.float32)
    inverse = None if grid.column_inverse is None else grid.column_inverse.detach().to(torch.float32)
    if not torch.equal(_grid_values(codes, scale, zero, inverse, grid.group_size).to(tensor.dtype), tensor.detach()):
        return None
    bits = int(grid.bits)
    meta, data = encode(codes.cpu().numpy().reshape(-1).astype(np.int64), "int", bits)
    half = torch.equal(scale.to(torch.float16).to(torch.float32), scale)  # scales made float16-exact
    parts = [scale.cpu().numpy().astype("<f2" if half else "<f4").tobytes()]
    meta.update(
        shape=list(tensor.shape),
        dtype=str(tensor.dtype).removeprefix("torch."),
        scale_shape=list(scale.shape),
        scale_len=len(parts[0]),
        group_size=int(grid.group_size),
        scale_kind="f16" if half else "f32",
    )
    if zero is not None:
        parts.append(pack_uint(zero.cpu().numpy().reshape(-1).astype(np.int64) + (1 << (bits - 1)), bits))
        meta["zero_len"] = len(parts[-1])
    if inverse is not None:
        parts.append(inverse.cpu().numpy().astype("<f4").tobytes())
        meta["column_len"] = len(parts[-1])
    return meta, b"".join(parts) + data


def _grid_values(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, inverse: torch.Tensor | None, group_size: int
) -> torch.Tensor:
    """``((codes - zero) * scale) * inverse`` with scales spread over their groups of columns: the
    operations, in order, that ``tightfit.operators.grid`` computes the weight with."""
    shape = codes.shape
    matrix = codes.reshape(shape[0], -1) if codes.dim() > 1 else codes.reshape(-1, 1)
    columns = matrix.shape[1]

    def spread(values: torch.Tensor) -> torch.Tensor:
        if group_size <= 0:
            return values.expand(values.shape[0], columns) if values.shape[1] == 1 else values
        return values.repeat_interleave(group_size, dim=1)[:, :columns]

    matrix = (matrix - spread(zero)) * spread(scale) if zero is not None else matrix * spread(scale)
    if inverse is not None:
        matrix = matrix * inverse
    return matrix.reshape(shape)


def _decode_grid(meta: dict[str, Any], data: bytes) -> torch.Tensor:
    bits, offset = meta["bits"], meta["scale_len"]
    scale_dtype = "<f2" if meta.get("scale_kind") == "f16" else "<f4"
    scale = torch.from_numpy(np.frombuffer(data[:offset], dtype=scale_dtype).astype(np.float32)).reshape(
        meta["scale_shape"]
    )
    zero = inverse = None
    if "zero_len" in meta:
        packed = data[offset : offset + meta["zero_len"]]
        zero = torch.from_numpy((unpack_uint(packed, bits, scale.numel()) - (1 << (bits - 1))).astype(np.float32))
        zero = zero.reshape(scale.shape)
        offset += meta["zero_len"]
    if "column_len" in meta:
        inverse = torch.from_numpy(np.frombuffer(data[offset : offset + meta["column_len"]], dtype="<f4").copy())
        offset += meta["column_len"]
    codes = torch.from_numpy(decode(meta, data[offset:]).astype(np.float32)).reshape(meta["shape"])
    return _grid_values(codes, scale, zero, inverse, meta["group_size"])


def encode_raw(tensor: torch.Tensor) -> tuple[dict[str, Any], bytes]:
    """Any other tensor (integer buffers, float64, ...) stored as its own bytes."""
    array = tensor.detach().cpu().contiguous()
    meta = {"kind": "raw", "shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch.")}
    if array.dtype == torch.bfloat16:
        return meta, array.view(torch.int16).numpy().tobytes()
    return meta, array.numpy().tobytes()


def decode_tensor(meta: dict[str, Any], data: bytes) -> torch.Tensor:
    """The tensor an entry (checked by :func:`check_meta`) and its ``length`` bytes describe."""
    dtype = DTYPES[meta["dtype"]]
    shape = tuple(meta["shape"])
    kind = meta["kind"]
    if kind == "raw":
        array = np.frombuffer(data, dtype=_RAW_NUMPY[meta["dtype"]]).copy()
        if meta["dtype"] == "bool":
            return torch.from_numpy(array != 0).reshape(shape)
        tensor = torch.from_numpy(array)
        return (tensor.view(torch.bfloat16) if dtype == torch.bfloat16 else tensor).reshape(shape)
    if kind == "int" and "group_size" in meta:
        return _decode_grid(meta, data).to(dtype)
    if kind == "int":
        scale_len = meta["scale_len"]
        scale = torch.from_numpy(np.frombuffer(data[:scale_len], dtype="<f4").copy()).reshape(meta["scale_shape"])
        codes = torch.from_numpy(decode(meta, data[scale_len:]).astype(np.float32)).reshape(shape)
        return (codes * scale).to(dtype)
    values = torch.from_numpy(decode(meta, data).copy()).reshape(shape)
    if kind == "bf16":
        return values.view(torch.bfloat16)
    return values.to(dtype)


# ------------------------------------------------------------------------------------ checking entries

#: Bounds on one entry's numbers (a shape's rank and dimensions), far beyond any real tensor.
MAX_RANK = 16
MAX_DIM = 2**40


def _int(meta: dict[str, Any], key: str, where: str, low: int = 0, high: int | None = None) -> int:
    value = meta.get(key)
    if type(value) is not int:
        raise ArtifactError(f"{where}.{key} must be an integer, but is {_show(value)}; the file is damaged.")
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise ArtifactError(f"{where}.{key} is {value}, but must be {bound}; the file is damaged.")
    return value


def _choice(meta: dict[str, Any], key: str, where: str, allowed: Any) -> Any:
    value = meta.get(key)
    if not isinstance(value, (str, int)) or isinstance(value, bool) or value not in allowed:
        raise ArtifactError(f"{where}.{key} is {_show(value)}, not one of {sorted(allowed)}; the file is damaged.")
    return value


def _shape(meta: dict[str, Any], key: str, where: str) -> tuple[int, ...]:
    value = meta.get(key)
    if (
        not isinstance(value, list)
        or len(value) > MAX_RANK
        or not all(type(d) is int and 0 <= d <= MAX_DIM for d in value)
    ):
        raise ArtifactError(
            f"{where}.{key} must be a list of at most {MAX_RANK} sizes in [0, {MAX_DIM}], "
            f"but is {_show(value)}; the file is damaged."
        )
    return tuple(value)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _expect(where: str, field: str, actual: int, expected: int, why: str) -> None:
    if actual != expected:
        raise ArtifactError(f"{where}.{field} is {actual}, but {why} makes it {expected}; the file is damaged.")


def check_meta(meta: Any, where: str, version: int) -> tuple[int, ...]:
    """Check one stored tensor's entry against its own shape and byte ``length`` (nothing is read
    or allocated); returns the shape. Raises ArtifactError naming the field at fault."""
    if not isinstance(meta, dict):
        raise ArtifactError(f"{where} must be an object, but is {_show(meta)}; the file is damaged.")
    kind = _choice(meta, "kind", where, {"raw", "f32", "f16", "bf16", "int"})
    dtype = _choice(meta, "dtype", where, set(DTYPES))
    shape = _shape(meta, "shape", where)
    length = _int(meta, "length", where)
    numel = math.prod(shape)
    if kind == "raw":
        _expect(where, "length", length, numel * DTYPES[dtype].itemsize, f"shape {list(shape)} of {dtype}")
        return shape
    if dtype not in (("bfloat16",) if kind == "bf16" else _FLOATS):
        raise ArtifactError(
            f"{where}.dtype is {dtype!r}, which values of kind {kind!r} cannot have; the file is damaged."
        )
    bits = _choice(meta, "bits", where, set(INT_BITS) if kind == "int" else {_KIND_BITS[kind]})
    _expect(where, "numel", _int(meta, "numel", where), numel, f"shape {list(shape)}")
    prefix = 0  # bytes before the values: an int tensor's scales
    if kind == "int" and "group_size" in meta:
        prefix = _grid_prefix(meta, where, shape, bits)
    elif kind == "int":
        scale_shape = _shape(meta, "scale_shape", where)
        scale_len = _int(meta, "scale_len", where)
        _expect(where, "scale_len", scale_len, 4 * math.prod(scale_shape), f"scale_shape {list(scale_shape)}")
        if not _broadcasts_to(scale_shape, shape):
            raise ArtifactError(
                f"{where}.scale_shape {list(scale_shape)} does not fit shape {list(shape)}; the file is damaged."
            )
        prefix = scale_len
    _check_layout(meta, where, version, numel, _value_bits(kind, bits), length, prefix)
    return shape


def _grid_prefix(meta: dict[str, Any], where: str, shape: tuple[int, ...], bits: int) -> int:
    """A group-wise entry's (:func:`encode_grid`) scales, zero points and column factors: their
    shapes follow from the tensor's, and their byte lengths from those; returns their bytes."""
    rows = shape[0] if shape else 1
    columns = math.prod(shape[1:]) if len(shape) > 1 else 1
    group_size = _int(meta, "group_size", where, 0, MAX_DIM)  # may exceed the columns: one group
    groups = 1 if group_size == 0 else -(-columns // group_size)
    scale_shape = _shape(meta, "scale_shape", where)
    if list(scale_shape) != [rows, groups]:
        raise ArtifactError(
            f"{where}.scale_shape {list(scale_shape)} does not fit shape {list(shape)} with group_size "
            f"{group_size}; the file is damaged."
        )
    width = 2 if _choice(meta, "scale_kind", where, {"f16", "f32"}) == "f16" else 4
    prefix = _int(meta, "scale_len", where)
    _expect(where, "scale_len", prefix, width * rows * groups, f"scale_shape {list(scale_shape)}")
    if "zero_len" in meta:
        zero_len = _int(meta, "zero_len", where)
        _expect(where, "zero_len", zero_len, _packed_len(rows * groups, bits), f"{rows * groups} zero points")
        prefix += zero_len
    if "column_len" in meta:
        column_len = _int(meta, "column_len", where)
        _expect(where, "column_len", column_len, 4 * columns, f"{columns} column factors")
        prefix += column_len
    return prefix


def _broadcasts_to(small: tuple[int, ...], shape: tuple[int, ...]) -> bool:
    if len(small) > len(shape):
        return False
    return all(s in (1, d) for s, d in zip(small[::-1], shape[::-1]))


def _check_layout(
    meta: dict[str, Any], where: str, version: int, numel: int, vbits: int, length: int, prefix: int
) -> None:
    """The layout's own fields, and ``length`` = ``prefix`` bytes (scales) + what the layout takes."""
    layout = _choice(meta, "layout", where, set(_LAYOUTS))
    scales = f"{prefix} bytes of scales and " if prefix else ""
    if layout == "dense":
        _expect(where, "length", length, prefix + _packed_len(numel, vbits), f"{scales}{numel} values of {vbits} bits")
    elif layout == "bitmask":
        mask_len = _int(meta, "mask_len", where)
        _expect(where, "mask_len", mask_len, _packed_len(numel, 1), f"numel {numel}")
        nnz = _int(meta, "nnz", where, 0, numel)
        _expect(
            where,
            "length",
            length,
            prefix + mask_len + _packed_len(nnz, vbits),
            f"{scales}a mask and {nnz} values of {vbits} bits",
        )
    else:
        gap_bits = _choice(meta, "gap_bits", where, set(GAP_BITS))
        entries = _int(meta, "entries", where, 1, numel)
        gap_len = _int(meta, "gap_len", where)
        _expect(where, "gap_len", gap_len, _packed_len(entries, gap_bits), f"{entries} gaps of {gap_bits} bits")
        _expect(where, "length", length, prefix + gap_len + _packed_len(entries, vbits), f"{scales}{entries} entries")
        if version >= 2 and numel > (entries + 1) << gap_bits:
            # format 2 ends a gap layout with fillers: a few bytes cannot stand for a huge tensor
            raise ArtifactError(
                f"{where}.numel is {numel}, more than {entries} entries of {gap_bits}-bit gaps "
                "can cover; the file is damaged."
            )
