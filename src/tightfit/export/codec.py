"""Byte encodings of tensors: what compression removed is stored as removed.

Values are float32, float16, or k-bit integer codes with one float32 scale per output channel, or
per group of input columns with optional k-bit zero points and per-column factors (:func:`encode_grid`).
Their layout is dense, a bitmask of nonzeros, or relative indices of the nonzeros in k-bit gaps
(as in Deep Compression, with zero "filler" entries where a gap overflows), whichever is smallest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

GAP_BITS = (2, 3, 4, 5, 6, 8)


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
    flat = np.unpackbits(np.frombuffer(data, dtype=np.uint8))[: count * bits].reshape(count, bits)
    weights = (1 << np.arange(bits - 1, -1, -1)).astype(np.int64)
    return flat.astype(np.int64) @ weights


def _packed_len(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


@dataclass
class EncodedTensor:
    meta: dict[str, Any]
    chunks: list[bytes]


def _value_bytes(values: np.ndarray, kind: str, bits: int) -> bytes:
    if kind == "f32":
        return values.astype("<f4").tobytes()
    if kind == "f16":
        return values.astype("<f2").tobytes()
    # Integer codes in [-qmax, qmax], stored offset by 2**(bits-1).
    return pack_uint(values.astype(np.int64) + (1 << (bits - 1)), bits)


def _value_bits(kind: str, bits: int) -> int:
    return {"f32": 32, "f16": 16}.get(kind, bits)


def _gap_entries(positions: np.ndarray, gap_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Gaps between nonzero positions, split with fillers so each fits in ``gap_bits``.

    Returns (gaps, index of the real entry for each nonzero) over all entries.
    """
    limit = (1 << gap_bits) - 1
    gaps = np.diff(positions, prepend=-1) - 1
    fillers = gaps // (limit + 1)
    counts = fillers + 1
    last = np.cumsum(counts) - 1
    out = np.full(int(counts.sum()), limit, dtype=np.int64)
    out[last] = gaps - fillers * (limit + 1)
    return out, last


def encode(values: np.ndarray, kind: str, bits: int = 32) -> tuple[dict[str, Any], bytes]:
    """Encode a flat array of values (floats, or integer codes for kind "int") in its smallest layout."""
    n = values.size
    vbits = _value_bits(kind, bits)
    positions = np.flatnonzero(values)
    nnz = positions.size
    candidates: dict[str, int] = {"dense": _packed_len(n, vbits)}
    candidates["bitmask"] = _packed_len(n, 1) + _packed_len(nnz, vbits)
    gap_plans: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    if nnz:
        for gb in GAP_BITS:
            gaps, last = _gap_entries(positions, gb)
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
    return unpack_uint(data, bits, count) - (1 << (bits - 1))


def decode(meta: dict[str, Any], data: bytes) -> np.ndarray:
    """Inverse of :func:`encode`: the flat array of values (float32/float16, or int64 codes)."""
    kind, bits, n = meta["kind"], meta["bits"], meta["numel"]
    layout = meta["layout"]
    if layout == "dense":
        return _decode_values(data, kind, bits, n)
    if layout == "bitmask":
        mask = np.unpackbits(np.frombuffer(data[: meta["mask_len"]], dtype=np.uint8))[:n].astype(bool)
        vals = _decode_values(data[meta["mask_len"] :], kind, bits, meta["nnz"])
        out = np.zeros(n, dtype=vals.dtype)
        out[mask] = vals
        return out
    if layout == "gap":
        entries = meta["entries"]
        gaps = unpack_uint(data[: meta["gap_len"]], meta["gap_bits"], entries)
        vals = _decode_values(data[meta["gap_len"] :], kind, bits, entries)
        out = np.zeros(n, dtype=vals.dtype)
        out[np.cumsum(gaps + 1) - 1] = vals
        return out
    raise ValueError(f"unknown tensor layout {layout!r}")


def encode_float(tensor: torch.Tensor, half: bool = False) -> tuple[dict[str, Any], bytes]:
    flat = tensor.detach().to(torch.float16 if half else torch.float32).cpu().numpy().reshape(-1)
    meta, data = encode(flat, "f16" if half else "f32", 16 if half else 32)
    meta.update(shape=list(tensor.shape), dtype=str(tensor.dtype).removeprefix("torch."))
    return meta, data


def encode_quantized(
    tensor: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bits: int
) -> tuple[dict[str, Any], bytes] | None:
    """Encode a weight as integer codes and per-channel scales, if ``codes * scale`` reproduces it
    exactly (it does for weights made by FakeQuantize); otherwise None."""
    codes = codes.detach()
    scale = scale.detach().to(torch.float32)
    if not torch.equal(codes * scale, tensor.detach()):
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
    meta.update(shape=list(tensor.shape), dtype=str(tensor.dtype).removeprefix("torch."), scale_shape=list(scale.shape),
                scale_len=len(parts[0]), group_size=int(grid.group_size), scale_kind="f16" if half else "f32")
    if zero is not None:
        parts.append(pack_uint(zero.cpu().numpy().reshape(-1).astype(np.int64) + (1 << (bits - 1)), bits))
        meta["zero_len"] = len(parts[-1])
    if inverse is not None:
        parts.append(inverse.cpu().numpy().astype("<f4").tobytes())
        meta["column_len"] = len(parts[-1])
    return meta, b"".join(parts) + data


def _grid_values(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, inverse: torch.Tensor | None,
                 group_size: int) -> torch.Tensor:
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
    scale = torch.from_numpy(np.frombuffer(data[:offset], dtype=scale_dtype).astype(np.float32)).reshape(meta["scale_shape"])
    zero = inverse = None
    if "zero_len" in meta:
        packed = data[offset:offset + meta["zero_len"]]
        zero = torch.from_numpy((unpack_uint(packed, bits, scale.numel()) - (1 << (bits - 1))).astype(np.float32))
        zero = zero.reshape(scale.shape)
        offset += meta["zero_len"]
    if "column_len" in meta:
        inverse = torch.from_numpy(np.frombuffer(data[offset:offset + meta["column_len"]], dtype="<f4").copy())
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
    dtype = getattr(torch, meta["dtype"])
    shape = tuple(meta["shape"])
    kind = meta["kind"]
    if kind == "raw":
        if dtype == torch.bfloat16:
            return torch.from_numpy(np.frombuffer(data, dtype=np.int16).copy()).view(torch.bfloat16).reshape(shape)
        np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
        return torch.from_numpy(np.frombuffer(data, dtype=np_dtype).copy()).reshape(shape)
    if kind == "int" and "group_size" in meta:
        return _decode_grid(meta, data).to(dtype)
    if kind == "int":
        scale_len = meta["scale_len"]
        scale = torch.from_numpy(np.frombuffer(data[:scale_len], dtype="<f4").copy()).reshape(meta["scale_shape"])
        codes = torch.from_numpy(decode(meta, data[scale_len:]).astype(np.float32)).reshape(shape)
        return (codes * scale).to(dtype)
    values = torch.from_numpy(decode(meta, data).copy()).reshape(shape)
    return values.to(dtype)
