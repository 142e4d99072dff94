"""The checkpoint index (ember.json): its data model and the validation every reader runs at open.

Pure Python + json on purpose: the controller and the S3 tier read indexes on nodes without
torch. A checkpoint that passes `open_checkpoint` can be loaded by offset arithmetic alone; all
the "could this escape the directory / overlap / run past the end" questions are answered here,
once, so loaders need not repeat them.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ember.ckpt_format import spec
from ember.ckpt_format.errors import InvalidIndexError, PartitionSizeError

_HEX16 = re.compile(r"[0-9a-f]{16}")

RECONVERT_HINT = "re-run `ember convert` to rebuild the checkpoint, or re-copy it from its source"


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    partition: int
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def to_json(self) -> dict[str, Any]:
        return {
            "dtype": self.dtype,
            "shape": list(self.shape),
            "partition": self.partition,
            "offset": self.offset,
            "nbytes": self.nbytes,
        }


@dataclass(frozen=True)
class PartitionEntry:
    file: str
    size: int
    checksums: list[str]

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "size": self.size, "checksums": list(self.checksums)}


@dataclass
class CheckpointIndex:
    path: Path
    version: int
    alignment: int
    chunk_bytes: int
    checksum: str
    config: dict[str, Any] | None
    generation_config: dict[str, Any] | None
    files: list[str]
    partitions: list[PartitionEntry]
    tensors: dict[str, TensorEntry]
    aliases: dict[str, str] = field(default_factory=dict)

    @property
    def index_path(self) -> Path:
        return self.path / spec.INDEX_FILE

    def partition_path(self, i: int) -> Path:
        return self.path / self.partitions[i].file

    @property
    def total_bytes(self) -> int:
        """Bytes of all partition files together: what a loader reads (tensors plus padding)."""
        return sum(p.size for p in self.partitions)

    @property
    def tensor_bytes(self) -> int:
        """Bytes of tensor data (each shared tensor counted once)."""
        return sum(t.nbytes for t in self.tensors.values())

    def num_chunks(self, partition: int) -> int:
        return len(self.partitions[partition].checksums)

    def chunk_range(self, partition: int, i: int) -> tuple[int, int]:
        """Byte range [start, end) of chunk `i` of `partition` (the last chunk may be short)."""
        size = self.partitions[partition].size
        n = self.num_chunks(partition)
        if not 0 <= i < n:
            raise IndexError(f"chunk {i} out of range for partition {partition} ({n} chunks)")
        start = i * self.chunk_bytes
        return start, min(start + self.chunk_bytes, size)

    def resolve(self, name: str) -> TensorEntry:
        """The entry for a tensor name or an alias of one."""
        return self.tensors[self.aliases.get(name, name)]

    def names(self) -> list[str]:
        """Every name a state dict of this checkpoint has: tensors and aliases."""
        return [*self.tensors, *self.aliases]

    def tensors_in_partition(self, partition: int) -> list[TensorEntry]:
        """Entries of one partition in file order."""
        return sorted(
            (t for t in self.tensors.values() if t.partition == partition),
            key=lambda t: (t.offset, t.nbytes, t.name),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "format": spec.FORMAT_NAME,
            "version": self.version,
            "alignment": self.alignment,
            "chunk_bytes": self.chunk_bytes,
            "checksum": self.checksum,
            "config": self.config,
            "generation_config": self.generation_config,
            "files": list(self.files),
            "partitions": [p.to_json() for p in self.partitions],
            "tensors": {name: t.to_json() for name, t in self.tensors.items()},
            "aliases": dict(self.aliases),
        }


def open_checkpoint(path: str | os.PathLike[str], *, check_files: bool = True) -> CheckpointIndex:
    """Read and validate a checkpoint's index; refuse anything a loader could trip over.

    `path` is the checkpoint directory (or its ember.json). With `check_files` (the default)
    every partition file must exist with exactly the size the index records; pass False to
    validate an index whose partitions are not local yet (e.g. fetched from S3).
    """
    path = Path(path)
    if path.is_file() and path.name == spec.INDEX_FILE:
        path = path.parent
    index_path = path / spec.INDEX_FILE
    if not path.exists():
        raise InvalidIndexError(
            f"checkpoint not found: {path} does not exist",
            "check the path, or create the checkpoint with `ember convert SRC DST`",
        )
    if not path.is_dir():
        raise InvalidIndexError(
            f"{path} is not an Ember checkpoint: expected a directory containing {spec.INDEX_FILE}",
            "convert the model first with `ember convert SRC DST` and pass DST",
        )
    if not index_path.is_file():
        raise InvalidIndexError(
            f"{path} is not an Ember checkpoint: {spec.INDEX_FILE} is missing",
            "convert the model first with `ember convert SRC DST`; a conversion that was "
            "interrupted leaves no checkpoint behind",
        )
    try:
        raw = index_path.read_bytes()
    except OSError as exc:
        raise InvalidIndexError(f"cannot read {index_path}: {exc.strerror or exc}", RECONVERT_HINT) from exc
    index = parse_index(raw, path)
    if check_files:
        check_partition_files(index)
    return index


def parse_index(raw: bytes | str, path: str | os.PathLike[str]) -> CheckpointIndex:
    """Validate ember.json content (without touching partition files) and build the index.

    `path` is the checkpoint directory the index belongs to; it names the file in errors.
    """
    path = Path(path)
    where = path / spec.INDEX_FILE
    v = _Validator(where)
    try:
        doc = json.loads(raw)
    except UnicodeDecodeError as exc:
        raise InvalidIndexError(f"{where} is not UTF-8 text: {exc.reason}", RECONVERT_HINT) from exc
    except json.JSONDecodeError as exc:
        raise InvalidIndexError(
            f"{where} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
            RECONVERT_HINT,
        ) from exc
    if not isinstance(doc, dict):
        v.fail("the top level must be a JSON object")
    if doc.get("format") != spec.FORMAT_NAME:
        raise InvalidIndexError(
            f"{where} is not an Ember checkpoint index: \"format\" is {doc.get('format')!r}, "
            f"expected {spec.FORMAT_NAME!r}",
            "point Ember at a directory made by `ember convert`",
        )
    version = v.int_field(doc, "version", minimum=1)
    if version > spec.FORMAT_VERSION:
        raise InvalidIndexError(
            f"{where} has format version {version}, written by a newer Ember "
            f"(this one reads version {spec.FORMAT_VERSION})",
            "upgrade Ember (pip install -U ember), or re-convert the model with this version",
        )
    alignment = v.int_field(doc, "alignment", minimum=spec.MIN_ALIGNMENT)
    if alignment & (alignment - 1):
        v.fail(f'"alignment" must be a power of two, got {alignment}')
    chunk_bytes = v.int_field(doc, "chunk_bytes", minimum=alignment)
    if chunk_bytes % alignment:
        v.fail(f'"chunk_bytes" ({chunk_bytes}) must be a multiple of "alignment" ({alignment})')
    checksum = doc.get("checksum")
    if checksum != spec.CHECKSUM:
        raise InvalidIndexError(
            f"{where} uses checksum {checksum!r}; this Ember supports only {spec.CHECKSUM!r}",
            "upgrade Ember, or re-convert the model with this version",
        )
    config = v.optional_object(doc, "config")
    generation_config = v.optional_object(doc, "generation_config")

    files = doc.get("files", [])
    if not isinstance(files, list):
        v.fail('"files" must be a list of file names')
    for name in files:
        v.plain_name(name, '"files"')
    if len(set(files)) != len(files):
        v.fail('"files" lists a file twice')

    partitions = _parse_partitions(v, doc.get("partitions"), alignment, chunk_bytes)
    part_files = {p.file for p in partitions}
    clash = part_files & ({spec.INDEX_FILE} | set(files))
    if clash:
        v.fail(f"partition file {sorted(clash)[0]!r} is also listed as an index or copied file")

    tensors = _parse_tensors(v, doc.get("tensors"), partitions, alignment)
    aliases = _parse_aliases(v, doc.get("aliases", {}), tensors)
    return CheckpointIndex(
        path=path,
        version=version,
        alignment=alignment,
        chunk_bytes=chunk_bytes,
        checksum=checksum,
        config=config,
        generation_config=generation_config,
        files=list(files),
        partitions=partitions,
        tensors=tensors,
        aliases=aliases,
    )


def check_partition_files(index: CheckpointIndex) -> None:
    """Every partition file exists with exactly its indexed size (catches truncated copies)."""
    for i, part in enumerate(index.partitions):
        file = index.partition_path(i)
        try:
            st = file.stat()
        except FileNotFoundError:
            raise PartitionSizeError(
                f"partition file {file} is missing (listed in {spec.INDEX_FILE})",
                RECONVERT_HINT,
                file=file,
            ) from None
        if not file.is_file():
            raise PartitionSizeError(f"partition {file} is not a regular file", RECONVERT_HINT, file=file)
        if st.st_size != part.size:
            what = "truncated" if st.st_size < part.size else "longer than expected"
            raise PartitionSizeError(
                f"partition file {file} is {what}: {st.st_size} bytes on disk, "
                f"{part.size} in {spec.INDEX_FILE}",
                RECONVERT_HINT,
                file=file,
            )


class _Validator:
    """Small helpers that turn a failed rule into an InvalidIndexError naming the index file."""

    def __init__(self, where: Path) -> None:
        self.where = where

    def fail(self, what: str):
        raise InvalidIndexError(f"{self.where} is invalid: {what}", RECONVERT_HINT)

    def is_int(self, x: object) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    def int_field(self, obj: dict, key: str, *, minimum: int, ctx: str = "") -> int:
        x = obj.get(key)
        if not self.is_int(x):
            self.fail(f'{ctx}"{key}" must be an integer, got {x!r}')
        if x < minimum:
            self.fail(f'{ctx}"{key}" must be at least {minimum}, got {x}')
        return x

    def optional_object(self, obj: dict, key: str) -> dict | None:
        x = obj.get(key)
        if x is not None and not isinstance(x, dict):
            self.fail(f'"{key}" must be a JSON object or null')
        return x

    def plain_name(self, name: object, ctx: str) -> str:
        if not spec.is_plain_name(name):
            raise InvalidIndexError(
                f"{self.where} is invalid: {ctx} has file name {name!r}, which is not a plain "
                "file name inside the checkpoint directory (refused: it could read files elsewhere)",
                "do not load this checkpoint; re-convert the model from a trusted source",
            )
        return name  # type: ignore[return-value]


def _parse_partitions(v: _Validator, raw: object, alignment: int, chunk_bytes: int) -> list[PartitionEntry]:
    if not isinstance(raw, list):
        v.fail('"partitions" must be a list')
    parts: list[PartitionEntry] = []
    seen: set[str] = set()
    for i, p in enumerate(raw):
        ctx = f"partitions[{i}]: "
        if not isinstance(p, dict):
            v.fail(f"{ctx}must be an object")
        file = v.plain_name(p.get("file"), f"partitions[{i}]")
        if file in seen:
            v.fail(f"{ctx}file {file!r} is used by two partitions")
        seen.add(file)
        size = v.int_field(p, "size", minimum=0, ctx=ctx)
        if size % alignment:
            v.fail(f'{ctx}"size" ({size}) is not a multiple of "alignment" ({alignment})')
        sums = p.get("checksums")
        if not isinstance(sums, list):
            v.fail(f'{ctx}"checksums" must be a list')
        expected = -(-size // chunk_bytes)
        if len(sums) != expected:
            v.fail(f"{ctx}has {len(sums)} checksums, expected {expected} for {size} bytes in chunks of {chunk_bytes}")
        for s in sums:
            if not isinstance(s, str) or not _HEX16.fullmatch(s):
                v.fail(f"{ctx}checksum {s!r} is not 16 lowercase hex digits")
        parts.append(PartitionEntry(file=file, size=size, checksums=list(sums)))
    return parts


def _parse_tensors(
    v: _Validator, raw: object, partitions: list[PartitionEntry], alignment: int
) -> dict[str, TensorEntry]:
    if not isinstance(raw, dict):
        v.fail('"tensors" must be an object mapping names to entries')
    tensors: dict[str, TensorEntry] = {}
    for name, t in raw.items():
        ctx = f"tensor {name!r}: "
        if not name:
            v.fail("a tensor has an empty name")
        if not isinstance(t, dict):
            v.fail(f"{ctx}entry must be an object")
        dtype = t.get("dtype")
        if dtype not in spec.DTYPE_ITEMSIZE:
            raise InvalidIndexError(
                f"{v.where} is invalid: {ctx}unknown dtype {dtype!r} "
                f"(format v{spec.FORMAT_VERSION} knows {', '.join(spec.DTYPE_ITEMSIZE)})",
                "upgrade Ember if the checkpoint was written by a newer version, otherwise re-convert it",
            )
        shape = t.get("shape")
        if not isinstance(shape, list) or not all(v.is_int(d) and d >= 0 for d in shape):
            v.fail(f'{ctx}"shape" must be a list of non-negative integers, got {shape!r}')
        part = v.int_field(t, "partition", minimum=0, ctx=ctx)
        if part >= len(partitions):
            v.fail(f'{ctx}"partition" {part} does not exist (there are {len(partitions)})')
        offset = v.int_field(t, "offset", minimum=0, ctx=ctx)
        if offset % alignment:
            v.fail(f'{ctx}"offset" {offset} is not a multiple of "alignment" ({alignment})')
        nbytes = v.int_field(t, "nbytes", minimum=0, ctx=ctx)
        expected = math.prod(shape) * spec.DTYPE_ITEMSIZE[dtype]
        if nbytes != expected:
            v.fail(f'{ctx}"nbytes" is {nbytes}, but shape {shape} of {dtype} needs {expected}')
        if offset + nbytes > partitions[part].size:
            v.fail(
                f"{ctx}bytes {offset}..{offset + nbytes} run past the end of "
                f"{partitions[part].file} ({partitions[part].size} bytes)"
            )
        tensors[name] = TensorEntry(name, dtype, tuple(shape), part, offset, nbytes)

    by_part: dict[int, list[TensorEntry]] = {}
    for t in tensors.values():
        if t.nbytes:
            by_part.setdefault(t.partition, []).append(t)
    for entries in by_part.values():
        entries.sort(key=lambda t: t.offset)
        for a, b in zip(entries, entries[1:]):
            if a.offset + a.nbytes > b.offset:
                v.fail(f"tensors {a.name!r} and {b.name!r} overlap in {partitions[a.partition].file}")
    return tensors


def _parse_aliases(v: _Validator, raw: object, tensors: dict[str, TensorEntry]) -> dict[str, str]:
    if not isinstance(raw, dict):
        v.fail('"aliases" must be an object mapping names to tensor names')
    for alias, target in raw.items():
        if alias in tensors:
            v.fail(f"alias {alias!r} is also a tensor name")
        if not isinstance(target, str) or target not in tensors:
            v.fail(f"alias {alias!r} points to {target!r}, which is not a tensor in the index")
    return dict(raw)
