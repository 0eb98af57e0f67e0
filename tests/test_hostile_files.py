"""Hostile .tfz files: crafted pickles, edited manifests and architectures, zip bombs, truncations and
flipped bytes. Loading one runs no code, allocates no more than a small multiple of what the file's
checked sizes declare, and refuses with an ArtifactError naming the part at fault; a file damaged
where it does not matter loads correctly."""

import copy
import io
import json
import resource
import struct
import tracemalloc
import zipfile
import zlib

import pytest
import torch
from torch import nn

from tightfit.errors import ArtifactError
from tightfit.export import to_bytes
from tightfit.export.artifact import load_model
from tightfit.operators import Compose, Plan, Prune, Quantize, apply

GIB = 2**30
X = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))


def _fresh() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 64), nn.ReLU(), nn.Linear(64, 6), nn.BatchNorm1d(6))
    model[4].weight = nn.Parameter(model[4].weight.detach().clone())
    return model.eval()


def _model() -> tuple[nn.Module, Plan]:
    model = _fresh()
    plan = Plan.from_strategy(
        Compose([Prune(), Quantize(bits=(2, 4))]),
        {
            "2": {"prune": {"sparsity": 0.95}, "quantize": {"bits": 4}},  # a sparse layout of 4-bit codes
            "4": {"prune": {"sparsity": 0.5}, "quantize": {"bits": 2}},
        },
    )
    return apply(plan, model).eval(), plan


@pytest.fixture(scope="module")
def saved():
    model, plan = _model()
    with torch.no_grad():
        expected = model(X)
    return to_bytes(model, plan), expected


