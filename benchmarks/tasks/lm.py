"""tiny-lm: a 4-layer GPT-2-configured causal transformer (width 256) over bytes, trained here on
the Python standard library's own ``.py`` sources (they ship with every Python, nothing is
downloaded). Files, not sequences, are split seeded into train / validation / test, so held-out
text is from modules the model never read."""

from __future__ import annotations

import math
import sysconfig
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

EOS = 256  # separates files; the bytes are tokens 0-255
VOCAB = 257
SEQ_LEN = 128
# Held-out sequences scored by the metric: 512 x 128 tokens. Every search trial reads the
# validation set, so it is capped; the sequences are drawn seeded from all held-out files.
EVAL_SEQUENCES = 512
# Wall-time budget of the training run. On the shared machine (load ~17 on 2 cores) this process got
# about 12% of a core, 8 s per step, so 50 minutes of wall time are a few minutes of one core.
TRAIN_MINUTES = 50.0
PIP_LINE = "pip install transformers"


def encode(text: str | bytes) -> list[int]:
    """Byte-level tokens: UTF-8 bytes as ids 0-255 (no vocabulary to learn or download)."""
    return list(text.encode("utf-8") if isinstance(text, str) else text)


def decode(tokens: Sequence[int]) -> str:
    return bytes(t for t in tokens if 0 <= t < 256).decode("utf-8", errors="replace")


def stdlib_files(root: str | Path | None = None) -> list[Path]:
    """The top-level ``.py`` files of the standard library, sorted by name."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.is_file())
    if not files:
        raise FileNotFoundError(f"no .py files in {root}: tiny-lm reads the standard library's sources.")
    return files


def split_files(
    files: Sequence[Path], seed: int, val_frac: float = 0.1, test_frac: float = 0.1
) -> tuple[list[Path], list[Path], list[Path]]:
    """(train, validation, test) files: a seeded permutation, at least one file per part."""
    if len(files) < 3:
        raise ValueError(f"split_files needs at least 3 files to split by file, got {len(files)}.")
    perm = np.random.default_rng(seed).permutation(len(files))
    n_val = max(1, round(val_frac * len(files)))
    n_test = max(1, round(test_frac * len(files)))

    def pick(ids):
        return sorted((files[i] for i in ids), key=str)

    return pick(perm[n_val + n_test :]), pick(perm[:n_val]), pick(perm[n_val : n_val + n_test])


def token_stream(files: Sequence[Path]) -> torch.Tensor:
    """The files' bytes concatenated, EOS after each file, as an int64 tensor."""
    parts = []
    for f in files:
        parts.append(np.frombuffer(Path(f).read_bytes(), dtype=np.uint8).astype(np.int64))
        parts.append(np.array([EOS], dtype=np.int64))
    return torch.from_numpy(np.concatenate(parts))


class TokenBlocks(Dataset):
    """Non-overlapping blocks of ``seq_len`` tokens of a stream as Hugging Face batches
    (``{"input_ids", "labels"}``: the model shifts the labels itself). ``limit`` keeps a seeded
    random subset of the blocks, in stream order."""

    def __init__(self, stream: torch.Tensor, seq_len: int = SEQ_LEN, limit: int | None = None, seed: int = 0) -> None:
        n = len(stream) // seq_len
        if n == 0:
            raise ValueError(f"TokenBlocks: {len(stream)} tokens make no block of {seq_len}.")
        self.blocks = stream[: n * seq_len].view(n, seq_len)
        if limit is not None and limit < n:
            keep = np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))
            self.blocks = self.blocks[torch.from_numpy(keep)]

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


def tiny_lm_model(seq_len: int = SEQ_LEN, *, layers: int = 4, width: int = 256, heads: int = 4) -> nn.Module:
    """GPT-2 architecture from a configuration (no download): 4 layers, width 256, 4 heads."""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError as e:
        raise ImportError(f"tiny-lm needs Hugging Face transformers: {PIP_LINE}") from e
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=seq_len,
        n_embd=width,
        n_layer=layers,
        n_head=heads,
        n_inner=4 * width,
        bos_token_id=EOS,
        eos_token_id=EOS,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        use_cache=False,
    )
    return GPT2LMHeadModel(config)


