"""Reading a ``.tfz`` without trusting it: the zip's members read with bounded reads, the manifest
checked field by field before anything it sizes is allocated. Every fault is an ArtifactError that
names the part of the file at fault."""

from __future__ import annotations

import io
import json
import os
import zipfile
import zlib
from pathlib import Path
from typing import Any

from ..errors import ArtifactError
from . import codec

FORMAT = "tightfit-artifact"
#: 2: the architecture is data (architecture.json), never a pickle; gap layouts end with fillers.
#: 1: the architecture was a pickled module (architecture.pt), never read (load with model=).
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
PAYLOAD = "payload.bin"
ARCHITECTURE = "architecture.json"
PICKLED_ARCHITECTURE = "architecture.pt"
MEMBERS = (MANIFEST, PAYLOAD, ARCHITECTURE, PICKLED_ARCHITECTURE)
#: Caps on the JSON members' uncompressed sizes (the payload's is what the manifest declares):
#: a manifest entry is ~200 bytes, so 16 MiB is ~80,000 tensors, far beyond real models.
MAX_JSON_BYTES = 16 * 2**20
#: The zip errors a damaged archive raises while it is read.
_ZIP_ERRORS = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    EOFError,
    zlib.error,
    OSError,
    ValueError,
    NotImplementedError,
    RuntimeError,
    KeyError,
)

PathOrBuffer = str | os.PathLike | io.BytesIO


def open_archive(path: PathOrBuffer) -> zipfile.ZipFile:
    """The zip archive at ``path``, its list of members checked (names, no duplicates, plain or
    deflate compression, not encrypted); nothing is decompressed yet."""
    if isinstance(path, (str, os.PathLike)) and not Path(path).is_file():
        raise ArtifactError(f"{path}: no such file.")
    try:
        archive = zipfile.ZipFile(path)
        infos = archive.infolist()
    except _ZIP_ERRORS as exc:
        raise ArtifactError(f"{path}: not a tightfit model file (not a readable zip archive: {exc}).") from exc
    names = [info.filename for info in infos]
    problem = None
    if len(set(names)) != len(names):
        problem = "a member name appears twice"
    elif unknown := sorted(set(names) - set(MEMBERS)):
        problem = f"unexpected member(s) {[n[:60] for n in unknown[:3]]}"
    elif not {MANIFEST, PAYLOAD} <= set(names):
        problem = f"{MANIFEST} or {PAYLOAD} missing"
    elif bad := [i.filename for i in infos if i.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)]:
        problem = f"{bad[0]} uses a compression other than deflate"
    elif enc := [i.filename for i in infos if i.flag_bits & 0x1]:
        problem = f"{enc[0]} is encrypted"
    if problem:
        archive.close()
        raise ArtifactError(f"{path}: not a tightfit model file ({problem}).")
    return archive


def read_member(archive: zipfile.ZipFile, name: str, limit: int, *, exact: bool = False) -> bytes:
    """The bytes of member ``name``, refused before decompression when its declared uncompressed
    size is above ``limit`` (or, ``exact``, not equal to it), and read with a bounded read (a
    member whose data inflates past its declared size fails its check instead of filling memory)."""
    info = archive.getinfo(name)
    if exact and info.file_size != limit:
        raise ArtifactError(
            f"{name} declares {info.file_size:,} bytes uncompressed, not the {limit:,} bytes the manifest "
            "accounts for; the file is damaged or crafted."
        )
    if info.file_size > limit:
        raise ArtifactError(
            f"{name} declares {info.file_size:,} bytes uncompressed, more than the {limit:,} a tightfit "
            "file's member may hold; the file is damaged or crafted."
        )
    try:
        with archive.open(info) as stream:
            data = stream.read(limit + 1)
    except _ZIP_ERRORS as exc:
        raise ArtifactError(f"{name}: damaged ({type(exc).__name__}: {exc}).") from exc
    if len(data) != info.file_size:
        raise ArtifactError(
            f"{name}: holds {len(data):,} bytes, not the {info.file_size:,} it declares; the file is damaged."
        )
    return data