def _members(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def _zip(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return out.getvalue()


def _with_manifest(data: bytes, edit) -> bytes:
    members = _members(data)
    manifest = json.loads(members["manifest.json"])
    edit(manifest)
    members["manifest.json"] = json.dumps(manifest).encode()
    return _zip(members)


def _load(data: bytes) -> nn.Module:
    return load_model(io.BytesIO(data))


def _outcome_is_load_or_refusal(data: bytes, expected: torch.Tensor | None) -> str:
    """Load ``data``: an ArtifactError, or (``expected`` given) a model whose outputs are the saved
    one's. Any other exception fails the test."""
    try:
        loaded = _load(data)
    except ArtifactError:
        return "refused"
    assert isinstance(loaded, nn.Module)
    if expected is not None:
        with torch.no_grad():
            assert torch.equal(loaded(X), expected)
    return "loaded"


def test_the_base_file_loads_and_has_every_layout(saved):
    data, expected = saved
    with torch.no_grad():
        assert torch.equal(_load(data)(X), expected)
    tensors = json.loads(_members(data)["manifest.json"])["tensors"]
    kinds = {(t.get("kind"), t.get("layout")) for t in tensors}
    assert {("int", "gap"), ("f32", "dense"), ("raw", None)} <= kinds, kinds
    assert any(t.get("layout") == "bitmask" for t in tensors) or any(t.get("kind") == "int" for t in tensors)


# ------------------------------------------------------------------------------------------ pickles


class _Payload:
    """Unpickling this creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _pickle_bytes(marker) -> bytes:
    buffer = io.BytesIO()
    torch.save(_Payload(marker), buffer)  # torch's own zip pickle, as architecture.pt was
    return buffer.getvalue()


def test_a_crafted_pickle_in_every_place_runs_nothing(saved, tmp_path):
    data, expected = saved
    marker = tmp_path / "pwned"
    evil = _pickle_bytes(marker)
    members = _members(data)
    v1_manifest = json.loads(members["manifest.json"])
    v1_manifest.update(version=1, architecture=True)
    format_1 = {
        "manifest.json": json.dumps(v1_manifest).encode(),
        "payload.bin": members["payload.bin"],
        "architecture.pt": evil,
    }
    cases = {
        "format-1 architecture.pt": (_zip(format_1), "never unpickles"),
        "manifest.json": (_zip({**members, "manifest.json": evil}), "manifest.json"),
        "payload.bin": (_zip({**members, "payload.bin": evil}), "payload.bin"),
        "architecture.json": (_zip({**members, "architecture.json": evil}), "architecture.json"),
        "the whole file": (evil, "not a tightfit model file"),
    }
    for where, (crafted, named) in cases.items():
        with pytest.raises(ArtifactError, match=named):
            _load(crafted)
        assert not marker.exists(), where
    # beside a format-2 file, an architecture.pt is never read: the file loads from its data
    with torch.no_grad():
        assert torch.equal(_load(_zip({**members, "architecture.pt": evil}))(X), expected)
    # a format-1 file loads into a given model without unpickling its architecture
    with torch.no_grad():
        assert torch.equal(load_model(io.BytesIO(_zip(format_1)), model=_fresh())(X), expected)
    assert not marker.exists()


def test_the_refusal_of_a_pickle_names_both_ways_out(saved):
    data, _ = saved
    members = _members(data)
    manifest = json.loads(members["manifest.json"])
    manifest.update(version=1, architecture=True)
    old = _zip(
        {
            "manifest.json": json.dumps(manifest).encode(),
            "payload.bin": members["payload.bin"],
            "architecture.pt": b"anything",
        }
    )
    with pytest.raises(ArtifactError) as refused:
        _load(old)
    assert "never unpickles" in str(refused.value) and "model=" in str(refused.value)


# --------------------------------------------------------------------------------- edited manifests


def _first(kind):
    def pick(manifest):
        return next(
            t for t in manifest["tensors"] if t.get("kind") == kind and (kind != "int" or t.get("layout") == "gap")
        )

    return pick


def _set(pick, key, value):
    def edit(manifest):
        pick(manifest)[key] = value

    return edit


def _drop(pick, key):
    def edit(manifest):
        del pick(manifest)[key]

    return edit


def _top(key, value=None, drop=False):
    def edit(manifest):
        if drop:
            del manifest[key]
        else:
            manifest[key] = value

    return edit


INT, F32, RAW = _first("int"), _first("f32"), _first("raw")
EDITS = {
    # the one edit that took 11.7 GB: a shape (and numel) a gap layout's few bytes cannot cover
    "huge shape": (lambda m: INT(m).update(shape=[100_000, 100_000], numel=10**10), "does not fit|numel"),
    "huge shape, numel and scales": (
        lambda m: INT(m).update(shape=[100_000, 100_000], numel=10**10, scale_shape=[100_000, 1], scale_len=400_000),
        "numel|length",
    ),
    "huge shape, raw": (_set(RAW, "shape", [2**40]), "length"),
    "shape of a float": (_set(F32, "shape", [3, 1000]), "numel"),
    "negative dimension": (_set(F32, "shape", [-6, 4]), "shape"),
    "shape not a list": (_set(F32, "shape", "6x4"), "shape"),
    "numel off by one": (lambda m: INT(m).update(numel=INT(m)["numel"] + 1), "numel"),
    "length longer": (lambda m: F32(m).update(length=F32(m)["length"] + 4), "length"),
    "length negative": (_set(F32, "length", -1), "length"),
    "length a string": (_set(F32, "length", "96"), "length"),
    "offset huge": (_set(F32, "offset", 2**62), "offset"),
    "offset negative": (_set(F32, "offset", -8), "offset"),
    "offset a float": (lambda m: F32(m).update(offset=float(F32(m)["offset"])), "offset"),
    "dtype a torch attribute": (_set(F32, "dtype", "FloatStorage"), "dtype"),
    "dtype unknown": (_set(RAW, "dtype", "float128"), "dtype"),
    "dtype a number": (_set(RAW, "dtype", 7), "dtype"),
    "dtype integer for floats": (_set(F32, "dtype", "int64"), "dtype"),
    "kind unknown": (_set(F32, "kind", "pickle"), "kind"),
    "layout unknown": (_set(F32, "layout", "sparse_coo"), "layout"),
    "bits out of range": (_set(INT, "bits", 64), "bits"),
    "bits a string": (_set(INT, "bits", "4"), "bits"),
    "entries huge": (_set(INT, "entries", 10**12), "entries"),
    "entries zero": (_set(INT, "entries", 0), "entries"),
    "gap_bits unknown": (_set(INT, "gap_bits", 7), "gap_bits"),
    "gap_len wrong": (lambda m: INT(m).update(gap_len=INT(m)["gap_len"] + 1), "gap_len"),
    "scale_len huge": (_set(INT, "scale_len", 2**40), "scale_len"),
    "scale_shape not broadcast": (_set(INT, "scale_shape", [5, 1]), "scale"),
    "missing kind": (_drop(F32, "kind"), "kind"),
    "missing shape": (_drop(INT, "shape"), "shape"),
    "missing length": (_drop(RAW, "length"), "length"),
    "missing scale_len": (_drop(INT, "scale_len"), "scale_len"),
    "name a number": (_set(F32, "name", 5), "name"),
    "name twice": (lambda m: m["tensors"][1].update(name=m["tensors"][0]["name"]), "name"),
    "name not in the model": (_set(F32, "name", "9.weight"), "9"),
    "parameter a string": (_set(F32, "parameter", "yes"), "parameter"),
    "parameter flipped": (lambda m: F32(m).update(parameter=not F32(m)["parameter"]), "buffer|parameter"),
    "alias of nothing": (lambda m: m["tensors"].append({"name": "extra", "alias_of": "nope"}), "alias_of"),
    "tensors an object": (_top("tensors", {}), "tensors"),
    "tensors missing": (_top("tensors", drop=True), "tensors"),
    "tensor an entry of null": (lambda m: m["tensors"].insert(0, None), r"tensors\[0\]"),
    "a tensor dropped": (lambda m: m["tensors"].remove(RAW(m)), "payload_bytes|offset|not store"),
    "version a string": (_top("version", "2"), "version"),
    "version from the future": (_top("version", 99), "newer"),
    "version zero": (_top("version", 0), "version"),
    "format other": (_top("format", "safetensors"), "format"),
    "payload_bytes larger": (lambda m: m.update(payload_bytes=m["payload_bytes"] + 1), "payload_bytes"),
    "payload_bytes huge": (_top("payload_bytes", 2**50), "payload_bytes"),
    "payload_bytes missing": (_top("payload_bytes", drop=True), "payload_bytes"),
    "architecture a pickle": (_top("architecture", "architecture.pt"), "architecture"),
    "plan not an object": (_top("plan", "prune everything"), "plan"),
}


@pytest.mark.parametrize("name", list(EDITS))
def test_an_edited_manifest_is_refused_naming_the_field(name, saved):
    data, _ = saved
    edit, field = EDITS[name]
    crafted = _with_manifest(data, edit)
    tracemalloc.start()
    try:
        with pytest.raises(ArtifactError, match=field):
            _load(crafted)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20, f"{name}: {peak / 2**20:.1f} MiB traced while refusing"


_HOSTILE_VALUES = (-1, 2**63, 1.5, None, "x", [2**40, 2**40])


def _leaves(node, path=()):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, path + (key,))
    elif isinstance(node, list) and node and isinstance(node[0], (dict, list)):
        for index, value in enumerate(node):
            yield from _leaves(value, path + (index,))
    else:
        yield path


def _replace(tree, path, value):
    tree = copy.deepcopy(tree)
    node = tree
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return tree


@pytest.mark.parametrize("member", ["manifest.json", "architecture.json"])
def test_every_field_set_to_hostile_values_loads_or_is_refused(member, saved):
    """Each JSON value replaced by each of a few hostile ones: never an exception other than
    ArtifactError (a value that is merely different, like a LayerNorm's eps, may load)."""
    data, _ = saved
    members = _members(data)
    tree = json.loads(members[member])
    outcomes = {"loaded": 0, "refused": 0}
    for path in _leaves(tree):
        for value in _HOSTILE_VALUES:
            crafted = _zip({**members, member: json.dumps(_replace(tree, path, value)).encode()})
            outcomes[_outcome_is_load_or_refusal(crafted, None)] += 1
    assert outcomes["refused"] > 0, outcomes


EDITED_ARCHITECTURES = {
    "a class outside the allow-list": (lambda a: a["root"]["children"][1][1].update(type="os.system"), "allowed"),
    "an argument the class does not take": (
        lambda a: a["root"]["children"][0][1]["args"].update(eval="1"),
        "not an argument",
    ),
    "an argument of the wrong size": (lambda a: a["root"]["children"][0][1]["args"].update(in_features=40), "shape"),
    "a huge layer": (
        lambda a: a["root"]["children"][2][1]["args"].update(in_features=10**6, out_features=10**6),
        "shape",
    ),
    "an object as an argument": (lambda a: a["root"]["children"][0][1]["args"].update(bias={"x": 1}), "number, string"),
    "a child named with a dot": (lambda a: a["root"]["children"][0].__setitem__(0, "a.b"), "pair"),
    "a layer dropped": (lambda a: a["root"]["children"].pop(4), "submodule"),
    "a tree too deep": (lambda a: a.update(root=_deep(200)), "deeper"),
    "another format": (lambda a: a.update(format="pickle"), "architecture"),
}


def _deep(depth):
    node = {"type": "Identity", "args": {}}
    for _ in range(depth):
        node = {"type": "Sequential", "children": [["0", node]]}
    return node


@pytest.mark.parametrize("name", list(EDITED_ARCHITECTURES))
def test_an_edited_architecture_is_refused_naming_the_part(name, saved):
    data, _ = saved
    members = _members(data)
    tree = json.loads(members["architecture.json"])
    edit, named = EDITED_ARCHITECTURES[name]
    edit(tree)
    tracemalloc.start()
    try:
        with pytest.raises(ArtifactError, match=named):
            _load(_zip({**members, "architecture.json": json.dumps(tree).encode()}))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20


def test_a_recurrent_layer_cannot_ask_for_endless_layers():
    lstm = nn.LSTM(3, 4)
    members = _members(to_bytes(lstm))
    tree = json.loads(members["architecture.json"])
    tree["root"]["args"]["num_layers"] = 10**9
    with pytest.raises(ArtifactError, match="num_layers"):
        _load(_zip({**members, "architecture.json": json.dumps(tree).encode()}))


# ----------------------------------------------------------------------------------------- zip bombs


def _zeros_deflated(size: int) -> bytes:
    """Raw deflate of ``size`` zero bytes (a multiple of 1 MiB), made without compressing them all:
    after a full flush the compressor starts afresh, so each MiB compresses to the same bytes."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = compressor.compress(bytes(2**20)) + compressor.flush(zlib.Z_FULL_FLUSH)
    return block * (size // 2**20) + compressor.flush()


def _raw_zip(members: list[tuple[str, bytes, int, int]]) -> bytes:
    """A zip whose members are given already deflated: (name, deflated data, size it declares, crc)."""
    out, central = io.BytesIO(), []
    for name, data, size, crc in members:
        offset, encoded = out.tell(), name.encode()
        out.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 8, 0, 0x21, crc, len(data), size, len(encoded), 0))
        out.write(encoded + data)
        central.append(
            struct.pack(
                "<IHHHHHHIIIHHHHHII",
                0x02014B50,
                20,
                20,
                0,
                8,
                0,
                0x21,
                crc,
                len(data),
                size,
                len(encoded),
                0,
                0,
                0,
                0,
                0,
                offset,
            )
            + encoded
        )
    start, directory = out.tell(), b"".join(central)
    out.write(directory)
    out.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members), len(directory), start, 0))
    return out.getvalue()


def _deflated(data: bytes) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    return compressor.compress(data) + compressor.flush()


@pytest.fixture(scope="module")
def bomb():
    return _zeros_deflated(GIB)


def _peak_growth(load) -> tuple[float, float]:
    """(MiB traced by tracemalloc at the peak, MiB the process's peak resident size grew) during ``load()``."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    try:
        load()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    return peak / 2**20, grown / 1024


def test_a_zip_bomb_is_refused_in_bounded_memory(saved, bomb):
    data, _ = saved
    members = _members(data)
    honest = {name: (_deflated(body), len(body), zlib.crc32(body)) for name, body in members.items()}
    assert len(bomb) < 2 * 2**20  # a 1 GiB member in about 1 MiB
    for target, named in (
        ("payload.bin", "payload.bin declares 1,073,741,824 bytes"),
        ("manifest.json", "manifest.json declares 1,073,741,824 bytes"),
        ("architecture.json", "architecture.json declares 1,073,741,824 bytes"),
    ):
        crafted = _raw_zip([(name, *((bomb, GIB, 0) if name == target else honest[name])) for name in members])

        def load(crafted=crafted, named=named):
            with pytest.raises(ArtifactError, match=named):
                _load(crafted)

        traced, grown = _peak_growth(load)
        assert traced < 100 and grown < 100, (target, traced, grown)
    # a member that declares the payload's true size but inflates far past it: read with a bounded
    # read, refused by its checksum
    payload_size = honest["payload.bin"][1]
    lying = _raw_zip(
        [
            (name, *((bomb, payload_size, honest[name][2]) if name == "payload.bin" else honest[name]))
            for name in members
        ]
    )

    def load_lying():
        with pytest.raises(ArtifactError, match="payload.bin"):
            _load(lying)

    traced, grown = _peak_growth(load_lying)
    assert traced < 100 and grown < 100, (traced, grown)
    # and an extra member is refused without being read
    extra = _raw_zip([(name, *honest[name]) for name in members] + [("notes.txt", bomb, GIB, 0)])
    with pytest.raises(ArtifactError, match="unexpected member"):
        _load(extra)


# ---------------------------------------------------------------------------- truncations and flips


#: every STEP-th offset (a load takes ~6 ms; every offset of the ~1.5 KB file: run with STEP = 1)
STEP = 4


def test_truncated_and_flipped_files_load_correctly_or_are_refused(saved, tmp_path):
    data, expected = saved
    outcomes = {"loaded": 0, "refused": 0}
    for end in range(0, len(data), STEP):
        outcomes[_outcome_is_load_or_refusal(data[:end], expected)] += 1
    assert outcomes["loaded"] == 0  # every member is needed, and the directory is at the end
    for index in range(1, len(data), STEP):  # (other offsets than the truncations')
        flipped = bytearray(data)
        flipped[index] ^= 0xFF
        outcomes[_outcome_is_load_or_refusal(bytes(flipped), expected)] += 1
    assert outcomes["loaded"] > 0  # (a flipped timestamp is harmless)


def test_a_missing_file_says_so(tmp_path):
    with pytest.raises(ArtifactError, match="no such file"):
        load_model(tmp_path / "nothing.tfz")


def test_edited_transformer_parts_are_refused():
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16), 2, enable_nested_tensor=False)
    members = _members(to_bytes(encoder))
    tree = json.loads(members["architecture.json"])
    edits = {
        "num_layers": lambda t: t["root"]["args"].update(num_layers=10**9),
        "state": lambda t: t["root"].setdefault("state", {}).update(__class__="x"),
        "activation": lambda t: t["root"]["children"][0][1]["children"][0][1]["args"].update(activation="os.system"),
        "children": lambda t: t["root"]["children"].append(["extra", {"type": "Identity", "args": {}}]),
    }
    for field, edit in edits.items():
        edited = copy.deepcopy(tree)
        edit(edited)
        with pytest.raises(ArtifactError, match=field if field != "activation" else "cannot be built"):
            _load(_zip({**members, "architecture.json": json.dumps(edited).encode()}))


# ------------------------------------------------------------------ group-wise entries (GPTQ / group scales)


@pytest.fixture(scope="module")
def grouped():
    """A file whose Linear weights are group-wise asymmetric codes (scales, zero points per group of 8)."""
    from tightfit import compress_once

    model = _fresh()
    result = compress_once(model, Quantize(bits=4, group_size=8, symmetric=False))
    data = to_bytes(result.model, result.plan)
    with torch.no_grad():
        expected = result.model(X)
    return data, expected


def _grid_entry(manifest):
    return next(t for t in manifest["tensors"] if "group_size" in t)


@pytest.mark.parametrize(
    "field, value",
    [
        ("group_size", 3),
        ("group_size", -1),
        ("scale_shape", [1, 1]),
        ("scale_kind", "f64"),
        ("scale_len", 2),
        ("zero_len", 10**12),
        ("column_len", 4),
        ("group_size", "8"),
    ],
)
def test_an_edited_group_wise_entry_is_refused_naming_the_field(grouped, field, value):
    data, expected = grouped
    assert _outcome_is_load_or_refusal(data, expected) == "loaded"

    def edit(manifest):
        _grid_entry(manifest)[field] = value

    with pytest.raises(ArtifactError, match=field):
        _load(_with_manifest(data, edit))