def sequence_losses(model: nn.Module, batch: Any) -> torch.Tensor:
    """Mean next-token cross-entropy (nats) of each sequence in a batch."""
    ids = batch["input_ids"] if isinstance(batch, dict) else (batch[0] if isinstance(batch, (tuple, list)) else batch)
    out = model(input_ids=ids)
    logits = out.logits if hasattr(out, "logits") else out[0]
    ce = nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1), reduction="none"
    )
    return ce.view(ids.shape[0], -1).mean(1)


def negative_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """The tiny-lm metric per sequence (higher is better): minus its mean token loss."""
    return -sequence_losses(model, batch)


@torch.no_grad()
def mean_loss(model: nn.Module, data: Dataset, batch: int = 32) -> float:
    model.eval()
    total, n = 0.0, 0
    for i in range(0, len(data), batch):
        ids = torch.stack([data[j]["input_ids"] for j in range(i, min(i + batch, len(data)))])
        total += float(sequence_losses(model, ids).sum())
        n += len(ids)
    return total / n


def lm_datasets(seed: int = 0, root: str | Path | None = None) -> tuple[TokenBlocks, TokenBlocks, TokenBlocks]:
    train_f, val_f, test_f = split_files(stdlib_files(root), seed)
    return (
        TokenBlocks(token_stream(train_f)),
        TokenBlocks(token_stream(val_f), limit=EVAL_SEQUENCES, seed=seed),
        TokenBlocks(token_stream(test_f), limit=EVAL_SEQUENCES, seed=seed + 1),
    )


def _lr_at(fraction: float, step: int, lr: float, warmup: int) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to 10% over the time budget."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, fraction))))


def train_task(seed: int = 0, *, minutes: float = TRAIN_MINUTES, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train for a fixed wall time (the shared machine's speed varies, the deadline does not):
    AdamW (lr 1e-3, betas 0.9/0.95, weight decay 0.1), batch 16 x 128 tokens, random blocks."""
    settings = {
        "minutes": minutes,
        "batch": 16,
        "seq_len": SEQ_LEN,
        "lr": 1e-3,
        "weight_decay": 0.1,
        "warmup": 30,
        "seed": seed,
    }
    train, val, test = lm_datasets(seed)
    torch.manual_seed(seed)
    model = tiny_lm_model()
    opt = torch.optim.AdamW(
        model.parameters(), lr=settings["lr"], betas=(0.9, 0.95), weight_decay=settings["weight_decay"]
    )
    g = torch.Generator().manual_seed(seed)
    start, step, budget = time.time(), 0, minutes * 60.0
    model.train()
    while (elapsed := time.time() - start) < budget:
        for group in opt.param_groups:
            group["lr"] = _lr_at(elapsed / budget, step, settings["lr"], settings["warmup"])
        ids = train.blocks[torch.randint(len(train), (settings["batch"],), generator=g)]
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 25 == 0:
            log(f"step {step} loss {loss.item():.4f} elapsed {elapsed:.0f}s")
    wall = time.time() - start
    val_loss, test_loss = mean_loss(model, val), mean_loss(model, test)
    log(
        f"done: {step} steps in {wall:.0f}s; validation loss {val_loss:.4f} (ppl {math.exp(val_loss):.2f}), test {test_loss:.4f}"
    )
    return {
        "model": model,
        "settings": settings,
        "train_seconds": wall,
        "steps": step,
        "tokens_seen": step * settings["batch"] * SEQ_LEN,
        "val_metric": -val_loss,
        "test_metric": -test_loss,
        "val_perplexity": math.exp(val_loss),
        "test_perplexity": math.exp(test_loss),
        "metric": "negative mean token loss (nats/byte)",
        "train_sequences": len(train),
        "files": {"train": len(train.blocks)},
    }