def read_json(archive: zipfile.ZipFile, name: str) -> Any:
    data = read_member(archive, name, MAX_JSON_BYTES)
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ArtifactError(
            f"{name}: not valid JSON ({type(exc).__name__}: {str(exc)[:100]}); the file is damaged."
        ) from exc


def check_manifest(manifest: Any, path: PathOrBuffer) -> int:
    """Check the manifest's top-level fields; returns its format version."""
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path}: {MANIFEST} is not an object; not a tightfit model file.")
    if manifest.get("format") != FORMAT:
        raise ArtifactError(
            f"{path}: not a tightfit model file ({MANIFEST} format is {str(manifest.get('format'))[:60]!r})."
        )
    version = manifest.get("version")
    if type(version) is not int or version < 1:
        raise ArtifactError(
            f"{path}: {MANIFEST} version is {str(version)[:60]!r}, not a format version; the file is damaged."
        )
    if version > FORMAT_VERSION:
        raise ArtifactError(f"{path}: written by a newer tightfit (format version {version}); upgrade tightfit.")
    if not isinstance(manifest.get("tensors"), list):
        raise ArtifactError(f"{path}: {MANIFEST} tensors must be a list; the file is damaged.")
    if manifest.get("plan") is not None and not isinstance(manifest["plan"], dict):
        raise ArtifactError(f"{path}: {MANIFEST} plan must be an object or null; the file is damaged.")
    if version >= 2:
        if manifest.get("architecture") not in (None, ARCHITECTURE):
            raise ArtifactError(
                f"{path}: {MANIFEST} architecture must be {ARCHITECTURE!r} or null; the file is damaged."
            )
        if type(manifest.get("payload_bytes")) is not int:
            raise ArtifactError(f"{path}: {MANIFEST} payload_bytes must be an integer; the file is damaged.")
    return version


def check_tensors(
    manifest: dict[str, Any], version: int
) -> tuple[list[dict[str, Any]], dict[str, tuple[int, ...]], int]:
    """Check every tensor entry (see :func:`tightfit.export.codec.check_meta`): names unique,
    aliases naming an earlier tensor, stored tensors back to back in the payload. Returns the
    entries, each name's declared shape, and the payload's length."""
    entries = manifest["tensors"]
    shapes: dict[str, tuple[int, ...]] = {}
    offset = 0
    for index, meta in enumerate(entries):
        where = f"{MANIFEST} tensors[{index}]"
        if not isinstance(meta, dict):
            raise ArtifactError(f"{where} must be an object; the file is damaged.")
        name = meta.get("name")
        if not isinstance(name, str) or not name or len(name) > 1000 or name in shapes:
            raise ArtifactError(f"{where}.name is {str(name)[:60]!r}: not a new tensor name; the file is damaged.")
        where = f"{where} ({name!r})"
        for flag in ("parameter", "requires_grad"):
            if flag in meta and type(meta[flag]) is not bool:
                raise ArtifactError(f"{where}.{flag} must be true or false; the file is damaged.")
        if "alias_of" in meta:
            if meta["alias_of"] not in shapes:
                raise ArtifactError(f"{where}.alias_of must name an earlier tensor; the file is damaged.")
            shapes[name] = shapes[meta["alias_of"]]
            continue
        shapes[name] = codec.check_meta(meta, where, version)
        if meta.get("offset") != offset or type(meta.get("offset")) is not int:
            raise ArtifactError(
                f"{where}.offset is {str(meta.get('offset'))[:40]}, but the tensors before it end at {offset}; "
                "the file is damaged."
            )
        offset += meta["length"]
    if version >= 2 and manifest["payload_bytes"] != offset:
        raise ArtifactError(
            f"{MANIFEST} payload_bytes is {manifest['payload_bytes']}, but its tensors take {offset}; "
            "the file is damaged."
        )
    return entries, shapes, offset
