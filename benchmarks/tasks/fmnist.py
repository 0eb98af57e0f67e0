"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist``: idx parsing, the seeded
stratified validation split, and tensors/loaders for the CNN tasks."""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

FMNIST_DIR = Path(os.environ.get("TIGHTFIT_FMNIST_DIR", "/usr/share/datasets/fashion-mnist"))
APT_LINE = "apt-get update && apt-get install -y dataset-fashion-mnist"
FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
VAL_SIZE = 5000
# Per-pixel mean/std of the 60,000 training images (scaled to [0, 1]), the usual constants.
MEAN, STD = 0.2860, 0.3530
# The largest idx file we accept: the training images are 47 MB; anything far bigger is not this data.
MAX_IDX_BYTES = 200_000_000


class IdxError(ValueError):
    """An idx file whose header or size is not what the idx format (ubyte data) says."""


def parse_idx(raw: bytes, *, name: str = "idx") -> np.ndarray:
    """The uint8 array of an (uncompressed) idx file: magic ``0x00 0x00 0x08 ndim``, ``ndim``
    big-endian uint32 dimensions, then the data. The header and the data size are checked before
    anything is allocated."""
    if len(raw) < 4:
        raise IdxError(f"{name}: {len(raw)} bytes is shorter than an idx header (4 bytes).")
    if raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise IdxError(
            f"{name}: bad idx magic {raw[:4].hex()} (expected 000008nn: unsigned bytes); not an idx ubyte file."
        )
    ndim = raw[3]
    if not 1 <= ndim <= 4:
        raise IdxError(f"{name}: idx header says {ndim} dimensions; expected 1 to 4.")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IdxError(f"{name}: {len(raw)} bytes is shorter than its {header}-byte header.")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims, dtype=np.int64))
    if expected > MAX_IDX_BYTES or len(raw) - header != expected:
        raise IdxError(
            f"{name}: header dimensions {dims} need {expected} data bytes but the file holds {len(raw) - header}."
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def read_idx_gz(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read(MAX_IDX_BYTES + 1024)  # bounded: a corrupt/huge stream is refused, not read whole
    return parse_idx(raw, name=str(path))


def stratified_split(labels: np.ndarray, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices), stratified by label and seeded (sklearn)."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    tr, va = train_test_split(idx, test_size=val_size, stratify=labels, random_state=seed, shuffle=True)
    return np.sort(tr), np.sort(va)


@dataclass
class FMNIST:
    """Uint8 images (N, 28, 28) and int64 labels, per split."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


_LOADED: dict[int, FMNIST] = {}


def load_fmnist(seed: int = 0, directory: Path | None = None, val_size: int = VAL_SIZE) -> FMNIST:
    """Train 55,000 / validation 5,000 (held out of the official training images, stratified,
    seeded) / test the official 10,000."""
    directory = Path(directory or FMNIST_DIR)
    cached = directory == FMNIST_DIR and val_size == VAL_SIZE
    if cached and seed in _LOADED:
        return _LOADED[seed]
    missing = [f for f in FILES.values() if not (directory / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {directory} (missing {', '.join(missing)}). Install it with: {APT_LINE}"
            " (or set TIGHTFIT_FMNIST_DIR to a folder holding the four idx .gz files)."
        )
    arr = {k: read_idx_gz(directory / f) for k, f in FILES.items()}
    for part in ("train", "test"):
        xi, yl = arr[f"{part}_images"], arr[f"{part}_labels"]
        if xi.ndim != 3 or yl.ndim != 1 or len(xi) != len(yl):
            raise IdxError(f"Fashion-MNIST {part}: images {xi.shape} and labels {yl.shape} do not pair up.")
    tr, va = stratified_split(arr["train_labels"], val_size, seed)
    x, y = arr["train_images"], arr["train_labels"].astype(np.int64)
    data = FMNIST(x[tr], y[tr], x[va], y[va], arr["test_images"], arr["test_labels"].astype(np.int64))
    if cached:
        _LOADED[seed] = data
    return data


def to_tensor(x: np.ndarray | torch.Tensor, size: int = 28, channels: int = 1) -> torch.Tensor:
    """Normalized float32 (N, channels, size, size); resized bilinearly when size != 28."""
    x = torch.from_numpy(x) if isinstance(x, np.ndarray) else x
    t = (x.float().div_(255.0).sub_(MEAN).div_(STD)).unsqueeze(1)
    if size != 28:
        t = torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
    if channels != 1:
        t = t.expand(-1, channels, -1, -1).contiguous()
    return t
