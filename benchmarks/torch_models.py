"""Plain-PyTorch models no issue names: depthwise convs with BatchNorm and squeeze-excitation, a
U-Net-style encoder-decoder with a transposed conv and a concatenation, an LSTM, tied embedding /
output weights, a dict output, a frozen layer, Conv1d, float64, a small transformer (keyword
forward; structured pruning removes whole heads). Each is compressed by every
operator (and by all of them composed) with a label-free metric (cosine similarity to the
original's outputs, `MaxDrop(0.2)`), budget 3, `search="random"`. Reported: finished or refused
before any work (and why), feasible, file-size ratio, modules left alone, failed trials, and
whether `tightfit.load(model.tfz, model=copy)` gives the search's metric again.

    PYTHONPATH=src python benchmarks/torch_models.py     # rows: docs/results/torch_models.txt
"""

import copy
import tempfile
import time

import torch
from torch import nn

import tightfit

torch.manual_seed(0)


class SE(nn.Module):
    def __init__(s, c):
        super().__init__()
        s.fc1 = nn.Conv2d(c, c // 4, 1)
        s.fc2 = nn.Conv2d(c // 4, c, 1)

    def forward(s, x):
        return x * torch.sigmoid(s.fc2(torch.relu(s.fc1(x.mean((2, 3), keepdim=True)))))


class MobileNetish(nn.Module):
    def __init__(s):
        super().__init__()
        s.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.Hardswish())
        s.dw = nn.Sequential(
            nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16), nn.ReLU6(), SE(16)
        )
        s.pw = nn.Sequential(nn.Conv2d(16, 24, 1, bias=False), nn.BatchNorm2d(24))
        s.head = nn.Linear(24, 5)

    def forward(s, x):
        h = s.stem(x)
        h = h + s.dw(h)
        h = s.pw(h)
        return s.head(h.mean((2, 3)))


class UNetish(nn.Module):
    def __init__(s):
        super().__init__()
        s.enc = nn.Conv2d(3, 8, 3, padding=1)
        s.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        s.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        s.dec = nn.Conv2d(16, 4, 3, padding=1)

    def forward(s, x):
        e = torch.relu(s.enc(x))
        d = torch.relu(s.down(e))
        u = s.up(d)
        return s.dec(torch.cat([e, u], 1))


class LSTMClassifier(nn.Module):
    def __init__(s):
        super().__init__()
        s.emb = nn.Embedding(30, 16)
        s.lstm = nn.LSTM(16, 32, batch_first=True)
        s.fc = nn.Linear(32, 4)

    def forward(s, x):
        h, _ = s.lstm(s.emb(x))
        return s.fc(h[:, -1])


class Tied(nn.Module):
    def __init__(s):
        super().__init__()
        s.emb = nn.Embedding(30, 16)
        s.mid = nn.Linear(16, 16)
        s.out = nn.Linear(16, 30, bias=False)
        s.out.weight = s.emb.weight

    def forward(s, x):
        return s.out(torch.tanh(s.mid(s.emb(x))))


class DictOut(nn.Module):
    def __init__(s):
        super().__init__()
        s.a = nn.Linear(10, 20)
        s.b = nn.Linear(20, 3)
        s.c = nn.Linear(20, 2)

    def forward(s, x):
        h = torch.relu(s.a(x))
        return {"logits": s.b(h), "aux": s.c(h)}


class Frozen(nn.Module):
    def __init__(s):
        super().__init__()
        s.a = nn.Linear(10, 20)
        s.b = nn.Linear(20, 3)
        s.a.requires_grad_(False)

    def forward(s, x):
        return s.b(torch.relu(s.a(x)))


class Conv1dNet(nn.Module):
    def __init__(s):
        super().__init__()
        s.c1 = nn.Conv1d(4, 16, 5, padding=2)
        s.c2 = nn.Conv1d(16, 16, 3, padding=1, dilation=1)
        s.fc = nn.Linear(16, 3)

    def forward(s, x):
        return s.fc(torch.relu(s.c2(torch.relu(s.c1(x)))).amax(-1))


class SmallTransformer(nn.Module):
    """Two nn.TransformerEncoderLayer (d_model 32, 4 heads) called with keyword arguments."""

    def __init__(s):
        super().__init__()
        s.emb = nn.Embedding(30, 32)
        s.enc = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0), 2, enable_nested_tensor=False
        )
        s.fc = nn.Linear(32, 4)

    def forward(s, input_ids, attention_mask):
        return s.fc(s.enc(s.emb(input_ids), src_key_padding_mask=attention_mask == 0).mean(1))


def out_tensor(o):
    return o["logits"] if isinstance(o, dict) else o


def call(m, x):
    return m(**x) if isinstance(x, dict) else m(x)


cases = [
    ("mobilenetish", MobileNetish(), torch.randn(8, 3, 16, 16)),
    ("unetish", UNetish(), torch.randn(8, 3, 16, 16)),
    ("lstm", LSTMClassifier(), torch.randint(0, 30, (8, 12))),
    ("tied", Tied(), torch.randint(0, 30, (8, 12))),
    ("dictout", DictOut(), torch.randn(8, 10)),
    ("frozen", Frozen(), torch.randn(8, 10)),
    ("conv1d", Conv1dNet(), torch.randn(8, 4, 32)),
    ("float64", DictOut().double(), torch.randn(8, 10, dtype=torch.float64)),
    (
        "transformer",
        SmallTransformer(),
        {"input_ids": torch.randint(0, 30, (8, 12)), "attention_mask": torch.ones(8, 12, dtype=torch.long)},
    ),
]
strategies = {
    "default": lambda: None,
    "structured": lambda: tightfit.StructuredPrune(ratio=(0.0, 0.5)),
    "lowrank": lambda: tightfit.LowRank(),
    "int8": lambda: tightfit.Int8(),
    "all": lambda: tightfit.Compose([tightfit.StructuredPrune(ratio=(0, 0.5)), tightfit.Prune(), tightfit.Quantize()]),
}
for name, model, x in cases:
    model.eval()
    with torch.no_grad():
        ref = out_tensor(call(model, x))

    def metric(m, x=x, ref=ref):
        with torch.no_grad():
            o = out_tensor(call(m, x))
        return float(nn.functional.cosine_similarity(o.flatten(1).double(), ref.flatten(1).double()).mean())

    for sname, make in strategies.items():
        t = time.time()
        with tempfile.TemporaryDirectory() as d:
            try:
                kw = dict(
                    evaluate=metric,
                    constraint=tightfit.MaxDrop(0.2),
                    budget=3,
                    example_input=x,
                    run_dir=d,
                    search="random",
                )
                st = make()
                if st is not None:
                    kw["strategy"] = st
                r = tightfit.compress(model, **kw)
                failed = [t.error for t in r.trials if t.state == "FAIL"]
                rl = ""
                if r.feasible:
                    loaded = tightfit.load(f"{d}/model.tfz", model=copy.deepcopy(model))
                    rl = f" reload={'same' if abs(metric(loaded) - r.metric) < 1e-5 else f'DIFF {metric(loaded):.5f}/{r.metric:.5f}'}"
                print(
                    f"{name:12s} {sname:10s} ok feasible={r.feasible} ratio={r.compression_ratio:.2f} left={len(r.left_alone)} failed={len(failed)} {failed[:1]}{rl} {time.time() - t:.1f}s",
                    flush=True,
                )
            except tightfit.errors.TightfitError as e:
                print(f"{name:12s} {sname:10s} refused {type(e).__name__}: {str(e)[:150]}", flush=True)
            except Exception as e:
                import traceback

                print(f"{name:12s} {sname:10s} CRASH {type(e).__name__}: {str(e)[:300]}", flush=True)
                traceback.print_exc(limit=-4)
